"""`ember report RUN_DIR`: loss, learning-rate and throughput curves of one run, as PNGs in RUN_DIR/report/."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ember.errors import UserError


def read_records(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        raise UserError("no metrics.jsonl: not a run directory, or the run has not logged yet", str(run_dir))
    records = []
    for line_no, line in enumerate(path.read_text().splitlines(), start=1):
        if line.strip():
            try:
                records.append(json.loads(line))
            except ValueError:
                raise UserError("unreadable line in metrics.jsonl", f"{path}:{line_no}") from None
    if not any(r.get("kind") == "train" for r in records):
        raise UserError("metrics.jsonl holds no train records yet", str(path))
    return records


def curve(records: list[dict], kind: str, key: str) -> tuple[list[int], list[float]]:
    pts = [(r["step"], r[key]) for r in records if r.get("kind") == kind and r.get(key) is not None]
    return [p[0] for p in pts], [p[1] for p in pts]


def plot_run(run_dir: Path, out_dir: Path) -> list[Path]:
    from ember.pretrain.scaling.report import pyplot, save

    plt = pyplot()
    records = read_records(run_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    figures = []

    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(*curve(records, "train", "loss"), label="train loss")
    steps, val = curve(records, "eval", "val_loss")
    if steps:
        ax.plot(steps, val, "o-", label="validation loss")
    ax.set(xlabel="step", ylabel="loss (nats)", title=f"{run_dir.name}: loss")
    ax.legend()
    ax.grid(alpha=0.3)
    figures.append(save(fig, out_dir / "loss.png"))

    fig, ax = plt.subplots(figsize=(7, 3))
    ax.plot(*curve(records, "train", "lr"))
    ax.set(xlabel="step", ylabel="learning rate", title=f"{run_dir.name}: learning rate")
    ax.grid(alpha=0.3)
    figures.append(save(fig, out_dir / "lr.png"))

    fig, ax = plt.subplots(figsize=(7, 3))
    ax.plot(*curve(records, "train", "tokens_per_s"), label="all ranks")
    ax.plot(*curve(records, "train", "tokens_per_s_per_device"), label="per device")
    ax.set(xlabel="step", ylabel="tokens / s", title=f"{run_dir.name}: throughput")
    ax.legend()
    ax.grid(alpha=0.3)
    figures.append(save(fig, out_dir / "throughput.png"))
    return figures


def run(args: argparse.Namespace) -> int:
    run_dir = Path(args.run_dir)
    if not run_dir.is_dir():
        raise UserError("run directory not found", str(run_dir))
    figures = plot_run(run_dir, Path(args.out) if args.out else run_dir / "report")
    print("wrote " + ", ".join(str(f) for f in figures))
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("report", help="plot a run's loss, learning rate and throughput (PNGs in RUN_DIR/report/)")
    p.add_argument("run_dir", help="a run directory (holds metrics.jsonl)")
    p.add_argument("--out", help="output directory (default: RUN_DIR/report)")
    p.set_defaults(func=run)
