"""The pieces of the fault contract one by one, in one process: manifest checks, metrics.jsonl repair,
stop signals, the watchdog, exit codes, the fault switches."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest
import torch

from ember.launch.elastic import exit_code
from ember.pretrain import faults
from ember.pretrain.checkpoint import manifest_problem, write_manifest
from ember.pretrain.metrics import Metrics


def test_manifest_names_a_truncated_or_altered_file(tmp_path):
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "__0_0.distcp").write_bytes(bytes(range(256)) * 64)
    (tmp_path / "trainer_state.json").write_text('{"step": 3}')
    write_manifest(tmp_path)
    assert manifest_problem(tmp_path) is None
    shard = tmp_path / "model" / "__0_0.distcp"
    good = shard.read_bytes()
    shard.write_bytes(good[:-10])
    assert manifest_problem(tmp_path) == f"{shard} has {len(good) - 10} bytes, the manifest says {len(good)}"
    shard.write_bytes(good[:100] + bytes([good[100] ^ 1]) + good[101:])
    assert manifest_problem(tmp_path) == f"{shard} does not match its checksum in the manifest"
    shard.unlink()
    assert manifest_problem(tmp_path) == f"{shard} is missing"
    (tmp_path / "manifest.json").write_text("{")
    assert "manifest.json is missing or unreadable" in manifest_problem(tmp_path)


def metrics_at(run_dir, resume_step):
    return Metrics(run_dir, rank=0, world_size=1, device=torch.device("cpu"), max_steps=10, tokens_per_step=1,
                   flops_per_token=1.0, peak_flops=None, resume_step=resume_step)


def test_metrics_survive_a_torn_last_line_and_hold_each_step_once(tmp_path, caplog):
    lines = [json.dumps({"kind": "train", "step": s}) for s in (1, 2, 3, 2, 3, 4)]  # 2-4 written again by a restart
    (tmp_path / "metrics.jsonl").write_text("\n".join(lines) + '\n{"kind": "train", "st')  # killed mid-write
    metrics_at(tmp_path, resume_step=3)
    kept = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in kept] == [1, 2, 3]
    assert "line 7 is not a JSON record" in caplog.text


def test_stop_signals_become_a_request(tmp_path):
    before = signal.getsignal(signal.SIGUSR1)
    with faults.StopSignals() as stop:
        assert stop.received is None
        os.kill(os.getpid(), signal.SIGUSR1)
        assert stop.received == "SIGUSR1"
        assert faults.stop_agreed(True, torch.device("cpu"))  # alone: the own request decides
    assert signal.getsignal(signal.SIGUSR1) is before


def test_watchdog_ends_a_stalled_process_with_its_stacks(tmp_path):
    log = tmp_path / "rank0.log"
    code = ("import time; from ember.pretrain.faults import Watchdog\n"
            f"with Watchdog(1.0, rank=0, log_file=__import__('pathlib').Path({str(log)!r})) as w:\n"
            "    w.beat(7)\n"
            "    time.sleep(60)\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == faults.EXIT_HUNG
    assert "error: rank 0 made no progress for 1 s after step 7 (train.hang_timeout_s=1)" in proc.stderr
    assert "Python stacks of rank 0, hung after step 7" in log.read_text() and "time.sleep" not in proc.stderr


def test_agent_exit_codes():
    assert exit_code({1: 2, 0: -15}) == (2, None)  # a user error: no restart, the worker printed its line
    assert exit_code({0: 143, 1: 143}) == (143, None)  # preempted
    # rank 0 left first and torch's agent ended rank 1 (already past the collective save) with SIGTERM
    assert exit_code({0: 143, 1: -15}) == (143, None)
    assert exit_code({0: 143, 1: 1})[0] == 1  # a crash is not a preemption
    code, line = exit_code({1: -9})
    assert code == 1 and line == "error: worker rank 1 failed (signal 9; its log is run_dir/logs/rank1.log)"


def test_fault_switches_parse_and_act_in_the_first_attempt_only(monkeypatch):
    monkeypatch.setenv(faults.FAULT_ENV, "kill@1:5, stall@0:9")
    assert faults.planned_faults() == [faults.Fault("kill", 1, 5), faults.Fault("stall", 0, 9)]
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
    assert faults.planned_faults() == []
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "0")
    monkeypatch.setenv(faults.FAULT_ENV, "explode@1:5")
    with pytest.raises(ValueError, match="KIND@RANK:STEP"):
        faults.planned_faults()
    monkeypatch.setenv(faults.POISON_ENV, "3, 7-9,12")
    assert faults.poisoned_steps() == {3, 7, 8, 9, 12}
