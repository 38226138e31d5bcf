"""`ember data prepare`: source -> filters -> tokenizer -> parallel encode -> shards + manifest, atomically.

Everything is written into a hidden temporary directory next to `output_dir` and renamed
into place only when the manifest is complete, so an error or an interrupt leaves no
half dataset behind (a killed run leaves only the hidden temporary, cleaned up by the
next prepare of the same output).
"""

from __future__ import annotations

import hashlib
import itertools
import logging
import os
import shutil
import signal
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from ember.data.config import DatasetEntry, FilterConfig, PrepareConfig
from ember.data.encode import encode_in_order
from ember.data.manifest import FORMAT, FORMAT_VERSION, MANIFEST, SPLITS, dataset_fingerprint, read_manifest, write_json_atomic
from ember.data.progress import PrepareProgress, print_prepare_summary
from ember.data.shards import ShardWriter, token_dtype
from ember.data.sources import Source, SourceStats, resolve_source
from ember.data.tokenizer import fingerprint, install_tokenizer, tokenizer_ids, train_bpe
from ember.errors import UserError

log = logging.getLogger("ember.data.prepare")


@dataclass
class Accounting:
    """Per-source accounting written to the manifest."""

    stats: SourceStats = field(default_factory=SourceStats)
    num_documents_kept: int = 0
    num_chars_kept: int = 0

    def to_json(self) -> dict:
        return {
            "documents_read": self.stats.num_documents_read, "documents_kept": self.num_documents_kept,
            "dropped": dict(sorted(self.stats.dropped.items())), "bytes_read": self.stats.num_bytes_read,
            "chars_kept": self.num_chars_kept,
        }


class DocumentFilter:
    """Length filters and exact de-duplication; yields (text, 16-byte hash) of every kept document."""

    def __init__(self, cfg: FilterConfig, stats: SourceStats):
        self.cfg, self.stats, self.seen = cfg, stats, set()

    def apply(self, texts: Iterator[str]) -> Iterator[tuple[str, bytes]]:
        cfg, drop = self.cfg, self.stats.drop
        for text in texts:
            if len(text) < cfg.min_chars:
                drop("too_short")
                continue
            if cfg.max_chars is not None and len(text) > cfg.max_chars:
                drop("too_long")
                continue
            try:
                data = text.encode("utf-8")
            except UnicodeEncodeError:  # lone surrogates from JSON escapes
                drop("undecodable")
                continue
            digest = hashlib.blake2b(data, digest_size=16).digest()
            if cfg.dedup:
                if digest in self.seen:
                    drop("duplicate")
                    continue
                self.seen.add(digest)
            yield text, digest


def hash_fraction(digest: bytes) -> float:
    """A document's position in [0, 1) by its hash: decides the split and tokenizer-training samples."""
    return int.from_bytes(digest[:8], "little") / 2.0**64


def default_num_proc() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


# ---------------------------------------------------------------- tokenizer


def kept_documents(cfg: PrepareConfig, source: Source, stats: SourceStats) -> Iterator[tuple[str, bytes]]:
    """(text, 16-byte hash) of every document that passes the filters, up to max_documents read."""
    return DocumentFilter(cfg.filters, stats).apply(itertools.islice(source.documents(stats), cfg.max_documents))


def tokenizer_training_texts(cfg: PrepareConfig, source: Source) -> Iterator[str]:
    """The train-split documents the BPE learns from: a hash-chosen fraction, up to max_train_bytes."""
    train_cfg, budget, num_docs = cfg.tokenizer_train, cfg.tokenizer_train.max_train_bytes, 0
    stats = SourceStats()
    for text, digest in kept_documents(cfg, source, stats):
        # The other half of the hash picks the sample, so it is independent of the split.
        if hash_fraction(digest) < cfg.val_fraction or (hash_fraction(digest[8:]) >= train_cfg.sample_fraction and num_docs > 0):
            continue
        num_docs += 1
        yield text
        if budget is not None:
            budget -= len(text)
            if budget <= 0:
                return
    if num_docs == 0:
        raise UserError(f"no documents to train the tokenizer on: read {stats.num_documents_read}, dropped {stats.dropped or 'none'}", cfg.source)


