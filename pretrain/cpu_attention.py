"""Causal self-attention on oneDNN's GEMM, for fp32 training on CPUs where it beats torch's BLAS (see cpu_matmul).

torch's flash-attention kernel for CPU does its matmuls through MKL, so on a non-Intel CPU attention runs at the
AVX2 rate. This implementation runs each (sequence, head) pair as four GEMMs on oneDNN (two forward, four
backward) and keeps the softmax probabilities for backward: O(seq^2) memory per layer, so it is only taken while
that stays small (`MAX_PROBS_BYTES`); longer sequences, masks (padding), sliding windows and dropout go to
torch's `scaled_dot_product_attention` through transformers' own sdpa function.

It is registered with transformers as the attention implementation "ember_onednn" (with sdpa's mask builder),
so HF models call it through their usual attention interface; nothing else about the model changes.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from ember.pretrain.cpu_matmul import onednn_matmul_nt

IMPLEMENTATION = "ember_onednn"
MAX_PROBS_BYTES = 64 << 20  # softmax probabilities kept for backward, per layer (batch x heads x seq^2 fp32)


class _CausalAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, query, key, value, scaling: float):
        """query (B, H, S, D), key and value (B, Hkv, S, D) with H a multiple of Hkv -> (B, H, S, D)."""
        batch, heads, seq, _ = query.shape
        group = heads // key.shape[1]
        query, key, value = query.contiguous(), key.contiguous(), value.contiguous()
        future = torch.ones(seq, seq, dtype=torch.bool).triu_(1)
        out = torch.empty_like(query)
        probs = torch.empty(batch, heads, seq, seq, dtype=query.dtype)
        for b in range(batch):
            for h in range(heads):
                k, v = key[b, h // group], value[b, h // group]
                scores = onednn_matmul_nt(query[b, h], k).mul_(scaling).masked_fill_(future, float("-inf"))
                torch.softmax(scores, dim=-1, out=probs[b, h])
                out[b, h] = onednn_matmul_nt(probs[b, h], v.t())
        ctx.save_for_backward(query, key, value, out, probs)
        ctx.scaling = scaling
        return out

    @staticmethod
    def backward(ctx, grad_out):
        query, key, value, out, probs = ctx.saved_tensors
        batch, heads, _, _ = query.shape
        group = heads // key.shape[1]
        grad_out = grad_out.contiguous()
        grad_q = torch.empty_like(query)
        grad_k, grad_v = torch.zeros_like(key), torch.zeros_like(value)  # summed over the heads sharing them
        # softmax backward: dS = P * (dP - rowsum(dO * O)), the row sums once for all heads.
        delta = (grad_out * out).sum(-1, keepdim=True)  # (B, H, S, 1)
        for b in range(batch):
            for h in range(heads):
                kv = h // group
                p, do = probs[b, h], grad_out[b, h]
                grad_v[b, kv] += onednn_matmul_nt(p.t(), do.t())
                grad_scores = onednn_matmul_nt(do, value[b, kv]).sub_(delta[b, h]).mul_(p).mul_(ctx.scaling)
                grad_q[b, h] = onednn_matmul_nt(grad_scores, key[b, kv].t())
                grad_k[b, kv] += onednn_matmul_nt(grad_scores.t(), query[b, h].t())
        return grad_q, grad_k, grad_v, None


def fast_path(query, key, attention_mask, dropout: float, sliding_window, kwargs) -> bool:
    batch, heads, seq, _ = query.shape
    return (query.device.type == "cpu" and query.dtype == torch.float32 and attention_mask is None
            and key.shape[2] == seq and not dropout and (sliding_window is None or sliding_window >= seq)
            and not kwargs.get("s_aux") and batch * heads * seq * seq * 4 <= MAX_PROBS_BYTES)


def onednn_attention_forward(module: nn.Module, query, key, value, attention_mask, dropout: float = 0.0,
                             scaling: float | None = None, sliding_window: int | None = None, **kwargs):
    """transformers' attention interface: (B, H, S, D) inputs -> ((B, S, H, D) output, no weights)."""
    if not fast_path(query, key, attention_mask, dropout, sliding_window, kwargs):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      sliding_window=sliding_window, **kwargs)
    scaling = query.shape[-1] ** -0.5 if scaling is None else scaling
    out = _CausalAttention.apply(query, key, value, scaling)
    return out.transpose(1, 2).contiguous(), None


AttentionInterface.register(IMPLEMENTATION, onednn_attention_forward)
AttentionMaskInterface.register(IMPLEMENTATION, sdpa_mask)  # padding still gets a mask (and the sdpa path)


def use_onednn_attention(model: nn.Module) -> bool:
    """Switch an HF model that runs sdpa attention to this implementation (in place). False if it runs another."""
    if model.config._attn_implementation != "sdpa":
        return False
    model.set_attn_implementation(IMPLEMENTATION)
    return True
