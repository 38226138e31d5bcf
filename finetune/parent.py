"""What `--from` points at: an ember run or checkpoint, or a Hugging Face model directory."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from ember.config import read_yaml, validate
from ember.errors import UserError
from ember.pretrain.backends.builder import is_hf_model_dir
from ember.pretrain.config import ModelConfig


@dataclass
class Parent:
    """The starting point of a fine-tuning run."""

    weights_path: Path  # what `pretrained_weights` reads: a checkpoint or an HF directory
    model: ModelConfig
    tokenizer_dir: Path | None
    token_ids: dict[str, int]  # eos/bos/pad ids
    run_dir: Path | None = None  # the ember run the checkpoint belongs to
    step: int | None = None  # the checkpoint's step
    hf_dir: Path | None = None  # an HF export of the same weights (the base a saved LoRA adapter applies to)
    val_fraction: float | None = None  # the pretraining split's held-out fraction, when its manifest is found


def model_config_from_hf(config: dict, where: str) -> ModelConfig:
    """ember's ModelConfig of an HF config.json (llama-style field names)."""
    try:
        rope = config.get("rope_parameters") or {}
        return ModelConfig(
            arch=config["model_type"], hidden_size=config["hidden_size"], num_layers=config["num_hidden_layers"],
            num_heads=config["num_attention_heads"], num_kv_heads=config.get("num_key_value_heads"),
            ffn_hidden_size=config["intermediate_size"], vocab_size=config["vocab_size"],
            max_seq_len=config.get("max_position_embeddings", 2048), tie_embeddings=config.get("tie_word_embeddings", False),
            norm_eps=config.get("rms_norm_eps", config.get("layer_norm_eps", 1e-5)),
            rope_theta=rope.get("rope_theta", config.get("rope_theta", 10000.0)))
    except (KeyError, ValueError) as e:
        raise UserError(f"cannot read the model shape from config.json: {e}", where) from None


def _val_fraction(run_config: dict) -> float | None:
    """The held-out fraction of the parent's first dataset, from its manifest (None when it cannot be found)."""
    for entry in (run_config.get("data") or {}).get("datasets") or []:
        path = entry.get("path")
        manifest = Path(path) / "manifest.json" if path else None
        if manifest is not None and manifest.is_file():
            return json.loads(manifest.read_text()).get("split", {}).get("val_fraction")
    return None


def resolve_parent(path: Path) -> Parent:
    """The parent at `path`; a UserError when it is neither an ember run / checkpoint nor an HF model directory."""
    from ember.pretrain.checkpoint import find_checkpoints, read_trainer_state, resolve_checkpoint

    path = Path(path)
    if not path.exists():
        raise UserError("--from: no such directory", str(path))
    if is_hf_model_dir(path):
        config = json.loads((path / "config.json").read_text())
        ids = {k: config[k] for k in ("eos_token_id", "bos_token_id", "pad_token_id") if isinstance(config.get(k), int)}
        has_tokenizer = (path / "tokenizer.json").is_file() or (path / "tokenizer_config.json").is_file()
        return Parent(path, model_config_from_hf(config, str(path / "config.json")), path if has_tokenizer else None, ids,
                      hf_dir=path)
    is_ember = read_trainer_state(path) is not None or find_checkpoints(path / "checkpoints") or find_checkpoints(path)
    if not is_ember:
        raise UserError("--from is neither an ember run or checkpoint (checkpoints/step_*/trainer_state.json) nor a "
                        "Hugging Face model directory (config.json + *.safetensors)", str(path))
    ckpt = resolve_checkpoint(path)
    state = read_trainer_state(ckpt)
    run_config = read_yaml(ckpt / "config.yaml") if (ckpt / "config.yaml").is_file() else {}
    if not isinstance(run_config.get("model"), dict):
        raise UserError("the checkpoint's config.yaml has no model section", str(ckpt))
    model = validate(run_config["model"], ModelConfig, default_where=f"{ckpt / 'config.yaml'}: model")
    run_dir = ckpt.parent.parent
    hf_dir = run_dir / "hf" if is_hf_model_dir(run_dir / "hf") else None
    tokenizer = ckpt / "tokenizer"
    return Parent(ckpt, model, tokenizer if tokenizer.is_dir() else None, dict(state.get("token_ids") or {}),
                  run_dir=run_dir, step=state["step"], hf_dir=hf_dir, val_fraction=_val_fraction(run_config))
