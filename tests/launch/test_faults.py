"""The fault contract, on real torchrun workers (2 CPU ranks, gloo, fp32) started by `ember launch --scheduler local`.

Every faulty run is compared with one uninterrupted run of the same config: its final weights (the HF
export) bit for bit, and its metrics.jsonl (each step exactly once). Faults come from the switches in
`pretrain/faults.py` (EMBER_FAULT), which act in a job's first attempt only.
"""

from __future__ import annotations

import random
import re
import shutil
import subprocess
import time

import pytest
from ember_cli import free_port, run_ember
from launch_runs import assert_bit_identical, error_lines, launch, tiny_config, train_losses, train_steps

pytestmark = [pytest.mark.slow, pytest.mark.distributed]

EXIT_PREEMPTED, EXIT_USER_ERROR = 143, 2


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return tmp_path_factory.mktemp("faults")


@pytest.fixture(scope="module")
def reference(runs, small_dataset):
    """The uninterrupted fsdp run every faulty one is compared with."""
    config = tiny_config(runs, small_dataset, "reference", backend="fsdp")
    proc = launch(config)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert train_steps(runs / "reference") == list(range(1, 9))
    return runs / "reference"


def test_two_nodes_started_as_printed_match_one_node(runs, small_dataset, reference):
    config = tiny_config(runs, small_dataset, "two-nodes", backend="fsdp")
    printed = run_ember("launch", str(config), "--scheduler", "torchrun", "--nodes", "2", "--procs-per-node", "1",
                        "--rdzv-endpoint", f"127.0.0.1:{free_port()}")
    assert printed.returncode == 0, printed.stderr
    script = runs / "two-nodes" / "launch" / "torchrun.sh"
    assert script.read_text().splitlines()[-1] in printed.stdout
    nodes = [subprocess.Popen(["bash", str(script)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for _ in range(2)]
    outputs = [node.communicate(timeout=600)[0] for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], outputs[0][-2000:] + outputs[1][-2000:]
    got, want = train_losses(runs / "two-nodes"), train_losses(reference)
    assert got.keys() == want.keys()
    assert max(abs(got[s] - want[s]) for s in want) <= 1e-6


@pytest.mark.parametrize("backend", ["fsdp", "deepspeed"])
def test_sigkill_restarts_and_finishes_bit_exact(runs, small_dataset, reference, backend):
    rng = random.Random(backend)
    kill_step = rng.choice([4, 5, 7])  # between the checkpoints at 3 and 6
    rank = rng.choice([0, 1])
    config = tiny_config(runs, small_dataset, f"kill-{backend}", backend=backend)
    proc = launch(config, "--max-restarts", "2", env={"EMBER_FAULT": f"kill@{rank}:{kill_step}"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    run_dir = runs / f"kill-{backend}"
    assert f"fault injection (EMBER_FAULT): kill at step {kill_step}" in proc.stderr
    assert "resumed from" in proc.stderr, "the restarted workers must resume from a checkpoint"
    assert train_steps(run_dir) == list(range(1, 9)), "every step exactly once"
    if backend == "fsdp":
        assert_bit_identical(run_dir, reference)
    else:
        ds_reference = tiny_config(runs, small_dataset, "reference-deepspeed", backend="deepspeed")
        assert launch(ds_reference).returncode == 0
        assert_bit_identical(run_dir, runs / "reference-deepspeed")


@pytest.fixture(scope="module")
def preempted(runs, small_dataset):
    """A run whose rank 1 got SIGTERM at step 5: every rank stops after step 5 with its checkpoint."""
    config = tiny_config(runs, small_dataset, "preempted", backend="fsdp")
    proc = launch(config, env={"EMBER_FAULT": "term@1:5"})
    return config, proc


def test_sigterm_checkpoints_the_agreed_step_and_resumes(runs, reference, preempted):
    config, proc = preempted
    run_dir = runs / "preempted"
    assert proc.returncode == EXIT_PREEMPTED, proc.stderr[-3000:]
    assert "every rank stopped after step 5 with its checkpoint saved" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert sorted(p.name for p in (run_dir / "checkpoints").glob("step_*")) == ["step_00000003", "step_00000005"]
    assert train_steps(run_dir) == [1, 2, 3, 4, 5]
    shutil.copytree(run_dir, runs / "preempted-copy")  # for the corruption test
    proc = launch(config)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resumed from" in proc.stderr and "(step 5)" in proc.stderr
    assert train_steps(run_dir) == list(range(1, 9)), "no step lost, none repeated"
    assert_bit_identical(run_dir, reference)


@pytest.mark.parametrize("damage", ["flip"])
def test_damaged_newest_checkpoint_falls_back_to_the_previous(runs, small_dataset, reference, preempted, damage):
    source = runs / "preempted-copy"
    if not source.is_dir():
        pytest.skip("needs the preempted run of test_sigterm_checkpoints_the_agreed_step_and_resumes")
    run_dir = runs / "corrupt"
    shutil.copytree(source, run_dir)
    config = tiny_config(runs, small_dataset, "corrupt", backend="fsdp")
    victim = max((run_dir / "checkpoints" / "step_00000005").rglob("*.distcp"), key=lambda p: p.stat().st_size)
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0xFF
    victim.write_bytes(bytes(data))
    proc = launch(config)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert re.search(rf"checkpoint step_00000005 is damaged \(\S*{victim.name} does not match its checksum", proc.stderr), \
        proc.stderr[-3000:]
    assert "(step 3)" in proc.stderr
    assert train_steps(run_dir) == list(range(1, 9))
    assert_bit_identical(run_dir, reference)


def test_hang_watchdog_ends_the_rank_and_the_job_resumes(runs, small_dataset, reference):
    timeout_s = 5
    config = tiny_config(runs, small_dataset, "hang", backend="fsdp", hang_timeout_s=timeout_s)
    proc = launch(config, "--max-restarts", "1", env={"EMBER_FAULT": "stall@1:5"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    match = re.search(r"error: rank 1 made no progress for (\d+) s after step 4 \(train.hang_timeout_s=5\)", proc.stderr)
    assert match, proc.stderr[-3000:]
    assert timeout_s <= int(match.group(1)) <= timeout_s + 3
    log = (runs / "hang" / "logs" / "rank1.log").read_text()
    assert "Python stacks of rank 1, hung after step 4" in log and "in inject" in log  # where it hung
    assert train_steps(runs / "hang") == list(range(1, 9))
    assert_bit_identical(runs / "hang", reference)


def test_user_error_on_one_rank_ends_every_rank_quietly(runs, small_dataset):
    config = tiny_config(runs, small_dataset, "user-error", backend="fsdp", collective_timeout_s=120)
    started = time.monotonic()
    proc = launch(config, "--max-restarts", "2", env={"EMBER_FAULT": "error@1:4"})
    elapsed = time.monotonic() - started
    assert proc.returncode == EXIT_USER_ERROR, proc.stderr[-3000:]
    assert error_lines(proc.stderr) == ["error: injected user error on rank 1 at step 4 (EMBER_FAULT)"], proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and "ChildFailedError" not in proc.stderr
    assert "resumed from" not in proc.stderr, "a user error is not restarted"
    assert elapsed < 120, "the job must not wait for the collective timeout"


def test_worker_with_a_missing_dataset_stops_at_once(runs, small_dataset, tmp_path):
    """A worker started by hand (the torchrun command `ember launch` prints) does not prepare data."""
    config = tiny_config(runs, small_dataset, "no-data", backend="fsdp")
    config.write_text(config.read_text().replace(str(small_dataset), str(tmp_path / "missing")))
    printed = run_ember("launch", str(config), "--scheduler", "torchrun", "--procs-per-node", "2",
                        "--rdzv-endpoint", f"127.0.0.1:{free_port()}", "--dry-run")
    assert printed.returncode == 0, printed.stderr
    script = runs / "no-data" / "launch" / "torchrun.sh"
    proc = subprocess.run(["bash", str(script)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == EXIT_USER_ERROR, proc.stderr[-3000:]
    lines = error_lines(proc.stderr)
    assert len(lines) == 1 and "workers do not prepare data" in lines[0] and "ember launch" in lines[0], proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
