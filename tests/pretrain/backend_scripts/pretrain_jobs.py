"""Several `ember pretrain` jobs, one after another in the same process(es): alone or under torchrun.

    python pretrain_jobs.py JOBS.json                                   (one process)
    python -m torch.distributed.run --nproc_per_node N pretrain_jobs.py JOBS.json

JOBS.json is a list of {"config": PATH, "sets": ["key=value", ...]}. Each job goes through what `ember pretrain
CONFIG --set ...` runs (load_config, then ember.pretrain.run.pretrain), so a test can compare many runs for the
price of one interpreter and one torchrun start-up per world size: start-up is most of a tiny run's time.
Between jobs the process group stays up (one rendezvous per process, as in a real run) and each job's log file
handler is closed, so every run directory holds its own log only.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

from ember.config import load_config
from ember.logs import setup_logging
from ember.pretrain import distributed
from ember.pretrain.run import pretrain
from ember.run_config import RunConfig


def close_log_files() -> None:
    logger = logging.getLogger("ember")
    for handler in [h for h in logger.handlers if isinstance(h, logging.FileHandler)]:
        logger.removeHandler(handler)
        handler.close()


def main() -> None:
    jobs = json.loads(Path(sys.argv[1]).read_text())
    setup_logging()
    keep_group, distributed.destroy = distributed.destroy, lambda: None
    for job in jobs:
        summary = pretrain(load_config(job["config"], RunConfig, job["sets"], kind="pretrain"))
        assert summary["finished"], job
        close_log_files()
    distributed.destroy = keep_group
    distributed.exit_worker(0)


if __name__ == "__main__":
    main()
