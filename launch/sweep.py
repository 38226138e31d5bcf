"""Running a sweep's runs: each one `ember pretrain CONFIG` (or `ember launch CONFIG`) in its own process.

Resumable by construction: a run whose metrics.jsonl ends with a finished summary is skipped, and any
other is started again, which resumes it from the newest checkpoint in its run directory.
"""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from ember.errors import UserError
from ember.pretrain.scaling.runs import run_result


def run_command(run: dict, via: str) -> list[str]:
    ember = [sys.executable, "-m", "ember"]
    return [*ember, "launch" if via == "launch" else "pretrain", run["config"]]


def say(line: str) -> None:
    """One line in one write: runs trained side by side (--jobs) report from their own threads."""
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def train_run(run: dict, via: str, index: str = "") -> dict:
    """Train one run of a sweep (skipped when finished); returns its result (params, tokens, loss)."""
    done = run_result(Path(run["run_dir"]))
    if done is not None:
        say(f"{index} {run['name']}: finished before, skipped (val loss {done['loss']:.4f})")
        return done
    resuming = (Path(run["run_dir"]) / "checkpoints").is_dir()
    say(f"{index} {run['name']}: {run['params']:,} params, {run['tokens']:,} tokens, {run['steps']} steps"
        f"{' (resuming from its checkpoint)' if resuming else ''}")
    log = Path(run["run_dir"]).with_suffix(".out")
    log.parent.mkdir(parents=True, exist_ok=True)
    started = time.time()
    with log.open("a") as out:
        code = subprocess.call(run_command(run, via), stdout=out, stderr=subprocess.STDOUT)
    result = run_result(Path(run["run_dir"]))
    if code != 0 or result is None:
        tail = log.read_text().strip().splitlines()[-1:] or ["(no output)"]
        raise UserError(f"sweep run {run['name']} failed with exit code {code}: {tail[0]}", str(log))
    say(f"{index} {run['name']}: val loss {result['loss']:.4f} in {time.time() - started:.0f} s")
    return result


def run_sweep(sweep: dict, via: str = "pretrain", jobs: int = 1) -> list[dict]:
    """Every run of the sweep, started in order (small budgets first), `jobs` of them at a time.

    Each run is its own process, so runs side by side change no loss (a run's result depends on its config
    only); give each one thread (OMP_NUM_THREADS=1) and one job per core. After a run fails no queued run
    starts (as `make -j` does): the runs already training finish, so a rerun skips them, and the first
    failure is raised.
    """
    runs = sweep["runs"]
    labelled = [(run, f"[{i}/{len(runs)}]") for i, run in enumerate(runs, start=1)]
    if jobs <= 1:
        return [train_run(run, via, label) for run, label in labelled]
    failed = threading.Event()

    def train_unless_failed(run: dict, label: str) -> dict | None:
        if failed.is_set():
            return None
        try:
            return train_run(run, via, label)
        except BaseException:
            failed.set()
            raise

    with ThreadPoolExecutor(max_workers=jobs) as pool:
        futures = [pool.submit(train_unless_failed, run, label) for run, label in labelled]
    if failed.is_set():
        not_started = sum(f.exception() is None and f.result() is None for f in futures)
        say(f"a run failed: {not_started} queued run(s) not started; mend it, then `ember scaling sweep` again resumes the rest")
    return [f.result() for f in futures]  # raises the first failed run's error, in sweep order
