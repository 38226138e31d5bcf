"""Model + optimizer checkpoints through torch.distributed.checkpoint (single, ddp, fsdp).

Every rank writes its own shards; keys are HF parameter names (optimizer state keyed by them too), so a
checkpoint written at one world size loads at any other, and into any of these three backends.
"""

from __future__ import annotations

import contextlib
import warnings
from concurrent.futures import Future
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.default_planner import _EmptyStateDictLoadPlanner
from torch.distributed.checkpoint.state_dict_loader import _load_state_dict
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from ember.errors import UserError
from ember.pretrain.backends.safe_load import SafeFileSystemReader

METADATA_FILE = ".metadata"
NO_DIST_WARNING = "torch.distributed is disabled, unavailable or uninitialized"


def is_dcp_checkpoint(ckpt_dir: Path) -> bool:
    return (Path(ckpt_dir) / METADATA_FILE).is_file()


def open_reader(ckpt_dir: Path) -> SafeFileSystemReader:
    reader = SafeFileSystemReader(str(ckpt_dir))
    # A refused or corrupt metadata file fails here as a UserError, not wrapped deep inside dcp.load.
    reader.read_metadata()
    return reader


@contextlib.contextmanager
def _single_process_ok():
    """DCP warns on every save/load without a process group; one process is intended here (single backend)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=NO_DIST_WARNING)
        yield


def _training_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    return {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, optimizer)}


def save_dcp(model: nn.Module, optimizer: torch.optim.Optimizer, ckpt_dir: Path) -> None:
    """Collective: each rank writes its shards of weights and optimizer state into `ckpt_dir`."""
    Path(ckpt_dir).mkdir(parents=True, exist_ok=True)
    with _single_process_ok():
        dcp.save(_training_state(model, optimizer), checkpoint_id=str(ckpt_dir), no_dist=not dist.is_initialized())


def begin_save_dcp(model: nn.Module, optimizer: torch.optim.Optimizer, ckpt_dir: Path,
                   group: dist.ProcessGroup | None) -> Future:
    """Collective: copy this rank's shards to CPU memory, then write them to `ckpt_dir` in a background thread.

    Returns when the copy is made (async_save stages into fresh CPU storages, CPU tensors included), so later
    optimizer steps do not change what is written. The future completes on every rank only after rank 0 wrote
    the metadata, which DCP does once all ranks reported their shards written. `group` must be a gloo group of
    its own: the write's collectives run in another thread and must not interleave with the training's.
    """
    Path(ckpt_dir).mkdir(parents=True, exist_ok=True)
    no_dist = not dist.is_initialized()
    if no_dist:
        # One process (single backend): DCP warns from the writer thread, after any `with` block here has ended.
        warnings.filterwarnings("ignore", message=NO_DIST_WARNING)
    return dcp.async_save(_training_state(model, optimizer), checkpoint_id=str(ckpt_dir), process_group=group,
                          no_dist=no_dist)


def load_dcp(model: nn.Module, optimizer: torch.optim.Optimizer, ckpt_dir: Path) -> None:
    """Collective: read the shards this rank needs now (resharding as needed) into model and optimizer."""
    if not is_dcp_checkpoint(ckpt_dir):
        raise UserError(f"no torch.distributed.checkpoint metadata ({METADATA_FILE}) in {ckpt_dir}", str(ckpt_dir))
    reader = open_reader(ckpt_dir)
    # Templates with this rank's current shapes; dcp.load fills them in place.
    state = _training_state(model, optimizer)
    with _single_process_ok():
        dcp.load(state, storage_reader=reader, no_dist=not dist.is_initialized())
    set_model_state_dict(model, state["model"])
    set_optimizer_state_dict(model, optimizer, state["optim"])


def gather_full_state_dict(model: nn.Module) -> dict[str, torch.Tensor] | None:
    """Collective: the full CPU weights on rank 0, None elsewhere."""
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    full = get_model_state_dict(model, options=options)
    if dist.is_initialized() and dist.get_rank() != 0:
        return None
    return {name: t.detach().to(torch.float32).clone() for name, t in full.items()}


def load_full_weights_dcp(ckpt_dir: Path) -> dict[str, torch.Tensor]:
    """Offline, one process, no process group: the full weights of a DCP checkpoint."""
    # What torch's own dcp_to_torch_save does, restricted to the model: the planner rebuilds the state dict
    # from the checkpoint's metadata (public dcp.load would fill only keys already present), no_dist even if a
    # process group happens to exist.
    state: dict = {}
    _load_state_dict(state, storage_reader=open_reader(ckpt_dir),
                     planner=_EmptyStateDictLoadPlanner(keys={"model"}), no_dist=True)
    return {name: t.to(torch.float32) for name, t in state["model"].items()}
