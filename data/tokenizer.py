"""Tokenizers: train a byte-level BPE, load HF tokenizers, store them in a dataset, fingerprint them.

A dataset keeps its own copy of the tokenizer (`<dataset>/tokenizer/`, an HF tokenizer
directory) and records the fingerprint of its tokenizer.json in the manifest, so the ids
in the shards can always be decoded and a swapped tokenizer is caught at load time.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from collections.abc import Iterable
from pathlib import Path

from ember.errors import UserError

log = logging.getLogger("ember.data.tokenizer")

# Files of an HF tokenizer directory that travel with it (the rest, e.g. model weights, do not).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json", "chat_template.jinja")


def fingerprint(tokenizer_dir: Path) -> str:
    """sha256 of the tokenizer.json bytes: equal fingerprints mean equal token ids."""
    path = Path(tokenizer_dir) / "tokenizer.json"
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError as e:
        raise UserError(f"cannot read tokenizer: {e.strerror}", str(path)) from None


def train_bpe(texts: Iterable[str], out_dir: Path, *, vocab_size: int, special_tokens: list[str], min_frequency: int = 2) -> Path:
    """Train a byte-level BPE on `texts` and save it as an HF tokenizer directory; the first special token is EOS."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    # Byte-level: every string round-trips exactly (no normaliser, no unknown token).
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=list(special_tokens),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    return save_hf_tokenizer(tok, out_dir, eos_token=special_tokens[0], pad_token=special_tokens[1] if len(special_tokens) > 1 else None)


def save_hf_tokenizer(tok, out_dir: Path, *, eos_token: str, pad_token: str | None) -> Path:
    """Save a `tokenizers.Tokenizer` as an HF tokenizer directory (tokenizer.json + tokenizer_config.json).

    Written directly rather than through transformers, whose import would dominate a small prepare;
    `AutoTokenizer.from_pretrained` loads the result as a fast tokenizer.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tok.save(str(out_dir / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": eos_token, "eos_token": eos_token,
              "clean_up_tokenization_spaces": False}
    if pad_token is not None:
        config["pad_token"] = pad_token
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    return out_dir


def _token_content(value) -> str | None:
    """A special token as tokenizer_config.json stores it: a string or {"content": ...}."""
    return value.get("content") if isinstance(value, dict) else value


def tokenizer_ids(tokenizer_dir: Path, eos_token: str) -> tuple[int, int, int | None]:
    """(vocab size = largest id + 1, EOS id, pad id or None) of an HF tokenizer directory, without transformers."""
    from tokenizers import Tokenizer

    tokenizer_dir = Path(tokenizer_dir)
    tok = Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json"))
    config_path = tokenizer_dir / "tokenizer_config.json"
    config = json.loads(config_path.read_text()) if config_path.is_file() else {}
    eos = _token_content(config.get("eos_token")) or eos_token
    eos_id = tok.token_to_id(eos)
    if eos_id is None:
        raise UserError(f"the tokenizer has no end-of-document token '{eos}'; set eos_token", str(tokenizer_dir))
    pad = _token_content(config.get("pad_token"))
    pad_id = tok.token_to_id(pad) if pad else None
    return max(tok.get_vocab(with_added_tokens=True).values()) + 1, eos_id, pad_id


def load_tokenizer(path: str | Path):
    """An HF fast tokenizer from a directory, a tokenizer.json file, or a hub name; UserError if none loads."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    p = Path(path)
    try:
        if p.is_file():
            tok = PreTrainedTokenizerFast(tokenizer_file=str(p), clean_up_tokenization_spaces=False)
        else:
            if not p.exists() and (str(path).startswith((".", "/")) or p.suffix):
                raise UserError("tokenizer not found", str(path))
            tok = AutoTokenizer.from_pretrained(str(path))
    except UserError:
        raise
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"cannot load tokenizer: {first}", str(path)) from None
    if not getattr(tok, "is_fast", False) or getattr(tok, "backend_tokenizer", None) is None:
        raise UserError("not a fast (tokenizers-backed) tokenizer", str(path))
    return tok


def install_tokenizer(spec: str, out_dir: Path, eos_token: str) -> Path:
    """Put the tokenizer named by `spec` into `out_dir` as an HF directory, byte for byte where possible."""
    src = Path(spec)
    out_dir = Path(out_dir)
    if src.is_dir() and (src / "tokenizer.json").is_file():
        from tokenizers import Tokenizer

        try:  # validate with tokenizers alone: importing transformers would dominate a small prepare
            Tokenizer.from_file(str(src / "tokenizer.json"))
        except Exception as e:
            raise UserError(f"cannot load tokenizer: {str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__}",
                            str(src / "tokenizer.json")) from None
        out_dir.mkdir(parents=True, exist_ok=True)
        # Byte copy keeps the fingerprint equal to the source's, so datasets sharing it agree.
        for name in TOKENIZER_FILES:
            if (src / name).is_file():
                shutil.copyfile(src / name, out_dir / name)
        return out_dir
    tok = load_tokenizer(spec)
    if tok.eos_token is None:
        if tok.convert_tokens_to_ids(eos_token) in (None, tok.unk_token_id):
            raise UserError(f"the tokenizer has no eos_token and no '{eos_token}' token; set eos_token", spec)
        tok.eos_token = eos_token
    out_dir.mkdir(parents=True, exist_ok=True)
    tok.save_pretrained(str(out_dir))
    return out_dir
