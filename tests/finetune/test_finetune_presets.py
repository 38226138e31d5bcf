"""Every shipped fine-tuning preset validates against the fine-tuning run config."""

from __future__ import annotations

from pathlib import Path

import pytest

from ember.config import load_config
from ember.run_config import FinetuneRunConfig

PRESETS = sorted((Path(__file__).resolve().parents[2] / "configs" / "finetune").glob("*.yaml"))


@pytest.mark.parametrize("path", PRESETS, ids=[p.stem for p in PRESETS])
def test_finetune_preset_loads(path):
    cfg = load_config(path, FinetuneRunConfig, kind="finetune")
    assert cfg.finetune.task == path.stem
    assert path.read_text().startswith(f"# ember finetune configs/finetune/{path.name}")


def test_a_topic_preset_exists():
    assert any("topic" in p.name for p in PRESETS)
