"""Every backend trains exactly like one process.

Through ember's own step and `ember pretrain`'s code path (`parity_runs`): every step's loss and pre-clip gradient norm, and the
final weights, within 1e-4 of the single process at the same global batch, which itself matches a plain PyTorch
loop; with 1 and with 4 micro-batches per rank. Through a backend script on fixed synthetic tokens
(`backend_scripts/train_steps.py`): the initial weights, the optimizer's decay groups, a non-finite step,
bit-identical save/load round trips, activation checkpointing, compile and other architectures.
Real torchrun, 2 processes, gloo, fp32, a tiny model.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent / "backend_scripts"))
sys.path.insert(0, str(Path(__file__).parent))  # pretrain_runs: the shared helper that runs `ember pretrain`
from backend_runs import ALL_BACKENDS, launch, losses, standard_runs  # noqa: E402
from parity_runs import MICRO_SPLITS, PARALLEL_BACKENDS, STEPS, assert_same_training, micro_batch_size  # noqa: E402
from parity_runs import plain_pytorch_run  # noqa: E402
from parity_runs import run as parity_run  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.distributed]

REL_TOL = 1e-4


def assert_close_losses(got: list[float], want: list[float], what: str) -> None:
    assert len(got) == len(want), what
    for step, (g, w) in enumerate(zip(got, want)):
        if math.isnan(w):
            assert math.isnan(g), f"{what}: step {step} should be NaN (poisoned), got {g}"
            continue
        assert abs(g - w) <= REL_TOL * abs(w), f"{what}: step {step} loss {g} vs single-process {w}"


@pytest.mark.parametrize("backend", ALL_BACKENDS.split(","))
def test_losses_match_single_process_at_every_step(backend):
    single, runs = standard_runs()
    reference = losses(single["steps"])
    assert all(math.isfinite(x) for i, x in enumerate(reference) if i != 2)
    # The losses must move, or matching them would prove little.
    assert reference[-1] < reference[0] - 0.1
    for rank, result in enumerate(runs[backend]):
        assert result["world_size"] == 2
        assert_close_losses(losses(result["steps"]), reference, f"{backend} rank {rank}")


@pytest.mark.parametrize("backend", ["single", *ALL_BACKENDS.split(",")])
def test_initial_weights_equal_single_process(backend):
    # FSDP on meta: shards initialised in place would be equal copies; the full weights must be rank 0's init.
    single, runs = standard_runs()
    result = single if backend == "single" else runs[backend][0]
    assert result["init_digest"] == single["init_digest"]


@pytest.mark.parametrize("backend", ALL_BACKENDS.split(","))
def test_optimizer_keeps_the_decay_groups(backend):
    # ZeRO-3 parameters are empty placeholders outside forward: grouping by ndim must still see matrices.
    single, runs = standard_runs()
    assert single["param_groups"] == [["decay", 0.1], ["no_decay", 0.0]]
    assert runs[backend][0]["param_groups"] == single["param_groups"]


@pytest.mark.parametrize("backend", ["single", *ALL_BACKENDS.split(",")])
def test_save_load_round_trip_continues_bit_identically(backend):
    single, runs = standard_runs()
    for result in [single] if backend == "single" else runs[backend]:
        assert losses(result["resumed"]) == losses(result["steps"][3:])
    head = single if backend == "single" else runs[backend][0]
    assert head["resumed_final_digest"] == head["final_digest"]
    assert head["saved_digest"] != head["final_digest"]


def test_activation_checkpointing_keeps_the_losses():
    single, _ = standard_runs()
    ranks = launch(2, "fsdp,deepspeed:3", "--steps", "2", "--ac-every", "1")
    for result in ranks[0]:
        assert result["checkpointed_blocks"] == 2
        assert_close_losses(losses(result["steps"]), losses(single["steps"][:2]), result["backend"])


# --- ember's own training step (fused loss, CPU kernels as configured), `ember pretrain`'s code path ----------


@pytest.fixture(scope="module")
def plain_loop(small_dataset):
    return plain_pytorch_run(small_dataset)


@pytest.mark.parametrize("num_micro", MICRO_SPLITS)
def test_single_process_trains_like_a_plain_pytorch_loop(small_dataset, plain_loop, num_micro):
    # The reference must move and clip, or matching it would prove little.
    assert plain_loop.losses[STEPS] < plain_loop.losses[1] - 0.1
    assert max(plain_loop.grad_norms.values()) > 1.0 > min(plain_loop.grad_norms.values())
    single = parity_run(small_dataset, "single", 1, micro_batch_size(1, num_micro))
    assert_same_training(single, plain_loop, range(1, STEPS + 1), f"single process, {num_micro} micro-batch(es)")


@pytest.mark.parametrize("num_micro", MICRO_SPLITS)
@pytest.mark.parametrize("backend", PARALLEL_BACKENDS)
def test_two_ranks_train_like_one_process(small_dataset, backend, num_micro):
    """Same global batch: every step's loss and pre-clip gradient norm, and the final weights, within 1e-4."""
    single = parity_run(small_dataset, "single", 1, micro_batch_size(1, num_micro))
    parallel = parity_run(small_dataset, backend, 2, micro_batch_size(2, num_micro))
    assert_same_training(parallel, single, range(1, STEPS + 1), f"{backend} on 2 ranks, {num_micro} micro-batch(es)")


def test_compiled_checkpointed_fsdp_blocks_keep_the_losses():
    # The one CPU test with torch.compile (~40 s of compilation): compile per block, then every 2nd block
    # checkpointed, then sharded, must still train like the plain single process.
    single, _ = standard_runs()
    ranks = launch(2, "fsdp", "--steps", "2", "--compile", "--ac-every", "2")
    for result in (rank[0] for rank in ranks):
        assert result["checkpointed_blocks"] == 1
        assert_close_losses(losses(result["steps"]), losses(single["steps"][:2]), "compiled fsdp")


def test_ddp_syncs_the_last_micro_batch_even_when_the_loop_splits_otherwise():
    # The config says 2 micro batches per rank, the loop runs 1 of 4: DDP's forward was told not to sync,
    # so the backend must all-reduce after the last backward itself.
    single, _ = standard_runs()
    ranks = launch(2, "ddp", "--steps", "2", "--loop-micro-batch", "4")
    for result in (rank[0] for rank in ranks):
        assert_close_losses(losses(result["steps"]), losses(single["steps"][:2]), "ddp with another split")


@pytest.mark.parametrize("arch", ["qwen2", "gpt_neox", "mixtral"])
def test_other_architectures_shard_like_one_process(arch):
    # Other HF block and init layouts (biases, parallel residual, experts) through fsdp and ZeRO-3.
    jobs = [f"{b}@{a}" for a in ("qwen2", "gpt_neox", "mixtral") for b in ("fsdp", "deepspeed:3")]
    single = {r["backend"]: r for r in launch(1, "single@qwen2,single@gpt_neox,single@mixtral", "--steps", "2")[0]}
    parallel = {r["backend"]: r for r in launch(2, ",".join(jobs), "--steps", "2")[0]}
    reference = single[f"single@{arch}"]
    for backend in ("fsdp", "deepspeed:3"):
        result = parallel[f"{backend}@{arch}"]
        assert result["init_digest"] == reference["init_digest"], backend
        assert result["param_groups"] == reference["param_groups"], backend
        assert_close_losses(losses(result["steps"]), losses(reference["steps"]), f"{backend} {arch}")
