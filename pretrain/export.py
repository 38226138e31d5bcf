"""Hugging Face export: a model directory that the matching Auto class (`AutoModelForCausalLM`,
`AutoModelForSequenceClassification`, ...) loads with `from_pretrained`.

Staged in `OUT.tmp` and then moved into place (`export_dir`), so a failed export never leaves a half-written
model, and files of OUT that no ember export wrote are never deleted.
"""

from __future__ import annotations

import copy
import logging
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import PretrainedConfig

from ember.config import read_yaml, validate
from ember.errors import UserError
from ember.pretrain.config import ModelConfig
from ember.pretrain.export_dir import check_export_target, publish_export

log = logging.getLogger("ember.pretrain.export")


def tied_aliases(model_cfg: ModelConfig) -> set[str]:
    """State-dict names that alias another parameter (a tied output head): safetensors stores each tensor once."""
    from ember.pretrain.model import build_meta_model

    model = build_meta_model(model_cfg)
    unique = {name for name, _ in model.named_parameters()} | {name for name, _ in model.named_buffers()}
    return set(model.state_dict()) - unique


def special_token_ids(tokenizer_dir: Path | None) -> dict[str, int]:
    """bos/eos/pad ids for config.json and generation_config.json, read from the tokenizer."""
    if tokenizer_dir is None or not Path(tokenizer_dir).is_dir():
        return {}
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    eos = tok.eos_token_id
    ids = {"eos_token_id": eos, "bos_token_id": tok.bos_token_id if tok.bos_token_id is not None else eos,
           "pad_token_id": tok.pad_token_id if tok.pad_token_id is not None else eos}
    return {k: v for k, v in ids.items() if v is not None}


def write_hf_export(state_dict: dict[str, torch.Tensor], model_cfg: ModelConfig, out_dir: Path, *,
                    tokenizer_dir: Path | None = None, token_ids: dict[str, int] | None = None) -> Path:
    """The causal LM of `model_cfg` with weights `state_dict` as an HF model directory (see `write_hf_model`)."""
    from ember.pretrain.model import hf_config

    return write_hf_model(state_dict, hf_config(model_cfg), out_dir, aliases=tied_aliases(model_cfg),
                          tokenizer_dir=tokenizer_dir, token_ids=token_ids)


def write_hf_model(state_dict: dict[str, torch.Tensor], config: PretrainedConfig, out_dir: Path, *,
                   aliases: set[str] = frozenset(), tokenizer_dir: Path | None = None,
                   token_ids: dict[str, int] | None = None, extra_files: dict[str, Path] | None = None) -> Path:
    """config.json, generation_config.json, model.safetensors and the tokenizer files in `out_dir`.

    `aliases` are state-dict names of tied tensors, stored once. `token_ids` (bos/eos/pad ids, e.g. from the
    dataset manifest) default to the tokenizer's. `extra_files` (name -> file or directory) are copied in too.
    """
    from transformers import GenerationConfig

    out_dir = Path(out_dir)
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    config = copy.deepcopy(config)
    for key, value in (token_ids or special_token_ids(tokenizer_dir)).items():
        setattr(config, key, value)
    config.save_pretrained(tmp)
    GenerationConfig.from_model_config(config).save_pretrained(tmp)
    tensors = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in state_dict.items() if k not in aliases}
    save_file(tensors, tmp / "model.safetensors", metadata={"format": "pt"})
    if tokenizer_dir is not None and Path(tokenizer_dir).is_dir():
        for f in Path(tokenizer_dir).iterdir():
            if f.is_file():
                shutil.copy2(f, tmp / f.name)
    for name, src in (extra_files or {}).items():
        (shutil.copytree if Path(src).is_dir() else shutil.copy2)(src, tmp / name)
    publish_export(tmp, out_dir)  # replaces an earlier export's files, never deletes other files
    log.info("exported a Hugging Face model to %s", out_dir)
    return out_dir


def export_checkpoint(ckpt: Path, out_dir: Path, overwrite: bool = False) -> Path:
    """Offline export of a saved pretraining checkpoint (one process, no process group).

    Only the `model` section of the checkpoint's config.yaml is read: the engine needs the shape, not the run.
    """
    from ember.pretrain.backends import load_full_weights
    from ember.pretrain.checkpoint import read_trainer_state, resolve_checkpoint

    check_export_target(out_dir, overwrite)  # before minutes of loading weights
    ckpt = resolve_checkpoint(Path(ckpt))
    config_file = ckpt / "config.yaml"
    if not config_file.is_file():
        raise UserError("checkpoint has no config.yaml", str(ckpt))
    model_section = read_yaml(config_file).get("model")
    if not isinstance(model_section, dict):
        raise UserError("config.yaml has no model section", str(config_file))
    model_cfg = validate(model_section, ModelConfig, default_where=f"{config_file}: model")
    tokenizer_dir = ckpt / "tokenizer"
    token_ids = read_trainer_state(ckpt).get("token_ids")
    return write_hf_export(load_full_weights(ckpt), model_cfg, out_dir,
                           tokenizer_dir=tokenizer_dir if tokenizer_dir.is_dir() else None, token_ids=token_ids)
