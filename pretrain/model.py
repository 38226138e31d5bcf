"""The model: an HF config from ember's `ModelConfig`, a meta-device build, and a deterministic weight init.

The model itself stays a plain `transformers` module, so checkpoints load anywhere in the HF ecosystem.
Build order (see DESIGN.md): `build_meta_model` -> parallelise -> materialise (`to_empty`) -> `init_weights`.
"""

from __future__ import annotations

import math
import zlib

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig

from ember.errors import UserError
from ember.pretrain.config import ModelConfig

# Name of the norm epsilon in each architecture's config; others use rms_norm_eps.
_NORM_EPS_KEY = {"gpt_neox": "layer_norm_eps", "gpt2": "layer_norm_epsilon", "phi": "layer_norm_eps"}

# Architectures without grouped-query attention (one kv head per query head).
_NO_GQA = {"gpt_neox", "gpt2", "phi"}

# Last name component of the projections that write into the residual stream, per architecture family.
# Their init std is divided by sqrt(2 * num_layers) (GPT-2 / Megatron scaled init), so the residual
# stream's variance does not grow with depth.
RESIDUAL_OUTPUT_NAMES = ("o_proj", "down_proj", "dense", "dense_4h_to_h", "c_proj", "out_proj", "w2", "fc2")


def hf_config(model_cfg: ModelConfig) -> PretrainedConfig:
    """The transformers config of `model_cfg`: shape fields mapped per architecture, no dropout, fp32, no KV cache."""
    arch = model_cfg.arch
    try:
        default = AutoConfig.for_model(arch)
    except (ValueError, KeyError) as e:
        raise UserError(f"unknown model architecture {arch!r}: {e}", "model.arch") from None
    num_kv_heads = model_cfg.num_kv_heads or model_cfg.num_heads
    kwargs = {
        "hidden_size": model_cfg.hidden_size,
        "num_hidden_layers": model_cfg.num_layers,
        "num_attention_heads": model_cfg.num_heads,
        "intermediate_size": model_cfg.ffn_hidden_size,
        "vocab_size": model_cfg.vocab_size,
        "max_position_embeddings": model_cfg.max_seq_len,
        "tie_word_embeddings": model_cfg.tie_embeddings,
        "initializer_range": model_cfg.init_std,
        _NORM_EPS_KEY.get(arch, "rms_norm_eps"): model_cfg.norm_eps,
        "use_cache": False,
        "dtype": torch.float32,
    }
    if arch in _NO_GQA:
        if num_kv_heads != model_cfg.num_heads:
            raise UserError(f"architecture {arch!r} has no grouped-query attention; num_kv_heads must equal num_heads", "model.num_kv_heads")
    else:
        kwargs["num_key_value_heads"] = num_kv_heads
    rope = getattr(default, "rope_parameters", None)
    if isinstance(rope, dict):
        kwargs["rope_parameters"] = {**rope, "rope_theta": model_cfg.rope_theta}
    # Dropout off: pretraining at these token counts does not use it, and it would break cross-backend parity.
    for key in default.to_dict():
        if key.endswith("dropout") or key.endswith("_pdrop") or key == "dropout":
            kwargs[key] = 0.0
    kwargs.update(model_cfg.hf_overrides)
    try:
        return AutoConfig.for_model(arch, **kwargs)
    except (TypeError, ValueError) as e:
        raise UserError(f"cannot build a {arch} config: {e}", "model") from None


def build_model(config: PretrainedConfig, auto_class=AutoModelForCausalLM) -> nn.Module:
    """`auto_class` (a causal LM, a sequence classifier, ...) of `config` in fp32, on the current default device
    (the caller's context: the meta device, DeepSpeed's `zero.Init`)."""
    # sdpa: fused attention kernels on CPU and GPU (flash / memory-efficient), no O(seq^2) mask tensor in Python.
    attn = config._attn_implementation or "sdpa"
    return auto_class.from_config(config, attn_implementation=attn, dtype=torch.float32)


def build_meta_model(model_cfg: ModelConfig) -> nn.Module:
    """The causal LM on the meta device: shapes only, no memory. Materialise with `to_empty`, then `init_weights`."""
    with torch.device("meta"):
        return build_model(hf_config(model_cfg))


def is_residual_output(name: str) -> bool:
    """Whether parameter `name` is a projection writing into the residual stream (gets the scaled std)."""
    parts = name.split(".")
    if len(parts) < 2:
        return False
    owner = parts[-2] if parts[-1] in ("weight", "bias") else parts[-1]
    return owner in RESIDUAL_OUTPUT_NAMES


