"""The shard format: flat little-endian token files plus a document-offset index per shard.

`<split>-<NNNNN>.bin` holds the tokens of whole documents back to back (each ends with
EOS); `<split>-<NNNNN>.idx` holds int64 little-endian offsets of every document start
plus the end (num_documents + 1 values), so document d is bin[idx[d]:idx[d+1]].
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

INDEX_DTYPE = np.dtype("<i8")
HASH_CHUNK = 1 << 22


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id fits, else uint32 (little-endian either way)."""
    return np.dtype("<u2") if vocab_size <= 1 << 16 else np.dtype("<u4")


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(HASH_CHUNK):
            h.update(chunk)
    return h.hexdigest()


@dataclass
class ShardInfo:
    """One finished shard as the manifest records it."""

    name: str
    num_tokens: int
    num_documents: int
    num_bytes: int
    sha256: str
    index_name: str
    index_num_bytes: int
    index_sha256: str

    def to_json(self) -> dict:
        return dict(self.__dict__)


class ShardWriter:
    """Appends documents of one split to shards of about `shard_tokens` tokens, hashing while writing."""

    def __init__(self, out_dir: Path, split: str, dtype: np.dtype, shard_tokens: int):
        self.out_dir, self.split, self.dtype, self.shard_tokens = Path(out_dir), split, np.dtype(dtype), shard_tokens
        self.shards: list[ShardInfo] = []
        self._file = None

    def _open(self) -> None:
        self._name = f"{self.split}-{len(self.shards):05d}"
        self._file = open(self.out_dir / f"{self._name}.bin", "wb")
        self._hash = hashlib.sha256()
        self._offsets = [np.zeros(1, dtype=INDEX_DTYPE)]
        self._num_tokens = 0

    def append(self, tokens: np.ndarray, doc_lengths: np.ndarray) -> None:
        """Write whole documents: `tokens` (sum(doc_lengths),) already in the shard dtype, EOS included.

        A shard closes after the first document that brings it to `shard_tokens`; documents never split.
        """
        tokens = np.ascontiguousarray(tokens, dtype=self.dtype)
        doc_lengths = np.asarray(doc_lengths, dtype=INDEX_DTYPE)
        while len(doc_lengths):
            if self._file is None:
                self._open()
            ends = np.cumsum(doc_lengths)
            room = self.shard_tokens - self._num_tokens
            num_docs = min(int(np.searchsorted(ends, room, side="left")) + 1, len(doc_lengths))
            n = int(ends[num_docs - 1])
            data = tokens[:n].tobytes()
            self._file.write(data)
            self._hash.update(data)
            self._offsets.append(self._num_tokens + ends[:num_docs])
            self._num_tokens += n
            if self._num_tokens >= self.shard_tokens:
                self._close()
            tokens, doc_lengths = tokens[n:], doc_lengths[num_docs:]

    def _close(self) -> None:
        self._file.close()
        self._file = None
        index = np.concatenate(self._offsets).astype(INDEX_DTYPE)
        index_bytes = index.tobytes()
        (self.out_dir / f"{self._name}.idx").write_bytes(index_bytes)
        self.shards.append(ShardInfo(
            name=f"{self._name}.bin", num_tokens=self._num_tokens, num_documents=len(index) - 1,
            num_bytes=self._num_tokens * self.dtype.itemsize, sha256=self._hash.hexdigest(),
            index_name=f"{self._name}.idx", index_num_bytes=len(index_bytes), index_sha256=hashlib.sha256(index_bytes).hexdigest(),
        ))

    def finish(self) -> list[ShardInfo]:
        if self._file is not None:
            self._close()
        return self.shards

    def abort(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
