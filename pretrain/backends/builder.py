"""What a backend builds: a model builder (the architecture) and the source of its initial weights.

Every backend takes a `ModelBuilder` and follows the same order with it: `build()` under a device context (the
meta device, or DeepSpeed's `zero.Init` for ZeRO-3) -> model techniques -> shard/wrap -> materialise -> weights
from `init_weights`, which fills a full, unsharded model (rank 0's reference for the sharded backends). So a
causal LM, a sequence classifier and a peft-wrapped model shard the same way; pretraining uses
`causal_lm_builder`.

Initial weights come from `initial_weights`: a deterministic fresh init, then optionally the tensors of a
pretrained model (`pretrained_weights`: an ember checkpoint of any backend and world size, or a Hugging Face
model directory) copied in by name.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from ember.errors import UserError
from ember.pretrain.config import ModelConfig
from ember.pretrain.model import build_model, hf_config, init_weights


@dataclass
class ModelBuilder:
    """How to construct the model a backend trains, and how to give it its initial weights."""

    build: Callable[[], nn.Module]  # the plain module, on the caller's default device (meta, zero.Init)
    init_weights: Callable[[nn.Module], None]  # every parameter and buffer of a materialised, unsharded model


def causal_lm_builder(model_cfg: ModelConfig, seed: int) -> ModelBuilder:
    """Pretraining's model: the causal LM of `model_cfg`, freshly initialised from `seed`."""
    return ModelBuilder(build=lambda: build_model(hf_config(model_cfg)),
                        init_weights=lambda model: init_weights(model, model_cfg, seed))


def meta_model(builder: ModelBuilder) -> nn.Module:
    with torch.device("meta"):
        return builder.build()


def initialised_model(builder: ModelBuilder, device: torch.device) -> nn.Module:
    """The full model with its initial weights: meta build, materialise on `device`, `init_weights`."""
    model = meta_model(builder)
    model.to_empty(device=device)
    builder.init_weights(model)
    return model


# ---------------------------------------------------------------- pretrained weights


def is_hf_model_dir(path: Path) -> bool:
    return (Path(path) / "config.json").is_file() and any(Path(path).glob("*.safetensors"))


def pretrained_weights(path: Path) -> dict[str, torch.Tensor]:
    """Full fp32 weights of an ember run / checkpoint (any backend, any world size) or of an HF model directory."""
    from ember.pretrain.backends import load_full_weights
    from ember.pretrain.checkpoint import resolve_checkpoint

    path = Path(path)
    if is_hf_model_dir(path):
        from safetensors.torch import load_file

        weights: dict[str, torch.Tensor] = {}
        for file in sorted(path.glob("*.safetensors")):
            weights.update(load_file(file))
        return {name: t.to(torch.float32) for name, t in weights.items()}
    return load_full_weights(resolve_checkpoint(path))


@torch.no_grad()
def copy_weights(model: nn.Module, weights: dict[str, torch.Tensor], key: Callable[[str], str | None]) -> list[str]:
    """Copy `weights[key(name)]` into each parameter and persistent buffer of `model` that has one; returns the
    names of `model`'s tensors that got none. A shape mismatch is a UserError naming the tensor."""
    missing = []
    for name, tensor in model.state_dict(keep_vars=True).items():
        source = key(name)
        if source is None or source not in weights:
            missing.append(name)
            continue
        value = weights[source]
        if value.shape != tensor.shape:
            raise UserError(f"pretrained tensor {source} has shape {tuple(value.shape)}, the model expects "
                            f"{tuple(tensor.shape)}", name)
        tensor.copy_(value.to(tensor.dtype))
    return missing


def initial_weights(model_cfg: ModelConfig, seed: int, pretrained: Callable[[], dict[str, torch.Tensor]] | None = None,
                    key: Callable[[str], str | None] = lambda name: name) -> Callable[[nn.Module], list[str]]:
    """`init_weights` of a builder: fresh deterministic init from `seed`, then the `pretrained()` tensors by name
    (`key` maps a model name to the pretrained one, None to keep the fresh values). Returns the names kept fresh."""

    def init(model: nn.Module) -> list[str]:
        init_weights(model, model_cfg, seed)
        if pretrained is None:
            return [name for name, _ in model.named_parameters()]
        missing = copy_weights(model, pretrained(), key)
        if getattr(model.config, "tie_word_embeddings", False) and hasattr(model, "tie_weights"):
            model.tie_weights()
        return missing

    return init


def read_hf_config(path: Path) -> dict:
    """config.json of an HF model directory as a dict."""
    return json.loads((Path(path) / "config.json").read_text())
