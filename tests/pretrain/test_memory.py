"""Sharding really divides memory: with fsdp or ZeRO-3 on 2 ranks, each rank holds about half the parameter and
optimizer-state bytes of one process (local shards summed, each storage counted once, fp32 masters included)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent / "backend_scripts"))
from backend_runs import standard_runs  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.distributed]


@pytest.mark.parametrize("backend", ["fsdp", "deepspeed:3"])
def test_fully_sharded_rank_holds_half_of_one_process(backend):
    single, runs = standard_runs()
    whole = single["census"]
    # The tiny test model: ~53k parameters, 3 fp32 copies (weights, Adam's two moments).
    assert whole["optimizer_bytes"] == 2 * whole["param_bytes"]
    for rank, result in enumerate(runs[backend]):
        ratio = result["census"]["total_bytes"] / whole["total_bytes"]
        assert 0.45 <= ratio <= 0.55, f"{backend} rank {rank} holds {ratio:.3f} of one process' bytes"
        param_ratio = result["census"]["param_bytes"] / whole["param_bytes"]
        optim_ratio = result["census"]["optimizer_bytes"] / whole["optimizer_bytes"]
        assert 0.45 <= param_ratio <= 0.55 and 0.45 <= optim_ratio <= 0.55, (backend, rank, param_ratio, optim_ratio)


def test_partial_sharding_holds_what_its_stage_promises():
    single, runs = standard_runs()
    whole = single["census"]
    for backend in ["ddp"]:  # a full replica
        assert runs[backend][0]["census"] == whole
    for backend in ["deepspeed:1", "deepspeed:2"]:
        # Whole weights on every rank, optimizer state (and its fp32 master) split: 1 + 0.5 + 1 of 3 copies.
        census = runs[backend][0]["census"]
        assert census["optimizer_bytes"] == whole["optimizer_bytes"] // 2
        assert abs(census["total_bytes"] / whole["total_bytes"] - 2.5 / 3) < 0.02
