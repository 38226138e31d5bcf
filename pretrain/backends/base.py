"""The one interface the training loop uses, whatever shards the model."""

from __future__ import annotations

import gc
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from ember.pretrain import distributed
from ember.pretrain.distributed import DistEnv


def resolve_autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """bf16 autocast for precision bf16, or auto where `kernels.auto_precision` picks it (GPUs, CPUs with AMX).

    A run resolves `auto` once for all ranks (pretrain/kernels.py); its backends see fp32 or bf16 here."""
    from ember.pretrain.kernels import auto_precision

    if precision == "bf16" or (precision == "auto" and auto_precision(device)[0] == "bf16"):
        return torch.bfloat16
    return None


class Backend:
    """Wraps model and optimizer; the loop calls forward via `model`, then backward/clip/step.

    `model(input_ids=...)` returns an output with `.logits` (batch, seq, vocab); with the fused loss
    (`fused_loss.has_fused_loss(module)`) `model(input_ids=..., loss_labels=...)` returns the losses without
    materialising the logits. `optimizer.param_groups`
    is where the loop writes the learning rate each step. `module` is the plain HF model inside any wrapper.
    """

    name = "base"

    def __init__(self, env: DistEnv, model: nn.Module, module: nn.Module, optimizer: torch.optim.Optimizer,
                 autocast_dtype: torch.dtype | None):
        self.env = env
        self.rank, self.world_size, self.device = env.rank, env.world_size, env.device
        self.model, self.module, self.optimizer = model, module, optimizer
        self.autocast_dtype = autocast_dtype

    # --- one optimizer step -------------------------------------------------------------------------
    def backward(self, loss: torch.Tensor, *, last_micro_batch: bool) -> None:
        """`loss` is already divided by the accumulation steps; gradients sync only on the last micro batch."""
        raise NotImplementedError

    def clip_grad_norm(self, max_norm: float) -> float:
        """The global pre-clip gradient norm over all shards and ranks; clips to `max_norm` (0: only measure)."""
        raise NotImplementedError

    def step(self) -> None:
        """Optimizer update, then gradients cleared."""
        raise NotImplementedError

    def skip_step(self) -> None:
        """Drop this step's gradients without touching weights or optimizer state (non-finite guard)."""
        raise NotImplementedError

    # --- checkpoints ---------------------------------------------------------------------------------
    def save(self, ckpt_dir: Path) -> None:
        raise NotImplementedError

    def load(self, ckpt_dir: Path) -> None:
        raise NotImplementedError

    def full_state_dict(self) -> dict[str, torch.Tensor] | None:
        """Full fp32 CPU weights with HF names on rank 0, None on the other ranks (collective)."""
        raise NotImplementedError

    # --- small collectives -----------------------------------------------------------------------------
    def barrier(self) -> None:
        distributed.barrier()

    def all_reduce_mean(self, x: float) -> float:
        return distributed.all_reduce_mean(x, self.device)

    def all_reduce_sum(self, x: float) -> float:
        """The sum of `x` over all ranks, in float64 (exact for counts below 2**53)."""
        if not dist.is_initialized() or dist.get_world_size() == 1:
            return float(x)
        t = torch.tensor([float(x)], dtype=torch.float64, device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return float(t.item())

    def close(self, all_ranks_done: bool = True) -> None:
        """Tear down. After a good run: wait for every rank, drop the model, optimizer and engine, then destroy
        the process groups. Gloo work objects that outlive the process group (DeepSpeed keeps some) can abort the
        process at interpreter exit after a good run, so they go while the interpreter is whole. After a failure
        no barrier: the other ranks may be gone."""
        if all_ranks_done:
            distributed.barrier()
        keep = {"rank", "world_size", "device", "env", "name", "autocast_dtype"}
        for attr in [a for a in vars(self) if a not in keep]:
            setattr(self, attr, None)
        gc.collect()
        distributed.destroy()