def train_tokenizer(cfg: PrepareConfig, out_dir: Path, source: Source | None = None) -> Path:
    """Train the byte-level BPE described by `cfg.tokenizer_train` on `cfg.source` into `out_dir`."""
    source = source or resolve_source(cfg.source, cfg.text_field, cfg.hub_config, cfg.hub_split, cfg.streaming)
    t0 = time.perf_counter()
    t = cfg.tokenizer_train
    out = train_bpe(tokenizer_training_texts(cfg, source), out_dir, vocab_size=t.vocab_size,
                    special_tokens=t.special_tokens, min_frequency=t.min_frequency)
    log.info("trained a byte-level BPE (vocab %d) in %.1f s -> %s", t.vocab_size, time.perf_counter() - t0, out)
    return out


# ---------------------------------------------------------------- encode and write


def _batches(cfg: PrepareConfig, source: Source, acct: Accounting) -> Iterator[tuple[list[str], list[bool]]]:
    batch, is_val, num_chars = [], [], 0
    for text, digest in kept_documents(cfg, source, acct.stats):
        batch.append(text)
        is_val.append(hash_fraction(digest) < cfg.val_fraction)
        num_chars += len(text)
        acct.num_documents_kept += 1
        acct.num_chars_kept += len(text)
        if num_chars >= cfg.batch_chars:
            yield batch, is_val
            batch, is_val, num_chars = [], [], 0
    if batch:
        yield batch, is_val


def write_shards(cfg: PrepareConfig, source: Source, tmp: Path, tokenizer_dir: Path, eos_id: int, dtype, acct: Accounting,
                 show_progress: bool) -> dict:
    writers = {split: ShardWriter(tmp, split, dtype, cfg.shard_tokens) for split in SPLITS}
    num_proc = cfg.num_proc or default_num_proc()
    progress = PrepareProgress(source.total_bytes, enabled=show_progress)
    try:
        with progress:
            results = encode_in_order(_batches(cfg, source, acct), str(tokenizer_dir / "tokenizer.json"), eos_id, dtype.str, num_proc)
            for (texts, _), (train_tok, train_len, val_tok, val_len) in results:
                writers["train"].append(train_tok, train_len)
                writers["val"].append(val_tok, val_len)
                progress.advance(len(texts), int(len(train_tok) + len(val_tok)), acct.stats.num_bytes_read)
        return {split: w.finish() for split, w in writers.items()}
    except BaseException:
        for w in writers.values():
            w.abort()
        raise


# ---------------------------------------------------------------- the command


def _clean_stale_temporaries(out: Path) -> None:
    """Remove hidden temporaries of earlier prepares of `out` whose process is gone."""
    for stale in out.parent.glob(f".{out.name}.tmp-*"):
        try:
            os.kill(int(stale.name.rsplit("-", 1)[1]), 0)
        except (ValueError, ProcessLookupError):
            shutil.rmtree(stale, ignore_errors=True)
        except PermissionError:
            pass


def _check_output(out: Path, overwrite: bool) -> None:
    if not out.exists() or (out.is_dir() and not any(out.iterdir())):  # an empty directory is replaced silently
        return
    if not overwrite:
        raise UserError("output directory already exists; pass --overwrite to replace it", str(out))
    if not out.is_dir() or (any(out.iterdir()) and not (out / MANIFEST).is_file()):
        raise UserError("refusing to overwrite: the output exists and is not an ember dataset", str(out))


