"""Shared test set-up: a quiet, offline, single-threaded environment for every test and subprocess."""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_SILENT", "true")


import pytest  # noqa: E402


@pytest.fixture(scope="session")
def small_dataset(tmp_path_factory):
    """A small prepared dataset: the stdlib files of at most 12,000 characters among the first 600 (~390
    files, ~1.6 MB), with a 512-token byte-level BPE trained on them.

    Returns the dataset directory (manifest.json, train/val shards, tokenizer/): ~740k train tokens in
    6 shards, ~30k val tokens, vocab 512, eos id 0, pad id 1.
    """
    from ember.data.config import PrepareConfig
    from ember.data.prepare import prepare

    cfg = PrepareConfig(source="builtin:python-stdlib", output_dir=tmp_path_factory.mktemp("data") / "small", max_documents=600,
                        filters={"max_chars": 12000}, tokenizer_train={"vocab_size": 512}, shard_tokens=1 << 17,
                        val_fraction=0.05, num_proc=1)
    return prepare(cfg, show_progress=False)
