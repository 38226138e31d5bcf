"""What one rank really holds: bytes of weights, gradients and optimizer state, and the peak during a step.

`rank_memory(backend)` is a census of the tensors a backend keeps, found where each backend keeps them, every
storage counted once (a view into a flat buffer counts the buffer; FSDP2's local shards count their padded
storage):

- single, ddp, fsdp: the module's parameters (FSDP2: the DTensors' local shards), their `.grad`, the optimizer's
  state tensors, the module's buffers.
- DeepSpeed: the module's parameters and ZeRO-3's partitions (`ds_tensor`), then every tensor held in an attribute
  of the ZeRO optimizer (flat parameter groups, fp32 master partitions, gradient partitions, the ipg buckets that
  gradients are reduced through) sorted by what the attribute holds, and the client optimizer's state.

The fp32 master copies that DeepSpeed keeps next to the parameters count as optimizer state, as in the ZeRO paper
(K = 12 bytes per parameter: master, exp_avg, exp_avg_sq). DDP's gradient buckets live inside its C++ reducer and
are not visible here.

`PeakTracker` follows every tensor storage allocated, resized or freed while it is active (a dispatch mode sees
every op's output; FSDP2 resizes storages in place, which no op shows, so `UntypedStorage.resize_` is followed
too) on top of a census taken when it starts; `peak_bytes` is the most that was alive at once.
"""

from __future__ import annotations

import contextlib
import weakref
from typing import Iterable, Iterator

import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensor
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

CATEGORIES = ("weights", "grads", "optimizer", "buffers")


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


def _storage(t) -> torch.UntypedStorage | None:
    if not torch.is_tensor(t):
        return None
    t = _local(t)
    if t.device.type == "meta":  # shapes only (DeepSpeed keeps some as bookkeeping)
        return None
    storage = t.untyped_storage()
    return storage if storage.nbytes() else None


def _tensors_in(value, depth: int = 3) -> Iterator[torch.Tensor]:
    """Tensors in an attribute: itself, or inside lists, tuples and dicts (values) nested up to `depth`."""
    if torch.is_tensor(value):
        yield value
    elif depth and isinstance(value, (list, tuple)):
        for item in value:
            yield from _tensors_in(item, depth - 1)
    elif depth and isinstance(value, dict):
        for item in value.values():
            yield from _tensors_in(item, depth - 1)


def _zero_attribute_category(name: str) -> str:
    """What a ZeRO optimizer attribute holds, from its name (DeepSpeed 0.19's stage 1/2 and stage 3 optimizers)."""
    name = name.lower()
    if "grad" in name or "ipg" in name:
        return "grads"  # averaged_gradients, grads_in_partition, grad_partitions_flat_buffer, ipg buckets
    if "fp32" in name:
        return "optimizer"  # single_partition_of_fp32_groups, fp32_partitioned_groups_flat: master weights
    if "bit16" in name or "fp16" in name or "lp_param" in name:
        return "weights"  # bit16_groups_flat, fp16_partitioned_groups_flat, lp_param_buffer: the parameters' storage
    return "buffers"


def _holders(backend) -> Iterator[tuple[str, str, torch.Tensor]]:
    """(category, where, tensor) for every tensor the backend keeps, in order of precedence: a storage seen twice
    keeps the category it was first seen under (ZeRO-3's partitions are the fp32 masters too: weights)."""
    module: nn.Module = backend.module
    for p in module.parameters():
        yield "weights", "parameters", p
        if hasattr(p, "ds_tensor"):  # ZeRO-3: the local partition; p.data is an empty placeholder
            yield "weights", "ds_tensor", p.ds_tensor
    for p in module.parameters():
        if p.grad is not None:
            yield "grads", "grad", p.grad
    zero_optimizer = getattr(backend, "zero_optimizer", None)
    state_owner = zero_optimizer.optimizer if zero_optimizer is not None else backend.optimizer
    for state in state_owner.state.values():
        for t in state.values():
            if torch.is_tensor(t) and t.numel() > 1:  # not the step counters
                yield "optimizer", "optimizer.state", t
    if zero_optimizer is not None:
        for name, value in vars(zero_optimizer).items():
            if name == "optimizer":
                continue
            category = _zero_attribute_category(name)
            for t in _tensors_in(value):
                yield category, name, t
    for b in module.buffers():
        yield "buffers", "buffers", b


