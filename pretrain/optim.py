"""AdamW with two parameter groups: decayed matrices, and never-decayed norms and biases.

Embeddings are decayed only when `decay_embeddings` is set (a tied output head counts as
the embedding it shares its weight with; an untied head is an ordinary matrix).
"""

from __future__ import annotations

import torch
from torch import nn

from ember.pretrain.config import TrainConfig


def split_decay_groups(model: nn.Module, decay_embeddings: bool) -> tuple[list[str], list[str]]:
    """(names of decayed parameters, names of the others), each parameter once even when tied."""
    embedding_ids = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    decay, no_decay = [], []
    for name, p in model.named_parameters():  # yields a tied weight only once
        if not p.requires_grad:
            continue
        # ndim < 2: norm scales and biases. ndim reads the full shape, also on a sharded DTensor.
        is_embedding = id(p) in embedding_ids
        if p.ndim < 2 or (is_embedding and not decay_embeddings):
            no_decay.append(name)
        else:
            decay.append(name)
    return decay, no_decay


def fused_available(params: list[torch.Tensor]) -> bool:
    """The fused AdamW kernel runs when every parameter lives on a device type that has it."""
    from torch.optim.optimizer import _get_fused_kernels_supported_devices

    supported = set(_get_fused_kernels_supported_devices())
    return bool(params) and all(p.device.type in supported and p.dtype.is_floating_point for p in params)


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW over `model` with decay / no-decay groups; fused when the device supports it."""
    decay, no_decay = split_decay_groups(model, cfg.decay_embeddings)
    params = dict(model.named_parameters())
    groups = [
        {"params": [params[n] for n in decay], "weight_decay": cfg.weight_decay, "group": "decay"},
        {"params": [params[n] for n in no_decay], "weight_decay": 0.0, "group": "no_decay"},
    ]
    groups = [g for g in groups if g["params"]]
    everything = [p for g in groups for p in g["params"]]
    fused = fused_available(everything)
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, fused=fused)
