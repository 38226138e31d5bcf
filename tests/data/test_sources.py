"""Every local source kind yields the same documents: jsonl / json (plain, .gz, .zst), parquet, txt, globs, save_to_disk."""

from __future__ import annotations

import gzip
import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from data_testkit import decode_split, make_docs, write_jsonl  # noqa: E402

from ember.data.config import PrepareConfig
from ember.data.prepare import prepare
from ember.data.sources import SourceStats, resolve_source
from ember.errors import UserError

DOCS = make_docs(30, seed=4)


def prepared_texts(source: str, out: Path, tokenizer: Path, **fields) -> list[str]:
    cfg = PrepareConfig(source=source, output_dir=out, tokenizer=str(tokenizer), num_proc=1, val_fraction=0, **fields)
    return decode_split(prepare(cfg, show_progress=False), "train")


def write_source(kind: str, root: Path) -> str:
    """Write DOCS in one source format under `root`; returns the `source` string."""
    lines = "".join(json.dumps({"text": d, "n": i}) + "\n" for i, d in enumerate(DOCS)).encode()
    if kind == "jsonl":
        return str(write_jsonl(root / "d.jsonl", DOCS))
    if kind == "jsonl.gz":
        (root / "d.jsonl.gz").write_bytes(gzip.compress(lines))
        return str(root / "d.jsonl.gz")
    if kind == "jsonl.zst":
        import zstandard

        (root / "d.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(lines))
        return str(root / "d.jsonl.zst")
    if kind == "json":
        (root / "d.json").write_text(json.dumps([{"text": d} for d in DOCS]))
        return str(root / "d.json")
    if kind == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.table({"text": DOCS, "n": list(range(len(DOCS)))}), root / "d.parquet", row_group_size=7)
        return str(root / "d.parquet")
    if kind == "txt-dir":
        (root / "txt").mkdir()
        for i, d in enumerate(DOCS):  # one file, one document; the directory is read in sorted order
            (root / "txt" / f"{i:03d}.txt").write_text(d)
        return str(root / "txt")
    if kind == "glob":
        write_jsonl(root / "part-0.jsonl", DOCS[:10])
        (root / "part-1.jsonl.gz").write_bytes(gzip.compress("".join(json.dumps({"text": d}) + "\n" for d in DOCS[10:]).encode()))
        (root / "notes.csv").write_text("ignored")
        return str(root / "part-*")
    if kind in ("saved", "saved-dict"):
        import datasets

        ds = datasets.Dataset.from_dict({"text": DOCS})
        (datasets.DatasetDict({"train": ds}) if kind == "saved-dict" else ds).save_to_disk(str(root / "saved"))
        return str(root / "saved")
    raise ValueError(kind)


@pytest.mark.parametrize("kind", ["jsonl", "jsonl.gz", "jsonl.zst", "json", "parquet", "txt-dir", "glob", "saved", "saved-dict"])
def test_every_source_kind_gives_the_documents_in_order(kind, tmp_path, tiny_tokenizer):
    source = write_source(kind, tmp_path)
    assert prepared_texts(source, tmp_path / "out", tiny_tokenizer) == DOCS


def test_text_field_is_configurable(tmp_path, tiny_tokenizer):
    src = write_jsonl(tmp_path / "c.jsonl", DOCS, field="content")
    assert prepared_texts(str(src), tmp_path / "out", tiny_tokenizer, text_field="content") == DOCS
    with pytest.raises(UserError, match="record has no text field 'text'"):
        prepared_texts(str(src), tmp_path / "out2", tiny_tokenizer)


def test_null_texts_are_counted(tmp_path):
    src = tmp_path / "n.jsonl"
    src.write_text('{"text": "a"}\n{"text": null}\n\n{"text": "b"}\n')
    stats = SourceStats()
    assert list(resolve_source(str(src)).documents(stats)) == ["a", "b"]
    assert stats.num_documents_read == 3 and stats.dropped == {"null_text": 1}


def test_max_documents_caps_reading(tmp_path, tiny_tokenizer):
    src = write_jsonl(tmp_path / "d.jsonl", DOCS)
    assert prepared_texts(str(src), tmp_path / "out", tiny_tokenizer, max_documents=7) == DOCS[:7]


def test_hub_names_resolve_to_the_hub_and_fail_cleanly_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert resolve_source("someone/corpus").kind == "hub"
    assert resolve_source("hf:wikitext", hub_config="wikitext-2-raw-v1").spec == "wikitext"
    with pytest.raises(UserError, match="cannot load hub dataset"):
        next(resolve_source("hf:nobody/no-such-corpus-ember", streaming=True).documents(SourceStats()))


def test_malformed_json_line_names_file_and_line(tmp_path):
    src = tmp_path / "bad.jsonl"
    src.write_text('{"text": "ok"}\n{"text": "broken\n')
    with pytest.raises(UserError) as e:
        list(resolve_source(str(src)).documents(SourceStats()))
    assert e.value.where == f"{src}:2" and e.value.what.startswith("malformed JSON line")


@pytest.mark.parametrize("streaming", [False, True], ids=["downloaded", "streaming"])
def test_hub_reader_with_a_local_dataset_folder(streaming, tmp_path, tiny_tokenizer):
    """The hub path (`datasets.load_dataset`), exercised offline on a folder of jsonl files."""
    (tmp_path / "corpus").mkdir()
    write_jsonl(tmp_path / "corpus" / "train.jsonl", DOCS)
    source = resolve_source(f"hf:{tmp_path / 'corpus'}", streaming=streaming)
    assert source.kind == "hub"
    stats = SourceStats()
    assert list(source.documents(stats)) == DOCS and stats.num_documents_read == len(DOCS)
    texts = prepared_texts(f"hf:{tmp_path / 'corpus'}", tmp_path / "out", tiny_tokenizer, streaming=streaming)
    assert texts == DOCS
