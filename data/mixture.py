"""The global sample order: a pure function of (seed, global sample index, sources' sizes).

Global samples are cut into blocks of `block_size`. The first n blocks hold source s
exactly `cumulative_counts(n)[s]` times (w_s * n * block_size rounded by largest
remainder), so at every block boundary each source is within one sample of its weight;
inside a block the sources come in a seeded random order. The j-th sample
drawn from source s is chunk `perm_{seed,s,epoch}(j mod num_chunks)` with
epoch = j // num_chunks: each pass over a source visits every chunk once, in a new order.
The permutation is a keyed Feistel network over the chunk index (cycle-walked into
[0, num_chunks)), so it costs O(1) memory however large the corpus is.
Nothing depends on rank, world size or worker count.
"""

from __future__ import annotations

import math
from functools import lru_cache

import numpy as np

BASE_BLOCK = 1024
_MIX_TAG, _PERM_TAG = 0x6D6978, 0x7065726D  # keep the two random streams apart
_FEISTEL_ROUNDS = 4
_PERM_WINDOW = 4096  # chunk ids are computed and cached for this many consecutive draws at once
_MUL1, _MUL2 = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)


def _mix(x: np.ndarray, key: np.uint64) -> np.ndarray:
    """A 64-bit integer hash (splitmix64 finaliser) of x ^ key; wraps modulo 2**64 by design."""
    x = x ^ key
    x = (x ^ (x >> np.uint64(30))) * _MUL1
    x = (x ^ (x >> np.uint64(27))) * _MUL2
    return x ^ (x >> np.uint64(31))


def feistel_permute(index: np.ndarray, n: int, keys: np.ndarray) -> np.ndarray:
    """A bijection of [0, n) applied to `index`: a Feistel network on the bits covering n (halves of
    unequal width when the count is odd), cycle-walked for values that land at or above n."""
    if n == 1:
        return np.zeros(len(index), dtype=np.int64)
    num_bits = max(int(n - 1).bit_length(), 2)
    widths = (num_bits // 2, num_bits - num_bits // 2)  # (left, right); they swap every round

    def rounds(x: np.ndarray) -> np.ndarray:
        left_bits, right_bits = widths
        for key in keys:  # an even number of rounds restores the (left, right) layout
            left, right = x >> np.uint64(right_bits), x & np.uint64((1 << right_bits) - 1)
            left = left ^ (_mix(right, key) & np.uint64((1 << left_bits) - 1))
            x = (right << np.uint64(left_bits)) | left
            left_bits, right_bits = right_bits, left_bits
        return x

    out = rounds(np.asarray(index, dtype=np.uint64))
    outside = out >= n
    while outside.any():  # n covers over half of the 2**num_bits domain: few steps
        out[outside] = rounds(out[outside])
        outside = out >= n
    return out.astype(np.int64)


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
        self._perm_keys = lru_cache(maxsize=64)(self._make_perm_keys)
        self._perm_window = lru_cache(maxsize=64)(self._make_perm_window)

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

    def _make_perm_keys(self, source: int, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, _PERM_TAG, source, epoch]).integers(0, 2**63, _FEISTEL_ROUNDS, dtype=np.uint64)

    def _make_perm_window(self, source: int, epoch: int, window: int) -> np.ndarray:
        """Chunk ids of positions window*W .. (window+1)*W - 1 of one pass over a source."""
        n = self.num_chunks[source]
        positions = np.arange(window * _PERM_WINDOW, min((window + 1) * _PERM_WINDOW, n), dtype=np.int64)
        return feistel_permute(positions, n, self._perm_keys(source, epoch))

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
            sel = np.nonzero(sources == s)[0]
            n = self.num_chunks[s]
            epochs, positions = np.divmod(draws[sel], n)
            windows = positions // _PERM_WINDOW
            for e, w in set(zip(epochs.tolist(), windows.tolist())):
                at = (epochs == e) & (windows == w)
                chunks[sel[at]] = self._perm_window(int(s), e, w)[positions[at] - w * _PERM_WINDOW]
        return sources, chunks

    def draws_by_source(self, num_samples: int) -> np.ndarray:
        """How many of the first `num_samples` global samples came from each source."""
        full, rest = divmod(int(num_samples), self.block_size)
        drawn = self._before(full)
        if rest:
            drawn = drawn + np.bincount(self._block(full)[0][:rest], minlength=len(self.weights))
        return drawn
