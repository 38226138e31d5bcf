"""One optimiser step's forward and backward: the batch contract, losses normalised over the global batch, clip.

The batch contract (`ModelBatch`): input ids, labels with IGNORE_INDEX where a position has no target, and
optionally position ids that restart at every packed example and an attention mask for padding. Pretraining's
token windows become one with `lm_batch` (labels = inputs shifted by one, nothing ignored).

A loss (`CausalLMLoss`, or a task's own with the same two methods) is a sum over supervised targets divided by
the number of supervised targets in the WHOLE global batch (all micro-batches, all ranks), counted and
all-reduced before the first backward. A batch masked unevenly across micro-batches and ranks then gets the
gradient of its global mean whatever the world size and accumulation; pretraining's unmasked batches get the
mean of equal micro-batch means, as before.

The update itself (`backend.step()` or `backend.skip_step()`) is left to the loop, which
owns the non-finite guard.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F

from ember.pretrain.fused_loss import IGNORE_INDEX, has_fused_loss

@dataclass
class ModelBatch:
    """What a model's forward gets, for every task; rows are sequences (examples, or packs of them).

    input_ids:      (rows, seq) int64
    labels:         (rows, seq) next-token targets, or (rows,) class ids; IGNORE_INDEX where there is none
    position_ids:   (rows, seq) restarting at 0 for each packed example, or None (0..seq-1 in every row)
    attention_mask: (rows, seq) 1 for real tokens, 0 for padding, or None (no padding)
    """

    input_ids: torch.Tensor
    labels: torch.Tensor
    position_ids: torch.Tensor | None = None
    attention_mask: torch.Tensor | None = None

    def split(self, rows: int) -> list[ModelBatch]:
        """Micro-batches of `rows` rows each (the last may be shorter)."""
        parts = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        chunks = {name: t.split(rows) if t is not None else None for name, t in parts.items()}
        return [type(self)(**{name: c[i] if c is not None else None for name, c in chunks.items()})
                for i in range(len(chunks["input_ids"]))]

    def to(self, device: torch.device) -> ModelBatch:
        return type(self)(**{f.name: t.to(device, non_blocking=True) if (t := getattr(self, f.name)) is not None else None
                             for f in dataclasses.fields(self)})

    def model_inputs(self) -> dict[str, torch.Tensor]:
        """Keyword arguments of the HF forward (labels excluded: the losses here are ember's own)."""
        inputs = {"input_ids": self.input_ids, "position_ids": self.position_ids, "attention_mask": self.attention_mask}
        return {k: v for k, v in inputs.items() if v is not None}


def lm_batch(tokens: torch.Tensor) -> ModelBatch:
    """Pretraining's windows `tokens` (rows, seq_len + 1): inputs and next-token labels, every position supervised."""
    return ModelBatch(input_ids=tokens[:, :-1], labels=tokens[:, 1:])


def as_model_batch(batch) -> ModelBatch:
    """A loader's batch in the contract: a `ModelBatch` as it is, pretraining's token `Batch` through `lm_batch`."""
    return batch if isinstance(batch, ModelBatch) else lm_batch(batch.tokens)


class Loss(Protocol):
    def num_targets(self, batch: ModelBatch) -> int:
        """Supervised targets in `batch` (the normaliser's share of it)."""

    def __call__(self, backend, batch: ModelBatch, normalizer: float) -> tuple[torch.Tensor, torch.Tensor]:
        """(loss to optimise, metric to report), both sums over `batch`'s targets divided by `normalizer`."""


@dataclass
class StepResult:
    loss: float        # the loss's metric (cross-entropy), mean over the global batch's targets (same on every rank)
    grad_norm: float   # global pre-clip gradient norm
    finite: bool       # both of the above are finite: the update may be applied
    num_targets: int = 0  # supervised targets in the global batch


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor, z_loss: float,
                   normalizer: float | torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss to optimise, cross-entropy to report) in fp32 whatever the autocast dtype: sums over the targets that
    are not IGNORE_INDEX, divided by `normalizer` (default: their number, i.e. the means)."""
    logits = logits.float()  # (batch, seq, vocab)
    flat, flat_labels = logits.view(-1, logits.size(-1)), labels.reshape(-1)  # (batch * seq, vocab), (batch * seq,)
    valid = flat_labels != IGNORE_INDEX
    if normalizer is None:
        normalizer = valid.sum().clamp(min=1)
    ce = F.cross_entropy(flat, flat_labels, ignore_index=IGNORE_INDEX, reduction="sum") / normalizer
    if not z_loss:
        return ce, ce
    # z-loss keeps the log-partition near 0 so the softmax stays well conditioned (PaLM).
    log_z = torch.logsumexp(flat, dim=-1)  # (batch * seq,)
    return ce + z_loss * (log_z.pow(2) * valid).sum() / normalizer, ce


def autocast(backend) -> contextlib.AbstractContextManager:
    if backend.autocast_dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=backend.device.type, dtype=backend.autocast_dtype)


class CausalLMLoss:
    """Next-token cross-entropy (+ z-loss) on the labels' supervised positions, through the fused head when the
    model has one (the logits are then never stored whole)."""

    def __init__(self, z_loss: float = 0.0):
        self.z_loss = z_loss

    def num_targets(self, batch: ModelBatch) -> int:
        return int((batch.labels != IGNORE_INDEX).sum())

    def __call__(self, backend, batch: ModelBatch, normalizer: float) -> tuple[torch.Tensor, torch.Tensor]:
        with autocast(backend):
            if has_fused_loss(backend.module):
                return backend.model(**batch.model_inputs(), loss_labels=batch.labels, z_loss=self.z_loss,
                                     loss_normalizer=normalizer)
            logits = backend.model(**batch.model_inputs()).logits  # (micro_batch, seq_len, vocab)
        return causal_lm_loss(logits, batch.labels, self.z_loss, normalizer)


def train_step(backend, batch: ModelBatch, *, micro_batch_size: int, grad_clip: float, loss: Loss | None = None,
               poison: bool = False) -> StepResult:
    """Forward/backward every micro-batch of this rank's slice `batch`, then clip.

    `loss` defaults to `CausalLMLoss()`. Its normaliser is the global number of supervised targets over the world
    size: the backends average gradients over ranks, so each rank divides its sums by its share of that number.
    """
    loss_fn = loss or CausalLMLoss()
    micro_batches = batch.split(micro_batch_size)
    num_micro = len(micro_batches)
    # Counted before the first backward: every micro-batch's loss needs the global count.
    num_targets = backend.all_reduce_sum(sum(loss_fn.num_targets(m) for m in micro_batches))
    normalizer = max(num_targets, 1.0) / backend.world_size
    metric_sum = torch.zeros((), device=backend.device)
    for i, micro in enumerate(micro_batches):
        value, metric = loss_fn(backend, micro.to(backend.device), normalizer)
        if poison and backend.rank == 0:
            value, metric = value * float("nan"), metric * float("nan")
        backend.backward(value, last_micro_batch=i == num_micro - 1)
        metric_sum += metric.detach()
    grad_norm = backend.clip_grad_norm(grad_clip)
    # Every rank must take the same skip/step decision: both numbers are global. Each rank's metric sum is its
    # targets' share times world_size / num_targets, so the mean over ranks is the global mean.
    value = backend.all_reduce_mean(metric_sum.item())
    return StepResult(loss=value, grad_norm=grad_norm, finite=math.isfinite(value) and math.isfinite(grad_norm),
                      num_targets=int(num_targets))


@torch.no_grad()
def evaluate(backend, batches, num_batches: int, micro_batch_size: int, loss: Loss | None = None) -> float:
    """The loss's metric (cross-entropy by default) per supervised target over `num_batches` global batches.

    Each rank reads its slice of every global batch in micro-batches, so the same targets are scored whatever
    the world size; sums and counts are all-reduced once at the end.
    """
    loss_fn = loss or CausalLMLoss()
    backend.model.eval()
    total, count = 0.0, 0
    for _, batch in zip(range(num_batches), batches):
        for micro in as_model_batch(batch).split(micro_batch_size):
            count += loss_fn.num_targets(micro)
            total += loss_fn(backend, micro.to(backend.device), 1.0)[1].item()  # normaliser 1: the sum
    backend.model.train()
    return backend.all_reduce_sum(total) / max(backend.all_reduce_sum(count), 1.0)
