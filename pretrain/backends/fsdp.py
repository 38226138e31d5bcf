"""FSDP2 (`fully_shard`): parameters, gradients and optimizer state sharded over ranks as DTensors."""

from __future__ import annotations

import logging
from typing import Callable

import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

from ember.pretrain.backends.base import resolve_autocast_dtype
from ember.pretrain.backends.builder import ModelBuilder, initialised_model, meta_model
from ember.pretrain.backends.parallelize import apply_model_techniques, broadcast_nonpersistent_buffers, decoder_blocks
from ember.pretrain.backends.torch_backend import TorchBackend
from ember.pretrain.distributed import DistEnv, ensure_process_group

log = logging.getLogger("ember.pretrain.backends.fsdp")


class FSDPBackend(TorchBackend):
    name = "fsdp"

    def backward(self, loss: torch.Tensor, *, last_micro_batch: bool) -> None:
        # FSDP2 reads this flag in its post-backward hooks: without sync, unsharded gradients accumulate
        # locally and the reduce-scatter happens once, on the last micro batch.
        self.model.set_requires_gradient_sync(last_micro_batch)
        loss.backward()


def apply_fsdp(model: nn.Module, mp_policy: MixedPrecisionPolicy, offload_policy: OffloadPolicy) -> None:
    """Shard each decoder block, then the root (embeddings, final norm, head)."""
    for block in decoder_blocks(model):
        # Blocks free their gathered weights after forward and gather again in backward: memory over traffic.
        fully_shard(block, mp_policy=mp_policy, offload_policy=offload_policy, reshard_after_forward=True)
    # The root's weights are needed again right at the start of backward; keeping them saves one all-gather.
    fully_shard(model, mp_policy=mp_policy, offload_policy=offload_policy, reshard_after_forward=False)


def load_initial_weights(model: nn.Module, builder: ModelBuilder, env: DistEnv) -> None:
    """Give the sharded model the single-process weights.

    Initialising shards in place would draw the same random numbers on every rank (each shard a copy of the
    others, see DESIGN.md); instead rank 0 builds the full model, and its weights are scattered to the shards.
    """
    reference = initialised_model(builder, torch.device("cpu")) if env.rank == 0 else None
    full = reference.state_dict() if reference is not None else {}
    set_model_state_dict(model, full, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    broadcast_nonpersistent_buffers(model, reference)


def fsdp_policies(cfg, device: torch.device) -> tuple[MixedPrecisionPolicy, OffloadPolicy]:
    if device.type == "cuda" and resolve_autocast_dtype(cfg.train.precision, device) == torch.bfloat16:
        # bf16 compute copies of the weights, fp32 gradient reduction and fp32 master shards.
        mp_policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    else:
        mp_policy = MixedPrecisionPolicy()
    offload = cfg.train.cpu_offload and device.type == "cuda"
    if cfg.train.cpu_offload and not offload:
        log.info("cpu_offload has no effect on CPU: parameters already live there")
    return mp_policy, CPUOffloadPolicy() if offload else OffloadPolicy()


def build_fsdp(cfg, make_optimizer: Callable[[nn.Module], torch.optim.Optimizer], env: DistEnv,
               builder: ModelBuilder) -> FSDPBackend:
    mp_policy, offload_policy = fsdp_policies(cfg, env.device)
    offload = isinstance(offload_policy, CPUOffloadPolicy)
    ensure_process_group(env)  # fully_shard needs a device mesh, also over one process
    model = meta_model(builder)
    apply_model_techniques(model, cfg.train, env.device)
    apply_fsdp(model, mp_policy, offload_policy)
    model.to_empty(device="cpu" if offload else env.device)
    if offload:
        # Offloaded parameters stay on the CPU; buffers (RoPE frequencies) are used on the GPU.
        for module in model.modules():
            for name, buf in module.named_buffers(recurse=False):
                setattr(module, name, buf.to(env.device))
    load_initial_weights(model, builder, env)
    optimizer = make_optimizer(model)
    return FSDPBackend(env, model, model, optimizer, resolve_autocast_dtype(cfg.train.precision, env.device))
