"""Every shipped preset under configs/ loads with its schema; every model preset builds on the meta device with
a parameter count near its name."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

import ember
from ember.config import load_config, read_yaml
from ember.pretrain.accounting import count_params
from ember.pretrain.config import ModelConfig
from ember.pretrain.model import build_meta_model
from ember.run_config import RunConfig

CONFIGS = Path(ember.__file__).parent / "configs"
LADDER = ["1m", "5m", "20m", "60m", "125m", "350m", "760m", "1b", "3b", "7b", "13b", "70b"]


def presets(folder: str, suffixes=(".yaml", ".yml")) -> list[Path]:
    return sorted(p for p in (CONFIGS / folder).glob("*") if p.suffix in suffixes)


def ids(paths: list[Path]) -> list[str]:
    return [p.name for p in paths]


def size_from_name(name: str) -> float:
    match = re.search(r"-(\d+(?:\.\d+)?)([mb])$", name)
    assert match, f"model preset {name} does not end in a size like -125m or -7b"
    return float(match[1]) * (1e6 if match[2] == "m" else 1e9)


def test_the_whole_ladder_ships():
    assert {p.stem for p in presets("models")} >= {f"llama-{size}" for size in LADDER}


@pytest.mark.parametrize("path", presets("models"), ids=ids(presets("models")))
def test_model_preset_builds_with_count_near_its_name(path):
    cfg = load_config(path, ModelConfig, kind="models")
    model = build_meta_model(cfg)  # meta device: a 70B model costs no memory
    built = sum(p.numel() for p in model.parameters())
    assert all(p.is_meta for p in model.parameters())
    assert count_params(cfg)["total"] == built
    assert built == pytest.approx(size_from_name(path.stem), rel=0.15)


@pytest.mark.parametrize("path", presets("models"), ids=ids(presets("models")))
def test_preset_opens_with_its_command(path):
    first = path.read_text().splitlines()[0]
    assert first.startswith("# ember ") or first.startswith("# torchrun "), f"{path.name}: first line is not a command"


def test_ladder_grows_monotonically():
    totals = [count_params(load_config(CONFIGS / "models" / f"llama-{s}.yaml", ModelConfig, kind="models"))["total"]
              for s in LADDER]
    assert totals == sorted(totals)


@pytest.mark.parametrize("path", presets("pretrain"), ids=ids(presets("pretrain")))
def test_pretrain_preset_loads(path):
    cfg = load_config(path, RunConfig, kind="pretrain")
    assert isinstance(cfg.model, ModelConfig)
    build_meta_model(cfg.model)


@pytest.mark.parametrize("path", presets("data"), ids=ids(presets("data")))
def test_data_preset_loads(path):
    from ember.data.config import PrepareConfig

    load_config(path, PrepareConfig, kind="data")


def test_other_folders_parse():
    # Folders without a schema test here (e.g. finetune recipes) must at least be valid YAML mappings.
    known = {"models", "pretrain", "data"}
    for folder in (p for p in CONFIGS.iterdir() if p.is_dir() and p.name not in known):
        for path in presets(folder.name):
            assert isinstance(read_yaml(path), dict), path
