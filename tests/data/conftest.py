"""Fixtures of the data tests: a tiny shared tokenizer and in-process prepare of generated documents."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from data_testkit import make_docs, write_jsonl  # noqa: E402


@pytest.fixture(scope="session")
def tiny_tokenizer(tmp_path_factory) -> Path:
    """An HF tokenizer directory: byte-level BPE, vocab 320, trained on generated documents."""
    from ember.data.tokenizer import train_bpe

    out = tmp_path_factory.mktemp("tok") / "tiny"
    return train_bpe(make_docs(400, seed=99), out, vocab_size=320, special_tokens=["<|endoftext|>", "<|pad|>"])


@pytest.fixture
def prepare_docs(tmp_path, tiny_tokenizer):
    """prepare_docs(docs, name=..., **config fields) -> dataset dir, prepared in-process from a jsonl of `docs`."""
    from ember.data.config import PrepareConfig
    from ember.data.prepare import prepare

    def run(docs: list[str], name: str = "ds", **fields) -> Path:
        src = write_jsonl(tmp_path / f"{name}.jsonl", docs)
        cfg = PrepareConfig(**{"source": str(src), "output_dir": tmp_path / name, "tokenizer": str(tiny_tokenizer),
                               "num_proc": 1, "val_fraction": 0.1, **fields})
        return prepare(cfg, show_progress=False)

    return run
