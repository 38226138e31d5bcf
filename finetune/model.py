"""The fine-tuned model: a task head on the pretrained backbone, the transfer mode, and peft's LoRA.

`task_builder` returns the engine's `ModelBuilder`, so every backend builds, shards and initialises the
fine-tuned model exactly as it does the pretraining model. Initial weights: the backbone's come from the parent
(`pretrained_weights`), the new head's (and LoRA's A matrices) from the seed; LoRA's B matrices start at zero,
so the adapted model starts as the pretrained one.

Modes: `full` trains everything; `frozen` only the head (a linear probe); `last_k` the last k decoder blocks and
the head; `lora` the adapters and the head (peft's `modules_to_save`), the backbone frozen.
"""

from __future__ import annotations

import copy
import logging
import math
import zlib
from typing import Callable

import torch
from torch import nn
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, PretrainedConfig

from ember.errors import UserError
from ember.pretrain.backends.builder import ModelBuilder, initial_weights, pretrained_weights
from ember.pretrain.backends.parallelize import decoder_blocks
from ember.pretrain.model import build_model, canonical_name, hf_config

log = logging.getLogger("ember.finetune.model")

HEADS = {"classification": "score", "sft": "lm_head", "dpo": "lm_head", "pretrain": "lm_head"}
PEFT_PREFIX = "base_model.model."


def task_hf_config(model_cfg, kind: str, num_labels: int, token_ids: dict[str, int]) -> PretrainedConfig:
    """The HF config of the fine-tuned model: the backbone's, plus the labels and token ids."""
    config = hf_config(model_cfg)
    for key, value in token_ids.items():
        setattr(config, key, value)
    if kind == "classification":
        config.num_labels = num_labels
        config.problem_type = "single_label_classification"
    return config


def base_name(name: str) -> str:
    """The plain HF name of a (possibly peft-wrapped) model's tensor: peft's prefix and `base_layer` removed."""
    name = canonical_name(name)
    if name.startswith(PEFT_PREFIX):
        name = name[len(PEFT_PREFIX):]
    return name.replace(".base_layer.", ".")


def is_new(name: str, kind: str) -> bool:
    """Tensors the parent has no value for: the classification head, LoRA's matrices, peft's head copies."""
    plain = base_name(name)
    return ("lora_" in plain or ".modules_to_save." in plain or ".original_module." in plain
            or (kind == "classification" and plain.split(".")[0] == HEADS["classification"]))


def is_head(name: str, kind: str) -> bool:
    return base_name(name).split(".")[0] == HEADS[kind]


def pretrained_key(kind: str) -> Callable[[str], str | None]:
    def key(name: str) -> str | None:
        return None if is_new(name, kind) else base_name(name)

    return key


def apply_mode(model: nn.Module, cfg, kind: str) -> nn.Module:
    """Set requires_grad for `cfg.mode` (a FinetuneConfig), wrapping the model with peft for LoRA."""
    if cfg.mode == "full":
        return model
    if cfg.mode == "lora":
        return wrap_lora(model, cfg, kind)
    trainable: set[int] = set()
    if cfg.mode == "last_k":
        blocks = decoder_blocks(model)
        if cfg.last_k > len(blocks):
            raise UserError(f"last_k {cfg.last_k} exceeds the model's {len(blocks)} blocks", "finetune.last_k")
        trainable = {id(p) for block in blocks[-cfg.last_k:] for p in block.parameters()}
    for name, param in model.named_parameters():
        param.requires_grad_(id(param) in trainable or is_head(name, kind))
    if not any(p.requires_grad for p in model.parameters()):
        raise UserError(f"mode {cfg.mode} leaves no parameter to train (a tied head in a frozen model?)", "finetune.mode")
    return model


def wrap_lora(model: nn.Module, cfg, kind: str) -> nn.Module:
    from peft import LoraConfig, TaskType, get_peft_model

    names = {name.rsplit(".", 1)[-1] for name, module in model.named_modules() if isinstance(module, nn.Linear)}
    unknown = [t for t in cfg.lora.target_modules if t not in names]
    if unknown:
        raise UserError(f"LoRA target module(s) {unknown} match no linear layer of the model (it has: {sorted(names)})",
                        "finetune.lora.target_modules")
    lora = LoraConfig(r=cfg.lora.rank, lora_alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout,
                      target_modules=list(cfg.lora.target_modules),
                      task_type=TaskType.SEQ_CLS if kind == "classification" else TaskType.CAUSAL_LM,
                      modules_to_save=[HEADS[kind]] if kind == "classification" else None)
    return get_peft_model(model, lora)


@torch.no_grad()
def reset_lora(model: nn.Module, seed: int) -> None:
    """LoRA's A matrices from (seed, name), B matrices zero: the adapted model starts as the base model."""
    for name, param in model.named_parameters():
        if ".lora_B." in name:
            param.zero_()
        elif ".lora_A." in name:
            gen = torch.Generator(device=param.device)
            gen.manual_seed((seed * 1_000_003 + zlib.crc32(base_name(name).encode())) % (2**63))
            bound = 1.0 / math.sqrt(param.shape[1])  # peft's default: kaiming-uniform with a = sqrt(5)
            param.uniform_(-bound, bound, generator=gen)


def task_builder(model_cfg, cfg, kind: str, config: PretrainedConfig, seed: int, weights_path=None) -> ModelBuilder:
    """The engine's builder for the fine-tuned model: architecture, transfer mode, initial weights."""
    auto_class = AutoModelForSequenceClassification if kind == "classification" else AutoModelForCausalLM

    def build() -> nn.Module:
        # No padding_idx in the embedding, as in pretraining (and ZeRO-3's partitioned init cannot zero a row);
        # the classifier still finds each row's last token through config.pad_token_id.
        plain = copy.deepcopy(config)
        plain.pad_token_id = None
        model = build_model(plain, auto_class)
        model.config.pad_token_id = config.pad_token_id
        return apply_mode(model, cfg, kind)

    cache: dict = {}

    def parent_weights() -> dict[str, torch.Tensor]:
        if "weights" not in cache:
            cache["weights"] = pretrained_weights(weights_path)
            check_vocabulary(cache["weights"], model_cfg.vocab_size, weights_path)
        return cache["weights"]

    fresh_and_loaded = initial_weights(model_cfg, seed, parent_weights if weights_path else None, pretrained_key(kind))

    def init(model: nn.Module) -> None:
        missing = fresh_and_loaded(model)
        if weights_path is not None:
            unexpected = [n for n in missing if not is_new(n, kind) and not n.endswith("lm_head.weight")]
            if unexpected:
                raise UserError(f"the starting weights have no value for {unexpected[:3]} (another architecture?)",
                                str(weights_path))
        reset_lora(model, seed)
        # Everything is filled: peft's and transformers' own initialisers must not run again on load.
        cache.clear()

    return ModelBuilder(build=build, init_weights=init)


def check_vocabulary(weights: dict[str, torch.Tensor], vocab_size: int, where) -> None:
    embedding = next((t for n, t in weights.items() if n.endswith("embed_tokens.weight")), None)
    if embedding is not None and embedding.shape[0] != vocab_size:
        raise UserError(f"the checkpoint's vocabulary has {embedding.shape[0]} tokens, the tokenizer's model "
                        f"config {vocab_size}", str(where))


def tied_aliases_of(model: nn.Module) -> set[str]:
    """State-dict names that alias another tensor (a tied head)."""
    unique = {name for name, _ in model.named_parameters()} | {name for name, _ in model.named_buffers()}
    return set(model.state_dict()) - unique
