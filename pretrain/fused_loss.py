"""The LM head and cross-entropy fused and computed in row chunks: the (tokens, vocab) logits never exist whole.

A causal LM's largest activation is its logits: with a 32k-128k vocabulary they outweigh a block's activations,
and the log-softmax over them is a memory-bound pass in forward and another in backward. Here each chunk of
rows computes its logits, the softmax, the loss and, while the chunk is hot in cache, the gradients of the hidden
states and of the head's weight (the same matmul FLOPs as autograd would spend, moved into forward). Backward
then only scales the stored gradients. Peak memory drops by the logits and their gradient; on CPU it is also
faster (no full-size log-softmax passes).

`enable_fused_loss(model)` gives the HF model a `loss_labels=` forward: `model(input_ids=..., loss_labels=...,
z_loss=..., loss_normalizer=...)` returns `(loss, cross_entropy)`, sums over the supervised rows divided by
`loss_normalizer` (default: their number). The head is still called as a module, so the hooks that gather
sharded weights (FSDP2, ZeRO-3) run as before; without `loss_labels` the model is the plain HF model.
"""

from __future__ import annotations

import types
from typing import Callable

import torch
from torch import nn

from ember.pretrain.cpu_matmul import OneDNNLinear, onednn_matmul_nt, torch_matmul_nt

IGNORE_INDEX = -100  # labels of tokens without a target (padding, prompts in fine-tuning), as in HF

# Logit elements per chunk: 4M fp32 (16 MiB) fits a server CPU's L3 and is large enough for efficient GEMMs.
CHUNK_ELEMENTS = 1 << 22
MIN_CHUNK_ROWS = 128

MatmulNT = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (a, b) -> a @ b.T


