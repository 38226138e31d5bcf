"""Shared by the loop/resume/export tests: a tiny run config, running it through the CLI, reading its records."""

from __future__ import annotations

import json
from pathlib import Path

import yaml
from ember_cli import run_ember, run_torchrun

# A ~50k-parameter llama: every run takes seconds on one core.
TINY_MODEL = {"hidden_size": 64, "num_layers": 2, "num_heads": 4, "num_kv_heads": 2, "ffn_hidden_size": 128, "max_seq_len": 64}
TINY_TRAIN = {"seq_len": 32, "global_batch_size": 8, "micro_batch_size": 2, "max_steps": 12, "lr": 3e-3,
              "warmup_steps": 2, "log_every": 1, "eval_every": 0, "eval_batches": 2}


def dataset_vocab(dataset_dir: Path) -> int:
    from ember.data.manifest import read_manifest

    return read_manifest(Path(dataset_dir)).vocab_size


def write_config(path: Path, dataset_dir: Path, run_dir: Path, **train) -> Path:
    cfg = {"run_dir": str(run_dir), "seed": 7, "data": {"datasets": [{"path": str(dataset_dir)}]},
           "model": {**TINY_MODEL, "vocab_size": dataset_vocab(dataset_dir)}, "train": {**TINY_TRAIN, **train},
           "tracking": {"wandb": "disabled"}}
    path.write_text(yaml.safe_dump(cfg))
    return path


def pretrain(config: Path, *sets: str, nproc: int = 0, env: dict | None = None):
    """`ember pretrain CONFIG --set ...` alone (nproc 0) or under torchrun; fails the test on a non-zero exit."""
    args = ["pretrain", str(config), *[a for s in sets for a in ("--set", s)]]
    proc = run_torchrun(nproc, *args, env=env) if nproc else run_ember(*args, env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def records(run_dir: Path, kind: str | None = None) -> list[dict]:
    lines = (Path(run_dir) / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if kind is None or r["kind"] == kind]


def train_losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in records(run_dir, "train")}


_TRAINED: dict[Path, Path] = {}


def trained_run(dataset_dir: Path, tmp_path_factory) -> Path:
    """One single-process run of 12 steps (eval every 5, checkpoint every 5, keep 2), shared by several test files."""
    if dataset_dir not in _TRAINED:
        root = tmp_path_factory.mktemp("loop")
        config = write_config(root / "run.yaml", dataset_dir, root / "run", eval_every=5, checkpoint_every=5, keep_last=2, log_every=2)
        pretrain(config)
        _TRAINED[dataset_dir] = root / "run"
    return _TRAINED[dataset_dir]
