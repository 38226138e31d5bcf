"""One process, no wrapper: the reference every other backend must match."""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from ember.pretrain.backends.base import resolve_autocast_dtype
from ember.pretrain.backends.builder import ModelBuilder, meta_model
from ember.pretrain.backends.parallelize import apply_model_techniques
from ember.pretrain.backends.torch_backend import TorchBackend
from ember.pretrain.distributed import DistEnv


def build_local_model(builder: ModelBuilder, cfg, device: torch.device) -> nn.Module:
    """Meta build -> model techniques (checkpointing, kernels, fused loss, compile) -> materialise on `device` -> init."""
    model = meta_model(builder)
    apply_model_techniques(model, cfg.train, device)
    model.to_empty(device=device)
    builder.init_weights(model)
    return model


class SingleBackend(TorchBackend):
    name = "single"

    def backward(self, loss: torch.Tensor, *, last_micro_batch: bool) -> None:
        loss.backward()


def build_single(cfg, make_optimizer: Callable[[nn.Module], torch.optim.Optimizer], env: DistEnv,
                 builder: ModelBuilder) -> SingleBackend:
    model = build_local_model(builder, cfg, env.device)
    optimizer = make_optimizer(model)
    return SingleBackend(env, model, model, optimizer, resolve_autocast_dtype(cfg.train.precision, env.device))
