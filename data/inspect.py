"""`ember data inspect`: a dataset's summary, its document-length histogram and decoded sample documents."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

from ember.data.manifest import read_manifest
from ember.data.shards import INDEX_DTYPE
from ember.data.tokenizer import load_tokenizer


def document_lengths(manifest, split: str) -> np.ndarray:
    """(num_documents,) tokens per document (EOS included) across all shards of a split."""
    parts = [np.diff(np.fromfile(manifest.dir / s.index_name, dtype=INDEX_DTYPE)) for s in manifest.shards(split)]
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)


def length_histogram(lengths: np.ndarray, num_bins: int = 16) -> list[tuple[int, int, int]]:
    """(low, high, count) over power-of-two bins, from the shortest to the longest document."""
    if len(lengths) == 0:
        return []
    lo = max(int(np.floor(np.log2(max(lengths.min(), 1)))), 0)
    hi = int(np.ceil(np.log2(lengths.max() + 1)))
    edges = 2 ** np.arange(lo, max(hi, lo + 1) + 1)
    counts, _ = np.histogram(lengths, bins=edges)
    return [(int(a), int(b), int(c)) for a, b, c in zip(edges[:-1], edges[1:], counts)][-num_bins:]


def read_document(manifest, split: str, doc: int) -> np.ndarray:
    """Tokens (EOS included) of the doc-th document of a split."""
    for s in manifest.shards(split):
        if doc < s.num_documents:
            index = np.fromfile(manifest.dir / s.index_name, dtype=INDEX_DTYPE)
            data = np.memmap(manifest.dir / s.name, dtype=manifest.dtype, mode="r")
            return np.asarray(data[index[doc] : index[doc + 1]])
        doc -= s.num_documents
    raise IndexError(doc)


def inspect_dataset(dataset_dir: Path, num_samples: int = 3, split: str = "train", max_chars: int = 400, seed: int = 0) -> None:
    m = read_manifest(dataset_dir)
    console = Console(file=sys.stdout)
    raw = m.raw
    summary = Table(title=f"dataset {m.dir}", show_header=False)
    summary.add_column("what")
    summary.add_column("value", justify="right")
    summary.add_row("source", raw["source"]["spec"])
    summary.add_row("tokenizer", f"vocab {m.vocab_size:,}, eos {m.eos_id}, pad {m.pad_id}, {m.dtype.name}, {m.tokenizer_fingerprint[:12]}")
    for sp in ("train", "val"):
        summary.add_row(sp, f"{m.num_tokens(sp):,} tokens, {m.num_documents(sp):,} documents, {len(m.shards(sp))} shards")
    acct = raw["accounting"]
    summary.add_row("documents read / kept", f"{acct['documents_read']:,} / {acct['documents_kept']:,}")
    for reason, n in acct["dropped"].items():
        summary.add_row(f"dropped: {reason}", f"{n:,}")
    summary.add_row("fingerprint", m.fingerprint[:16])
    console.print(summary)

    lengths = document_lengths(m, split)
    if len(lengths):
        hist = Table(title=f"{split}: tokens per document (mean {lengths.mean():,.0f}, median {np.median(lengths):,.0f}, max {lengths.max():,})")
        hist.add_column("tokens")
        hist.add_column("documents", justify="right")
        hist.add_column("")
        peak = max(c for _, _, c in length_histogram(lengths)) or 1
        for a, b, c in length_histogram(lengths):
            hist.add_row(f"{a:,} - {b - 1:,}", f"{c:,}", "#" * round(30 * c / peak))
        console.print(hist)

    if num_samples > 0 and len(lengths):
        tok = load_tokenizer(m.tokenizer_dir)
        picks = np.sort(np.random.default_rng(seed).choice(len(lengths), size=min(num_samples, len(lengths)), replace=False))
        for doc in picks:
            ids = read_document(m, split, int(doc))
            text = tok.decode(ids.tolist(), skip_special_tokens=False)
            shown = text if len(text) <= max_chars else text[:max_chars] + f" ... [{len(text) - max_chars:,} more characters]"
            console.rule(f"{split} document {doc} ({len(ids):,} tokens)")
            console.print(shown, markup=False, highlight=False)
