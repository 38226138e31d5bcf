"""Shared by test_memory and test_simulate: one small run config, its per-rank memory measured in real runs
(backend_scripts/memory_steps.py, alone or under torchrun on gloo), cached per launch for the session."""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]
SCRIPT = Path(__file__).parent / "backend_scripts" / "memory_steps.py"
_WORKDIR = Path(tempfile.mkdtemp(prefix="ember-memory-"))

# ~1M parameters: big enough that every backend's buffers are visible next to the model, small enough for seconds.
# 8 sequences per step: 2 micro-batches per rank on 2 ranks (gradients accumulate), 1 on 4.
CONFIG = {
    "seed": 7, "data": {"datasets": [{"path": "unused"}]}, "tracking": {"wandb": "disabled"},
    "model": {"arch": "llama", "hidden_size": 128, "num_layers": 4, "num_heads": 4, "num_kv_heads": 2,
              "ffn_hidden_size": 352, "vocab_size": 1024, "max_seq_len": 128},
    "train": {"backend": "fsdp", "seq_len": 64, "global_batch_size": 8, "micro_batch_size": 2, "precision": "fp32",
              "cpu_matmul": "torch"},  # pinned: the auto choice is a timed probe; memory is the same either way
}
ALL_BACKENDS = "fsdp,ddp,deepspeed:1,deepspeed:2,deepspeed:3"


def config_path() -> Path:
    path = _WORKDIR / "memory.yaml"
    if not path.is_file():
        path.write_text(yaml.safe_dump(CONFIG))
    return path


def run_config():
    from ember.config import load_config
    from ember.run_config import RunConfig

    return load_config(config_path(), RunConfig, kind="pretrain")


@functools.cache
def measured(nproc: int, backends: str) -> dict[str, list[dict]]:
    """{backend spec: [rank 0's result, rank 1's, ...]} of real runs on `nproc` processes (1: no process group)."""
    out = _WORKDIR / f"run-{nproc}-{backends.replace(',', '_').replace(':', '')}.json"
    launcher = [sys.executable] if nproc == 1 else [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                                   "--nproc_per_node", str(nproc)]
    cmd = [*launcher, str(SCRIPT), str(config_path()), str(out), "--backends", backends]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    ranks = [json.loads(Path(f"{out}.rank{r}").read_text()) for r in range(nproc)]
    return {job["backend"]: [rank[i] for rank in ranks] for i, job in enumerate(ranks[0])}
