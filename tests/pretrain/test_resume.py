"""Stop after step 10 of 20, start again: steps 11-20 and the final weights equal the uninterrupted run's.

`train.stop_after_steps` ends the process after a step (checkpoint saved) without changing the
schedule, which is defined by `train.max_steps`.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).parent))
from pretrain_runs import pretrain, records, train_losses, write_config  # noqa: E402


def final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(run_dir / "hf" / "model.safetensors")


def assert_bit_identical(full: Path, resumed: Path, first: int, last: int) -> None:
    a, b = train_losses(full), train_losses(resumed)
    assert [b[s] for s in range(first, last + 1)] == [a[s] for s in range(first, last + 1)]
    wa, wb = final_weights(full), final_weights(resumed)
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def stop_and_resume(tmp_path: Path, dataset: Path, *sets: str, nproc: int = 0, steps: int = 20) -> tuple[Path, Path]:
    """(uninterrupted run dir, stopped-at-half-then-resumed run dir)."""
    config = write_config(tmp_path / "run.yaml", dataset, tmp_path / "full", max_steps=steps)
    pretrain(config, *sets, nproc=nproc)
    resumed = tmp_path / "resumed"
    pretrain(config, f"run_dir={resumed}", f"train.stop_after_steps={steps // 2}", *sets, nproc=nproc)
    assert max(train_losses(resumed)) == steps // 2 and not (resumed / "hf").exists()
    shutil.copytree(resumed, tmp_path / "at_half")  # kept for resharding tests
    proc = pretrain(config, f"run_dir={resumed}", *sets, nproc=nproc)
    assert f"resumed from {resumed / 'checkpoints' / f'step_{steps // 2:08d}'}" in proc.stderr
    return tmp_path / "full", resumed


def test_single_process_resume_is_bit_identical(tmp_path, small_dataset):
    full, resumed = stop_and_resume(tmp_path, small_dataset, steps=8)
    assert_bit_identical(full, resumed, 5, 8)
    assert records(resumed, "summary")[-1]["resumed_from"] == 4
    # metrics.jsonl holds each step once, across the two processes.
    assert [r["step"] for r in records(resumed, "train")] == list(range(1, 9))


def test_resume_skips_an_unfinished_checkpoint(tmp_path, small_dataset):
    """A directory still named .tmp (a run killed while saving) is never resumed from, and is cleaned up."""
    config = write_config(tmp_path / "run.yaml", small_dataset, tmp_path / "run", max_steps=6, checkpoint_every=2)
    pretrain(config, "train.stop_after_steps=4")
    ckpts = tmp_path / "run" / "checkpoints"
    shutil.copytree(ckpts / "step_00000004", ckpts / "step_00000006.tmp")
    (ckpts / "step_00000004" / "trainer_state.json").unlink()  # as if killed before the state was written
    proc = pretrain(config)
    assert "resumed from" in proc.stderr and "step_00000002" in proc.stderr
    assert not (ckpts / "step_00000006.tmp").exists() and (ckpts / "latest").read_text().strip() == "step_00000006"


def assert_continues_on_one_rank(tmp_path: Path, full: Path, *sets: str, steps: int = 20) -> None:
    """The 2-rank checkpoint of the half-way step continues on 1 rank (same global batch, twice the accumulation)
    with the losses of the uninterrupted 2-rank run."""
    one_rank = tmp_path / "at_half"
    proc = pretrain(tmp_path / "run.yaml", f"run_dir={one_rank}", *sets, nproc=1)
    assert "resumed from" in proc.stderr
    two, one = train_losses(full), train_losses(one_rank)
    for step in range(steps // 2 + 1, steps + 1):
        assert one[step] == pytest.approx(two[step], rel=1e-4), step


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("backend", ["fsdp", "deepspeed"])
def test_resume_is_bit_identical_and_reshards_to_one_rank(tmp_path, small_dataset, backend):
    full, resumed = stop_and_resume(tmp_path, small_dataset, f"train.backend={backend}", nproc=2)
    assert_bit_identical(full, resumed, 11, 20)
    assert_continues_on_one_rank(tmp_path, full, f"train.backend={backend}")
    if backend == "deepspeed":  # ZeRO-3 on another world size: DeepSpeed's universal format, written once
        assert (tmp_path / "at_half" / "checkpoints" / "step_00000010" / "universal" / "latest_universal").is_file()


@pytest.mark.slow
@pytest.mark.distributed
def test_zero2_checkpoint_reshards_to_one_rank(tmp_path, small_dataset):
    sets = ("train.backend=deepspeed", "train.zero_stage=2")
    full, _ = stop_and_resume(tmp_path, small_dataset, *sets, nproc=2, steps=8)
    assert_continues_on_one_rank(tmp_path, full, *sets, steps=8)
