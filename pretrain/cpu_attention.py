"""Causal self-attention on oneDNN's GEMM, for fp32 training on CPUs where it beats torch's BLAS (see cpu_matmul).

torch's flash-attention kernel for CPU does its matmuls through MKL, so on a non-Intel CPU attention runs at the
AVX2 rate. This implementation runs each (sequence, head) pair as six GEMMs on oneDNN (two forward, four
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
    """Per (sequence, head): S = (scale * Q) K^T + causal bias, P = softmax(S), O = P V.

    Every GEMM takes a contiguous first operand: oneDNN reads a transposed second operand in place but copies a
    transposed first one, so the transposes backward needs (Q^T, dO^T) are made once for all heads.
    """

    @staticmethod
    def forward(ctx, query, key, value, scaling: float):
        """query (B, H, S, D), key and value (B, Hkv, S, D) with H a multiple of Hkv -> (B, H, S, D)."""
        batch, heads, seq, _ = query.shape
        group = heads // key.shape[1]
        query, key, value = (query * scaling).contiguous(), key.contiguous(), value.contiguous()
        causal_bias = torch.zeros(seq, seq, dtype=query.dtype).masked_fill_(
            torch.ones(seq, seq, dtype=torch.bool).triu_(1), float("-inf"))
        out = torch.empty_like(query)
        probs = torch.empty(batch, heads, seq, seq, dtype=query.dtype)
        for b in range(batch):
            for h in range(heads):
                k, v = key[b, h // group], value[b, h // group]
                scores = torch.ops.mkldnn._linear_pointwise.binary(query[b, h], causal_bias, k, None, "add")
                torch.softmax(scores, dim=-1, out=probs[b, h])
                out[b, h] = onednn_matmul_nt(probs[b, h], v.t())
        ctx.save_for_backward(query, key, value, out, probs)
        ctx.scaling = scaling
        return out

    @staticmethod
    def backward(ctx, grad_out):
        query, key, value, out, probs = ctx.saved_tensors  # query already scaled
        batch, heads, _, _ = query.shape
        group = heads // key.shape[1]
        grad_q = torch.empty_like(query)
        # dK^T and dV^T, (B, Hkv, D, S): summed over the heads sharing them, transposed back once at the end.
        grad_k_t = torch.zeros(key.transpose(-1, -2).shape, dtype=key.dtype)
        grad_v_t = torch.zeros_like(grad_k_t)
        query_t = query.transpose(-1, -2).contiguous()
        grad_out_t = grad_out.transpose(-1, -2).contiguous()
        grad_out = grad_out.contiguous()
        # softmax backward: dS = P * (dP - rowsum(dO * O)), the row sums once for all heads.
        delta = (grad_out * out).sum(-1, keepdim=True)  # (B, H, S, 1)
        for b in range(batch):
            for h in range(heads):
                kv, p = h // group, probs[b, h]
                grad_v_t[b, kv] += onednn_matmul_nt(grad_out_t[b, h], p.t())  # dO^T P
                grad_scores = onednn_matmul_nt(grad_out[b, h], value[b, kv]).sub_(delta[b, h]).mul_(p)
                grad_q[b, h] = onednn_matmul_nt(grad_scores, key[b, kv].t())  # dS K
                grad_k_t[b, kv] += onednn_matmul_nt(query_t[b, h], grad_scores.t())  # (scale Q)^T dS
        return grad_q.mul_(ctx.scaling), grad_k_t.transpose(-1, -2), grad_v_t.transpose(-1, -2), None


def fast_path(module: nn.Module, query, key, attention_mask, dropout: float, sliding_window, kwargs) -> bool:
    """Plain causal self-attention over whole sequences in fp32 on CPU, small enough to keep P for backward."""
    batch, heads, seq, _ = query.shape
    causal = kwargs.get("is_causal")
    causal = getattr(module, "is_causal", True) if causal is None else causal
    return (query.device.type == "cpu" and query.dtype == torch.float32 and attention_mask is None and causal
            and key.shape[2] == seq and not dropout and (sliding_window is None or sliding_window >= seq)
            and kwargs.get("s_aux") is None and batch * heads * seq * seq * 4 <= MAX_PROBS_BYTES)


def onednn_attention_forward(module: nn.Module, query, key, value, attention_mask, dropout: float = 0.0,
                             scaling: float | None = None, sliding_window: int | None = None, **kwargs):
    """transformers' attention interface: (B, H, S, D) inputs -> ((B, S, H, D) output, no weights)."""
    if not fast_path(module, query, key, attention_mask, dropout, sliding_window, kwargs):
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
