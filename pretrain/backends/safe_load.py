"""Load DeepSpeed's pickled checkpoint files without unpickling arbitrary objects.

DeepSpeed calls `torch.load(..., weights_only=False)`. Inside `weights_only_torch_load()` every `torch.load`
runs with `weights_only=True`, allowing only the few plain types DeepSpeed writes besides tensors.
"""

from __future__ import annotations

import contextlib
import functools

import torch


def _allowed_globals() -> list:
    import argparse
    import collections

    allowed = [argparse.Namespace, collections.OrderedDict]
    try:
        from deepspeed.runtime.fp16.loss_scaler import LossScaler, DynamicLossScaler

        allowed += [LossScaler, DynamicLossScaler]
    except ImportError:
        pass
    try:
        from deepspeed.runtime.zero.config import ZeroStageEnum

        allowed.append(ZeroStageEnum)
    except ImportError:
        pass
    try:
        from deepspeed.utils.tensor_fragment import fragment_address

        allowed.append(fragment_address)
    except ImportError:
        pass
    return allowed


@contextlib.contextmanager
def weights_only_torch_load():
    original = torch.load

    @functools.wraps(original)
    def safe_load(*args, **kwargs):
        kwargs["weights_only"] = True
        return original(*args, **kwargs)

    torch.load = safe_load
    try:
        with torch.serialization.safe_globals(_allowed_globals()):
            yield
    finally:
        torch.load = original
