"""One process, no wrapper: the reference every other backend must match."""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from ember.pretrain.backends.base import resolve_autocast_dtype
from ember.pretrain.backends.parallelize import apply_model_techniques
from ember.pretrain.backends.torch_backend import TorchBackend
from ember.pretrain.distributed import DistEnv
from ember.pretrain.model import build_meta_model, init_weights


def build_local_model(cfg, device: torch.device) -> nn.Module:
    """Meta build -> model techniques (checkpointing, kernels, fused loss, compile) -> materialise on `device` -> init."""
    model = build_meta_model(cfg.model)
    apply_model_techniques(model, cfg.train, device)
    model.to_empty(device=device)
    init_weights(model, cfg.model, cfg.seed)
    return model


class SingleBackend(TorchBackend):
    name = "single"

    def backward(self, loss: torch.Tensor, *, last_micro_batch: bool) -> None:
        loss.backward()


def build_single(cfg, make_optimizer: Callable[[nn.Module], torch.optim.Optimizer], env: DistEnv) -> SingleBackend:
    model = build_local_model(cfg, env.device)
    optimizer = make_optimizer(model)
    return SingleBackend(env, model, model, optimizer, resolve_autocast_dtype(cfg.train.precision, env.device))
