"""One logging set-up for every command and rank.

Rank 0 logs INFO to the console; other ranks only warnings unless `all_ranks` (or
EMBER_LOG_ALL_RANKS=1). Every rank can add a log file in the run directory.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

FORMAT = "%(asctime)s %(rankname)s%(levelname)s %(name)s: %(message)s"
DATEFMT = "%Y-%m-%d %H:%M:%S"


def current_rank() -> int:
    return int(os.environ.get("RANK", "0"))


class _RankFilter(logging.Filter):
    def __init__(self, rank: int, multi: bool):
        super().__init__()
        self.tag = f"[rank{rank}] " if multi else ""

    def filter(self, record: logging.LogRecord) -> bool:
        record.rankname = self.tag
        return True


def setup_logging(verbose: bool = False, all_ranks: bool | None = None) -> logging.Logger:
    """Configure the `ember` logger for this process (idempotent)."""
    rank = current_rank()
    multi = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if all_ranks is None:
        all_ranks = os.environ.get("EMBER_LOG_ALL_RANKS") == "1"
    logger = logging.getLogger("ember")
    logger.handlers.clear()
    logger.propagate = False
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(FORMAT, DATEFMT))
    handler.addFilter(_RankFilter(rank, multi))
    level = logging.DEBUG if verbose else logging.INFO
    handler.setLevel(level if rank == 0 or all_ranks else logging.WARNING)
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG if verbose else logging.INFO)
    return logger


def add_log_file(run_dir: Path) -> Path:
    """Also log this rank's records (INFO and up) to `run_dir/logs/rank{R}.log`."""
    rank = current_rank()
    path = Path(run_dir) / "logs" / f"rank{rank}.log"
    path.parent.mkdir(parents=True, exist_ok=True)
    logger = logging.getLogger("ember")
    for h in logger.handlers:
        if isinstance(h, logging.FileHandler) and Path(h.baseFilename) == path.resolve():
            return path
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter(FORMAT, DATEFMT))
    handler.addFilter(_RankFilter(rank, True))
    handler.setLevel(logging.INFO)
    logger.addHandler(handler)
    return path
