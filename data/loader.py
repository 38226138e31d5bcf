"""The distributed, resumable token loader over memory-mapped shards.

A source's split is one virtual token stream (its shards end to end). Sample (chunk) c of
a source is stream[c*seq_len : c*seq_len + seq_len + 1]: consecutive chunks overlap by the
one token that is the last label of one and the first input of the next. Which source and
chunk the global sample i is comes from `MixtureSchedule` (seed, i, sizes only). Rank r of
W takes rows [r*B/W, (r+1)*B/W) of every global batch of B samples. The loader's whole
state is the number of global samples consumed.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ember.data.manifest import Manifest, read_manifest
from ember.data.mixture import MixtureSchedule
from ember.data.shards import INDEX_DTYPE
from ember.errors import UserError


@dataclass
class Batch:
    """One optimizer step's data for this rank.

    tokens:        (rows, seq_len + 1) int64; inputs = tokens[:, :-1], labels = tokens[:, 1:]
    doc_starts:    (rows, seq_len + 1) bool; True where a document's first token sits
    sources:       (rows,) int64 source index of each row (order of the loader's datasets)
    source_tokens: source name -> trained tokens (rows * seq_len) from it in the whole global batch
    start_sample:  global index of the first sample of the global batch
    """

    tokens: torch.Tensor
    doc_starts: torch.Tensor
    sources: torch.Tensor
    source_tokens: dict[str, int]
    start_sample: int

    def pin_memory(self) -> Batch:
        return Batch(self.tokens.pin_memory(), self.doc_starts.pin_memory(), self.sources.pin_memory(), self.source_tokens, self.start_sample)


class TokenStream:
    """The concatenated shards of one split of one dataset, opened lazily (per process) as memmaps."""

    def __init__(self, manifest: Manifest, split: str):
        self.dir, self.dtype = manifest.dir, manifest.dtype
        shards = manifest.shards(split)
        self.names = [s.name for s in shards]
        self.index_names = [s.index_name for s in shards]
        self.sizes = np.array([s.num_tokens for s in shards], dtype=np.int64)  # (num_shards,)
        self.starts = np.concatenate([[0], np.cumsum(self.sizes)])  # (num_shards + 1,) stream offset of each shard
        self.num_tokens = int(self.starts[-1])
        self._pid, self._maps, self._doc_starts = None, None, None

    def _open(self) -> None:
        # Memmaps are opened per process: pickling one to a DataLoader worker would copy the data.
        # Plain ndarray views: slicing them skips np.memmap's per-slice Python overhead. The
        # indexes stay on disk too, so memory does not grow with the number of documents.
        if self._pid != os.getpid():
            self._maps = [np.memmap(self.dir / n, dtype=self.dtype, mode="r").view(np.ndarray) for n in self.names]
            self._doc_starts = [np.memmap(self.dir / n, dtype=INDEX_DTYPE, mode="r").view(np.ndarray)[:-1] for n in self.index_names]
            self._pid = os.getpid()

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_pid": None, "_maps": None, "_doc_starts": None}

    def read_rows(self, starts: np.ndarray, tokens: np.ndarray, doc_starts: np.ndarray) -> None:
        """Row i of `tokens` (rows, length) = stream[starts[i] : starts[i] + length]; `doc_starts` (rows, length)
        gets True where a document begins. One slice copy per row (or per shard piece), no per-token Python."""
        self._open()
        rows, shards, lo, hi, at = self._pieces(starts, tokens.shape[1])
        for r, k, a, b, o in zip(rows.tolist(), shards.tolist(), lo.tolist(), hi.tolist(), at.tolist()):
            tokens[r, o : o + b - a] = self._maps[k][a:b]
        if (shards == shards[0]).all():
            self._mark_doc_starts(int(shards[0]), rows, lo, hi, at, doc_starts)
            return
        for k in np.unique(shards):
            sel = shards == k
            self._mark_doc_starts(int(k), rows[sel], lo[sel], hi[sel], at[sel], doc_starts)

    def _pieces(self, starts: np.ndarray, length: int) -> tuple[np.ndarray, ...]:
        """(row, shard, local start, local end, offset in row) of the shard pieces covering each row's window."""
        shard = np.searchsorted(self.starts, starts, side="right") - 1
        lo = starts - self.starts[shard]
        hi = np.minimum(lo + length, self.sizes[shard])
        pieces = [(np.arange(len(starts)), shard, lo, hi, np.zeros(len(starts), dtype=np.int64))]
        crossing = np.nonzero(hi - lo < length)[0]
        if len(crossing) == 0:
            return pieces[0]
        for r in crossing:  # rare: a window that crosses shard ends
            done, k = int(hi[r] - lo[r]), int(shard[r]) + 1
            while done < length:
                n = min(length - done, int(self.sizes[k]))
                pieces.append(tuple(np.array([v]) for v in (r, k, 0, n, done)))
                done, k = done + n, k + 1
        return tuple(np.concatenate(parts).astype(np.int64) for parts in zip(*pieces))

    def _mark_doc_starts(self, shard: int, rows, lo, hi, at, out: np.ndarray) -> None:
        """Set out[row, at + p - lo] for every document start p of `shard` in [lo, hi), piece by piece."""
        index = self._doc_starts[shard]  # (num_docs,) local offsets of document starts
        first, last = np.searchsorted(index, lo), np.searchsorted(index, hi)
        counts = last - first
        piece = np.repeat(np.arange(len(rows)), counts)
        which = np.arange(int(counts.sum())) - np.repeat(np.cumsum(counts) - counts, counts) + first[piece]
        out[rows[piece], at[piece] + index[which] - lo[piece]] = True


class TokenLoader:
    """Iterating yields this rank's `Batch` of every global batch, from `samples_consumed` on, forever."""

    def __init__(self, manifests: list[Manifest], weights: list[float], *, split: str, seq_len: int, global_batch_size: int,
                 rank: int, world_size: int, seed: int, num_workers: int = 0, pin_memory: bool | None = None):
        if global_batch_size % world_size:
            raise UserError(f"global_batch_size {global_batch_size} is not divisible by the world size {world_size}", "train.global_batch_size")
        self.split, self.seq_len, self.global_batch_size = split, seq_len, global_batch_size
        self.rank, self.world_size, self.seed, self.num_workers = rank, world_size, seed, num_workers
        self.pin_memory = torch.cuda.is_available() if pin_memory is None else pin_memory
        self.names = _unique_names(manifests)
        self.streams = [TokenStream(m, split) for m in manifests]
        num_chunks = [(s.num_tokens - 1) // seq_len for s in self.streams]
        for name, n, s in zip(self.names, num_chunks, self.streams):
            if n < 1:
                raise UserError(f"split '{split}' of dataset '{name}' has {s.num_tokens} tokens, fewer than seq_len + 1 = {seq_len + 1}", str(s.dir))
        self.num_chunks = num_chunks
        self.schedule = MixtureSchedule(weights, num_chunks, seed)
        self.samples_consumed = 0

    # ------------------------------------------------------------ state

    def state_dict(self) -> dict:
        return {"samples_consumed": self.samples_consumed, "seed": self.seed, "split": self.split}

    def load_state_dict(self, state: dict) -> None:
        self.samples_consumed = int(state["samples_consumed"])

    def samples_by_source(self) -> dict[str, int]:
        drawn = self.schedule.draws_by_source(self.samples_consumed)
        return {name: int(n) for name, n in zip(self.names, drawn)}

    def epochs_by_source(self) -> dict[str, float]:
        """Passes over each source so far (1.5 = once fully and half again); above 1 means repetition."""
        drawn = self.schedule.draws_by_source(self.samples_consumed)
        return {name: float(n) / c for name, n, c in zip(self.names, drawn, self.num_chunks)}

    # ------------------------------------------------------------ reading

    def read_batch(self, start_sample: int) -> Batch:
        """This rank's rows of the global batch that starts at global sample `start_sample`."""
        B, L = self.global_batch_size, self.seq_len
        sources, chunks = self.schedule.locate(start_sample, B)
        counts = np.bincount(sources, minlength=len(self.streams))
        rows = B // self.world_size
        mine = slice(self.rank * rows, (self.rank + 1) * rows)
        tokens = np.empty((rows, L + 1), dtype=np.int64)  # (rows, seq_len + 1)
        doc_starts = np.zeros((rows, L + 1), dtype=bool)
        my_sources, my_starts = sources[mine], chunks[mine] * L  # (rows,), (rows,) stream offsets
        present = np.unique(my_sources)
        if len(present) == 1:  # one source: read straight into the batch
            self.streams[int(present[0])].read_rows(my_starts, tokens, doc_starts)
            present = []
        for s in present:
            sel = np.nonzero(my_sources == s)[0]
            part_tokens = np.empty((len(sel), L + 1), dtype=np.int64)
            part_docs = np.zeros((len(sel), L + 1), dtype=bool)
            self.streams[int(s)].read_rows(my_starts[sel], part_tokens, part_docs)
            tokens[sel], doc_starts[sel] = part_tokens, part_docs
        return Batch(torch.from_numpy(tokens), torch.from_numpy(doc_starts), torch.from_numpy(sources[mine].copy()),
                     {name: int(n) * L for name, n in zip(self.names, counts)}, start_sample)

    def __iter__(self) -> Iterator[Batch]:
        starts = itertools.count(self.samples_consumed, self.global_batch_size)
        if self.num_workers == 0:
            batches = map(self.read_batch, starts)
        else:
            batches = iter(torch.utils.data.DataLoader(
                _BatchDataset(self), batch_size=None, sampler=starts, num_workers=self.num_workers,
                pin_memory=self.pin_memory, prefetch_factor=2, multiprocessing_context="fork" if os.name == "posix" else None,
            ))
        for batch in batches:
            if self.num_workers == 0 and self.pin_memory:
                batch = batch.pin_memory()
            self.samples_consumed = batch.start_sample + self.global_batch_size
            yield batch


class _BatchDataset(torch.utils.data.Dataset):
    """Map-style view for DataLoader workers: index = first global sample of a global batch."""

    def __init__(self, loader: TokenLoader):
        self.loader = loader

    def __getitem__(self, start_sample: int) -> Batch:
        return self.loader.read_batch(start_sample)


def _unique_names(manifests: list[Manifest]) -> list[str]:
    names, seen = [], {}
    for m in manifests:
        seen[m.name] = seen.get(m.name, 0) + 1
        names.append(m.name if seen[m.name] == 1 else f"{m.name}#{seen[m.name]}")
    return names


def build_loader(dataset_dirs: list[Path], weights: list[float], *, split: str, seq_len: int, global_batch_size: int, rank: int,
                 world_size: int, seed: int, num_workers: int = 0, pin_memory: bool | None = None) -> TokenLoader:
    """A `TokenLoader` over prepared datasets mixed by `weights`; see the module docstring for the order."""
    if not dataset_dirs:
        raise UserError("no datasets given", "data.datasets")
    if len(weights) != len(dataset_dirs):
        raise UserError(f"{len(weights)} weights for {len(dataset_dirs)} datasets", "data.datasets")
    if any(w <= 0 for w in weights):
        raise UserError("mixture weights must be > 0", "data.datasets")
    if not 0 <= rank < world_size:
        raise UserError(f"rank {rank} outside world size {world_size}", "loader")
    manifests = [read_manifest(d) for d in dataset_dirs]
    first = manifests[0]
    for m in manifests[1:]:
        if m.tokenizer_fingerprint != first.tokenizer_fingerprint:
            raise UserError(f"datasets use different tokenizers: {first.name} has {first.tokenizer_fingerprint[:12]}, "
                            f"{m.name} has {m.tokenizer_fingerprint[:12]}; prepare them with the same tokenizer", str(m.dir))
    return TokenLoader(manifests, list(weights), split=split, seq_len=seq_len, global_batch_size=global_batch_size, rank=rank,
                       world_size=world_size, seed=seed, num_workers=num_workers, pin_memory=pin_memory)
