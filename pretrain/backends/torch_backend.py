"""What single, ddp and fsdp share: a plain torch optimizer, gradient clipping, DCP checkpoints."""

from __future__ import annotations

import math
from pathlib import Path

import torch

from ember.pretrain.backends.base import Backend
from ember.pretrain.backends.dcp_io import gather_full_state_dict, load_dcp, save_dcp


def _global_value(norm: torch.Tensor) -> float:
    # FSDP2 gradients are DTensors: their norm is a DTensor whose global value needs one all-reduce.
    if hasattr(norm, "full_tensor"):
        norm = norm.full_tensor()
    return float(norm.item())


class TorchBackend(Backend):
    """single / ddp / fsdp: gradients live in `param.grad` (local shards for fsdp)."""

    def _grads(self) -> list[torch.Tensor]:
        return [p.grad for g in self.optimizer.param_groups for p in g["params"] if p.grad is not None]

    def clip_grad_norm(self, max_norm: float) -> float:
        grads = self._grads()
        if not grads:
            return 0.0
        total = torch.nn.utils.get_total_norm(grads, norm_type=2.0)
        value = _global_value(total)  # the same on every rank
        # A non-finite norm means the step will be skipped: leave the gradients alone.
        if max_norm > 0 and math.isfinite(value):
            torch.nn.utils.clip_grads_with_norm_(
                [p for g in self.optimizer.param_groups for p in g["params"]], max_norm, total)
        return value

    def step(self) -> None:
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def skip_step(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def save(self, ckpt_dir: Path) -> None:
        save_dcp(self.module, self.optimizer, ckpt_dir)

    def load(self, ckpt_dir: Path) -> None:
        load_dcp(self.module, self.optimizer, ckpt_dir)

    def full_state_dict(self) -> dict[str, torch.Tensor] | None:
        return gather_full_state_dict(self.module)
