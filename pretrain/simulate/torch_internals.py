"""Every torch internal the simulation touches, in one place (checked with torch 2.13.0).

A simulated rank runs the real build and the real training step of rank R of N without peers and without
memory: torch's "fake" process group answers every collective at once (with garbage values), and `FakeTensorMode`
gives every tensor a shape, dtype and device but no storage. FSDP2's memory tracker then attributes every
(fake) allocation to weights, gradients, optimizer state, gathered parameters, communication buffers or
activations as the step runs. None of these are public API, so each use says why it is needed:

- `torch.testing._internal.distributed.fake_pg.FakeStore` and the "fake" backend: a process group of N ranks in
  one process. Public alternatives need N processes.
- `torch.distributed._tools.fsdp2_mem_tracker.FSDPMemTracker`: the per-category peak of an FSDP2 step; the only
  tracker that knows FSDP2's sharded/unsharded parameters and its all-gather / reduce-scatter buffers.
- `fully_shard`'s default device mesh (`_fully_shard._init_default_mesh`): the mesh constructor reads tensor
  values, which fake tensors do not have, so the mesh is made before `FakeTensorMode` starts and handed in.
- DTensor's sharding propagation (`_sharding_prop.detect_fake_mode`) reuses the active fake mode to compute
  global output shapes; the tracker would then count those global-shape tensors (the full model's size in the
  optimizer step) as this rank's memory. A fresh fake mode of its own keeps them out.
- FSDP2 cuts every parameter into N chunks to keep its own (`_fsdp_param._chunk_with_empty`): at N = 1,024 on
  fake tensors that is ~600k fake tensors for a 7B model, 555 of the 622 s its build took (profiled). The
  simulation cuts only the chunks FSDP2 reads (its own, and the first, whose size is the padded one), the same
  views `torch.chunk` would give.
- `aten._local_scalar_dense` and `aten.nonzero` have no fake result (their output depends on values):
  `.item()` of a loss or norm reads 1, and a mask selects every element (pretraining supervises every token).
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import Iterator

import torch
import torch.distributed as dist
from torch.utils._python_dispatch import TorchDispatchMode

CHECKED_TORCH = "2.13.0"


def init_fake_process_group(rank: int, world_size: int):
    """A process group of `world_size` ranks in this process, this process being `rank`; and its 1-D CPU mesh
    (made now, outside fake mode)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.testing._internal.distributed.fake_pg import FakeStore

    dist.init_process_group("fake", rank=rank, world_size=world_size, store=FakeStore())
    return init_device_mesh("cpu", (world_size,))


class _ValueFreeOps(TorchDispatchMode):
    """Answers the ops whose result depends on tensor values, which fake tensors do not have."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            dtype = args[0].dtype
            return True if dtype == torch.bool else (1.0 if dtype.is_floating_point else 1)
        if func is torch.ops.aten.nonzero.default:
            mask = args[0]
            return torch.empty((mask.numel(), mask.dim()), dtype=torch.long, device=mask.device)
        return func(*args, **(kwargs or {}))


class _Chunks(Sequence):
    """`torch.chunk(tensor, num_chunks, dim)` padded with empty tensors to `num_chunks`, cut when indexed."""

    def __init__(self, tensor: torch.Tensor, num_chunks: int, dim: int):
        self.tensor, self.num_chunks, self.dim = tensor, num_chunks, dim
        self.step = -(-tensor.size(dim) // num_chunks)  # torch.chunk's chunk size

    def __len__(self) -> int:
        return self.num_chunks

    def __getitem__(self, index: int) -> torch.Tensor:
        size = self.tensor.size(self.dim)
        start = index * self.step
        if index >= self.num_chunks or index < 0:
            raise IndexError(index)
        if start >= size:
            return self.tensor.new_empty(0)
        return self.tensor.narrow(self.dim, start, min(self.step, size - start))


@contextlib.contextmanager
def fake_tensors(mesh) -> Iterator[None]:
    """Fake tensors for everything created inside; `fully_shard` takes `mesh`; DTensor propagation stays untracked;
    FSDP2 cuts a parameter's own chunk only."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.distributed.fsdp._fully_shard import _fsdp_param, _fully_shard
    from torch.distributed.tensor import _sharding_prop

    saved = _fully_shard._init_default_mesh, _sharding_prop.detect_fake_mode, _fsdp_param._chunk_with_empty
    _fully_shard._init_default_mesh = lambda *args, **kwargs: mesh
    _sharding_prop.detect_fake_mode = lambda *args, **kwargs: None
    _fsdp_param._chunk_with_empty = _Chunks
    try:
        with FakeTensorMode(allow_non_fake_inputs=True), _ValueFreeOps():
            yield
    finally:
        _fully_shard._init_default_mesh, _sharding_prop.detect_fake_mode, _fsdp_param._chunk_with_empty = saved


def fsdp_memory_tracker(model, optimizer):
    """FSDP2's memory tracker over `model` (an FSDPModule) and `optimizer`; enter it around the step."""
    from torch.distributed._tools.fsdp2_mem_tracker import FSDPMemTracker

    return FSDPMemTracker(model, optimizer)


def snapshot(tracker, kind: str = "current") -> dict[str, int]:
    """The tracker's bytes by category ("current" or "peak") on the one device, keyed by short category names
    (sharded_param, unsharded_param, buffer, sharded_grad, unsharded_grad, act, temp, all_gather, reduce_scatter,
    opt, inp, total)."""
    by_device = tracker.get_tracker_snapshot(kind)
    out: dict[str, int] = {}
    for snap in by_device.values():
        for key, value in snap.items():
            name = (key.name if hasattr(key, "name") else str(key)).lower()
            out[name] = out.get(name, 0) + int(value)
    return out
