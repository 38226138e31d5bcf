"""One live job per run directory: an advisory lock on `run_dir/.lock`, released when its holder dies.

`flock` locks belong to the open file: a killed job frees its run directory by itself, so a
restart or a requeue never finds a stale lock. The holder's pid is written inside for the error line.
`ember launch` holds the lock for the workers it starts and tells them so (`HELD_ENV`); a job
started otherwise takes it on rank 0 (`pretrain`).
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

from ember.errors import UserError

LOCK_FILE = ".lock"
HELD_ENV = "EMBER_RUN_DIR_LOCKED"  # the run directory whose lock a parent process holds


def _in_use(run_dir: Path) -> UserError:
    try:
        holder = (run_dir / LOCK_FILE).read_text().strip()
    except OSError:
        holder = "?"
    return UserError(f"the run directory is in use by another live job (pid {holder or '?'}); wait for it, or use another run_dir",
                     str(run_dir))


def check_free(run_dir: Path) -> None:
    """UserError when a live job holds `run_dir`; writes nothing."""
    path = Path(run_dir) / LOCK_FILE
    if not path.is_file():
        return
    with open(path) as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise _in_use(Path(run_dir)) from None


def hold(run_dir: Path):
    """Take the lock of `run_dir` for the life of this process (returns the open file that holds it)."""
    run_dir = Path(run_dir)
    if os.environ.get(HELD_ENV) == str(run_dir.resolve()):
        return None
    run_dir.mkdir(parents=True, exist_ok=True)
    f = open(run_dir / LOCK_FILE, "a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.close()
        raise _in_use(run_dir) from None
    f.truncate(0)
    f.write(f"{os.getpid()}\n")
    f.flush()
    return f
