"""Run the real `ember` CLI, alone or under torchrun, as a user would."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_ember(*args: str, cwd: Path | None = None, env: dict | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    """`python -m ember ARGS`; returns the finished process (stdout/stderr as text)."""
    return subprocess.run(
        [sys.executable, "-m", "ember", *args], cwd=cwd or REPO, env={**os.environ, **(env or {})},
        capture_output=True, text=True, timeout=timeout,
    )


def run_torchrun(nproc: int, *args: str, cwd: Path | None = None, env: dict | None = None, timeout: float = 900) -> subprocess.CompletedProcess:
    """`torchrun --nproc_per_node N -m ember ARGS` on gloo, on a free local port."""
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
        "--master_addr", "127.0.0.1", "--master_port", str(free_port()), "-m", "ember", *args,
    ]
    return subprocess.run(cmd, cwd=cwd or REPO, env={**os.environ, **(env or {})}, capture_output=True, text=True, timeout=timeout)


def run_script(script: Path, *args: str, nproc: int = 1, timeout: float = 900) -> subprocess.CompletedProcess:
    """A Python script of the tests: one plain process (nproc 1), or `nproc` under torchrun on a free local port."""
    launcher = [] if nproc == 1 else ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc)]
    return subprocess.run([sys.executable, *launcher, str(script), *args], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout)
