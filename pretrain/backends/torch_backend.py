"""What single, ddp and fsdp share: a plain torch optimizer, gradient clipping, DCP checkpoints."""

from __future__ import annotations

import logging
import math
from concurrent.futures import Future
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist

from ember.pretrain.backends.base import Backend
from ember.pretrain.backends.dcp_io import begin_save_dcp, gather_full_state_dict, load_dcp, save_dcp

log = logging.getLogger("ember.pretrain.backends")

# On the error path a background write gets this long to end; the peers may be gone, a collective may never return.
ERROR_PATH_WAIT_S = 300.0


def _global_value(norm: torch.Tensor) -> float:
    # FSDP2 gradients are DTensors: their norm is a DTensor whose global value needs one all-reduce.
    if hasattr(norm, "full_tensor"):
        norm = norm.full_tensor()
    return float(norm.item())


class TorchBackend(Backend):
    """single / ddp / fsdp: gradients live in `param.grad` (local shards for fsdp)."""

    # A background checkpoint write and what runs once it is on disk (begin_save / finish_save).
    _pending: tuple[Future, Callable[[bool], None]] | None = None
    # gloo group of the background writes (made at the first one): their collectives run in the writer thread.
    _save_group: dist.ProcessGroup | None = None

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
        self.finish_save()  # the run's last checkpoint is published before its export is written
        return gather_full_state_dict(self.module)

    # --- background checkpoints ----------------------------------------------------------------------
    def begin_save(self, ckpt_dir: Path, on_written: Callable[[bool], None]) -> None:
        """Collective: snapshot model and optimizer state, then write it to `ckpt_dir` while training goes on.

        A save still pending is finished first. `on_written(all_ranks)` runs from `finish_save` once the
        write is complete on every rank: with True on all ranks together (it may use collectives), with
        False on the error path, on each rank alone. Without a process group (single backend) DCP writes
        as one process, still in the background.
        """
        self.finish_save()
        if self._save_group is None and dist.is_initialized():
            self._save_group = dist.new_group(backend="gloo")  # collective: every rank saves at the same step
        self._pending = (begin_save_dcp(self.module, self.optimizer, ckpt_dir, self._save_group), on_written)

    def finish_save(self, all_ranks: bool = True) -> None:
        """Wait for the pending background save, then run its `on_written`; nothing when none is pending.

        Called before the next save, before the final weights are read, and by `close`. On the error path
        (all_ranks False) the wait is bounded and failures are logged, not raised: the run's own error wins,
        and an incomplete write stays a `.tmp` directory that the next run removes.
        """
        if self._pending is None:
            return
        future, on_written = self._pending
        self._pending = None
        if all_ranks:
            future.result()
            on_written(True)
            return
        try:
            future.result(timeout=ERROR_PATH_WAIT_S)
            on_written(False)
        except Exception as e:  # noqa: BLE001 -- see the docstring
            log.warning("background checkpoint write not published: %r", e)

    def close(self, all_ranks_done: bool = True) -> None:
        try:
            self.finish_save(all_ranks=all_ranks_done)
        finally:
            super().close(all_ranks_done)
