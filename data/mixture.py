"""The global sample order: a pure function of (seed, global sample index, sources' sizes).

Global samples are cut into blocks of `block_size`. Every block holds each source a fixed
number of times (the weights rounded by largest remainder), in a seeded random order, so
proportions hold to within one sample per block from the first step. The j-th sample
drawn from source s is chunk `perm_{seed,s,epoch}[j mod num_chunks]` with
epoch = j // num_chunks: each pass over a source visits every chunk once, in a new order.
Nothing depends on rank, world size or worker count.
"""

from __future__ import annotations

import math
from functools import lru_cache

import numpy as np

BASE_BLOCK = 1024
_MIX_TAG, _PERM_TAG = 0x6D6978, 0x7065726D  # keep the two random streams apart


def block_counts(weights: list[float], block_size: int) -> np.ndarray:
    """Samples of each source per block: weights * block_size rounded by largest remainder (sums to block_size)."""
    w = np.asarray(weights, dtype=np.float64)
    exact = w / w.sum() * block_size
    counts = np.floor(exact).astype(np.int64)
    order = np.argsort(-(exact - counts), kind="stable")
    counts[order[: block_size - counts.sum()]] += 1
    return counts


def choose_block_size(weights: list[float]) -> int:
    """A multiple of BASE_BLOCK large enough that every source appears in every block."""
    w = np.asarray(weights, dtype=np.float64)
    smallest = float((w / w.sum()).min())
    return BASE_BLOCK * max(1, math.ceil(1.0 / (smallest * BASE_BLOCK)))


class MixtureSchedule:
    """Maps a global sample index to (source, chunk index within that source)."""

    def __init__(self, weights: list[float], num_chunks: list[int], seed: int):
        self.seed, self.num_chunks = int(seed), [int(n) for n in num_chunks]
        self.block_size = choose_block_size(weights)
        self.counts = block_counts(weights, self.block_size)
        self._block = lru_cache(maxsize=8)(self._make_block)
        self._perm = lru_cache(maxsize=16)(self._make_perm)

    def _make_block(self, block: int) -> tuple[np.ndarray, np.ndarray]:
        """(source id, draw number within the block) for every position of one block."""
        pattern = np.repeat(np.arange(len(self.counts)), self.counts)
        sources = np.random.default_rng([self.seed, _MIX_TAG, block]).permutation(pattern)
        rank_in_source = np.empty(self.block_size, dtype=np.int64)
        for s, n in enumerate(self.counts):
            rank_in_source[sources == s] = np.arange(n)
        return sources, rank_in_source

    def _make_perm(self, source: int, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, _PERM_TAG, source, epoch]).permutation(self.num_chunks[source])

    def locate(self, start: int, count: int) -> tuple[np.ndarray, np.ndarray]:
        """(source ids, chunk ids) of global samples start .. start+count-1."""
        idx = np.arange(start, start + count, dtype=np.int64)
        sources = np.empty(count, dtype=np.int64)
        chunks = np.empty(count, dtype=np.int64)
        for block in np.unique(idx // self.block_size):
            sel = (idx // self.block_size) == block
            pos = idx[sel] % self.block_size
            src, rank = self._block(int(block))
            s = src[pos]
            draw = block * self.counts[s] + rank[pos]  # j: how many earlier samples came from that source
            sources[sel] = s
            chunks[sel] = [self._chunk(int(a), int(b)) for a, b in zip(s, draw)]
        return sources, chunks

    def _chunk(self, source: int, draw: int) -> int:
        n = self.num_chunks[source]
        return int(self._perm(source, draw // n)[draw % n])

    def draws_by_source(self, num_samples: int) -> np.ndarray:
        """How many of the first `num_samples` global samples came from each source."""
        full, rest = divmod(int(num_samples), self.block_size)
        drawn = self.counts * full
        if rest:
            drawn = drawn + np.bincount(self._block(full)[0][:rest], minlength=len(self.counts))
        return drawn