@contextmanager
def _termination_cleans_up():
    """Turn SIGTERM into SystemExit while preparing, so the temporary directory is removed on the way out."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum, frame):
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def prepare(cfg: PrepareConfig, overwrite: bool = False, show_progress: bool = True) -> Path:
    """Build the dataset described by `cfg`; returns its directory."""
    with _termination_cleans_up():
        return _prepare(cfg, overwrite, show_progress)


def _prepare(cfg: PrepareConfig, overwrite: bool, show_progress: bool) -> Path:
    t0 = time.perf_counter()
    out = Path(cfg.output_dir).absolute()
    _check_output(out, overwrite)
    source = resolve_source(cfg.source, cfg.text_field, cfg.hub_config, cfg.hub_split, cfg.streaming)
    out.parent.mkdir(parents=True, exist_ok=True)
    _clean_stale_temporaries(out)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        tok_dir = tmp / "tokenizer"
        if cfg.tokenizer:
            install_tokenizer(cfg.tokenizer, tok_dir, cfg.eos_token)
        else:
            train_tokenizer(cfg, tok_dir, source)
        vocab_size, eos_id, pad_id = tokenizer_ids(tok_dir, cfg.eos_token)
        dtype = token_dtype(vocab_size)
        acct = Accounting()
        t_encode = time.perf_counter()
        shards = write_shards(cfg, source, tmp, tok_dir, eos_id, dtype, acct, show_progress)
        encode_s = time.perf_counter() - t_encode
        if acct.num_documents_kept == 0:
            raise UserError(f"no documents to tokenise: read {acct.stats.num_documents_read}, dropped {acct.stats.dropped or 'none'}", cfg.source)
        if not shards["train"]:
            raise UserError("the train split is empty (every document went to val); lower val_fraction", cfg.source)
        manifest = _manifest(cfg, source, tok_dir, vocab_size, eos_id, pad_id, dtype, shards, acct, encode_s)
        write_json_atomic(tmp / MANIFEST, manifest)
        _move_into_place(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if show_progress:
        print_prepare_summary(read_manifest(out), time.perf_counter() - t0)
    return out


def _move_into_place(tmp: Path, out: Path) -> None:
    if not out.exists():
        try:
            os.rename(tmp, out)
        except OSError:  # another prepare of the same output finished first
            raise UserError("the output directory appeared while preparing (another prepare wrote it?)", str(out)) from None
        return
    old = out.parent / f".{out.name}.old-{os.getpid()}"
    os.rename(out, old)
    os.rename(tmp, out)
    shutil.rmtree(old, ignore_errors=True)


def _manifest(cfg, source, tok_dir, vocab_size, eos_id, pad_id, dtype, shards, acct, encode_s) -> dict:
    splits = {}
    for split in SPLITS:
        infos = [s.to_json() for s in shards[split]]
        splits[split] = {"num_tokens": sum(s["num_tokens"] for s in infos), "num_documents": sum(s["num_documents"] for s in infos), "shards": infos}
    tok_fp = fingerprint(tok_dir)
    num_tokens = splits["train"]["num_tokens"] + splits["val"]["num_tokens"]
    return {
        "format": FORMAT, "format_version": FORMAT_VERSION,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "fingerprint": dataset_fingerprint(tok_fp, dtype.name, splits),
        "dtype": dtype.name, "byte_order": "little",
        "tokenizer": {"path": "tokenizer", "origin": cfg.tokenizer or "trained", "fingerprint": tok_fp,
                      "vocab_size": vocab_size, "eos_id": eos_id, "pad_id": pad_id},
        "source": {"spec": cfg.source, "kind": source.kind, "num_files": len(source.files), "text_field": cfg.text_field},
        "accounting": {**acct.to_json(), "tokens": num_tokens},
        "split": {"method": "blake2b-16 of the document's UTF-8 bytes", "val_fraction": cfg.val_fraction},
        "timing": {"encode_s": round(encode_s, 3), "tokens_per_s": round(num_tokens / max(encode_s, 1e-9))},
        "splits": splits,
        "config": cfg.model_dump(mode="json"),
    }


def ensure_prepared(entry: DatasetEntry) -> Path:
    """The dataset directory of one mixture entry, preparing it first if it holds no dataset yet.

    Cheap when the dataset exists (manifest, sizes and tokenizer fingerprint; no checksum
    pass). Not distributed-aware: call it on rank 0, barrier, then on the other ranks.
    """
    from ember.config import load_config

    cfg = None
    if entry.prepare is not None:
        cfg = load_config(entry.prepare, PrepareConfig, kind="data")
        if entry.path is not None:
            cfg = cfg.model_copy(update={"output_dir": Path(entry.path)})
    out = Path(entry.path) if entry.path is not None else Path(cfg.output_dir)
    if (out / MANIFEST).is_file():
        read_manifest(out)
        return out
    if cfg is None:
        raise UserError("no prepared dataset here (no manifest.json) and no `prepare` config to build it", str(out))
    log.info("preparing %s into %s", entry.prepare, out)
    return prepare(cfg, overwrite=False)
