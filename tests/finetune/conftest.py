"""The fine-tuning tests start from tiny pretraining runs made with the pretraining tests' helpers."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "pretrain"))

from pretrain_runs import pretrain, write_config  # noqa: E402


@pytest.fixture(scope="session")
def parent(small_dataset, tmp_path_factory) -> Path:
    """A tiny pretraining run of 6 steps (exported to run/hf): the parent the fine-tuning tests start from."""
    root = tmp_path_factory.mktemp("parent")
    pretrain(write_config(root / "pre.yaml", small_dataset, root / "run", max_steps=6, eval_every=0))
    return root / "run"
