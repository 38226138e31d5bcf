"""DistributedDataParallel: a full replica per rank, gradients averaged once per optimizer step."""

from __future__ import annotations

from typing import Callable

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from ember.pretrain.backends.base import resolve_autocast_dtype
from ember.pretrain.backends.builder import ModelBuilder
from ember.pretrain.backends.single import build_local_model
from ember.pretrain.backends.torch_backend import TorchBackend
from ember.pretrain.distributed import DistEnv


class DDPBackend(TorchBackend):
    """DDP decides in *forward* whether the coming backward all-reduces, but the loop says which micro batch is
    last only at backward time. The number of micro batches per step follows from the config, so the flag for
    each coming forward is set ahead; should the loop end a step elsewhere, a last micro batch that ran without
    sync is made up by an explicit all-reduce (the same pattern every step keeps resumed runs bit-identical)."""

    name = "ddp"

    def __init__(self, *args, num_micro_batches: int, **kwargs):
        super().__init__(*args, **kwargs)
        self._num_micro_batches = num_micro_batches
        self._micro_index = 0  # backward calls so far in this step
        self.model.require_backward_grad_sync = self._sync_next_forward()

    def _sync_next_forward(self) -> bool:
        return self._micro_index + 1 >= self._num_micro_batches

    def backward(self, loss: torch.Tensor, *, last_micro_batch: bool) -> None:
        synced = self.model.require_backward_grad_sync  # what the forward of this micro batch prepared
        loss.backward()
        if last_micro_batch:
            if not synced:
                self._all_reduce_grads()
            self._micro_index = 0
        else:
            self._micro_index += 1
        self.model.require_backward_grad_sync = self._sync_next_forward()

    @torch.no_grad()
    def _all_reduce_grads(self) -> None:
        for grad in self._grads():
            dist.all_reduce(grad, op=dist.ReduceOp.SUM)
            grad.div_(self.world_size)


def build_ddp(cfg, make_optimizer: Callable[[nn.Module], torch.optim.Optimizer], env: DistEnv,
              builder: ModelBuilder) -> DDPBackend:
    # Every rank builds the same weights (deterministic init); DDP also broadcasts rank 0's at construction.
    module = build_local_model(builder, cfg, env.device)
    device_ids = [env.device.index] if env.device.type == "cuda" else None
    model = DistributedDataParallel(module, device_ids=device_ids)
    optimizer = make_optimizer(module)
    return DDPBackend(env, model, module, optimizer, resolve_autocast_dtype(cfg.train.precision, env.device),
                      num_micro_batches=cfg.train.accumulation_steps(env.world_size))
