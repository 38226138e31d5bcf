"""Non-finite guard: a poisoned step (EMBER_POISON_STEP, a fault-injection switch) is skipped, counted, and the
run goes on; `train.max_nonfinite_steps` poisoned steps in a row stop the run with one clear error."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from ember_cli import run_ember  # noqa: E402
from pretrain_runs import pretrain, records, write_config  # noqa: E402


def weights(ckpt: Path) -> dict[str, torch.Tensor]:
    from ember.pretrain.backends import load_full_weights

    return load_full_weights(ckpt)


def check_one_skipped_step(run: Path, poisoned: int, max_steps: int) -> None:
    train = {r["step"]: r for r in records(run, "train")}
    assert train[poisoned]["loss"] is None and train[poisoned]["grad_norm"] is None  # NaN is written as null
    assert [train[s]["skipped_steps"] for s in sorted(train)] == [0 if s < poisoned else 1 for s in sorted(train)]
    assert all(train[s]["loss"] is not None for s in train if s != poisoned)
    summary = records(run, "summary")[-1]
    assert summary["finished"] and summary["step"] == max_steps and summary["skipped_steps"] == 1


def test_a_poisoned_step_is_skipped_without_an_update(tmp_path, small_dataset):
    config = write_config(tmp_path / "run.yaml", small_dataset, tmp_path / "run", max_steps=5, checkpoint_every=1, keep_last=5)
    proc = pretrain(config, env={"EMBER_POISON_STEP": "3"})
    assert "step 3: loss nan" in proc.stderr and "update skipped (1 in a row, 1 in all)" in proc.stderr
    check_one_skipped_step(tmp_path / "run", poisoned=3, max_steps=5)
    ckpts = tmp_path / "run" / "checkpoints"
    before, after, next_step = (weights(ckpts / f"step_0000000{s}") for s in (2, 3, 4))
    assert all(torch.equal(before[k], after[k]) for k in before)  # step 3 changed nothing
    assert not all(torch.equal(after[k], next_step[k]) for k in after)  # step 4 trained again


def test_consecutive_non_finite_steps_stop_the_run_with_a_clear_error(tmp_path, small_dataset):
    config = write_config(tmp_path / "run.yaml", small_dataset, tmp_path / "run", max_steps=10, max_nonfinite_steps=3)
    proc = run_ember("pretrain", str(config), env={"EMBER_POISON_STEP": "2-4"})
    assert proc.returncode == 2, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: 3 consecutive steps had a non-finite loss or gradient norm") and "step 4" in last
    assert "Traceback" not in proc.stderr
    assert [r["step"] for r in records(tmp_path / "run", "train")] == [1, 2, 3, 4]


@pytest.mark.slow
@pytest.mark.distributed
def test_ranks_agree_to_skip_a_step_poisoned_on_rank_0(tmp_path, small_dataset):
    # Through the CLI on fsdp; every backend's agreement (DeepSpeed's ZeRO stages included) is checked on the
    # backend script's standard runs (test_backends.py: test_nan_on_one_rank_skips_the_step_everywhere...).
    config = write_config(tmp_path / "run.yaml", small_dataset, tmp_path / "run", max_steps=5, checkpoint_every=1, keep_last=5)
    pretrain(config, "train.backend=fsdp", nproc=2, env={"EMBER_POISON_STEP": "2"})
    check_one_skipped_step(tmp_path / "run", poisoned=2, max_steps=5)
    ckpts = tmp_path / "run" / "checkpoints"
    before, after = weights(ckpts / "step_00000001"), weights(ckpts / "step_00000002")
    assert all(torch.equal(before[k], after[k]) for k in before)
