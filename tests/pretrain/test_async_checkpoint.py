"""`train.async_checkpoint`: DCP checkpoints written in the background give the same runs and files as synchronous ones."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch
from ember_cli import run_ember

sys.path.insert(0, str(Path(__file__).parent))
from pretrain_runs import pretrain, train_losses, write_config  # noqa: E402

from ember.pretrain.backends import load_full_weights  # noqa: E402
from ember.pretrain.backends.dcp_io import begin_save_dcp  # noqa: E402
from ember.pretrain.checkpoint import find_checkpoints  # noqa: E402


def hf_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(run_dir / "hf" / "model.safetensors")


def assert_same_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys() and a
    for name in a:
        assert torch.equal(a[name], b[name]), name


def published(run_dir: Path) -> list[str]:
    """Checkpoint names in run_dir/checkpoints, after checking that nothing unfinished is left and `latest` is the newest."""
    root = run_dir / "checkpoints"
    assert not list(root.glob("*.tmp")), list(root.iterdir())
    names = [p.name for p in find_checkpoints(root)]
    assert (root / "latest").read_text().strip() == names[-1]
    return names


def test_async_save_writes_a_snapshot(tmp_path):
    """What is written is the state when the save began, whatever the optimizer does while the write runs."""
    torch.manual_seed(0)
    model = torch.nn.Linear(64, 64)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.randn(4, 64)).sum().backward()
    optimizer.step()
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    future = begin_save_dcp(model, optimizer, tmp_path / "ckpt", group=None)
    for _ in range(3):  # in-place updates of the live weights and moments while the write may still run
        optimizer.step()
    future.result()
    assert not torch.equal(model.weight.detach(), before["weight"])
    assert_same_tensors(load_full_weights(tmp_path / "ckpt"), before)


def test_async_checkpoint_with_deepspeed_is_a_config_error(tmp_path, small_dataset):
    config = write_config(tmp_path / "run.yaml", small_dataset, tmp_path / "run")
    proc = run_ember("config", "show", str(config), "--set", "train.backend=deepspeed", "--set", "train.async_checkpoint=true")
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and "async_checkpoint" in lines[0], proc.stderr


@pytest.mark.slow
@pytest.mark.distributed
def test_fsdp_async_checkpoints_resume_bit_identical_to_sync(tmp_path, small_dataset):
    common = ("train.backend=fsdp", "train.checkpoint_every=5", "train.keep_last=4")
    config = write_config(tmp_path / "run.yaml", small_dataset, tmp_path / "sync", max_steps=20)
    pretrain(config, *common, nproc=2)

    resumed = tmp_path / "async"
    async_sets = (f"run_dir={resumed}", "train.async_checkpoint=true", *common)
    proc = pretrain(config, *async_sets, "train.stop_after_steps=10", nproc=2)
    assert "saving checkpoint" in proc.stderr and "in the background" in proc.stderr
    # The last background save was published when the process ended (no export: the run stopped early).
    assert published(resumed) == ["step_00000005", "step_00000010"] and not (resumed / "hf").exists()
    proc = pretrain(config, *async_sets, nproc=2)
    assert f"resumed from {resumed / 'checkpoints' / 'step_00000010'}" in proc.stderr

    sync_losses, async_losses = train_losses(tmp_path / "sync"), train_losses(resumed)
    assert [async_losses[s] for s in range(11, 21)] == [sync_losses[s] for s in range(11, 21)]
    assert_same_tensors(hf_weights(resumed), hf_weights(tmp_path / "sync"))
    # Every checkpoint written in the background holds exactly what the synchronous run saved at that step.
    steps = ["step_00000005", "step_00000010", "step_00000015", "step_00000020"]
    assert published(resumed) == steps and published(tmp_path / "sync") == steps
    for name in steps:
        assert_same_tensors(load_full_weights(resumed / "checkpoints" / name),
                            load_full_weights(tmp_path / "sync" / "checkpoints" / name))


def test_a_failing_run_publishes_its_finished_background_save(tmp_path, small_dataset):
    """Steps 6-7 poisoned: the run stops with an error at step 7 while step 5 was still pending; it is published."""
    config = write_config(tmp_path / "run.yaml", small_dataset, tmp_path / "run", max_steps=12, checkpoint_every=5,
                          max_nonfinite_steps=2)
    proc = run_ember("pretrain", str(config), "--set", "train.async_checkpoint=true",
                     env={**os.environ, "EMBER_POISON_STEP": "6-7"})
    assert proc.returncode == 2 and "consecutive steps" in proc.stderr, proc.stderr[-2000:]
    assert published(tmp_path / "run") == ["step_00000005"]
