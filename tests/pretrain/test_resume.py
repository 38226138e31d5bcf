"""Resume: stopped and started again, a run continues bit for bit; on another world size (fsdp, ZeRO-1/2/3:
1 -> 2, 2 -> 1, 2 -> 4 ranks) within 1e-4 of the run that kept its world size.

`train.stop_after_steps` ends the process after a step (checkpoint saved) without changing the
schedule, which is defined by `train.max_steps`. A multi-rank resume on the same world size is bit-identical
for every backend in test_parity (the backend script's save/load round trip) and, through `ember launch`
after a SIGKILL, for fsdp and DeepSpeed in tests/launch/test_faults.py.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).parent))
from parity_runs import RESHARDED, STEPS, assert_same_training, micro_batch_size  # noqa: E402
from parity_runs import config as parity_config  # noqa: E402
from parity_runs import run as parity_run  # noqa: E402
from pretrain_runs import pretrain, records, train_losses  # noqa: E402


def final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(run_dir / "hf" / "model.safetensors")


def assert_bit_identical(full: Path, resumed: Path, first: int, last: int) -> None:
    a, b = train_losses(full), train_losses(resumed)
    assert [b[s] for s in range(first, last + 1)] == [a[s] for s in range(first, last + 1)]
    wa, wb = final_weights(full), final_weights(resumed)
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


@pytest.fixture(scope="module")
def stopped_run(small_dataset, tmp_path_factory) -> tuple[Path, Path]:
    """(the parity suite's uninterrupted single-process run, a copy of its job stopped after step 4 by
    `train.stop_after_steps`): 4 micro-batches per step, checkpoints at steps 2 and 4."""
    full = parity_run(small_dataset, "single", 1, micro_batch_size(1, 4)).run_dir
    stopped = tmp_path_factory.mktemp("resume") / "stopped"
    pretrain(parity_config(small_dataset), f"run_dir={stopped}", f"train.micro_batch_size={micro_batch_size(1, 4)}",
             "train.stop_after_steps=4")
    assert max(train_losses(stopped)) == 4 and not (stopped / "hf").exists()
    return full, stopped


def continue_run(dataset: Path, run_dir: Path):
    """The stopped job's command again, on `run_dir`."""
    return pretrain(parity_config(dataset), f"run_dir={run_dir}", f"train.micro_batch_size={micro_batch_size(1, 4)}")


def test_single_process_resume_is_bit_identical(small_dataset, stopped_run, tmp_path):
    full, stopped = stopped_run
    resumed = tmp_path / "resumed"
    shutil.copytree(stopped, resumed)
    proc = continue_run(small_dataset, resumed)
    assert f"resumed from {resumed / 'checkpoints' / 'step_00000004'}" in proc.stderr
    assert_bit_identical(full, resumed, 5, STEPS)
    assert records(resumed, "summary")[-1]["resumed_from"] == 4
    # metrics.jsonl holds each step once, across the two processes.
    assert [r["step"] for r in records(resumed, "train")] == list(range(1, STEPS + 1))


def test_resume_skips_an_unfinished_checkpoint(small_dataset, stopped_run, tmp_path):
    """A directory still named .tmp (a run killed while saving) is never resumed from, and is cleaned up; a
    checkpoint whose trainer state is missing is passed over for the one before it."""
    full, stopped = stopped_run
    run_dir = tmp_path / "run"
    shutil.copytree(stopped, run_dir)
    ckpts = run_dir / "checkpoints"
    shutil.copytree(ckpts / "step_00000004", ckpts / "step_00000006.tmp")
    (ckpts / "step_00000004" / "trainer_state.json").unlink()  # as if killed before the state was written
    proc = continue_run(small_dataset, run_dir)
    assert f"resumed from {run_dir / 'checkpoints' / 'step_00000002'}" in proc.stderr
    assert not (run_dir / "checkpoints" / "step_00000006.tmp").exists()
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == f"step_{STEPS:08d}"
    assert_bit_identical(full, run_dir, 3, STEPS)


# --- resharding: a checkpoint continues on another world size like the run that kept its own --------------------
# Shared base runs (`parity_runs`): the 2-rank runs of the parity suite, one micro-batch per rank, checkpoints at
# steps 2, 4, 6. Each test continues a copy of one from a checkpoint; the global batch stays 8 sequences.


def two_rank_run(dataset: Path, backend: str):
    return parity_run(dataset, backend, 2, micro_batch_size(2, 1))


def two_to_one(dataset: Path, backend: str):
    """The 2-rank run's step-2 checkpoint continued on 1 rank (twice the accumulation)."""
    return parity_run(dataset, backend, 1, micro_batch_size(2, 1), after=(two_rank_run(dataset, backend), 2))


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("backend", RESHARDED)
def test_checkpoint_shrinks_from_two_ranks_to_one(small_dataset, backend):
    two, one = two_rank_run(small_dataset, backend), two_to_one(small_dataset, backend)
    assert_same_training(one, two, range(3, STEPS + 1), f"{backend}: 2 -> 1 rank at step 2")
    if backend.startswith("zero"):  # DeepSpeed's universal format, converted once inside the checkpoint
        assert (one.run_dir / "checkpoints" / "step_00000002" / "universal" / "latest_universal").is_file()


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("backend", RESHARDED)
def test_checkpoint_grows_from_one_rank_to_two(small_dataset, backend):
    one = two_to_one(small_dataset, backend)  # from step 2 on, a 1-rank run: its step-4 checkpoint has 1 rank's shards
    two = parity_run(small_dataset, backend, 2, micro_batch_size(2, 1), after=(one, 4))
    assert_same_training(two, one, range(5, STEPS + 1), f"{backend}: 1 -> 2 ranks at step 4")


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("backend", RESHARDED)
def test_checkpoint_grows_from_two_ranks_to_four(small_dataset, backend):
    two = two_rank_run(small_dataset, backend)
    four = parity_run(small_dataset, backend, 4, micro_batch_size(4, 1), after=(two, 2))
    assert_same_training(four, two, range(3, STEPS + 1), f"{backend}: 2 -> 4 ranks at step 2")
