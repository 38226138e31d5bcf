"""`prepare`: shards decode back to the documents, splits by hash, filters, uint32 ids, atomic output."""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from data_testkit import decode_split, make_docs, read_split_documents, write_jsonl  # noqa: E402

from ember.data.config import DatasetEntry, PrepareConfig
from ember.data.manifest import read_manifest
from ember.data.prepare import ensure_prepared, hash_fraction, prepare
from ember.errors import UserError


def expected_split(text: str, val_fraction: float) -> str:
    import hashlib

    return "val" if hash_fraction(hashlib.blake2b(text.encode(), digest_size=16).digest()) < val_fraction else "train"


def test_decoded_shards_give_back_every_document_followed_by_eos(prepare_docs):
    docs = make_docs(300)
    out = prepare_docs(docs, val_fraction=0.2, shard_tokens=2048, batch_chars=3000)
    m = read_manifest(out)
    assert len(m.shards("train")) > 3, "small shards: documents spread over several"
    for split in ("train", "val"):
        want = [d for d in docs if expected_split(d, 0.2) == split]
        assert decode_split(out, split) == want  # every text, in source order, each followed by one EOS
    assert 0 < m.num_documents("val") < m.num_documents("train")
    acct = m.raw["accounting"]
    assert acct["documents_read"] == acct["documents_kept"] == 300 and acct["dropped"] == {}
    assert m.dtype == np.dtype("<u2") and m.vocab_size == 320 and m.eos_id == 0 and m.pad_id == 1
    assert m.num_tokens("train") + m.num_tokens("val") == acct["tokens"]


def test_split_is_decided_by_document_hash_alone(prepare_docs):
    docs = make_docs(200, seed=3)
    shuffled = docs[:]
    random.Random(1).shuffle(shuffled)
    a = prepare_docs(docs, name="a", val_fraction=0.25)
    b = prepare_docs(shuffled, name="b", val_fraction=0.25)
    again = prepare_docs(docs, name="again", val_fraction=0.25)
    for split in ("train", "val"):
        assert sorted(decode_split(a, split)) == sorted(decode_split(b, split))
    assert read_manifest(a).fingerprint == read_manifest(again).fingerprint


def test_shards_do_not_depend_on_the_number_of_processes(prepare_docs):
    docs = make_docs(300, seed=5)
    one = prepare_docs(docs, name="one", num_proc=1, batch_chars=2000)
    two = prepare_docs(docs, name="two", num_proc=2, batch_chars=2000)
    assert read_manifest(one).fingerprint == read_manifest(two).fingerprint


def test_filters_drop_and_count(prepare_docs):
    docs = ["short", "x" * 50, "y" * 5000, "x" * 50, "z" * 100, ""]
    out = prepare_docs(docs, val_fraction=0.0, filters={"min_chars": 10, "max_chars": 1000, "dedup": True})
    acct = read_manifest(out).raw["accounting"]
    assert acct["documents_read"] == 6 and acct["documents_kept"] == 2
    assert acct["dropped"] == {"too_short": 2, "too_long": 1, "duplicate": 1}
    assert decode_split(out, "train") == ["x" * 50, "z" * 100]


def test_undecodable_bytes_are_counted_not_fatal(tmp_path, tiny_tokenizer):
    src = tmp_path / "mixed.jsonl"
    good = make_docs(20)
    lines = [json.dumps({"text": d}).encode() for d in good] + [b'{"text": "caf\xe9 latin-1"}', b'{"text": "lone \\ud800 surrogate"}']
    src.write_bytes(b"\n".join(lines) + b"\n")
    cfg = PrepareConfig(source=str(src), output_dir=tmp_path / "out", tokenizer=str(tiny_tokenizer), num_proc=1, val_fraction=0)
    m = read_manifest(prepare(cfg, show_progress=False))
    assert m.raw["accounting"]["dropped"] == {"undecodable": 2}
    assert decode_split(m.dir, "train") == good


