"""Parameters, training FLOPs and memory per rank of a model and a run, computed from shapes alone.

Counts are exact for llama, mistral, qwen2, mixtral and gpt_neox (checked against the built model in tests);
other architectures are counted on a meta-device build. Memory is an estimate with documented formulas.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ember.pretrain.config import ModelConfig
from ember.pretrain.model import build_meta_model, hf_config

LLAMA_LIKE = {"llama", "mistral", "qwen2", "mixtral"}
COUNTED_ARCHS = LLAMA_LIKE | {"gpt_neox"}
GIB = 1024**3


@dataclass(frozen=True)
class Shapes:
    """The dimensions that decide parameter counts and FLOPs, read from the HF config (overrides included)."""

    arch: str
    hidden: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    ffn: int
    vocab: int
    tied: bool
    num_experts: int  # 1 for dense MLPs
    experts_per_token: int
    attn_bias: bool
    mlp_bias: bool


def shapes_of(model_cfg: ModelConfig) -> Shapes:
    hf = hf_config(model_cfg)
    heads = hf.num_attention_heads
    moe = model_cfg.arch == "mixtral"
    return Shapes(
        arch=model_cfg.arch,
        hidden=hf.hidden_size,
        num_layers=hf.num_hidden_layers,
        num_heads=heads,
        num_kv_heads=getattr(hf, "num_key_value_heads", None) or heads,
        head_dim=getattr(hf, "head_dim", None) or hf.hidden_size // heads,
        ffn=hf.intermediate_size,
        vocab=hf.vocab_size,
        tied=bool(hf.tie_word_embeddings),
        num_experts=hf.num_local_experts if moe else 1,
        experts_per_token=hf.num_experts_per_tok if moe else 1,
        # qwen2 always has q/k/v biases; gpt_neox's query_key_value/dense biases follow attention_bias.
        attn_bias=model_cfg.arch == "qwen2" or bool(getattr(hf, "attention_bias", False)),
        mlp_bias=model_cfg.arch == "gpt_neox" or bool(getattr(hf, "mlp_bias", False)),
    )


def _attention_params(s: Shapes) -> tuple[int, int]:
    """(matmul weights, biases) of one attention block."""
    q_dim, kv_dim = s.num_heads * s.head_dim, s.num_kv_heads * s.head_dim
    weights = s.hidden * (q_dim + 2 * kv_dim) + q_dim * s.hidden
    if not s.attn_bias:
        return weights, 0
    # qwen2: biases on q, k, v only; gpt_neox (and llama attention_bias): on the output projection too.
    out_bias = 0 if s.arch == "qwen2" else s.hidden
    return weights, q_dim + 2 * kv_dim + out_bias


def _mlp_params(s: Shapes) -> tuple[int, int, int]:
    """(all matmul weights, matmul weights one token passes through, biases) of one MLP block."""
    if s.arch == "gpt_neox":  # dense_h_to_4h, dense_4h_to_h
        return 2 * s.hidden * s.ffn, 2 * s.hidden * s.ffn, (s.ffn + s.hidden) if s.mlp_bias else 0
    expert = 3 * s.hidden * s.ffn  # SwiGLU: gate, up, down
    router = s.hidden * s.num_experts if s.num_experts > 1 else 0
    biases = (2 * s.ffn + s.hidden) if s.mlp_bias else 0
    return expert * s.num_experts + router, expert * s.experts_per_token + router, biases


def _norm_params(s: Shapes) -> int:
    """Per-norm parameters: LayerNorm has scale and bias, RMSNorm a scale."""
    return 2 * s.hidden if s.arch == "gpt_neox" else s.hidden


def count_params(model_cfg: ModelConfig) -> dict[str, int]:
    """Exact parameter counts: total, embedding (input table plus an untied output head), non_embedding."""
    if model_cfg.arch not in COUNTED_ARCHS:
        return _count_built(model_cfg)
    s = shapes_of(model_cfg)
    attn_w, attn_b = _attention_params(s)
    mlp_w, _, mlp_b = _mlp_params(s)
    per_layer = attn_w + attn_b + mlp_w + mlp_b + 2 * _norm_params(s)
    embedding = s.vocab * s.hidden * (1 if s.tied else 2)
    non_embedding = s.num_layers * per_layer + _norm_params(s)
    return {"total": embedding + non_embedding, "embedding": embedding, "non_embedding": non_embedding}


def _count_built(model_cfg: ModelConfig) -> dict[str, int]:
    model = build_meta_model(model_cfg)
    total = sum(p.numel() for p in model.parameters())
    embedding = model.get_input_embeddings().weight.numel()
    head = model.get_output_embeddings()
    if head is not None and head.weight is not model.get_input_embeddings().weight:
        embedding += head.weight.numel()
    return {"total": total, "embedding": embedding, "non_embedding": total - embedding}


def matmul_params_per_token(model_cfg: ModelConfig) -> int:
    """Weights of the matrix multiplies one token goes through: attention and (active) MLP projections of every
    layer plus the LM head. Embedding lookups, norms and biases do no matmul and are left out."""
    if model_cfg.arch not in COUNTED_ARCHS:
        counts = _count_built(model_cfg)
        hidden, vocab = model_cfg.hidden_size, model_cfg.vocab_size
        return counts["non_embedding"] + hidden * vocab
    s = shapes_of(model_cfg)
    attn_w, _ = _attention_params(s)
    _, mlp_active, _ = _mlp_params(s)
    return s.num_layers * (attn_w + mlp_active) + s.hidden * s.vocab


def flops_per_token(model_cfg: ModelConfig, seq_len: int) -> float:
    """Training FLOPs per token (forward + backward), as in PaLM (Chowdhery et al. 2022, appendix B):
    6 * matmul parameters + 12 * num_layers * (num_heads * head_dim) * seq_len.

    6N: 2 FLOPs per multiply-add in forward, twice that in backward. The attention term counts QK^T and
    attention-times-V (2 * 2 * seq_len * attn_dim forward per layer, x3 with backward), without the causal
    halving, as PaLM's MFU does.
    """
    num_layers = model_cfg.num_layers
    if model_cfg.arch in COUNTED_ARCHS:
        s = shapes_of(model_cfg)
        attn_dim, num_layers = s.num_heads * s.head_dim, s.num_layers
    else:
        attn_dim = model_cfg.hidden_size
    return 6.0 * matmul_params_per_token(model_cfg) + 12.0 * num_layers * attn_dim * seq_len