def chunk_rows(num_rows: int, vocab_size: int) -> int:
    return min(num_rows, max(MIN_CHUNK_ROWS, CHUNK_ELEMENTS // vocab_size))


def _chunk_loss(matmul_nt: MatmulNT, hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                z_loss: float, scale: float, with_grads: bool):
    """Sums over one chunk of rows: (cross-entropy, z-loss), and the gradient of the logits (scaled by `scale`)."""
    logits = matmul_nt(hidden, weight)  # (rows, vocab)
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # softmax in fp32 at least
    valid = labels != IGNORE_INDEX  # (rows,)
    safe_labels = labels.clamp(min=0)
    target = logits.gather(1, safe_labels[:, None]).squeeze(1)  # (rows,)
    row_max = logits.amax(dim=1)
    probs = torch.softmax(logits, dim=1, out=logits)  # in place: the chunk's only (rows, vocab) buffer
    # log Z from the softmax itself: max(p) = exp(max - log Z), and max(p) >= 1/vocab cannot underflow.
    log_z = row_max - probs.amax(dim=1).log()  # (rows,)
    ce_sum = ((log_z - target) * valid).sum()
    z_sum = (log_z.square() * valid).sum()
    if not with_grads:
        return ce_sum, z_sum, None
    # d(ce + z * log_z^2)/d logits = softmax * (1 + 2 z log_z) - onehot(label), per valid row, times `scale`.
    row_scale = torch.where(valid, scale * (1.0 + 2.0 * z_loss * log_z), 0.0)
    grad = probs.mul_(row_scale[:, None])
    rows = valid.nonzero().squeeze(1)
    grad[rows, safe_labels[rows]] -= scale
    return ce_sum, z_sum, grad


def _chunked(hidden, weight, labels, z_loss: float, matmul_nt: MatmulNT, compute_dtype: torch.dtype, with_grads: bool,
             normalizer: float | None = None):
    """hidden (N, d), weight (V, d), labels (N,) -> loss, cross-entropy (sums over valid rows divided by
    `normalizer`, default their number) and, with `with_grads`, the gradients of the loss with respect to `hidden`
    and `weight`."""
    if normalizer is None:
        normalizer = float((labels != IGNORE_INDEX).sum().clamp(min=1))
    scale = 1.0 / float(normalizer)
    h, w = hidden.to(compute_dtype), weight.to(compute_dtype)
    acc_dtype = torch.promote_types(compute_dtype, torch.float32)
    ce_sum = z_sum = torch.zeros((), dtype=acc_dtype, device=hidden.device)
    grad_hidden = grad_weight = None
    # oneDNN: the weight gradient accumulates transposed, (d, V), its fast orientation for a wide head.
    onednn = matmul_nt is onednn_matmul_nt
    if with_grads:
        grad_hidden = torch.empty_like(h)
        grad_weight = torch.zeros(weight.shape[::-1] if onednn else weight.shape, dtype=acc_dtype, device=weight.device)
    step = chunk_rows(h.shape[0], w.shape[0])
    for start in range(0, h.shape[0], step):
        rows = slice(start, start + step)
        ce, z, grad = _chunk_loss(matmul_nt, h[rows], w, labels[rows], z_loss, scale, with_grads)
        ce_sum, z_sum = ce_sum + ce, z_sum + z
        if with_grads:
            grad = grad.to(compute_dtype)
            grad_hidden[rows] = matmul_nt(grad, w.t())
            grad_weight += matmul_nt(h[rows].t(), grad.t()) if onednn else grad.t() @ h[rows]
    if with_grads:
        grad_hidden = grad_hidden.to(hidden.dtype)
        grad_weight = (grad_weight.t().contiguous() if onednn else grad_weight).to(weight.dtype)
    ce = ce_sum * scale
    return ce + z_loss * z_sum * scale, ce, grad_hidden, grad_weight


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, labels, z_loss: float, matmul_nt: MatmulNT, compute_dtype: torch.dtype,
                normalizer: float | None):
        loss, ce, grad_hidden, grad_weight = _chunked(hidden, weight, labels, z_loss, matmul_nt, compute_dtype, True,
                                                      normalizer)
        ctx.save_for_backward(grad_hidden, grad_weight)
        ctx.mark_non_differentiable(ce)
        return loss, ce

    @staticmethod
    def backward(ctx, grad_loss, _grad_ce):
        grad_hidden, grad_weight = ctx.saved_tensors
        return grad_hidden * grad_loss, grad_weight * grad_loss, None, None, None, None, None


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, z_loss: float = 0.0,
                         matmul_nt: MatmulNT = torch_matmul_nt, normalizer: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss to optimise, cross-entropy) of logits `hidden @ weight.T` against `labels`, chunk by chunk.

    hidden (..., d), labels (...) with IGNORE_INDEX for rows without a target; both are sums over the other rows
    divided by `normalizer` (default: their number, i.e. means). The loss adds `z_loss` x log_z^2 likewise
    (PaLM's z-loss). Softmax and loss are computed in fp32 whatever
    the matmul dtype (the autocast dtype inside autocast, else the hidden states').
    """
    device = hidden.device.type
    compute_dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else hidden.dtype
    flat, flat_labels = hidden.reshape(-1, hidden.shape[-1]), labels.reshape(-1)
    with torch.autocast(device, enabled=False):
        if torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad):
            return _LinearCrossEntropy.apply(flat, weight, flat_labels, z_loss, matmul_nt, compute_dtype, normalizer)
        loss, ce, _, _ = _chunked(flat, weight, flat_labels, z_loss, matmul_nt, compute_dtype, False, normalizer)
        return loss, ce


class LossHead(nn.Linear):
    """The output head (an `nn.Linear`, same parameters): plain logits, or with `labels` the fused loss."""

    matmul_nt: MatmulNT = staticmethod(torch_matmul_nt)

    def forward(self, hidden: torch.Tensor, labels: torch.Tensor | None = None, z_loss: float = 0.0,
                normalizer: float | None = None):
        if labels is None:
            return super().forward(hidden)
        return linear_cross_entropy(hidden, self.weight, labels, z_loss, type(self).matmul_nt, normalizer)


class OneDNNLossHead(LossHead, OneDNNLinear):
    """LossHead on oneDNN's GEMM (fp32 on CPU): the plain logits through `OneDNNLinear`, the fused loss too."""

    matmul_nt = staticmethod(onednn_matmul_nt)


# Architectures whose logits are exactly `head(final hidden states)`: no soft-capping or scaling after the head.
_POSTPROCESSED_LOGITS = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier_scale")


def supports_fused_loss(model: nn.Module) -> bool:
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    config = getattr(model, "config", None)
    return (isinstance(head, nn.Linear) and head.bias is None and hasattr(model, "get_decoder")
            and not any(getattr(config, key, None) for key in _POSTPROCESSED_LOGITS))


def _forward(self, *args, loss_labels: torch.Tensor | None = None, z_loss: float = 0.0,
             loss_normalizer: float | None = None, **kwargs):
    if loss_labels is None:
        return type(self).forward(self, *args, **kwargs)
    hidden = self.get_decoder()(*args, **kwargs).last_hidden_state  # (batch, seq, hidden)
    return self.get_output_embeddings()(hidden, labels=loss_labels, z_loss=z_loss, normalizer=loss_normalizer)


def has_fused_loss(model: nn.Module) -> bool:
    """Whether `enable_fused_loss` was applied to `model` (the plain HF model inside any wrapper)."""
    return isinstance(getattr(model, "get_output_embeddings", lambda: None)(), LossHead)


def enable_fused_loss(model: nn.Module, onednn: bool = False) -> bool:
    """Give `model` the fused `loss_labels=` forward (in place, also on meta models). False if its architecture
    post-processes logits, in which case the model is left unchanged."""
    if not supports_fused_loss(model):
        return False
    model.get_output_embeddings().__class__ = OneDNNLossHead if onednn else LossHead
    model.forward = types.MethodType(_forward, model)
    return True
