"""fp32 linear layers through oneDNN on CPUs where its GEMM beats the BLAS that torch calls.

torch's CPU wheels send fp32 `mm` to MKL, which takes its AVX2 code path on non-Intel CPUs; oneDNN (also
inside torch) JIT-compiles AVX-512 kernels for whatever CPU it finds. On this project's AMD EPYC machine that
is 2.3x the matmul throughput, in full fp32 (no bf16 or TF32 shortcut); on Intel CPUs the two are about equal.
So the kernel is chosen by a short measured probe (`onednn_speedup`), not by the vendor: oneDNN when its GEMM
is clearly faster here (`ONEDNN_MIN_SPEEDUP`). A run measures once, on rank 0, and records the choice
(`pretrain/kernels.py`), so every rank and every resumption uses the same kernel. `matmul_seconds` times both,
for the MFU peak and the benchmarks.

`OneDNNLinear` is an `nn.Linear` whose forward and backward run on oneDNN; swapping the class keeps the
parameters, their names and every hook (FSDP2, ZeRO-3) as they were.
"""

from __future__ import annotations

import functools
import time

import torch
from torch import nn


def onednn_available() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def _cpuinfo_field(name: str) -> str:
    """The first `name : value` of /proc/cpuinfo ('' where there is none, e.g. not Linux)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == name:
                    return value.strip()
    except OSError:
        pass
    return ""


def cpu_vendor() -> str:
    """The CPU vendor string ('GenuineIntel', 'AuthenticAMD', ...); '' where /proc/cpuinfo does not say."""
    return _cpuinfo_field("vendor_id")


def cpu_model() -> str:
    import platform

    return _cpuinfo_field("model name") or platform.processor() or "unknown CPU"


def cpu_flags() -> set[str]:
    return set(_cpuinfo_field("flags").split())


def has_amx_bf16() -> bool:
    """Whether the CPU has AMX tiles for bf16 matmuls (Intel Sapphire Rapids and later): bf16 autocast pays there."""
    return "amx_bf16" in cpu_flags()


def describe_cpu() -> str:
    """'MODEL (bf16: ..., AMX: ...)', printed beside every benchmark figure."""
    flags = cpu_flags()
    bf16 = "avx512_bf16" if "avx512_bf16" in flags else "none native"
    return f"{cpu_model()} (bf16: {bf16}, AMX: {'amx_bf16' if 'amx_bf16' in flags else 'no'})"


# oneDNN is chosen only when its GEMM is clearly faster: a margin that timing noise on a shared machine does not
# cross (measured: 2.3-2.5x on the AMD EPYC, about 1.0x on Intel Xeons).
ONEDNN_MIN_SPEEDUP = 1.25


def onednn_speedup(size: int = 512, budget_s: float = 0.1) -> float:
    """oneDNN's fp32 GEMM rate over torch's default (MKL) on this CPU, current thread count: a probe of ~0.3 s."""
    if not onednn_available():
        return 0.0
    return matmul_seconds("torch", size=size, budget_s=budget_s) / matmul_seconds("onednn", size=size, budget_s=budget_s)


@functools.lru_cache(maxsize=None)
def onednn_by_default() -> bool:
    """The `auto` choice in this process: oneDNN where the probe finds its GEMM clearly faster.

    A run decides once on rank 0 and records it (`pretrain/kernels.py`); this per-process answer is for code that
    builds a model outside a run (exports, tests).
    """
    return onednn_speedup() >= ONEDNN_MIN_SPEEDUP


def onednn_matmul_nt(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b.T for 2-D fp32 CPU tensors (a: (M, K), b: (N, K), any strides) with oneDNN's GEMM -> (M, N)."""
    return torch.ops.mkldnn._linear_pointwise(a, b, None, "none", [], "")


def torch_matmul_nt(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return a @ b.t()


def onednn_grad_weight(grad_out: torch.Tensor, inputs: torch.Tensor) -> torch.Tensor:
    """grad_out.T @ inputs ((M, N), (M, K) -> (N, K)): the weight gradient of a linear layer.

    Either way a transposed operand goes first, and oneDNN copies a strided first operand: the narrower of the
    two is put there. For N > K that means computing the transposed product and copying it back, one weight-sized
    (N, K) copy.
    """
    if grad_out.shape[1] > inputs.shape[1]:
        return onednn_matmul_nt(inputs.t(), grad_out.t()).t().contiguous()
    return onednn_matmul_nt(grad_out.t(), inputs.t())


class _OneDNNLinearFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        flat = x.reshape(-1, x.shape[-1])  # (tokens, in)
        out = torch.ops.mkldnn._linear_pointwise(flat, weight, bias, "none", [], "")  # (tokens, out)
        return out.view(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, weight = ctx.saved_tensors
        flat_grad = grad.reshape(-1, grad.shape[-1])  # (tokens, out)
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = onednn_matmul_nt(flat_grad, weight.t()).view(x.shape)
        if ctx.needs_input_grad[1]:
            grad_w = onednn_grad_weight(flat_grad, x.reshape(-1, x.shape[-1]))
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = flat_grad.sum(0)
        return grad_x, grad_w, grad_b


class OneDNNLinear(nn.Linear):
    """nn.Linear on oneDNN for fp32 CPU tensors; any other device or dtype takes the usual path."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type == "cpu" and x.dtype == torch.float32 == self.weight.dtype:
            return _OneDNNLinearFunction.apply(x, self.weight, self.bias)
        return super().forward(x)


def use_onednn_linears(model: nn.Module) -> int:
    """Run every plain `nn.Linear` of `model` on oneDNN (in place; works on meta models). Returns how many."""
    swapped = 0
    for module in model.modules():
        if type(module) is nn.Linear:
            module.__class__ = OneDNNLinear
            swapped += 1
    return swapped


def _best_seconds(fn, budget_s: float) -> float:
    fn()  # warm-up: lazy initialisation, JIT, page faults
    best, start, reps = float("inf"), time.perf_counter(), 0
    while reps < 3 or (time.perf_counter() - start < budget_s and reps < 50):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
        reps += 1
    return best


@functools.lru_cache(maxsize=None)
def matmul_seconds(kernel: str, dtype: torch.dtype = torch.float32, size: int = 1024, num_threads: int | None = None,
                   budget_s: float = 0.5) -> float:
    """Best time of one `size`^3 matmul with `kernel` ('torch' or 'onednn') on this CPU, cached per process.

    The best of several repetitions (at least 3, for about `budget_s`): other processes on a shared machine can
    only slow a run down.
    """
    del num_threads  # part of the cache key only: the result depends on torch.get_num_threads()
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(size, size, generator=gen).to(dtype)
    b = torch.randn(size, size, generator=gen).to(dtype)
    matmul = onednn_matmul_nt if kernel == "onednn" else torch_matmul_nt
    return _best_seconds(lambda: matmul(a, b), budget_s)
