"""A run's precision and CPU GEMM are decided once: by the machine's facts and a measured probe, on rank 0 for
every rank, recorded in the checkpoint, kept by a resume, and named in the log and the summary record."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from parity_runs import micro_batch_size  # noqa: E402
from parity_runs import run as parity_run  # noqa: E402
from pretrain_runs import pretrain, records, write_config  # noqa: E402

from ember.pretrain import cpu_matmul  # noqa: E402
from ember.pretrain.kernels import auto_precision  # noqa: E402


def kernel_lines(log: Path) -> list[str]:
    return [line.split("kernels: ", 1)[1] for line in log.read_text().splitlines() if "ember.pretrain.kernels" in line]


def recorded(run_dir: Path, step: int) -> dict:
    return json.loads((run_dir / "checkpoints" / f"step_{step:08d}" / "trainer_state.json").read_text())["kernels"]


def test_auto_precision_is_bf16_only_where_the_cpu_has_amx():
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").is_file() else ""
    amx = bool(re.search(r"\bamx_bf16\b", flags))
    assert auto_precision(torch.device("cpu")) == (("bf16", "CPU with AMX") if amx else ("fp32", "CPU without AMX"))
    assert auto_precision(torch.device("cuda", 0))[0] == "bf16"
    assert ("AMX: amx_bf16" if amx else "AMX: no") in cpu_matmul.describe_cpu()


@pytest.mark.slow
@pytest.mark.distributed
def test_every_rank_uses_rank_zeros_choice_and_the_checkpoint_records_it(small_dataset):
    run = parity_run(small_dataset, "fsdp", 2, micro_batch_size(2, 1)).run_dir  # precision pinned fp32, GEMM auto
    rank0, rank1 = kernel_lines(run / "logs" / "rank0.log"), kernel_lines(run / "logs" / "rank1.log")
    assert len(rank0) == 1 and rank0 == rank1
    assert "precision fp32 (train.precision)" in rank0[0] and "probe: oneDNN" in rank0[0]
    summary = records(run, "summary")[-1]
    assert recorded(run, 6) == {"precision": summary["precision"], "cpu_matmul": summary["cpu_matmul"]}
    assert summary["precision"] == "fp32" and f"CPU GEMM {summary['cpu_matmul']} " in rank0[0]


@pytest.mark.slow
def test_a_resumed_run_keeps_the_recorded_choice(tmp_path, small_dataset):
    """Recorded torch's GEMM, resumed with `auto`: the checkpoint's choice stands (whatever a probe would say now),
    so the resumed steps run the kernels the first steps ran."""
    config = write_config(tmp_path / "run.yaml", small_dataset, tmp_path / "run", max_steps=4, precision="auto")
    pretrain(config, "train.cpu_matmul=torch", "train.stop_after_steps=2")
    expected_precision = auto_precision(torch.device("cpu"))[0]
    assert recorded(tmp_path / "run", 2) == {"precision": expected_precision, "cpu_matmul": "torch"}
    pretrain(config)  # cpu_matmul: auto
    lines = kernel_lines(tmp_path / "run" / "logs" / "rank0.log")
    assert len(lines) == 2 and f"precision {expected_precision} (kept from the checkpoint)" in lines[1]
    if expected_precision == "fp32":  # the GEMM choice only exists in fp32
        assert "CPU GEMM torch (kept from the checkpoint)" in lines[1]
    assert records(tmp_path / "run", "summary")[-1]["cpu_matmul"] == "torch"
    assert recorded(tmp_path / "run", 4) == recorded(tmp_path / "run", 2)
