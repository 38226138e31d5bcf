"""Parallel tokenisation: worker processes encode large batches of documents into numpy arrays.

Each worker owns one single-threaded `tokenizers.Tokenizer` and returns, per batch, the
flat token array (EOS after every document) and the document lengths, split into train
and val. The parent keeps a bounded number of batches in flight and receives results in
submission order, so the shards do not depend on the number of workers.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
from collections import deque
from collections.abc import Iterable, Iterator

import numpy as np

_state: dict = {}


def init_encoder(tokenizer_json: str, eos_id: int, dtype: str, in_worker: bool = False) -> None:
    from tokenizers import Tokenizer

    if in_worker:
        # Ctrl-C and termination are the parent's to handle: it stops the pool and removes its output.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)

    _state["tok"] = Tokenizer.from_file(tokenizer_json)
    _state["eos"] = eos_id
    _state["dtype"] = np.dtype(dtype)


def _pack(encodings, eos: int, dtype: np.dtype) -> tuple[np.ndarray, np.ndarray]:
    if not encodings:
        return np.zeros(0, dtype=dtype), np.zeros(0, dtype=np.int64)
    # One numpy conversion per document (not per token); EOS closes every document.
    arrays = [np.array(e.ids + [eos], dtype=dtype) for e in encodings]
    lengths = np.fromiter((len(a) for a in arrays), dtype=np.int64, count=len(arrays))
    return np.concatenate(arrays), lengths


def encode_batch(texts: list[str], is_val: list[bool]) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(train tokens, train doc lengths, val tokens, val doc lengths) of one batch of documents."""
    tok, eos, dtype = _state["tok"], _state["eos"], _state["dtype"]
    encodings = tok.encode_batch_fast(texts, add_special_tokens=False)
    train = [e for e, v in zip(encodings, is_val) if not v]
    val = [e for e, v in zip(encodings, is_val) if v]
    return (*_pack(train, eos, dtype), *_pack(val, eos, dtype))


def encode_in_order(batches: Iterable[tuple[list[str], list[bool]]], tokenizer_json: str, eos_id: int, dtype: str,
                    num_proc: int) -> Iterator[tuple]:
    """Encode batches with `num_proc` processes; yields (batch, result) in input order, at most 2*num_proc in flight."""
    if num_proc <= 1:
        init_encoder(tokenizer_json, eos_id, dtype)
        for batch in batches:
            yield batch, encode_batch(*batch)
        return
    # Workers are single-threaded tokenizers (one per core); setting this before the fork also
    # keeps tokenizers from warning in the children about a parent that already used threads.
    previous = os.environ.get("TOKENIZERS_PARALLELISM")
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    try:
        ctx = mp.get_context("fork")
        with ctx.Pool(num_proc, initializer=init_encoder, initargs=(tokenizer_json, eos_id, dtype, True)) as pool:
            pending: deque = deque()
            for batch in batches:
                pending.append((batch, pool.apply_async(encode_batch, batch)))
                if len(pending) >= 2 * num_proc:
                    done, result = pending.popleft()
                    yield done, result.get()
            while pending:
                done, result = pending.popleft()
                yield done, result.get()
    finally:
        if previous is None:
            os.environ.pop("TOKENIZERS_PARALLELISM", None)
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = previous
