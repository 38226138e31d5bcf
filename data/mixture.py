"""The global sample order: a pure function of (seed, global sample index, sources' sizes).

Global samples are cut into blocks of `block_size`. The first n blocks hold source s
exactly `cumulative_counts(n)[s]` times (w_s * n * block_size rounded by largest
remainder), so at every block boundary each source is within one sample of its weight;
inside a block the sources come in a seeded random order. The j-th sample
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


def cumulative_counts(weights: np.ndarray, num_samples: int) -> np.ndarray:
    """Samples of each source among the first `num_samples`: weights * num_samples rounded by largest remainder."""
    exact = weights * num_samples
    counts = np.floor(exact).astype(np.int64)
    order = np.argsort(-(exact - counts), kind="stable")
    counts[order[: num_samples - int(counts.sum())]] += 1
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
        w = np.asarray(weights, dtype=np.float64)
        self.weights = w / w.sum()
        self.block_size = choose_block_size(weights)
        self._block = lru_cache(maxsize=8)(self._make_block)
        self._perm = lru_cache(maxsize=16)(self._make_perm)

    def _before(self, block: int) -> np.ndarray:
        """Samples of each source in blocks 0 .. block-1."""
        return cumulative_counts(self.weights, block * self.block_size)

    def _make_block(self, block: int) -> tuple[np.ndarray, np.ndarray]:
        """(source id, draw number j within that source) for every position of one block."""
        before = self._before(block)
        counts = self._before(block + 1) - before  # never negative: every weight * block_size >= 1
        pattern = np.repeat(np.arange(len(counts)), counts)
        sources = np.random.default_rng([self.seed, _MIX_TAG, block]).permutation(pattern)
        draw = np.empty(self.block_size, dtype=np.int64)
        for s, n in enumerate(counts):
            draw[sources == s] = before[s] + np.arange(n)
        return sources, draw

    def _make_perm(self, source: int, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, _PERM_TAG, source, epoch]).permutation(self.num_chunks[source])

    def locate(self, start: int, count: int) -> tuple[np.ndarray, np.ndarray]:
        """(source ids, chunk ids) of global samples start .. start+count-1."""
        idx = np.arange(start, start + count, dtype=np.int64)
        sources = np.empty(count, dtype=np.int64)
        draws = np.empty(count, dtype=np.int64)  # j: how many earlier samples came from the same source
        for block in np.unique(idx // self.block_size):
            sel = (idx // self.block_size) == block
            src, draw = self._block(int(block))
            pos = idx[sel] % self.block_size
            sources[sel], draws[sel] = src[pos], draw[pos]
        chunks = np.empty(count, dtype=np.int64)
        for s in np.unique(sources):
            n = self.num_chunks[s]
            sel = sources == s
            epochs = draws[sel] // n
            picked = np.empty(len(epochs), dtype=np.int64)
            for e in np.unique(epochs):
                at = epochs == e
                picked[at] = self._perm(int(s), int(e))[draws[sel][at] % n]
            chunks[sel] = picked
        return sources, chunks

    def draws_by_source(self, num_samples: int) -> np.ndarray:
        """How many of the first `num_samples` global samples came from each source."""
        full, rest = divmod(int(num_samples), self.block_size)
        drawn = self._before(full)
        if rest:
            drawn = drawn + np.bincount(self._block(full)[0][:rest], minlength=len(self.weights))
        return drawn
