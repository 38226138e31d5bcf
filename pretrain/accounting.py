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


# ---------------------------------------------------------------- memory per rank
#
# Model state, bytes per parameter (Rajbhandari et al. 2020, ZeRO, section 3.1), as measured per rank in real
# 2-rank runs on CPU (tests/pretrain/test_memory.py counts every tensor each backend holds):
#   fp32, single/ddp/fsdp:      weights 4, grads 4, AdamW exp_avg + exp_avg_sq 8.
#   fp32, DeepSpeed ZeRO-1/2:   weights 4, grads 4, and an fp32 master copy next to the weights: 4 + 8 = 12.
#   fp32, DeepSpeed ZeRO-3:     weights 4, grads 4, AdamW 8: ember makes the parameter partition *be* the fp32
#                               master (backends/zero.py, share_master_partitions).
#   bf16 with DeepSpeed:        bf16 weights 2, bf16 grads 2, fp32 master + AdamW 12 (the ZeRO paper's K = 12).
#   bf16 with single/ddp/fsdp:  the parameters stay fp32 (they are the master copy) and compute runs on bf16 copies
#                               (autocast casts, or FSDP2's gathered bf16 params), so 4 + 4 + 8 plus those copies.
# Sharding divides: fsdp and ZeRO-3 everything; ZeRO-2 optimizer and grads; ZeRO-1 the optimizer. ZeRO-1 keeps
# whole gradients until the last micro-batch reduces them; ZeRO-2 reduces every micro-batch into a partition buffer
# that holds each parameter reaching into the rank's slice whole (up to two straddling parameters, bounded here by
# the largest). DDP also holds its gradient buckets (another grads' worth, inside its C++ reducer; not counted).
#
# Activations saved for backward, per layer and token (fused sdpa attention keeps no seq x seq scores; no dropout),
# after Korthikanti et al. 2022 ("Reducing Activation Recomputation in Large Transformer Models", section 4.1)
# adapted to pre-norm SwiGLU blocks; in elements of the compute dtype:
#   attention: RMSNorm input, normalised, scaled 3h; q h; k and v 2 * kv_dim; attention output h -> 5h + 2 kv_dim
#   SwiGLU MLP: RMSNorm 3h; gate F, up F, silu(gate) F, product F                            -> 3h + 4F
#   (gpt_neox: LayerNorms 2 * 3h, qkv 3h, attention output h, MLP 2F -> 10h + 2F;
#    mixtral: the MLP's F terms times experts_per_token)
# plus the head: final norm 3h and the logits (compute dtype) with their fp32 log-softmax, V * (e + 4) bytes; with
# the fused loss (train.fused_loss) no logits are kept, only the gradients it computed in forward: d hidden, h per
# token, and d weight, V x h in fp32 once per micro-batch.
# With activation checkpointing a checkpointed block keeps only its input (h elements per token), and one block's
# full activations exist again while it is recomputed in backward.

BACKENDS = ("single", "ddp", "fsdp", "zero1", "zero2", "zero3")


def resolve_precision(precision: str, on_gpu: bool) -> str:
    """'fp32' or 'bf16': 'auto' means bf16 on GPUs, fp32 on CPU (bf16 is ~25x slower on CPUs)."""
    if precision == "auto":
        return "bf16" if on_gpu else "fp32"
    return precision


def backend_name(train_cfg) -> str:
    """'single', 'ddp', 'fsdp' or 'zero1'/'zero2'/'zero3' for DeepSpeed."""
    return f"zero{train_cfg.zero_stage}" if train_cfg.backend == "deepspeed" else train_cfg.backend


def _state_bytes_per_param(backend: str, precision: str) -> tuple[int, int, int]:
    """(weights, grads, optimizer) bytes per parameter before sharding."""
    if precision == "bf16" and backend.startswith("zero"):
        return 2, 2, 12
    if backend in ("zero1", "zero2"):
        return 4, 4, 12  # the fp32 master partition is a copy of the weights
    return 4, 4, 8


def _shard_degrees(backend: str, world_size: int) -> tuple[int, int, int]:
    """How many ranks share (weights, grads, optimizer states)."""
    n = world_size
    return {"single": (1, 1, 1), "ddp": (1, 1, 1), "fsdp": (n, n, n),
            "zero1": (1, 1, n), "zero2": (1, n, n), "zero3": (n, n, n)}[backend]


def largest_param_numel(model_cfg: ModelConfig) -> int:
    """Elements of the largest single parameter (the embedding table or the head, in these architectures)."""
    if model_cfg.arch not in COUNTED_ARCHS:
        return max(p.numel() for p in build_meta_model(model_cfg).parameters())
    s = shapes_of(model_cfg)
    return max(s.vocab * s.hidden, s.hidden * s.ffn, s.hidden * s.num_heads * s.head_dim)


