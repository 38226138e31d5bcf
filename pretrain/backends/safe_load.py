"""Load DeepSpeed's pickled checkpoint files without unpickling arbitrary objects.

DeepSpeed calls `torch.load(..., weights_only=False)`. Inside `weights_only_torch_load()` every `torch.load`
runs with `weights_only=True`, allowing besides tensors only the few plain classes ZeRO checkpoints hold.
"""

from __future__ import annotations

import contextlib
import functools
import pickle
from pathlib import Path

import torch

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
