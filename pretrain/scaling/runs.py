"""The points a law is fitted to: (params, tokens, loss) of finished runs, of a sweep, or of a CSV file."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import yaml

from ember.errors import UserError


def run_result(run_dir: Path) -> dict | None:
    """params (embeddings included), tokens seen, final validation loss of a finished run; None if unfinished."""
    from ember.pretrain.accounting import count_params
    from ember.pretrain.config import ModelConfig

    run_dir = Path(run_dir)
    metrics, config = run_dir / "metrics.jsonl", run_dir / "config.yaml"
    if not metrics.is_file() or not config.is_file():
        return None
    records = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    summary = next((r for r in reversed(records) if r.get("kind") == "summary"), None)
    evals = [r for r in records if r.get("kind") == "eval" and r.get("val_loss") is not None]
    if summary is None or not summary.get("finished") or not evals:
        return None
    model = ModelConfig(**yaml.safe_load(config.read_text())["model"])
    params = count_params(model)["total"]
    tokens = summary["tokens_seen"]
    return {"run_dir": str(run_dir), "name": run_dir.name, "params": params, "tokens": tokens, "flops": 6.0 * params * tokens,
            "loss": evals[-1]["val_loss"], "step": summary["step"], "train_seconds": summary.get("train_seconds")}


def results_of_runs(run_dirs: list[Path]) -> list[dict]:
    rows = []
    for d in run_dirs:
        if not Path(d).is_dir():
            raise UserError("not a run directory", str(d))
        row = run_result(Path(d))
        if row is None:
            raise UserError("the run has not finished (no summary with finished: true and a validation loss in metrics.jsonl)", str(d))
        rows.append(row)
    return rows


def results_of_sweep(sweep: dict) -> tuple[list[dict], list[str]]:
    """Finished runs of a sweep (with their budget and size), and the names of those not finished."""
    rows, missing = [], []
    for run in sweep["runs"]:
        row = run_result(Path(run["run_dir"]))
        if row is None:
            missing.append(run["name"])
        else:
            rows.append({**row, "name": run["name"], "size": run["size"], "budget": run["budget"]})
    return rows, missing


def results_of_csv(path: Path) -> list[dict]:
    """Rows of a CSV with columns params, tokens, loss (and optionally flops)."""
    path = Path(path)
    if not path.is_file():
        raise UserError("CSV file not found", str(path))
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        missing = [c for c in ("params", "tokens", "loss") if c not in (reader.fieldnames or [])]
        if missing:
            raise UserError(f"CSV lacks column(s) {', '.join(missing)} (columns: params,tokens,loss[,flops])", str(path))
        rows = []
        for line, record in enumerate(reader, start=2):
            try:
                row = {k: float(record[k]) for k in ("params", "tokens", "loss")}
            except (TypeError, ValueError):
                raise UserError("params, tokens and loss must be numbers", f"{path}:{line}") from None
            if not all(math.isfinite(v) and v > 0 for v in row.values()):
                bad = next(k for k, v in row.items() if not (math.isfinite(v) and v > 0))
                raise UserError(f"{bad} must be finite and positive, got {record[bad]}", f"{path}:{line}")
            flops = record.get("flops")
            row["flops"] = float(flops) if flops not in (None, "") else 6.0 * row["params"] * row["tokens"]
            row["name"] = f"row{line}"
            rows.append(row)
    return rows
