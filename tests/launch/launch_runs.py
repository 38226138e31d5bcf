"""Shared by the launch tests: tiny run configs started through `ember launch`, and what their runs left."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from ember_cli import run_ember
from pretrain_runs import write_config

# cpu_matmul pinned: the faulty and the uninterrupted run are compared bit for bit, and `auto` is a timing
# probe that two separate jobs on a loaded machine can decide differently.
FAST_TRAIN = {"max_steps": 8, "checkpoint_every": 3, "log_every": 1, "eval_every": 0, "cpu_matmul": "torch"}


def tiny_config(root: Path, dataset_dir: Path, name: str, **train) -> Path:
    """A ~50k-parameter llama run of 8 steps, checkpoints at 3 and 6, one train record per step."""
    return write_config(root / f"{name}.yaml", dataset_dir, root / name, **{**FAST_TRAIN, **train})


def launch(config: Path, *args: str, env: dict | None = None, timeout: float = 600):
    """`ember launch CONFIG --scheduler local --procs-per-node 2 ARGS` (the real CLI, real torchrun on gloo)."""
    return run_ember("launch", str(config), "--scheduler", "local", "--procs-per-node", "2", *args, env=env, timeout=timeout)


def train_steps(run_dir: Path) -> list[int]:
    lines = (Path(run_dir) / "metrics.jsonl").read_text().splitlines()
    return [r["step"] for r in map(json.loads, lines) if r["kind"] == "train"]


def train_losses(run_dir: Path) -> dict[int, float]:
    lines = (Path(run_dir) / "metrics.jsonl").read_text().splitlines()
    return {r["step"]: r["loss"] for r in map(json.loads, lines) if r["kind"] == "train"}


def final_weights(run_dir: Path) -> dict:
    """The HF export's tensors (run_dir/hf/model.safetensors)."""
    from safetensors.torch import load_file

    return load_file(Path(run_dir) / "hf" / "model.safetensors")


def assert_bit_identical(run_dir: Path, reference: Path) -> None:
    import torch

    got, want = final_weights(run_dir), final_weights(reference)
    assert got.keys() == want.keys()
    differ = [name for name in want if not torch.equal(got[name], want[name])]
    assert not differ, f"final weights differ from the uninterrupted run in {differ[:5]}"


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error:")]


PYTHON = sys.executable
