"""Measure what each rank holds in two real training steps of a run config (ember's own step: configured loss,
backward, clip, optimizer step); write OUT.rankR as JSON.

Run alone or under `python -m torch.distributed.run --standalone --nproc_per_node N memory_steps.py CONFIG OUT
--backends fsdp,ddp,deepspeed:1 [--set ...]`; OUT.rankR holds one result per backend, each from a fresh backend:
`state` is the census just before the second optimizer step (weights, gradients and optimizer state all alive),
`held_maxima` each category's most at any micro-batch boundary, `peak_bytes` the most live tensor bytes during
the two steps.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch

from ember.config import load_config
from ember.pretrain import memory
from ember.pretrain.backends import build_backend
from ember.pretrain.distributed import exit_worker, init_distributed
from ember.pretrain.kernels import decide_kernels
from ember.pretrain.optim import build_optimizer
from ember.pretrain.step import CausalLMLoss, lm_batch, train_step
from ember.run_config import RunConfig


def local_tokens(cfg, backend, step: int) -> torch.Tensor:
    """(per-rank batch, seq_len + 1) random tokens for `step`: every rank its own slice of the global batch."""
    t = cfg.train
    per_rank = t.global_batch_sequences(backend.world_size) // backend.world_size
    gen = torch.Generator().manual_seed(100 * step + backend.rank)
    return torch.randint(0, cfg.model.vocab_size, (per_rank, t.seq_len + 1), generator=gen)


def measure(args, spec: str) -> dict:
    backend_name, _, stage = spec.partition(":")
    sets = [f"train.backend={backend_name}"] + ([f"train.zero_stage={stage}"] if stage else [])
    cfg = load_config(args.config, RunConfig, [*args.overrides, *sets], kind="pretrain")
    env = init_distributed()
    cfg = decide_kernels(cfg.train, env.device).apply(cfg)  # as a run builds it
    backend = build_backend(cfg, lambda m: build_optimizer(m, cfg.train))
    t = cfg.train
    state = None
    with memory.PeakTracker(backend) as tracker, memory.held_maxima(backend) as maxima:
        for step in (1, 2):
            train_step(backend, lm_batch(local_tokens(cfg, backend, step)), micro_batch_size=t.micro_batch_size,
                       grad_clip=t.grad_clip, loss=CausalLMLoss(t.z_loss))
            if step == 2:
                state = memory.rank_memory(backend, by_holder=True)
            backend.step()
    result = {"backend": spec, "rank": backend.rank, "world_size": backend.world_size, "state": state,
              "after_step": memory.rank_memory(backend), "held_maxima": maxima, "peak_bytes": tracker.peak_bytes,
              "start_bytes": tracker.start_bytes}
    del backend, tracker
    return result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("config")
    parser.add_argument("out")
    parser.add_argument("--backends", default="fsdp", help="comma-separated BACKEND[:ZERO_STAGE]")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    args = parser.parse_args()
    results = [measure(args, spec) for spec in args.backends.split(",")]
    rank = int(os.environ.get("RANK", "0"))
    Path(f"{args.out}.rank{rank}").write_text(json.dumps(results))
    exit_worker(0)


if __name__ == "__main__":
    main()