def census(backend) -> dict[int, tuple[str, str, torch.UntypedStorage]]:
    """storage address -> (category, where, storage), each storage once."""
    found: dict[int, tuple[str, str, torch.UntypedStorage]] = {}
    for category, where, t in _holders(backend):
        storage = _storage(t)
        if storage is not None and storage.data_ptr() not in found:
            found[storage.data_ptr()] = (category, where, storage)
    return found


def rank_memory(backend, by_holder: bool = False) -> dict[str, int]:
    """Bytes this rank holds now, by category (weights, grads, optimizer, buffers) and in total; with `by_holder`
    also by where they were found ("category:where" keys)."""
    out = dict.fromkeys(CATEGORIES, 0)
    for category, where, storage in census(backend).values():
        out[category] += storage.nbytes()
        if by_holder:
            key = f"{category}:{where}"
            out[key] = out.get(key, 0) + storage.nbytes()
    out["total"] = sum(out[c] for c in CATEGORIES)
    return out


@contextlib.contextmanager
def held_maxima(backend) -> Iterator[dict[str, int]]:
    """The most bytes of each category held at any micro-batch boundary while active: a census after every
    backward (gradients accumulate between micro-batches, and ZeRO-1 keeps them whole until the last one) and at
    exit. Yields the dict it fills."""
    maxima = dict.fromkeys((*CATEGORIES, "total"), 0)

    def record() -> None:
        for key, value in rank_memory(backend).items():
            maxima[key] = max(maxima[key], value)

    original = backend.backward

    def backward(loss, **kwargs):
        original(loss, **kwargs)
        record()

    backend.backward = backward
    try:
        yield maxima
        record()
    finally:
        del backend.backward  # the class's method again


class PeakTracker(TorchDispatchMode):
    """Live tensor bytes of this rank while active, starting from `census(backend)`; `peak_bytes` is their maximum.

    Usage: `with PeakTracker(backend) as tracker: <one training step>`, then `tracker.peak_bytes`.
    """

    def __init__(self, backend):
        super().__init__()
        self._live: dict[int, int] = {}  # id(storage) -> bytes
        self._refs: dict[int, weakref.ref] = {}
        self.current_bytes = self.peak_bytes = 0
        for _, _, storage in census(backend).values():
            self._see(storage)
        self.start_bytes = self.peak_bytes = self.current_bytes
        self._resize = torch.UntypedStorage.resize_

    def _see(self, storage: torch.UntypedStorage) -> None:
        key = id(storage)
        nbytes = storage.nbytes()
        if key in self._live:
            self._update(key, nbytes)
            return
        self._live[key] = nbytes
        self._refs[key] = weakref.ref(storage, lambda _, key=key: self._free(key))
        self.current_bytes += nbytes
        self.peak_bytes = max(self.peak_bytes, self.current_bytes)

    def _update(self, key: int, nbytes: int) -> None:
        self.current_bytes += nbytes - self._live[key]
        self._live[key] = nbytes
        self.peak_bytes = max(self.peak_bytes, self.current_bytes)

    def _free(self, key: int) -> None:
        self.current_bytes -= self._live.pop(key, 0)
        self._refs.pop(key, None)

    def _see_all(self, tensors: Iterable) -> None:
        for t in tensors:
            # DTensor's sharding propagation runs ops on fake tensors of the global shape: no memory behind them.
            if torch.is_tensor(t) and not hasattr(t, "to_local") and not isinstance(t, FakeTensor):
                self._see(t.untyped_storage())

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if any(hasattr(t, "to_local") for t in types):
            return NotImplemented  # let DTensor run its local ops, which this mode then sees
        out = func(*args, **(kwargs or {}))
        self._see_all(tree_leaves(out))
        return out

    def __enter__(self):
        tracker, resize = self, self._resize

        def resize_(storage, size):
            result = resize(storage, size)
            tracker._see(storage)
            return result

        torch.UntypedStorage.resize_ = resize_
        return super().__enter__()

    def __exit__(self, *exc):
        torch.UntypedStorage.resize_ = self._resize
        return super().__exit__(*exc)
