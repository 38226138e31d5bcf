"""Techniques applied to a plain HF model, one function each, in the build order every backend follows:

    meta model -> activation checkpointing -> CPU GEMM, fused loss -> compile -> shard/wrap (backend)
    -> materialise -> init

None of them renames parameters, so state dicts keep their Hugging Face names.
"""

from __future__ import annotations

import functools
import logging

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.checkpoint import checkpoint

from ember.errors import UserError
from ember.pretrain.backends.base import resolve_autocast_dtype
from ember.pretrain.config import TrainConfig
from ember.pretrain.cpu_attention import use_onednn_attention
from ember.pretrain.cpu_matmul import onednn_available, onednn_by_default, use_onednn_linears
from ember.pretrain.fused_loss import enable_fused_loss

log = logging.getLogger("ember.pretrain.backends")


def decoder_blocks(model: nn.Module) -> list[nn.Module]:
    """The repeated transformer blocks, in order (the unit of checkpointing, compiling and sharding)."""
    block_classes = set(getattr(model, "_no_split_modules", None) or [])
    blocks = [m for m in model.modules() if type(m).__name__ in block_classes]
    if blocks:
        return blocks
    # Fallback: the longest ModuleList is the layer stack in every HF causal LM.
    lists = [m for m in model.modules() if isinstance(m, nn.ModuleList)]
    if not lists:
        raise ValueError(f"cannot find the decoder blocks of {type(model).__name__}")
    return list(max(lists, key=len))


def apply_activation_checkpointing(model: nn.Module, every: int = 1) -> None:
    """Recompute every `every`-th block's activations in backward instead of storing them.

    HF blocks checkpoint their own `forward` when `gradient_checkpointing` is set, which keeps module hooks
    (FSDP2's, ZeRO-3's) outside the recomputed region and the parameter names unchanged. Non-reentrant
    checkpointing: it works with keyword inputs and with sharded parameters.
    """
    recompute = functools.partial(checkpoint, use_reentrant=False)
    for index, block in enumerate(decoder_blocks(model)):
        if index % every:
            continue
        if hasattr(type(block), "gradient_checkpointing"):
            block.gradient_checkpointing = True
            block._gradient_checkpointing_func = recompute
        else:
            inner = block.forward
            block.forward = lambda *args, _inner=inner, **kwargs: recompute(functools.partial(_inner, **kwargs), *args)


def apply_compile(model: nn.Module) -> None:
    """torch.compile each block in place (`Module.compile` keeps names: no `_orig_mod` prefix)."""
    for block in decoder_blocks(model):
        block.compile(fullgraph=False)


def uses_onednn(train: TrainConfig, device: torch.device) -> bool:
    """Whether linear layers and attention run on oneDNN: fp32 on CPU, not compiled (inductor picks its own kernels)."""
    fp32_cpu = device.type == "cpu" and resolve_autocast_dtype(train.precision, device) is None
    if train.cpu_matmul == "torch" or not fp32_cpu or train.compile:
        return False
    if train.cpu_matmul == "onednn":
        if not onednn_available():
            raise UserError("this torch build has no oneDNN (mkldnn); use cpu_matmul auto or torch", "train.cpu_matmul")
        return True
    return onednn_by_default()


def apply_model_techniques(model: nn.Module, train: TrainConfig, device: torch.device) -> None:
    """Everything `train` asks of the model itself, in place on the (meta) model before any backend wraps it."""
    if train.activation_checkpointing:
        apply_activation_checkpointing(model, train.ac_every)
    onednn = uses_onednn(train, device)
    if onednn:
        use_onednn_linears(model)
        use_onednn_attention(model)
        log.info("fp32 linear layers and attention on oneDNN's GEMM (train.cpu_matmul=%s)", train.cpu_matmul)
    fused = train.fused_loss and enable_fused_loss(model, onednn=onednn)
    if train.fused_loss and not fused:
        log.info("fused loss off: %s has no plain linear LM head, or post-processes its logits", type(model).__name__)
    if train.compile:
        apply_compile(model)


@torch.no_grad()
def broadcast_nonpersistent_buffers(model: nn.Module, reference: nn.Module | None, src: int = 0) -> None:
    """Fill buffers that are not in the state dict (RoPE frequencies) from rank `src`'s `reference` model.

    After `to_empty` they hold garbage, and `set_model_state_dict` only moves state-dict entries.
    """
    persistent = set(model.state_dict().keys())
    ref_buffers = dict(reference.named_buffers()) if reference is not None else {}
    for name, buf in model.named_buffers():
        if name in persistent:
            continue
        if reference is not None:
            buf.copy_(ref_buffers[name].to(buf.device))
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.broadcast(buf, src=src)
