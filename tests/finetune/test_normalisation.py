"""The loss of a masked batch is normalised by its supervised targets over the whole global batch.

The same unevenly masked global batch, stepped at world size 1, 2 and 4 (real torchrun, gloo, ddp) and with 1 or
4 micro-batches per rank, must give the same loss and the same gradients, with the plain and the fused loss.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).with_name("masked_step.py")
REPO = Path(__file__).resolve().parents[2]

# (world size, micro-batch rows): 8 rows in all.
LAYOUTS = [(1, 8), (1, 2), (2, 1), (4, 2)]


def run_layout(tmp_path: Path, world: int, micro: int) -> dict:
    out = tmp_path / f"w{world}_m{micro}.pt"
    cmd = [sys.executable, str(SCRIPT)] if world == 1 else \
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(world), str(SCRIPT)]
    proc = subprocess.run([*cmd, "--micro-batch", str(micro), "--out", str(out)], cwd=REPO, capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return torch.load(out, weights_only=True)


@pytest.fixture(scope="module")
def layouts(tmp_path_factory) -> dict:
    tmp = tmp_path_factory.mktemp("norm")
    return {(w, m): run_layout(tmp, w, m) for w, m in LAYOUTS}


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("loss", ["plain", "fused"])
def test_masked_batch_gives_the_same_loss_and_gradients_at_every_layout(layouts, loss):
    reference = layouts[LAYOUTS[0]][loss]
    # Rows 0..7 keep 12, 10, 8, 6, 4, 2, 0, 0 targets: the global count is what every layout divides by.
    assert reference["num_targets"] == 42
    for layout in LAYOUTS[1:]:
        got = layouts[layout][loss]
        assert got["num_targets"] == 42, layout
        assert got["loss"] == pytest.approx(reference["loss"], abs=1e-6), layout
        assert got["grad_norm"] == pytest.approx(reference["grad_norm"], abs=1e-6), layout
        for name, grad in reference["grads"].items():
            assert torch.allclose(got["grads"][name], grad, atol=1e-6, rtol=0), (layout, name)


@pytest.mark.slow
@pytest.mark.distributed
def test_plain_and_fused_losses_agree(layouts):
    plain, fused = layouts[LAYOUTS[0]]["plain"], layouts[LAYOUTS[0]]["fused"]
    assert fused["loss"] == pytest.approx(plain["loss"], abs=1e-5)
    for name, grad in plain["grads"].items():
        assert torch.allclose(fused["grads"][name], grad, atol=1e-5), name