def _gather_units(model_cfg: ModelConfig) -> tuple[int, int]:
    """Parameters of (one decoder block, the root: embeddings, head and final norm), the FSDP / ZeRO-3 gather units."""
    counts = count_params(model_cfg)
    block = (counts["non_embedding"] - model_cfg.hidden_size) // model_cfg.num_layers
    return block, counts["embedding"] + model_cfg.hidden_size


def _activation_elements_per_token(model_cfg: ModelConfig) -> tuple[int, int]:
    """(elements one block saves per token, elements a checkpointed block saves per token)."""
    h = model_cfg.hidden_size
    if model_cfg.arch == "gpt_neox":
        return 10 * h + 2 * model_cfg.ffn_hidden_size, h
    kv_dim = (model_cfg.num_kv_heads or model_cfg.num_heads) * (h // model_cfg.num_heads)
    experts_per_token = hf_config(model_cfg).num_experts_per_tok if model_cfg.arch == "mixtral" else 1
    return 8 * h + 2 * kv_dim + 4 * model_cfg.ffn_hidden_size * experts_per_token, h


def activation_bytes(model_cfg: ModelConfig, micro_batch: int, seq_len: int, precision: str,
                     checkpointing: bool, ac_every: int = 1, fused_loss: bool = False) -> int:
    """Activations one rank holds at the peak of backward for one micro-batch (formula above)."""
    elem = 4 if precision == "fp32" else 2
    tokens = micro_batch * seq_len
    full, kept = _activation_elements_per_token(model_cfg)
    num_layers = model_cfg.num_layers
    num_checkpointed = math.ceil(num_layers / ac_every) if checkpointing else 0
    per_token = (num_layers - num_checkpointed) * full * elem + num_checkpointed * kept * elem
    if num_checkpointed:
        per_token += full * elem  # the block being recomputed
    hidden, vocab = model_cfg.hidden_size, model_cfg.vocab_size
    if fused_loss:
        return tokens * (per_token + 4 * hidden * elem) + vocab * hidden * 4
    return tokens * (per_token + 3 * hidden * elem + vocab * (elem + 4))


def memory_per_rank(cfg, world_size: int, *, on_gpu: bool = True, backend: str | None = None) -> dict[str, int]:
    """Bytes one rank holds for `cfg` (a RunConfig) on `world_size` ranks, by category.

    `backend` ('single', 'ddp', 'fsdp', 'zero1', 'zero2', 'zero3') defaults to the config's. Keys: weights, grads,
    optimizer (on the device), gathered (transient full-size copies: FSDP/ZeRO-3 gathered units, autocast casts),
    offloaded (host memory with cpu_offload), activations_full, activations_checkpointed, activations (as the
    config sets activation checkpointing), total (device).
    """
    train, model_cfg = cfg.train, cfg.model
    backend = backend or backend_name(train)
    world_size = 1 if backend == "single" else world_size
    precision = resolve_precision(train.precision, on_gpu)
    num_params = count_params(model_cfg)["total"]
    per_param = _state_bytes_per_param(backend, precision)
    degrees = _shard_degrees(backend, world_size)
    weights, grads, optimizer = (math.ceil(num_params * b / d) for b, d in zip(per_param, degrees))
    if backend == "zero2" and world_size > 1:
        grads += largest_param_numel(model_cfg) * per_param[1]  # parameters straddling the partition's edge
    compute_elem = 2 if precision == "bf16" else 4
    if backend == "fsdp" and world_size > 1:
        # The root stays gathered for the whole step (backends/fsdp.py: reshard_after_forward=False); two blocks are
        # gathered at once (the current one and the prefetched next), plus one block's unsharded grads.
        block, root = _gather_units(model_cfg)
        gathered = (root + 2 * block) * compute_elem + block * per_param[1]
    elif backend == "zero3" and world_size > 1:
        # ZeRO-3 gathers each module as it runs: two of the largest units at once, plus one unit's unsharded grads.
        unit = max(_gather_units(model_cfg))
        gathered = 2 * unit * compute_elem + unit * per_param[1]
    elif precision == "bf16" and backend in ("single", "ddp"):
        gathered = num_params * 2  # autocast's bf16 copies of the weights, saved for backward
    else:
        gathered = 0
    offloaded = 0
    if train.cpu_offload:
        moved = {"fsdp": ("weights", "grads", "optimizer"), "zero3": ("weights", "optimizer")}.get(backend, ("optimizer",))
        state = {"weights": weights, "grads": grads, "optimizer": optimizer}
        offloaded = sum(state[k] for k in moved)
        weights, grads, optimizer = (0 if k in moved else state[k] for k in ("weights", "grads", "optimizer"))
    act = {ac: activation_bytes(model_cfg, train.micro_batch_size, train.seq_len, precision, ac, train.ac_every,
                                train.fused_loss) for ac in (False, True)}
    activations = act[train.activation_checkpointing]
    return {
        "weights": weights, "grads": grads, "optimizer": optimizer, "gathered": gathered, "offloaded": offloaded,
        "activations_full": act[False], "activations_checkpointed": act[True], "activations": activations,
        "total": weights + grads + optimizer + gathered + activations,
    }
