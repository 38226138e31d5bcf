"""Read checkpoints without unpickling arbitrary objects.

DeepSpeed calls `torch.load(..., weights_only=False)`: inside `weights_only_torch_load()` every `torch.load`
runs with `weights_only=True`, allowing besides tensors only the few plain classes ZeRO checkpoints hold.
torch.distributed.checkpoint reads its `.metadata` with plain `pickle.load`: `SafeFileSystemReader` reads it
with an unpickler that builds only DCP's own metadata classes, torch dtypes/sizes/layouts and paths.
"""

from __future__ import annotations

import contextlib
import functools
import pathlib
import pickle
from pathlib import Path
from typing import Any

import torch
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta

from ember.errors import UserError


def _allowed_globals() -> list:
    """Found in ZeRO 1/2/3 checkpoints by `torch.serialization.get_unsafe_globals_in_checkpoint`."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


@contextlib.contextmanager
def weights_only_torch_load(ckpt_dir: Path | str = "checkpoint"):
    """Every torch.load inside is weights_only; a file that needs more is a UserError naming `ckpt_dir`."""
    original = torch.load

    @functools.wraps(original)
    def safe_load(*args, **kwargs):
        kwargs["weights_only"] = True
        return original(*args, **kwargs)

    torch.load = safe_load
    try:
        with torch.serialization.safe_globals(_allowed_globals()):
            yield
    except pickle.UnpicklingError as e:
        lines = [line.strip() for line in str(e).splitlines() if "Unsupported global" in line]
        what = lines[0] if lines else type(e).__name__
        raise UserError(f"refusing to unpickle a non-tensor object from the DeepSpeed checkpoint ({what})",
                        str(ckpt_dir)) from None
    finally:
        torch.load = original


_TORCH_VALUE_TYPES = (torch.dtype, torch.layout, torch.memory_format)


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if module.startswith("torch.distributed.checkpoint."):
            return super().find_class(module, name)
        if module == "torch":
            value = getattr(torch, name, None)
            if value is torch.Size or isinstance(value, _TORCH_VALUE_TYPES):
                return value
        if (module, name) == ("torch.serialization", "_get_layout"):
            return super().find_class(module, name)
        if module == "pathlib" and name in ("PosixPath", "WindowsPath", "PurePosixPath", "PureWindowsPath", "Path"):
            return getattr(pathlib, name)
        if (module, name) == ("collections", "OrderedDict"):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"Unsupported global: {module}.{name}")


class SafeFileSystemReader(FileSystemReader):
    """FileSystemReader whose metadata read builds only checkpoint-metadata objects."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        path = self._get_metadata_path(kwargs.get("rank"))
        try:
            with self.fs.create_stream(path, "rb") as metadata_file:
                metadata = _MetadataUnpickler(metadata_file).load()
        except pickle.UnpicklingError as e:
            raise UserError(f"refusing to unpickle the checkpoint metadata ({e})", str(path)) from None
        except EOFError:
            raise UserError("the checkpoint metadata is truncated", str(path)) from None
        if not isinstance(metadata, Metadata):
            raise UserError("checkpoint metadata is not torch.distributed.checkpoint Metadata", str(path))
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata
