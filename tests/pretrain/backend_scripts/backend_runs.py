"""Launch train_steps.py alone or under real torchrun (gloo) and read back each rank's JSON results.

Launches are cached per argument list for the pytest session, so several test files assert on one run.
"""

from __future__ import annotations

import atexit
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

SCRIPT = Path(__file__).with_name("train_steps.py")
REPO = Path(__file__).resolve().parents[3]
_cache: dict[tuple, list[list[dict]]] = {}
_workdir = Path(tempfile.mkdtemp(prefix="ember-backends-"))
atexit.register(shutil.rmtree, _workdir, ignore_errors=True)

# One run of every backend: 6 steps (4 micro batches per step alone, 2 per rank on 2 ranks), a NaN step at 2,
# a checkpoint at 3 with a fresh-backend round trip.
ALL_BACKENDS = "ddp,fsdp,deepspeed:1,deepspeed:2,deepspeed:3"
STANDARD_ARGS = ("--steps", "6", "--save-at", "3", "--poison-step", "2", "--round-trip")


def workdir() -> Path:
    return _workdir


def launch(nproc: int, jobs: str, *args: str, timeout: float = 600) -> list[list[dict]]:
    """Per rank, the list of job results. nproc 1 runs the script as a plain process (no process group)."""
    key = (nproc, jobs, args)
    if key in _cache:
        return _cache[key]
    out = _workdir / f"run{len(_cache)}.json"
    if nproc == 1:
        cmd = [sys.executable, str(SCRIPT)]
    else:
        # --standalone: torchrun picks a free local port itself (no race with other processes for it).
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc), str(SCRIPT)]
    cmd += ["--jobs", jobs, "--out", str(out), *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    results = [json.loads(Path(f"{out}.rank{r}").read_text()) for r in range(nproc)]
    _cache[key] = results
    return results


def standard_runs() -> tuple[dict, dict[str, list[dict]]]:
    """(the single-process run, {backend: [rank results]}) for STANDARD_ARGS, checkpoints under workdir()."""
    ckpt = ("--ckpt-root", str(_workdir / "ckpt"))
    single = launch(1, "single", *STANDARD_ARGS, *ckpt)[0][0]
    ranks = launch(2, ALL_BACKENDS, *STANDARD_ARGS, *ckpt)
    by_backend = {job["backend"]: [rank[i] for rank in ranks] for i, job in enumerate(ranks[0])}
    return single, by_backend


def losses(records: list[dict]) -> list[float]:
    return [r["loss"] for r in records]
