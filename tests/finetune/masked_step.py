"""One `train_step` on a global batch masked unevenly across rows, for the normalisation test.

Run alone or under torchrun (gloo). Every rank takes its rows of the same global batch and splits them into
micro-batches of `--micro-batch`; rank 0 saves the loss, the grad norm and every full gradient (ddp gradients
are already averaged over ranks) with the plain loss and with the fused loss.
"""

from __future__ import annotations

import argparse
import os

import torch

from ember.config import validate
from ember.pretrain.backends import build_backend
from ember.pretrain.distributed import exit_worker
from ember.pretrain.fused_loss import IGNORE_INDEX
from ember.pretrain.optim import build_optimizer
from ember.pretrain.step import ModelBatch, train_step
from ember.run_config import RunConfig

VOCAB, ROWS, SEQ = 128, 8, 12


def global_batch() -> ModelBatch:
    """Rows supervised from position 2 * row on: row 0 fully, later rows less, rows 6 and 7 not at all."""
    gen = torch.Generator().manual_seed(3)
    ids = torch.randint(0, VOCAB, (ROWS, SEQ + 1), generator=gen)
    labels = ids[:, 1:].clone()
    for row in range(ROWS):
        labels[row, : 2 * row] = IGNORE_INDEX
    return ModelBatch(input_ids=ids[:, :-1], labels=labels)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--micro-batch", type=int, required=True)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    torch.use_deterministic_algorithms(True)
    results = {}
    for fused in (False, True):
        world = int(os.environ.get("WORLD_SIZE", "1"))
        cfg = validate({"seed": 5, "data": {"datasets": [{"path": "unused"}]},
                        "model": {"hidden_size": 32, "num_layers": 2, "num_heads": 2, "ffn_hidden_size": 64,
                                  "vocab_size": VOCAB, "max_seq_len": 32},
                        "train": {"backend": "ddp" if world > 1 else "single", "seq_len": SEQ, "global_batch_size": ROWS,
                                  "micro_batch_size": args.micro_batch, "precision": "fp32", "fused_loss": fused,
                                  "cpu_matmul": "torch"}}, RunConfig)
        backend = build_backend(cfg, lambda m: build_optimizer(m, cfg.train))
        batch = global_batch()
        per_rank = ROWS // backend.world_size
        mine = ModelBatch(batch.input_ids[backend.rank * per_rank:(backend.rank + 1) * per_rank],
                          batch.labels[backend.rank * per_rank:(backend.rank + 1) * per_rank])
        result = train_step(backend, mine, micro_batch_size=args.micro_batch, grad_clip=0.0)
        grads = {name: p.grad.detach().clone() for name, p in backend.module.named_parameters()}
        results["fused" if fused else "plain"] = {"loss": result.loss, "grad_norm": result.grad_norm,
                                                   "num_targets": result.num_targets, "grads": grads}
        # No close between the two: a second process group in the same job is not what is tested here.
    if int(os.environ.get("RANK", "0")) == 0:
        torch.save(results, args.out)
    exit_worker(0)


if __name__ == "__main__":
    main()
