"""Bytes of parameters and optimizer state this rank really holds (local shards, each storage counted once)."""

from __future__ import annotations

import torch


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


def _storages(tensors) -> dict[int, int]:
    """storage address -> bytes; a view into a flat buffer counts the buffer once."""
    out: dict[int, int] = {}
    for t in tensors:
        if not torch.is_tensor(t):
            continue
        t = _local(t)
        storage = t.untyped_storage()
        if storage.nbytes():
            out[storage.data_ptr()] = storage.nbytes()
    return out


def parameter_tensors(backend) -> list[torch.Tensor]:
    tensors = []
    for p in backend.module.parameters():
        tensors.append(p)
        if hasattr(p, "ds_tensor"):  # ZeRO-3: the local partition; p.data is an empty placeholder
            tensors.append(p.ds_tensor)
    # DeepSpeed steps its fp32 master partitions: the optimizer's params, and the keys of its state.
    tensors += [p for group in backend.optimizer.param_groups for p in group["params"]]
    tensors += [k for k in backend.optimizer.state.keys() if torch.is_tensor(k)]
    return tensors


def optimizer_state_tensors(backend) -> list[torch.Tensor]:
    return [t for state in backend.optimizer.state.values() for t in state.values() if torch.is_tensor(t) and t.numel() > 1]


def rank_bytes(backend) -> dict[str, int]:
    params = _storages(parameter_tensors(backend))
    states = _storages(optimizer_state_tensors(backend))
    states = {k: v for k, v in states.items() if k not in params}
    return {"param_bytes": sum(params.values()), "optimizer_bytes": sum(states.values()),
            "total_bytes": sum(params.values()) + sum(states.values())}
