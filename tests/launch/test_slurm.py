"""A real SLURM (one node, started here): the sbatch script `ember launch --scheduler slurm` writes and submits
trains and exports; the pre-timeout signal makes the workers checkpoint, the script requeues the job, and the
requeued job resumes from that checkpoint. Skipped, with the reason, where the daemons cannot start."""

from __future__ import annotations

import re
import time
from pathlib import Path

import pytest
import slurm_cluster
from ember_cli import run_ember
from launch_runs import tiny_config, train_steps

pytestmark = [pytest.mark.slow, pytest.mark.distributed]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    cluster, why = slurm_cluster.start(tmp_path_factory.mktemp("slurm"))
    if cluster is None:
        print(f"SLURM tests skipped: {why}")
        pytest.skip(why)
    yield cluster
    cluster.stop()


def submit(cluster, config: Path) -> str:
    proc = run_ember("launch", str(config), "--scheduler", "slurm", "--procs-per-node", "2", env=cluster.env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return re.search(r"submitted SLURM job (\d+)", proc.stdout).group(1)


def wait_until(check, timeout_s: float, what: str):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        result = check()
        if result:
            return result
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}")


def finished(cluster, job: str) -> str | None:
    state = cluster.job_state(job)
    return state if state in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY") else None


def test_sbatch_job_trains_and_exports(cluster, tmp_path, small_dataset):
    config = tiny_config(tmp_path, small_dataset, "run", backend="fsdp")
    job = submit(cluster, config)
    state = wait_until(lambda: finished(cluster, job), 600, f"SLURM job {job}")
    log = tmp_path / "run" / "launch" / f"slurm-{job}.out"
    assert state == "COMPLETED", log.read_text()[-3000:]
    assert (tmp_path / "run" / "hf" / "model.safetensors").is_file()
    assert train_steps(tmp_path / "run") == list(range(1, 9))


def test_pre_timeout_signal_checkpoints_requeues_and_resumes(cluster, tmp_path, small_dataset):
    config = tiny_config(tmp_path, small_dataset, "run", backend="fsdp", max_steps=16, checkpoint_every=5)
    job = submit(cluster, config)
    metrics = tmp_path / "run" / "metrics.jsonl"
    wait_until(lambda: metrics.is_file() and len(train_steps(tmp_path / "run")) >= 2, 600, "training to start")
    # What SLURM does signal_before_s before the time limit (--signal=B:USR1@S): USR1 to the batch script.
    assert cluster.run("scancel", "--signal=USR1", "--batch", job).returncode == 0
    log = tmp_path / "run" / "launch" / f"slurm-{job}.out"
    wait_until(lambda: log.is_file() and "(restart 1)" in log.read_text(), 600, "the job to be requeued and start again")
    state = wait_until(lambda: finished(cluster, job), 600, f"requeued SLURM job {job}")
    text = log.read_text()
    assert state == "COMPLETED", text[-3000:]
    stopped = int(re.search(r"every rank stopped after step (\d+) with its checkpoint saved", text).group(1))
    assert "workers exited with code 143" in text
    assert f"resumed from {tmp_path / 'run' / 'checkpoints' / f'step_{stopped:08d}'}" in text
    assert train_steps(tmp_path / "run") == list(range(1, 17)), "no step lost, none repeated"
    assert (tmp_path / "run" / "hf" / "model.safetensors").is_file()
