"""The loader: bit-identical resume at any world size, mixture proportions, stream fidelity, validation."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from data_testkit import make_docs, read_split_documents  # noqa: E402

from ember.data.loader import build_loader
from ember.data.manifest import read_manifest
from ember.data.mixture import MixtureSchedule
from ember.errors import UserError

SEQ, GLOBAL_BATCH = 16, 8


@pytest.fixture
def two_sources(prepare_docs):
    """Two datasets sharing one tokenizer, of very different sizes (the small one repeats many times)."""
    big = prepare_docs(make_docs(200, seed=1), name="prose", shard_tokens=1024)  # many shards: windows cross shard ends
    small = prepare_docs(make_docs(15, seed=2, max_words=20), name="code")
    return [big, small], [0.7, 0.3]


def loader(dirs, weights, rank=0, world_size=1, **kw):
    args = dict(split="train", seq_len=SEQ, global_batch_size=GLOBAL_BATCH, seed=11)
    return build_loader(dirs, weights, rank=rank, world_size=world_size, **{**args, **kw})


def take(it, n):
    return [next(it) for _ in range(n)]


def global_batches(dirs, weights, world_size, num_steps, resume_at=None, resume_world_size=None):
    """Global batches (rows of all ranks stacked) of `num_steps` steps, optionally stopping and resuming."""
    per_rank = []
    for rank in range(world_size):
        ld = loader(dirs, weights, rank, world_size)
        per_rank.append(take(iter(ld), resume_at if resume_at is not None else num_steps))
        state = ld.state_dict()
    steps = [torch.cat([per_rank[r][s].tokens for r in range(world_size)]) for s in range(len(per_rank[0]))]
    if resume_at is not None:
        w2 = resume_world_size or world_size
        rest = []
        for rank in range(w2):
            ld = loader(dirs, weights, rank, w2)
            ld.load_state_dict(state)
            rest.append(take(iter(ld), num_steps - resume_at))
        steps += [torch.cat([rest[r][s].tokens for r in range(w2)]) for s in range(num_steps - resume_at)]
    return steps


@pytest.mark.parametrize("world_size,resume_world_size", [(1, 1), (2, 2), (4, 4), (2, 4), (4, 1)])
def test_resume_reproduces_the_uninterrupted_batches(two_sources, world_size, resume_world_size):
    dirs, weights = two_sources
    reference = global_batches(dirs, weights, 1, 60)
    resumed = global_batches(dirs, weights, world_size, 60, resume_at=23, resume_world_size=resume_world_size)
    assert len(resumed) == 60
    for step, (a, b) in enumerate(zip(reference, resumed)):
        assert torch.equal(a, b), f"step {step} differs"


def test_state_is_the_sample_count_and_json_serialisable(two_sources):
    import json

    ld = loader(*two_sources)
    take(iter(ld), 5)
    state = json.loads(json.dumps(ld.state_dict()))
    assert state["samples_consumed"] == 5 * GLOBAL_BATCH


def test_workers_give_the_same_batches(two_sources):
    dirs, weights = two_sources
    plain = take(iter(loader(dirs, weights, rank=1, world_size=2)), 12)
    workers = take(iter(loader(dirs, weights, rank=1, world_size=2, num_workers=2)), 12)
    for a, b in zip(plain, workers):
        assert torch.equal(a.tokens, b.tokens) and torch.equal(a.doc_starts, b.doc_starts) and a.source_tokens == b.source_tokens
    # Workers prefetch ahead, but the state counts only the batches handed out.
    ld = loader(dirs, weights, rank=1, world_size=2, num_workers=2)
    take(iter(ld), 5)
    assert ld.state_dict()["samples_consumed"] == 5 * GLOBAL_BATCH
    resumed = loader(dirs, weights, rank=1, world_size=2, num_workers=2)
    resumed.load_state_dict(ld.state_dict())
    assert all(torch.equal(a.tokens, b.tokens) for a, b in zip(plain[5:], take(iter(resumed), 7)))


def test_rows_are_stream_windows_with_document_starts(two_sources):
    dirs, weights = two_sources
    ld = loader(dirs, weights)
    streams = [np.array([t for d in read_split_documents(d, "train") for t in d]) for d in dirs]
    starts = [np.cumsum([0] + [len(d) for d in read_split_documents(d, "train")])[:-1] for d in dirs]
    eos = read_manifest(dirs[0]).eos_id
    for batch in take(iter(ld), 20):
        assert batch.tokens.shape == (GLOBAL_BATCH, SEQ + 1) and batch.tokens.dtype == torch.int64
        for row, src in zip(range(GLOBAL_BATCH), batch.sources.tolist()):
            toks = batch.tokens[row].numpy()
            hits = [c for c in range((len(streams[src]) - 1) // SEQ) if np.array_equal(streams[src][c * SEQ : c * SEQ + SEQ + 1], toks)]
            assert hits, "every row is a seq_len+1 window of its source's stream at a multiple of seq_len"
            c = hits[0]
            want = np.isin(np.arange(c * SEQ, c * SEQ + SEQ + 1), starts[src])
            assert np.array_equal(batch.doc_starts[row].numpy(), want)
            assert np.array_equal(want[1:], toks[:-1] == eos)  # a document starts right after each EOS


def test_mixture_proportions_within_one_percent_over_100k_samples():
    for weights in ([0.7, 0.3], [0.5, 0.3, 0.2], [5.0, 1.0, 0.01]):
        sizes = [1000, 37, 5][: len(weights)]
        sched = MixtureSchedule(weights, sizes, seed=3)
        sources, chunks = sched.locate(0, 100_000)
        share = np.bincount(sources, minlength=len(weights)) / 100_000
        want = np.array(weights) / sum(weights)
        assert np.all(np.abs(share - want) <= 0.01 * want + 1e-12), (weights, share)
        assert np.array_equal(sched.draws_by_source(100_000), np.bincount(sources, minlength=len(weights)))
        assert all(chunks[sources == s].max() < n for s, n in enumerate(sizes))


def test_order_is_a_pure_function_of_seed_and_index():
    a = MixtureSchedule([0.7, 0.3], [500, 40], seed=5)
    b = MixtureSchedule([0.7, 0.3], [500, 40], seed=5)
    whole = a.locate(0, 5000)
    pieces = [b.locate(s, n) for s, n in ((4000, 1000), (0, 1777), (1777, 2223))]
    order = [1, 2, 0]
    assert np.array_equal(whole[0], np.concatenate([pieces[i][0] for i in order]))
    assert np.array_equal(whole[1], np.concatenate([pieces[i][1] for i in order]))
    other = MixtureSchedule([0.7, 0.3], [500, 40], seed=6).locate(0, 5000)
    assert not np.array_equal(whole[1], other[1])


def test_every_pass_visits_every_chunk_once():
    sched = MixtureSchedule([1.0], [97], seed=0)
    _, chunks = sched.locate(0, 97 * 3)
    for epoch in range(3):
        assert sorted(chunks[epoch * 97 : (epoch + 1) * 97]) == list(range(97))
    assert not np.array_equal(chunks[:97], chunks[97:194])


def test_tokens_and_passes_by_source_are_reported(two_sources):
    dirs, weights = two_sources
    ld = loader(dirs, weights)
    totals = {"prose": 0, "code": 0}
    for batch in take(iter(ld), 100):
        assert sum(batch.source_tokens.values()) == GLOBAL_BATCH * SEQ
        for k, v in batch.source_tokens.items():
            totals[k] += v
    assert abs(totals["code"] / (100 * GLOBAL_BATCH * SEQ) - 0.3) < 0.02
    passes = ld.epochs_by_source()
    assert passes["code"] > 1.0, "the small source was repeated, and that is reported"
    assert ld.samples_by_source()["code"] * SEQ == totals["code"]


def test_val_split_order_is_deterministic(two_sources):
    dirs, weights = two_sources
    a = take(iter(loader(dirs, weights, split="val")), 3)
    b = take(iter(loader(dirs, weights, split="val")), 3)
    assert all(torch.equal(x.tokens, y.tokens) for x, y in zip(a, b))


def test_datasets_with_different_tokenizers_are_refused(two_sources, small_dataset):
    with pytest.raises(UserError, match="datasets use different tokenizers"):
        build_loader([two_sources[0][0], small_dataset], [1, 1], split="train", seq_len=SEQ, global_batch_size=4,
                     rank=0, world_size=1, seed=0)


def test_bad_loader_arguments(two_sources):
    dirs, weights = two_sources
    with pytest.raises(UserError, match="not divisible by the world size 3"):
        loader(dirs, weights, world_size=3)
    with pytest.raises(UserError, match="fewer than seq_len"):
        loader(dirs, weights, seq_len=10**7)
    with pytest.raises(UserError, match="2 weights for 1 datasets"):
        loader(dirs[:1], weights)


@pytest.mark.parametrize("n", [1, 2, 3, 1000, 4097, 65_536, 1_000_003])
def test_chunk_permutation_is_a_bijection(n):
    from ember.data.mixture import feistel_permute

    keys = np.array([1, 2, 3, 4], dtype=np.uint64)
    out = feistel_permute(np.arange(n), n, keys)
    assert np.array_equal(np.sort(out), np.arange(n))
    if n > 1000:  # well shuffled: neither a shift nor a near-identity
        assert abs(np.corrcoef(np.arange(n), out)[0, 1]) < 0.1
        assert np.mean(np.abs(np.diff(out)) == 1) < 0.01


@pytest.mark.parametrize("length", [17, 1000, 3000])
def test_windows_across_shard_ends_match_the_flat_stream(two_sources, length):
    from ember.data.loader import TokenStream

    d = two_sources[0][0]
    m = read_manifest(d)
    assert len(m.shards("train")) > 3
    docs = read_split_documents(d, "train")
    flat = np.array([t for doc in docs for t in doc])
    first_tokens = np.cumsum([0] + [len(doc) for doc in docs])[:-1]
    stream = TokenStream(m, "train")
    starts = np.arange(0, len(flat) - length, 97, dtype=np.int64)
    tokens = np.empty((len(starts), length), dtype=np.int64)
    doc_starts = np.zeros((len(starts), length), dtype=bool)
    stream.read_rows(starts, tokens, doc_starts)
    for i, a in enumerate(starts):
        assert np.array_equal(tokens[i], flat[a : a + length])
        assert np.array_equal(doc_starts[i], np.isin(np.arange(a, a + length), first_tokens))
