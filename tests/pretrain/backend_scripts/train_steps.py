"""Train a tiny Llama on fixed synthetic tokens with one or more backends; write what happened as JSON.

Run alone (single process) or under `python -m torch.distributed.run --nproc_per_node 2`. Each job in
`--jobs` is `BACKEND[:ZERO_STAGE][@ARCH]` (llama by default) and runs `--steps` optimizer steps from the same initial weights. Options
add a save/load round trip, a poisoned (NaN) step and a load from another run's checkpoint.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
from pathlib import Path

import torch
import torch.nn.functional as F

from ember.config import validate
from ember.pretrain.backends import build_backend
from ember.pretrain.distributed import exit_worker
from ember.pretrain.optim import build_optimizer
from ember.run_config import RunConfig

VOCAB = 256


def make_config(args, backend: str, zero_stage: int, arch: str = "llama") -> RunConfig:
    return validate({
        "seed": 7,
        "data": {"datasets": [{"path": "unused"}]},
        "model": {"arch": arch, "hidden_size": 64, "num_layers": 2, "num_heads": 4,
                  "num_kv_heads": 4 if arch == "gpt_neox" else 2,  # gpt_neox has no grouped-query attention
                  "hf_overrides": {"num_local_experts": 2, "num_experts_per_tok": 1} if arch == "mixtral" else {},
                  "ffn_hidden_size": 128, "vocab_size": VOCAB, "max_seq_len": 64,
                  "tie_embeddings": args.tie},
        "train": {"backend": backend, "zero_stage": zero_stage, "seq_len": args.seq_len,
                  "global_batch_size": args.global_batch, "micro_batch_size": args.micro_batch,
                  "lr": 3e-3, "grad_clip": args.grad_clip, "precision": "fp32",
                  "activation_checkpointing": args.ac_every > 0, "ac_every": max(args.ac_every, 1),
                  "compile": args.compile, "cpu_offload": args.cpu_offload},
    }, RunConfig)


def global_tokens(step: int, args) -> torch.Tensor:
    """(global_batch, seq_len + 1) tokens of optimizer step `step`: a pure function of the step."""
    gen = torch.Generator().manual_seed(1000 + step)
    # Arithmetic progressions mod VOCAB with a random start and stride: learnable, so losses move.
    start = torch.randint(0, VOCAB, (args.global_batch, 1), generator=gen)
    stride = torch.randint(1, 8, (args.global_batch, 1), generator=gen)
    positions = torch.arange(args.seq_len + 1).unsqueeze(0)
    return (start + stride * positions) % VOCAB


def train_step(backend, step: int, args, poison: bool = False) -> dict:
    tokens = global_tokens(step, args)
    per_rank = args.global_batch // backend.world_size
    local = tokens[backend.rank * per_rank:(backend.rank + 1) * per_rank]  # (per_rank, seq + 1)
    micro_batches = local.split(args.loop_micro_batch or args.micro_batch)
    loss_sum = 0.0
    for i, micro in enumerate(micro_batches):
        inputs, labels = micro[:, :-1], micro[:, 1:]
        logits = backend.model(input_ids=inputs).logits  # (micro, seq, vocab)
        loss = F.cross_entropy(logits.float().reshape(-1, VOCAB), labels.reshape(-1))
        if poison and i == 0 and backend.rank == 0:  # one bad rank must stop every rank's update
            loss = loss * float("nan")
        backend.backward(loss / len(micro_batches), last_micro_batch=i == len(micro_batches) - 1)
        loss_sum += loss.item() / len(micro_batches)
    norm = backend.clip_grad_norm(args.grad_clip)
    if math.isfinite(norm):
        backend.step()
        skipped = False
    else:
        backend.skip_step()
        skipped = True
    return {"loss": backend.all_reduce_mean(loss_sum), "grad_norm": norm, "skipped": skipped}


def set_lr(backend, step: int) -> None:
    # A changing lr checks that the loop's writes into param_groups reach the update (DeepSpeed included).
    for group in backend.optimizer.param_groups:
        group["lr"] = 3e-3 * (0.5 + 0.5 * math.cos(math.pi * step / 40))


def state_digest(state: dict[str, torch.Tensor]) -> str:
    """sha256 over sorted names and exact bytes: equal digests mean bit-identical weights."""
    h = hashlib.sha256()
    for name in sorted(state):
        h.update(name.encode())
        h.update(state[name].detach().to(torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()


def weights_digest(backend) -> str | None:
    full = backend.full_state_dict()  # collective
    return state_digest(full) if full is not None else None


def optimizer_digest(backend) -> str:
    """Hash of this rank's optimizer state tensors (the client optimizer's, which ZeRO updates in place)."""
    h = hashlib.sha256()
    for state in backend.optimizer.state.values():
        for key in sorted(state):
            t = state[key]
            t = t.to_local() if hasattr(t, "to_local") else t
            if torch.is_tensor(t):
                h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def run_steps(backend, start: int, stop: int, args, result: dict | None = None) -> list[dict]:
    records = []
    for step in range(start, stop):
        set_lr(backend, step)
        poison = step == args.poison_step
        if poison and result is not None:
            before = weights_digest(backend), optimizer_digest(backend)
        records.append(train_step(backend, step, args, poison=poison))
        if poison and result is not None:
            after = weights_digest(backend), optimizer_digest(backend)
            result["weights_unchanged_by_skip"] = before[0] == after[0] if backend.rank == 0 else None
            result["optimizer_unchanged_by_skip"] = before[1] == after[1]
    return records


def build(cfg):
    return build_backend(cfg, lambda m: build_optimizer(m, cfg.train))


def job(args, spec: str) -> dict:
    """Train `--steps` steps (saving at `--save-at`), then optionally resume a fresh backend from the save."""
    backend_spec, _, arch = spec.partition("@")
    backend_name, _, stage = backend_spec.partition(":")
    cfg = make_config(args, backend_name, int(stage or 3), arch or "llama")
    backend = build(cfg)
    result: dict = {"backend": spec, "world_size": backend.world_size, "init_digest": weights_digest(backend),
                    # (name, weight decay) of each optimizer param group: the decay/no-decay split must survive sharding.
                    "param_groups": [[g.get("group"), g["weight_decay"]] for g in backend.optimizer.param_groups],
                    "checkpointed_blocks": sum(bool(getattr(m, "gradient_checkpointing", False)) for m in backend.module.modules())}
    if args.load_from:
        # Continue another run's checkpoint (possibly written at another world size or by another backend).
        backend.load(Path(args.load_from))
        result["steps"] = run_steps(backend, args.load_step, args.steps, args, result)
    else:
        save_at = args.save_at or args.steps
        result["steps"] = run_steps(backend, 0, save_at, args, result)
        if args.save_at:
            ckpt = Path(args.ckpt_root) / spec.replace(":", "_")
            backend.save(ckpt)
            result["saved_digest"] = weights_digest(backend)
            result["steps"] += run_steps(backend, save_at, args.steps, args, result)
    result["final_digest"] = weights_digest(backend)
    if args.save_at and args.round_trip:
        # A fresh backend (new init), loaded from the checkpoint, must continue bit for bit.
        del backend
        fresh = build(cfg)
        fresh.load(Path(args.ckpt_root) / spec.replace(":", "_"))
        result["resumed"] = run_steps(fresh, args.save_at, args.steps, args)
        result["resumed_final_digest"] = weights_digest(fresh)
        fresh.barrier()
    return result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--jobs", required=True, help="comma-separated BACKEND[:ZERO_STAGE][@HF_ARCH]")
    parser.add_argument("--out", required=True, help="JSON file (rank R writes OUT.rankR)")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--global-batch", type=int, default=8)
    parser.add_argument("--micro-batch", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=32)
    parser.add_argument("--loop-micro-batch", type=int, default=0,
                        help="split each rank's batch this way instead of by the config's micro batch")
    parser.add_argument("--grad-clip", type=float, default=0.5)
    parser.add_argument("--tie", action="store_true")
    parser.add_argument("--ac-every", type=int, default=0, help="activation checkpointing every k-th block (0: off)")
    parser.add_argument("--compile", action="store_true", help="torch.compile each block")
    parser.add_argument("--cpu-offload", action="store_true")
    parser.add_argument("--save-at", type=int, default=0)
    parser.add_argument("--ckpt-root", default="")
    parser.add_argument("--round-trip", action="store_true")
    parser.add_argument("--load-from", default="")
    parser.add_argument("--load-step", type=int, default=0)
    parser.add_argument("--poison-step", type=int, default=-1)
    args = parser.parse_args()

    torch.use_deterministic_algorithms(True)
    results = [job(args, spec) for spec in args.jobs.split(",")]
    rank = int(os.environ.get("RANK", "0"))
    path = Path(f"{args.out}.rank{rank}")
    path.write_text(json.dumps(results, indent=1))
    exit_worker(0)


if __name__ == "__main__":
    main()
