"""Plan at scale on one CPU: rank R of an N-rank job, built and stepped on fake tensors, its memory measured.

`simulate(cfg, world_size, rank, target, gpu_mem)` runs the simulation in a child process (`child.py`), so the
caller's process group, tensors and torch patches stay untouched; `rank.py` holds what the child does and
`torch_internals.py` every torch internal it uses. Backends: fsdp is simulated; single, ddp and DeepSpeed ZeRO
come from `accounting.memory_per_rank`'s formulas (the memory tracker follows FSDP2 modules only; DeepSpeed's
engine and DDP's C++ reducer on fake tensors were not tried).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

from ember.errors import UserError
from ember.pretrain.simulate.rank import SIMULATED_BACKENDS, TARGETS

__all__ = ["SIMULATED_BACKENDS", "TARGETS", "simulate"]

# torchrun's variables would make the child join the caller's job.
_JOB_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "GROUP_RANK",
            "ROLE_RANK", "TORCHELASTIC_RUN_ID")


def simulate(cfg, world_size: int, rank: int = 0, target: str = "gpu", gpu_mem: int | None = None,
             timeout_s: float | None = None) -> dict:
    """Bytes rank `rank` of `world_size` holds in one training step of `cfg` (a RunConfig) on `target` ('gpu' or
    'cpu'), by category, and with `gpu_mem` the largest micro-batch that fits it. See rank.simulate_rank."""
    from ember.config import to_yaml

    if not 0 <= rank < world_size:
        raise UserError(f"rank {rank} is not one of the {world_size} ranks", "--rank")
    request = {"config": to_yaml(cfg), "world_size": world_size, "rank": rank, "target": target, "gpu_mem": gpu_mem}
    env = {k: v for k, v in os.environ.items() if k not in _JOB_ENV}
    env.setdefault("PYTHONWARNINGS", "ignore")
    proc = subprocess.run([sys.executable, "-m", "ember.pretrain.simulate.child"], input=json.dumps(request),
                          capture_output=True, text=True, env=env, timeout=timeout_s)
    lines = proc.stdout.strip().splitlines()
    answer = json.loads(lines[-1]) if lines and lines[-1].startswith("{") else None
    if answer is None:
        raise RuntimeError(f"the simulation failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    if "error" in answer:
        raise UserError(answer["error"]["what"], answer["error"]["where"])
    return answer
