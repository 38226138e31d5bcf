"""Run metrics: `metrics.jsonl` (rank 0, one JSON object per line) and a compact console line.

Throughput is measured over the steps since the previous record, counting only the time
spent in training steps (evaluation and checkpoint time would otherwise dilute it).
"""

from __future__ import annotations

import json
import logging
import math
import resource
import time
from pathlib import Path

import torch

from ember.pretrain.peak import mfu as model_flops_utilisation

log = logging.getLogger("ember.pretrain.metrics")


def finite_or_none(x: float | None) -> float | None:
    """JSON has no NaN/inf: a non-finite value is written as null."""
    return x if x is not None and math.isfinite(x) else None


def peak_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def human(n: float) -> str:
    for unit in ("", "k", "M", "G"):
        if abs(n) < 1000:
            return f"{n:.1f}{unit}"
        n /= 1000
    return f"{n:.1f}T"


def read_records(path: Path) -> list[dict]:
    """The records of a metrics.jsonl. A line that is not JSON (the last one, torn by a kill mid-write) is
    dropped with a warning: a run must survive the file it wrote when it died."""
    records = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:
            log.warning("%s: line %d is not a JSON record (torn by a process killed while writing it): dropped", path, number)
            continue
        if isinstance(record, dict):
            records.append(record)
    return records


def drop_records_after(path: Path, step: int) -> None:
    """On resume, forget what a stopped run wrote after its last checkpoint, so that every step's train and eval
    records appear once however often the run was restarted (atomic rewrite)."""
    if not path.is_file():
        return
    kept, seen = [], set()
    for record in read_records(path):
        key = (record.get("kind"), record.get("step"))
        if record.get("step", 0) > step or (key[0] != "summary" and key in seen):
            continue
        seen.add(key)
        kept.append(json.dumps(record))
    tmp = path.with_suffix(".jsonl.tmp")
    tmp.write_text("".join(line + "\n" for line in kept))
    tmp.replace(path)


class Metrics:
    """Collects step timings and writes train, eval and summary records (only rank 0 writes)."""

    def __init__(self, run_dir: Path, *, rank: int, world_size: int, device: torch.device, max_steps: int,
                 tokens_per_step: int, flops_per_token: float, peak_flops: float | None, resume_step: int = 0, tracker=None):
        self.path = Path(run_dir) / "metrics.jsonl"
        self.rank, self.world_size, self.device = rank, world_size, device
        self.max_steps, self.tokens_per_step = max_steps, tokens_per_step
        self.flops_per_token, self.peak_flops = flops_per_token, peak_flops
        self.interval_time, self.interval_steps = 0.0, 0
        self.last_train: dict = {}
        self.last_eval: dict = {}
        self.tracker = tracker  # W&B (pretrain/tracking.py) sees every record metrics.jsonl gets
        if rank == 0:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            drop_records_after(self.path, resume_step) if resume_step else self.path.unlink(missing_ok=True)

    def write(self, record: dict) -> None:
        if self.rank == 0:
            with self.path.open("a") as f:
                f.write(json.dumps(record) + "\n")
        if self.tracker is not None:
            self.tracker.log(record)

    def record_step(self, seconds: float) -> None:
        self.interval_time += seconds
        self.interval_steps += 1

    def log_train(self, step: int, *, loss: float, lr: float, grad_norm: float, state, loader) -> dict:
        steps, seconds = max(self.interval_steps, 1), max(self.interval_time, 1e-9)
        self.interval_time, self.interval_steps = 0.0, 0
        tokens_per_s = self.tokens_per_step * steps / seconds
        per_device = tokens_per_s / self.world_size
        mfu = model_flops_utilisation(per_device, self.flops_per_token, self.peak_flops)  # None without a known peak
        record = {
            "kind": "train", "step": step, "loss": finite_or_none(loss), "lr": lr, "grad_norm": finite_or_none(grad_norm),
            "tokens_per_s": tokens_per_s, "tokens_per_s_per_device": per_device, "mfu": mfu,
            "step_time_s": seconds / steps, "peak_mem_bytes": peak_memory_bytes(self.device),
            "tokens_seen": state.tokens_seen, "samples_consumed": loader.state_dict()["samples_consumed"],
            "skipped_steps": state.skipped_steps, "tokens_by_source": dict(state.tokens_by_source), "time": time.time(),
        }
        self.write(record)
        self.last_train = record
        log.info("step %d/%d | loss %.4f | lr %.2e | gnorm %.3f | %s tok/s (%s/dev) | mfu %s | %.3f s/step | mem %s",
                 step, self.max_steps, loss, lr, grad_norm, human(tokens_per_s), human(per_device),
                 f"{100 * mfu:.1f}%" if mfu is not None else "n/a", seconds / steps, human(record["peak_mem_bytes"]) + "B")
        return record

    def log_eval(self, step: int, val_loss: float | None) -> dict | None:
        if val_loss is None:  # no validation split
            return None
        val_ppl = math.exp(val_loss) if val_loss < 700 else math.inf
        record = {"kind": "eval", "step": step, "val_loss": finite_or_none(val_loss), "val_ppl": finite_or_none(val_ppl), "time": time.time()}
        self.write(record)
        self.last_eval = record
        log.info("eval step %d | val loss %.4f | val ppl %.2f", step, val_loss, val_ppl)
        return record

    def log_summary(self, summary: dict) -> None:
        self.write({"kind": "summary", **summary, "time": time.time()})