def test_vocabulary_over_65536_is_stored_as_uint32(tmp_path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    from ember.data.tokenizer import save_hf_tokenizer

    # A word-level vocabulary of 70,002 entries: ids above 65,535 occur in ordinary text.
    vocab = {"<|endoftext|>": 0, "<|pad|>": 1, "<unk>": 2, **{f"w{i}": i + 3 for i in range(69_999)}}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with single spaces
    big = save_hf_tokenizer(tok, tmp_path / "big", eos_token="<|endoftext|>", pad_token="<|pad|>")
    docs = [" ".join(f"w{(i * 7919 + k * 104_729) % 69_999}" for k in range(1 + i % 9)) for i in range(60)] + ["w69998 w65533 w3"]
    src = write_jsonl(tmp_path / "big.jsonl", docs)
    out = prepare(PrepareConfig(source=str(src), output_dir=tmp_path / "out", tokenizer=str(big), num_proc=1, val_fraction=0),
                  show_progress=False)
    m = read_manifest(out)
    assert m.vocab_size == 70_002 and m.dtype == np.dtype("<u4")
    assert (out / m.shards("train")[0].name).stat().st_size == 4 * m.num_tokens("train")
    ids = [i for d in read_split_documents(out, "train") for i in d]
    assert max(ids) == 70_001  # w69998
    assert decode_split(out, "train") == docs


def test_existing_output_is_refused_unless_overwrite(prepare_docs, tmp_path, tiny_tokenizer):
    out = prepare_docs(make_docs(30), name="ds")
    first = read_manifest(out).fingerprint
    with pytest.raises(UserError, match="already exists; pass --overwrite"):
        prepare_docs(make_docs(30), name="ds")
    src = write_jsonl(tmp_path / "other.jsonl", make_docs(40, seed=7))
    cfg = PrepareConfig(source=str(src), output_dir=out, tokenizer=str(tiny_tokenizer), num_proc=1)
    prepare(cfg, overwrite=True, show_progress=False)
    assert read_manifest(out).fingerprint != first
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # no temporaries left


def test_overwrite_refuses_a_directory_that_is_not_a_dataset(tmp_path, tiny_tokenizer):
    (tmp_path / "precious").mkdir()
    (tmp_path / "precious" / "notes.txt").write_text("keep me")
    src = write_jsonl(tmp_path / "d.jsonl", make_docs(10))
    cfg = PrepareConfig(source=str(src), output_dir=tmp_path / "precious", tokenizer=str(tiny_tokenizer), num_proc=1)
    with pytest.raises(UserError, match="not an ember dataset"):
        prepare(cfg, overwrite=True, show_progress=False)
    assert (tmp_path / "precious" / "notes.txt").read_text() == "keep me"


def test_ensure_prepared_builds_once_then_reuses(tmp_path, tiny_tokenizer, monkeypatch):
    src = write_jsonl(tmp_path / "d.jsonl", make_docs(60))
    preset = tmp_path / "mine.yaml"
    preset.write_text(f"source: {src}\noutput_dir: {tmp_path / 'default_out'}\ntokenizer: {tiny_tokenizer}\nnum_proc: 1\n")
    out = ensure_prepared(DatasetEntry(prepare=str(preset), path=tmp_path / "chosen"))
    assert out == tmp_path / "chosen" and read_manifest(out).num_documents("train") > 0
    stamp = (out / "manifest.json").stat().st_mtime_ns
    assert ensure_prepared(DatasetEntry(prepare=str(preset), path=tmp_path / "chosen")) == out
    assert (out / "manifest.json").stat().st_mtime_ns == stamp
    assert ensure_prepared(DatasetEntry(path=out)) == out
    assert ensure_prepared(DatasetEntry(prepare=str(preset))) == tmp_path / "default_out"
    with pytest.raises(UserError, match="no prepared dataset here"):
        ensure_prepared(DatasetEntry(path=tmp_path / "nothing"))


def test_stdlib_preset_uses_the_builtin_corpus():
    from ember.config import load_config
    from ember.data.sources import resolve_source

    cfg = load_config("stdlib", PrepareConfig, kind="data")
    assert cfg.source == "builtin:python-stdlib" and str(cfg.output_dir) == "runs/data/stdlib"
    assert cfg.tokenizer is None and cfg.tokenizer_train.vocab_size == 8192
    assert cfg.tokenizer_train.special_tokens == ["<|endoftext|>", "<|pad|>"]
    files = resolve_source(cfg.source).files
    assert len(files) > 500 and files == sorted(files)
    assert all(f.suffix == ".py" and "site-packages" not in f.parts for f in files)


def test_small_dataset_fixture(small_dataset):
    from ember.data.tokenizer import load_tokenizer

    m = read_manifest(small_dataset)
    assert m.vocab_size == 512 and len(m.shards("train")) > 1 and m.num_tokens("val") > 0
    tok = load_tokenizer(m.tokenizer_dir)
    assert tok.eos_token_id == m.eos_id and len(tok) == 512
    first = decode_split(small_dataset, "train")[0]
    assert first.startswith(('"""', "#", "from", "import"))


def test_a_bare_tokenizer_json_is_installed_as_an_hf_directory(tmp_path, tiny_tokenizer):
    from transformers import AutoTokenizer

    docs = make_docs(40, seed=12)
    src = write_jsonl(tmp_path / "d.jsonl", docs)
    cfg = PrepareConfig(source=str(src), output_dir=tmp_path / "out", tokenizer=str(tiny_tokenizer / "tokenizer.json"),
                        num_proc=1, val_fraction=0)
    m = read_manifest(prepare(cfg, show_progress=False))
    tok = AutoTokenizer.from_pretrained(m.tokenizer_dir)
    assert tok.eos_token == "<|endoftext|>" and m.eos_id == tok.convert_tokens_to_ids("<|endoftext|>")
    assert decode_split(m.dir, "train") == docs


def test_unknown_tokenizer_is_one_clear_error(tmp_path):
    src = write_jsonl(tmp_path / "d.jsonl", make_docs(5))
    for spec, match in ((str(tmp_path / "no-such-tok"), "tokenizer not found"), ("nobody/no-such-tokenizer-ember", "cannot load tokenizer")):
        cfg = PrepareConfig(source=str(src), output_dir=tmp_path / "out", tokenizer=spec, num_proc=1)
        with pytest.raises(UserError, match=match):
            prepare(cfg, show_progress=False)
        assert not (tmp_path / "out").exists()


def test_verify_names_missing_and_corrupt_files(prepare_docs):
    from ember.data.manifest import verify_dataset

    out = prepare_docs(make_docs(200, seed=21), shard_tokens=2048)
    assert verify_dataset(out)[1] == []
    (out / "train-00002.bin").unlink()
    index = out / "train-00000.idx"
    index.write_bytes(index.read_bytes()[:-1] + b"\x01")
    _, problems = verify_dataset(out)
    assert problems == ["train-00000.idx: checksum mismatch (corrupt)", "train-00002.bin: missing"]
    with pytest.raises(UserError, match="missing shard file train-00002.bin"):
        read_manifest(out)
    (out / "manifest.json").write_text("{not json")
    assert verify_dataset(out)[1][0].startswith("manifest.json: unreadable")


def test_a_broken_tokenizer_directory_is_one_clear_error(tmp_path):
    (tmp_path / "tok").mkdir()
    (tmp_path / "tok" / "tokenizer.json").write_text('{"version": "1.0", "model": {"type": "nonsense"}}')
    src = write_jsonl(tmp_path / "d.jsonl", make_docs(5))
    cfg = PrepareConfig(source=str(src), output_dir=tmp_path / "out", tokenizer=str(tmp_path / "tok"), num_proc=1)
    with pytest.raises(UserError) as e:
        prepare(cfg, show_progress=False)
    assert e.value.what.startswith("cannot load tokenizer") and e.value.where == str(tmp_path / "tok" / "tokenizer.json")
    assert not (tmp_path / "out").exists()


def test_an_empty_output_directory_is_filled_without_overwrite(prepare_docs, tmp_path):
    (tmp_path / "ds").mkdir()
    out = prepare_docs(make_docs(20), name="ds")
    assert read_manifest(out).num_documents("train") + read_manifest(out).num_documents("val") == 20


def test_tokenizer_training_sample(tmp_path):
    from ember.data.prepare import tokenizer_training_texts
    from ember.data.sources import resolve_source

    docs = make_docs(400, seed=30)
    src = write_jsonl(tmp_path / "d.jsonl", docs)

    def sample(**fields):
        cfg = PrepareConfig(source=str(src), output_dir=tmp_path / "unused", **fields)
        return list(tokenizer_training_texts(cfg, resolve_source(str(src))))

    every_train_doc = sample(val_fraction=0.2)
    assert every_train_doc == [d for d in docs if expected_split(d, 0.2) == "train"]  # never a val document
    quarter = sample(val_fraction=0.2, tokenizer_train={"sample_fraction": 0.25})
    assert set(quarter) < set(every_train_doc) and 0.15 < len(quarter) / len(every_train_doc) < 0.35
    assert quarter == sample(val_fraction=0.2, tokenizer_train={"sample_fraction": 0.25})
    capped = sample(val_fraction=0.2, tokenizer_train={"max_train_bytes": 2000})
    assert capped == every_train_doc[: len(capped)] and sum(map(len, capped[:-1])) < 2000 <= sum(map(len, capped))
