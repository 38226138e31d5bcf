"""Parallel backends behind one interface: single, ddp, fsdp, deepspeed.

`build_backend(cfg, make_optimizer, builder)` joins the process group torchrun set up (if any), builds the
model of `builder` (default: the causal LM of `cfg.model`; see builder.py) in the documented order (meta ->
activation checkpointing -> compile -> shard/wrap -> materialise -> the builder's initial weights, the
single-process ones on every backend) and wraps model and optimizer. `load_full_weights(ckpt_dir)` reads any saved
checkpoint back into full HF-named fp32 weights, offline, in one process.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch
from torch import nn

from ember.errors import UserError
from ember.pretrain.backends.base import Backend
from ember.pretrain.backends.builder import ModelBuilder, causal_lm_builder
from ember.pretrain.distributed import init_distributed

__all__ = ["Backend", "ModelBuilder", "build_backend", "load_full_weights"]


def build_backend(cfg, make_optimizer: Callable[[nn.Module], torch.optim.Optimizer], builder: ModelBuilder | None = None) -> Backend:
    """The backend named by `cfg.train.backend`, with the model of `builder` and its optimizer ready to train."""
    env = init_distributed()
    builder = builder or causal_lm_builder(cfg.model, cfg.seed)
    name = cfg.train.backend
    if name == "single":
        if env.world_size > 1:
            raise UserError(f"backend 'single' cannot run on {env.world_size} processes; pick ddp, fsdp or deepspeed",
                            "train.backend")
        from ember.pretrain.backends.single import build_single

        return build_single(cfg, make_optimizer, env, builder)
    if name == "ddp":
        from ember.pretrain.backends.ddp import build_ddp
        from ember.pretrain.backends.single import build_single

        # DDP over one process is the single backend (same DCP checkpoints).
        return build_ddp(cfg, make_optimizer, env, builder) if env.world_size > 1 else build_single(cfg, make_optimizer, env, builder)
    if name == "fsdp":
        from ember.pretrain.backends.fsdp import build_fsdp

        return build_fsdp(cfg, make_optimizer, env, builder)
    if name == "deepspeed":
        from ember.pretrain.backends.zero import build_deepspeed

        return build_deepspeed(cfg, make_optimizer, env, builder)
    raise UserError(f"unknown backend {name!r}", "train.backend")


def load_full_weights(ckpt_dir: Path) -> dict[str, torch.Tensor]:
    """Full fp32 HF-named weights of a checkpoint (DCP shards or ZeRO partitions); no process group needed."""
    from ember.pretrain.backends.dcp_io import is_dcp_checkpoint, load_full_weights_dcp
    from ember.pretrain.backends.zero import CHECKPOINT_TAG, load_full_weights_zero

    ckpt_dir = Path(ckpt_dir)
    if is_dcp_checkpoint(ckpt_dir):
        return load_full_weights_dcp(ckpt_dir)
    if (ckpt_dir / CHECKPOINT_TAG).is_dir():
        return load_full_weights_zero(ckpt_dir)
    raise UserError(f"{ckpt_dir} holds neither a torch.distributed.checkpoint nor a DeepSpeed checkpoint", str(ckpt_dir))
