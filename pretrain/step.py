"""One optimiser step's forward and backward: micro-batches, fp32 loss, clip, global loss.

The update itself (`backend.step()` or `backend.skip_step()`) is left to the loop, which
owns the non-finite guard.
"""

from __future__ import annotations

import contextlib
import math
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ember.pretrain.fused_loss import has_fused_loss

POISON_ENV = "EMBER_POISON_STEP"


@dataclass
class StepResult:
    loss: float        # cross-entropy, mean over the global batch (identical on every rank)
    grad_norm: float   # global pre-clip gradient norm
    finite: bool       # both of the above are finite: the update may be applied


def poisoned_steps() -> set[int]:
    """Fault injection for tests: `EMBER_POISON_STEP=7` or `=3,4,5` or `=3-5` makes those steps' loss NaN.

    The NaN is injected on rank 0 only; the gradient reduction and the loss all-reduce carry
    it to the other ranks, which is exactly how a real bad batch spreads.
    """
    steps: set[int] = set()
    for part in filter(None, os.environ.get(POISON_ENV, "").replace(" ", "").split(",")):
        low, _, high = part.partition("-")
        steps.update(range(int(low), int(high or low) + 1))
    return steps


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor, z_loss: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss to optimise, cross-entropy to report), both in fp32 whatever the autocast dtype."""
    logits = logits.float()  # (batch, seq, vocab)
    flat = logits.view(-1, logits.size(-1))  # (batch * seq, vocab)
    ce = F.cross_entropy(flat, labels.reshape(-1))
    if not z_loss:
        return ce, ce
    # z-loss keeps the log-partition near 0 so the softmax stays well conditioned (PaLM).
    log_z = torch.logsumexp(flat, dim=-1)  # (batch * seq,)
    return ce + z_loss * log_z.pow(2).mean(), ce


def autocast(backend) -> contextlib.AbstractContextManager:
    if backend.autocast_dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=backend.device.type, dtype=backend.autocast_dtype)


def forward_loss(backend, tokens: torch.Tensor, z_loss: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss to optimise, cross-entropy) of one micro-batch `tokens` (micro_batch, seq_len + 1) on this rank."""
    tokens = tokens.to(backend.device, non_blocking=True)
    inputs, labels = tokens[:, :-1], tokens[:, 1:]  # (micro_batch, seq_len) each
    with autocast(backend):
        if has_fused_loss(backend.module):
            return backend.model(input_ids=inputs, loss_labels=labels, z_loss=z_loss)
        logits = backend.model(input_ids=inputs).logits  # (micro_batch, seq_len, vocab)
    return causal_lm_loss(logits, labels, z_loss)


def train_step(backend, tokens: torch.Tensor, *, micro_batch_size: int, grad_clip: float, z_loss: float, poison: bool = False) -> StepResult:
    """Forward/backward every micro-batch of this rank's slice `tokens` (local_batch, seq_len + 1), then clip."""
    micro_batches = tokens.split(micro_batch_size)
    num_micro = len(micro_batches)
    ce_sum = torch.zeros((), device=backend.device)
    for i, micro in enumerate(micro_batches):
        loss, ce = forward_loss(backend, micro, z_loss)
        if poison and backend.rank == 0:
            loss, ce = loss * float("nan"), ce * float("nan")
        # Equal-sized micro-batches of full sequences: the mean of means is the global token mean.
        backend.backward(loss / num_micro, last_micro_batch=i == num_micro - 1)
        ce_sum += ce.detach()
    grad_norm = backend.clip_grad_norm(grad_clip)
    # Every rank must take the same skip/step decision: both numbers are global.
    loss = backend.all_reduce_mean(ce_sum.item() / num_micro)
    return StepResult(loss=loss, grad_norm=grad_norm, finite=math.isfinite(loss) and math.isfinite(grad_norm))


@torch.no_grad()
def evaluate(backend, batches, num_batches: int, micro_batch_size: int) -> float:
    """Mean cross-entropy over `num_batches` global validation batches.

    Each rank reads its slice of every global batch in equal micro-batches, so the same
    sequences are scored whatever the world size.
    """
    backend.model.eval()
    total, count = 0.0, 0
    for _, batch in zip(range(num_batches), batches):
        for micro in batch.tokens.split(micro_batch_size):
            total += forward_loss(backend, micro)[1].item()
            count += 1
    backend.model.train()
    return backend.all_reduce_mean(total / max(count, 1))
