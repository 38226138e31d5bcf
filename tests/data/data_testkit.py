"""Helpers of the data tests: generated corpora and reading shards back document by document."""

from __future__ import annotations

import json
import random
from pathlib import Path

WORDS = ("alpha beta gamma delta epsilon zeta theta lambda sigma omega def class return import yield "
         "naïve café über 日本語 ✓ emoji🙂 tab\tnew\nline").split(" ")


def make_docs(num_docs: int, seed: int = 0, max_words: int = 80) -> list[str]:
    """Distinct documents of varied length, with non-ASCII text, tabs and newlines."""
    rng = random.Random(seed)
    return [f"doc {seed}-{i}: " + " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, max_words))) for i in range(num_docs)]


def write_jsonl(path: Path, docs: list[str], field: str = "text") -> Path:
    path.write_text("".join(json.dumps({field: d, "id": i}) + "\n" for i, d in enumerate(docs)))
    return path




def read_split_documents(dataset_dir: Path, split: str) -> list[list[int]]:
    """Token ids of every document of a split, in order, straight from the shards and their indexes."""
    import numpy as np

    from ember.data.manifest import read_manifest

    m = read_manifest(dataset_dir)
    docs = []
    for s in m.shards(split):
        index = np.fromfile(dataset_dir / s.index_name, dtype="<i8")
        data = np.fromfile(dataset_dir / s.name, dtype=m.dtype)
        assert index[0] == 0 and index[-1] == len(data) == s.num_tokens
        docs += [data[a:b].tolist() for a, b in zip(index[:-1], index[1:])]
    return docs


def decode_split(dataset_dir: Path, split: str) -> list[str]:
    """Texts of a split's documents; asserts every document ends with exactly one EOS."""
    from ember.data.manifest import read_manifest
    from ember.data.tokenizer import load_tokenizer

    m = read_manifest(dataset_dir)
    tok = load_tokenizer(m.tokenizer_dir)
    texts = []
    for ids in read_split_documents(dataset_dir, split):
        assert ids[-1] == m.eos_id and m.eos_id not in ids[:-1]
        texts.append(tok.decode(ids[:-1], skip_special_tokens=False))
    return texts
