"""Peak FLOP/s of the device, for model FLOPs utilisation (MFU).

GPUs: the vendors' dense (no structured sparsity) tensor-core figures, matched from `torch.cuda.get_device_name`.
CPUs: there is no trustworthy spec sheet for a shared or virtual CPU, so the peak is measured: the best of a few
large square matmuls under the current thread settings, with the fastest GEMM torch has, once per process.
"""

from __future__ import annotations

import functools
import logging
import os
import re

import torch

from ember.pretrain import cpu_matmul

log = logging.getLogger("ember.pretrain.peak")

TERA = 1e12

# (name pattern, {dtype: dense peak FLOP/s}). First match wins, so specific names come before general ones.
# fp32 is the non-tensor-core rate: PyTorch does not use TF32 for matmuls unless asked to
# (torch.backends.cuda.matmul.allow_tf32), so an fp32 run is measured against it.
GPU_PEAKS: list[tuple[str, dict[str, float]]] = [
    (r"\bGH200\b", {"bf16": 989.4 * TERA, "fp16": 989.4 * TERA, "tf32": 494.7 * TERA, "fp32": 66.9 * TERA}),
    (r"\bH200 NVL\b", {"bf16": 835.5 * TERA, "fp16": 835.5 * TERA, "tf32": 417.5 * TERA, "fp32": 60.0 * TERA}),
    (r"\bH200\b", {"bf16": 989.4 * TERA, "fp16": 989.4 * TERA, "tf32": 494.7 * TERA, "fp32": 66.9 * TERA}),
    (r"\bH100 NVL\b", {"bf16": 835.5 * TERA, "fp16": 835.5 * TERA, "tf32": 417.5 * TERA, "fp32": 60.0 * TERA}),
    (r"\bH100.*PCIe\b", {"bf16": 756.0 * TERA, "fp16": 756.0 * TERA, "tf32": 378.0 * TERA, "fp32": 51.2 * TERA}),
    (r"\bH100\b", {"bf16": 989.4 * TERA, "fp16": 989.4 * TERA, "tf32": 494.7 * TERA, "fp32": 66.9 * TERA}),  # SXM
    (r"\bH800\b", {"bf16": 989.4 * TERA, "fp16": 989.4 * TERA, "tf32": 494.7 * TERA, "fp32": 66.9 * TERA}),
    (r"\bB200\b", {"bf16": 2250.0 * TERA, "fp16": 2250.0 * TERA, "tf32": 1100.0 * TERA, "fp32": 80.0 * TERA}),
    (r"\bA100\b", {"bf16": 312.0 * TERA, "fp16": 312.0 * TERA, "tf32": 156.0 * TERA, "fp32": 19.5 * TERA}),
    (r"\bA800\b", {"bf16": 312.0 * TERA, "fp16": 312.0 * TERA, "tf32": 156.0 * TERA, "fp32": 19.5 * TERA}),
    (r"\bL40S\b", {"bf16": 362.1 * TERA, "fp16": 362.1 * TERA, "tf32": 183.0 * TERA, "fp32": 91.6 * TERA}),
    (r"\bL40\b", {"bf16": 181.0 * TERA, "fp16": 181.0 * TERA, "tf32": 90.5 * TERA, "fp32": 90.5 * TERA}),
    (r"\bL4\b", {"bf16": 121.0 * TERA, "fp16": 121.0 * TERA, "tf32": 60.0 * TERA, "fp32": 30.3 * TERA}),
    (r"\bA10\b", {"bf16": 125.0 * TERA, "fp16": 125.0 * TERA, "tf32": 62.5 * TERA, "fp32": 31.2 * TERA}),
    (r"\bA6000\b", {"bf16": 154.8 * TERA, "fp16": 154.8 * TERA, "tf32": 77.4 * TERA, "fp32": 38.7 * TERA}),
    (r"\bRTX 4090\b", {"bf16": 165.2 * TERA, "fp16": 165.2 * TERA, "tf32": 82.6 * TERA, "fp32": 82.6 * TERA}),
    (r"\bRTX 3090\b", {"bf16": 71.0 * TERA, "fp16": 71.0 * TERA, "tf32": 35.6 * TERA, "fp32": 35.6 * TERA}),
    (r"\bV100\b", {"fp16": 125.0 * TERA, "fp32": 15.7 * TERA}),
    (r"\bT4\b", {"fp16": 65.0 * TERA, "fp32": 8.1 * TERA}),
    (r"\bMI300X\b", {"bf16": 1307.4 * TERA, "fp16": 1307.4 * TERA, "tf32": 653.7 * TERA, "fp32": 163.4 * TERA}),
    (r"\bMI250X\b", {"bf16": 383.0 * TERA, "fp16": 383.0 * TERA, "fp32": 95.7 * TERA}),
]

_DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


def dtype_name(dtype: torch.dtype | str) -> str:
    """'fp32', 'bf16', 'fp16' or 'tf32' for a torch dtype or one of those names."""
    if isinstance(dtype, torch.dtype):
        return _DTYPE_NAMES[dtype]
    return dtype


def gpu_peak_flops(device_name: str, dtype: torch.dtype | str) -> float | None:
    """Dense peak FLOP/s of a GPU named like `torch.cuda.get_device_name()` returns; None if unknown."""
    name = dtype_name(dtype)
    for pattern, peaks in GPU_PEAKS:
        if re.search(pattern, device_name, flags=re.IGNORECASE):
            return peaks.get(name)
    return None


@functools.lru_cache(maxsize=None)
def measured_cpu_peak_flops(dtype: torch.dtype = torch.float32, num_threads: int | None = None,
                            size: int = 1024, budget_s: float = 1.0) -> float:
    """Best FLOP/s of `size` x `size` matmuls on this CPU with the current torch thread count, cached per process.

    Every GEMM torch carries is timed (its default BLAS, and oneDNN's where present) and the faster counts: MFU
    is measured against what this CPU can do, not against whichever kernel a run happens to use.
    """
    kernels = ["torch", "onednn"] if cpu_matmul.onednn_available() else ["torch"]
    seconds = min(cpu_matmul.matmul_seconds(k, dtype, size, num_threads, budget_s / len(kernels)) for k in kernels)
    return 2.0 * size**3 / seconds


def device_peak_flops(device: torch.device | str, dtype: torch.dtype | str = torch.float32) -> float | None:
    """Peak FLOP/s of one device: table value for known GPUs, a measured matmul peak on CPU.

    EMBER_PEAK_FLOPS (a number) overrides both, for hardware missing from the table. None for an unknown GPU.
    """
    override = os.environ.get("EMBER_PEAK_FLOPS")
    if override:
        return float(override)
    device = torch.device(device)
    if device.type == "cpu":
        torch_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype_name(dtype)]
        return measured_cpu_peak_flops(torch_dtype, torch.get_num_threads())
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        peak = gpu_peak_flops(name, dtype)
        if peak is None:
            log.warning("no peak FLOP/s known for %s in %s; set EMBER_PEAK_FLOPS to get MFU", name, dtype_name(dtype))
        return peak
    return None


def mfu(tokens_per_s: float, flops_per_token: float, peak: float | None, num_devices: int = 1) -> float | None:
    """Model FLOPs utilisation: achieved training FLOP/s over the peak of all devices (None without a peak)."""
    if not peak:
        return None
    return tokens_per_s * flops_per_token / (peak * num_devices)
