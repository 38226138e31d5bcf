"""Memory per rank, measured in real runs (2 processes on gloo, and one alone): every tensor each backend holds,
counted by category (pretrain/memory.py), against what each backend promises and against `ember estimate`'s
formulas (pretrain/accounting.py) within 10%."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from ember.pretrain import accounting

sys.path.insert(0, str(Path(__file__).parent))
from memory_runs import ALL_BACKENDS, measured, run_config  # noqa: E402
from pretrain_runs import records, trained_run  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.distributed]

STATE = ("weights", "grads", "optimizer")
FORMULA_NAME = {"fsdp": "fsdp", "ddp": "ddp", "deepspeed:1": "zero1", "deepspeed:2": "zero2", "deepspeed:3": "zero3"}


def held(result: dict) -> dict[str, int]:
    """Each category's most at any micro-batch boundary of the step (gradients peak before the last reduction)."""
    return result["held_maxima"]


def test_each_backend_holds_what_its_sharding_promises():
    whole = held(measured(1, "single")["single"][0])
    runs = measured(2, ALL_BACKENDS)
    n_bytes = whole["weights"]  # 4 bytes per parameter, fp32
    assert whole["grads"] == n_bytes and whole["optimizer"] == 2 * n_bytes  # AdamW's two moments
    for rank in (0, 1):
        fsdp, ddp = held(runs["fsdp"][rank]), held(runs["ddp"][rank])
        z1, z2, z3 = (held(runs[f"deepspeed:{s}"][rank]) for s in (1, 2, 3))
        assert {k: ddp[k] for k in STATE} == {k: whole[k] for k in STATE}  # a full replica
        for k in STATE:  # fully sharded: half of everything (FSDP2 pads a shard by a few rows at most)
            assert fsdp[k] == pytest.approx(whole[k] / 2, rel=0.01), ("fsdp", k)
            assert z3[k] == pytest.approx(whole[k] / 2, rel=0.01), ("zero3", k)
        # ZeRO-1 and -2: whole weights; the optimizer state is half of (fp32 master + two moments) = 12 bytes each.
        for z in (z1, z2):
            assert z["weights"] == whole["weights"]
            assert z["optimizer"] == pytest.approx(12 / 4 * whole["weights"] / 2, rel=0.01)
        # ZeRO-1 holds whole gradients until the last micro-batch; ZeRO-2 reduces each into its partition.
        assert z1["grads"] == pytest.approx(whole["grads"], rel=0.01)
        assert z2["grads"] < 0.7 * z1["grads"]


def test_steady_state_and_peak_are_both_measured():
    runs = measured(2, ALL_BACKENDS)
    for spec, ranks in runs.items():
        for result in ranks:
            state, after = result["state"], result["after_step"]
            assert after["optimizer"] == state["optimizer"] > 0 and after["weights"] == state["weights"]
            # everything held at once, plus activations and the collectives' buffers during the step
            assert result["peak_bytes"] > state["total"], spec
    # the torch backends free their gradients after the update; ZeRO-3 keeps its flat gradient partition
    assert runs["fsdp"][0]["after_step"]["grads"] == 0
    assert runs["deepspeed:3"][0]["after_step"]["grads"] == runs["deepspeed:3"][0]["state"]["grads"]


@pytest.mark.parametrize("spec", ["fsdp", "deepspeed:1", "deepspeed:2", "deepspeed:3"])
def test_estimate_is_within_ten_percent_of_the_measurement(spec):
    cfg = run_config()
    formula = accounting.memory_per_rank(cfg, 2, on_gpu=False, backend=FORMULA_NAME[spec])
    for rank, result in enumerate(measured(2, ALL_BACKENDS)[spec]):
        for k in STATE:
            assert formula[k] == pytest.approx(held(result)[k], rel=0.10), (spec, rank, k)
        assert sum(formula[k] for k in STATE) == pytest.approx(sum(held(result)[k] for k in STATE), rel=0.10)


def test_a_run_records_the_memory_it_held(small_dataset, tmp_path_factory):
    run_dir = trained_run(small_dataset, tmp_path_factory)  # one process, fp32, shared with test_loop
    held_bytes = records(run_dir, "summary")[-1]["memory_bytes"]
    assert held_bytes["weights"] > 0 and held_bytes["grads"] == held_bytes["weights"]  # after a backward
    assert held_bytes["optimizer"] == 2 * held_bytes["weights"]
    log = (run_dir / "logs" / "rank0.log").read_text()
    assert "memory held by this rank" in log
