"""How long the CLI takes before it does any work: `ember --help` and `ember config show`.

Baseline, in the same invocation: a bare `python -c pass`. The ratio shows what ember's own
imports cost; heavy libraries (torch, transformers, datasets) must load only in the commands
that need them.

    .venv/bin/python bench/cli_startup.py [--repeats 10]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def best_of(cmd: list[str], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        subprocess.run(cmd, cwd=REPO, check=True, capture_output=True)
        times.append(time.perf_counter() - t0)
    return min(times), statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=10, help="runs per command (best and median reported)")
    args = parser.parse_args()
    base, _ = best_of([sys.executable, "-c", "pass"], args.repeats)
    print(f"{'command':40s} {'best s':>8s} {'median s':>9s} {'x python':>9s}")
    print(f"{'python -c pass (baseline)':40s} {base:8.3f}")
    for label, cmd in [
        ("ember --help", ["-m", "ember", "--help"]),
        ("ember config show tiny.yaml", ["-m", "ember", "config", "show", "configs/pretrain/tiny.yaml"]),
    ]:
        best, median = best_of([sys.executable, *cmd], args.repeats)
        print(f"{label:40s} {best:8.3f} {median:9.3f} {best / base:9.1f}")


if __name__ == "__main__":
    main()