def _is_norm_or_bias(name: str, param: torch.Tensor) -> str | None:
    """'one' for norm scales, 'zero' for biases, None for weights drawn from the normal."""
    if name.endswith("bias"):
        return "zero"
    # Norm scales are the only 1-D weights in these architectures (embeddings and projections are >= 2-D).
    if param.ndim == 1:
        return "one"
    return None


# Name components that wrappers (DDP, torch.compile, checkpoint/FSDP1 wrappers) insert; the HF name is what counts.
_WRAPPER_PARTS = {"module", "_orig_mod", "_fsdp_wrapped_module", "_checkpoint_wrapped_module"}


def canonical_name(name: str) -> str:
    """The Hugging Face parameter name, without the components wrappers add."""
    return ".".join(part for part in name.split(".") if part not in _WRAPPER_PARTS)


def _param_generator(seed: int, name: str, device: torch.device) -> torch.Generator:
    """A generator seeded by (seed, HF parameter name): each weight's values are independent of the others, of
    the order in which parameters are visited and of wrappers around the model."""
    gen = torch.Generator(device=device)
    gen.manual_seed((seed * 1_000_003 + zlib.crc32(canonical_name(name).encode())) % (2**63))
    return gen


@torch.no_grad()
def _scaled_init(model: nn.Module, model_cfg: ModelConfig, seed: int) -> None:
    residual_std = model_cfg.init_std / math.sqrt(2 * model_cfg.num_layers)
    # A tied head may show up here as its own parameter (to_empty unties); init_weights re-ties it afterwards.
    for name, param in model.named_parameters():
        kind = _is_norm_or_bias(name, param)
        if kind == "zero":
            param.zero_()
        elif kind == "one":
            param.fill_(1.0)
        else:
            std = residual_std if is_residual_output(name) else model_cfg.init_std
            param.normal_(0.0, std, generator=_param_generator(seed, name, param.device))


def _clear_hf_init_flags(model: nn.Module) -> None:
    # transformers skips modules/tensors it has marked initialised; after to_empty they hold garbage.
    for module in model.modules():
        if hasattr(module, "_is_hf_initialized"):
            module._is_hf_initialized = False
        for tensor in list(module.parameters(recurse=False)) + list(module.buffers(recurse=False)):
            if getattr(tensor, "_is_hf_initialized", False):
                tensor._is_hf_initialized = False


@torch.no_grad()
def _reset_rotary_buffers(model: nn.Module) -> None:
    """Recompute RoPE inverse frequencies: they are non-persistent buffers, garbage after `to_empty`."""
    for module in model.modules():
        if "RotaryEmbedding" in type(module).__name__ and hasattr(module, "original_inv_freq"):
            module._is_hf_initialized = False
            for buf in (module.inv_freq, module.original_inv_freq):
                buf._is_hf_initialized = False
            model._init_weights(module)


def materialize(model: nn.Module, device: torch.device | str) -> nn.Module:
    """`to_empty` for a meta model that will be *loaded* rather than initialised (exports, offline evaluation).

    Two things `to_empty` gets wrong for HF models, fixed here: non-persistent buffers (RoPE inverse
    frequencies, absent from state dicts) hold uninitialised memory, and tied weights come back as two separate
    parameters (the output head would no longer follow the embedding). Weights stay uninitialised: load them next.
    """
    model.to_empty(device=device)
    _clear_hf_init_flags(model)
    _reset_rotary_buffers(model)
    if getattr(model.config, "tie_word_embeddings", False):
        model.tie_weights()
    return model


def init_weights(model: nn.Module, model_cfg: ModelConfig, seed: int) -> None:
    """Deterministic full init of a materialised, non-sharded model (same seed -> bit-identical weights).

    `init: scaled`: normal(0, init_std) for embeddings and projections, residual output projections
    std / sqrt(2 * num_layers), norm scales 1, biases 0. `init: hf`: the architecture's own initialiser
    under `torch.manual_seed(seed)`. RoPE buffers are recomputed in both cases.
    """
    if any(p.is_meta for p in model.parameters()):
        raise ValueError("init_weights needs a materialised model (call to_empty first)")
    _clear_hf_init_flags(model)
    if model_cfg.init == "hf":
        devices = [p.device.index or 0 for p in model.parameters() if p.is_cuda][:1]
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)
            model.initialize_weights()
    else:
        _scaled_init(model, model_cfg, seed)
    _reset_rotary_buffers(model)
    if model_cfg.tie_embeddings:
        model.tie_weights()
