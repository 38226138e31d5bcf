"""The precision and CPU GEMM a run trains with, decided once: on rank 0, sent to every rank, kept by resumes.

`train.precision: auto` means bf16 autocast on GPUs and on CPUs with AMX (bf16 matmul tiles: ~8x the fp32
matmul rate, 1.8x end to end with the same loss, measured on a Xeon), fp32 elsewhere (AVX-512 bf16 without AMX
runs autocast ~25x slower than fp32, measured on an AMD EPYC). `train.cpu_matmul: auto` means oneDNN's GEMM
where a short measured probe finds it clearly faster than torch's default (`cpu_matmul.onednn_speedup`).

Each rank deciding alone could disagree (a probe is a timing), and a resumed run deciding again could pick
another kernel and lose bit-identity; so rank 0 decides, broadcasts, and every checkpoint records the choice
(`trainer_state.json: kernels`), which a resumed run takes over where the config still says `auto`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from ember.pretrain import cpu_matmul, distributed

log = logging.getLogger("ember.pretrain.kernels")


@dataclass(frozen=True)
class RunKernels:
    precision: str   # "fp32" or "bf16" (autocast): what the backend trains in
    cpu_matmul: str  # "onednn" or "torch": the fp32 CPU GEMM ("torch" wherever oneDNN's kernels do not apply)
    why: str         # how it was decided, for the log

    def to_dict(self) -> dict:
        return {"precision": self.precision, "cpu_matmul": self.cpu_matmul}

    def apply(self, cfg):
        """`cfg` (a run config) with these choices in place of `auto`: what the backend is built from."""
        train = cfg.train.model_copy(update={"precision": self.precision, "cpu_matmul": self.cpu_matmul})
        return cfg.model_copy(update={"train": train})


def auto_precision(device: torch.device) -> tuple[str, str]:
    """(precision, why) for `precision: auto` on `device`: a fact of the hardware, no timing."""
    if device.type == "cuda":
        return "bf16", "GPU"
    if device.type == "cpu" and cpu_matmul.has_amx_bf16():
        return "bf16", "CPU with AMX"
    return "fp32", "CPU without AMX" if device.type == "cpu" else device.type


def recorded_kernels(run_dir: Path) -> dict | None:
    """The choices recorded in the newest checkpoint of `run_dir` (None: no checkpoint, or one from before they were)."""
    from ember.pretrain.checkpoint import find_checkpoints, read_trainer_state

    found = find_checkpoints(Path(run_dir) / "checkpoints")
    recorded = (read_trainer_state(found[-1]) or {}).get("kernels") if found else None
    return recorded if isinstance(recorded, dict) else None


def _decide(train, device: torch.device, recorded: dict | None) -> RunKernels:
    recorded = recorded or {}
    if train.precision != "auto":
        precision, why = train.precision, "train.precision"
    elif recorded.get("precision") in ("fp32", "bf16"):
        precision, why = recorded["precision"], "kept from the checkpoint"
    else:
        precision, why = auto_precision(device)
    reasons = [f"precision {precision} ({why})"]
    if device.type != "cpu" or precision != "fp32" or train.compile:
        kernel = "torch"  # oneDNN's kernels replace fp32 CPU GEMMs only, and compiled blocks pick their own
    elif train.cpu_matmul != "auto":
        kernel, reasons = train.cpu_matmul, reasons + [f"CPU GEMM {train.cpu_matmul} (train.cpu_matmul)"]
    elif recorded.get("cpu_matmul") in ("onednn", "torch"):
        kernel, reasons = recorded["cpu_matmul"], reasons + [f"CPU GEMM {recorded['cpu_matmul']} (kept from the checkpoint)"]
    else:
        speedup = cpu_matmul.onednn_speedup()
        kernel = "onednn" if speedup >= cpu_matmul.ONEDNN_MIN_SPEEDUP else "torch"
        reasons.append(f"CPU GEMM {kernel} (probe: oneDNN {speedup:.2f}x torch's fp32 GEMM)")
    if device.type == "cpu":
        reasons.append(cpu_matmul.describe_cpu())
    return RunKernels(precision, kernel, "; ".join(reasons))


def decide_kernels(train, device: torch.device, run_dir: Path | None = None) -> RunKernels:
    """Collective: rank 0's choice for `train` (a TrainConfig) on every rank; a resumable `run_dir`'s record first."""
    choice = None
    distributed.barrier()  # the probe is a timing: no rank is still busy starting up while rank 0 measures
    if not dist.is_initialized() or dist.get_rank() == 0:
        recorded = recorded_kernels(run_dir) if run_dir is not None and train.resume else None
        choice = _decide(train, device, recorded)
    choice = distributed.broadcast_object(choice)
    log.info("kernels: %s", choice.why)
    return choice
