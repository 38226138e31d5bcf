"""`ember data ...` through the real CLI: prepare, verify, inspect, tokenizer train, and every bad input."""

from __future__ import annotations

import gzip
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from ember_cli import REPO, run_ember

sys.path.insert(0, str(Path(__file__).resolve().parent))
from data_testkit import make_docs, write_jsonl  # noqa: E402


def prepare_cli(source, out, *extra):
    return run_ember("data", "prepare", "stdlib", "--set", f"source={source}", "--set", f"output_dir={out}", *extra)


def assert_nothing_written(out: Path):
    assert not out.exists(), "no half-written dataset"
    assert [p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")] == [], "no temporaries left"


@pytest.fixture(scope="module")
def cli_dataset(tmp_path_factory):
    """A dataset prepared through the CLI, tokenizer trained on the way (vocab 300)."""
    root = tmp_path_factory.mktemp("cli")
    src = write_jsonl(root / "docs.jsonl", make_docs(150, seed=8))
    out = root / "ds"
    proc = prepare_cli(src, out, "--set", "tokenizer_train.vocab_size=300", "--set", "shard_tokens=4096")
    assert proc.returncode == 0, proc.stderr
    return out, proc


def copy_dataset(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


def test_prepare_shows_progress_and_a_summary(cli_dataset):
    out, proc = cli_dataset
    assert "tok/s" in proc.stderr and "docs/s" in proc.stderr
    assert "documents read / kept" in proc.stdout and "150 / 150" in proc.stdout
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["tokenizer"]["vocab_size"] == 300 and manifest["dtype"] == "uint16"
    assert len(manifest["splits"]["train"]["shards"]) > 1


def test_verify_passes_then_names_a_flipped_byte(cli_dataset, tmp_path):
    out = copy_dataset(cli_dataset[0], tmp_path / "ds")
    ok = run_ember("data", "verify", str(out))
    assert ok.returncode == 0 and ok.stdout.startswith("ok: "), ok.stderr
    shard = out / "train-00001.bin"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    bad = run_ember("data", "verify", str(out))
    assert bad.returncode == 2
    assert bad.stderr.strip() == (f"error: dataset verification failed: 1 problem(s), first: train-00001.bin: checksum mismatch (corrupt) "
                                  f"({out}/train-00001.bin)")
    assert "corrupt: train-00001.bin: checksum mismatch" in bad.stdout


def test_truncated_shard_is_one_clear_error(cli_dataset, tmp_path):
    out = copy_dataset(cli_dataset[0], tmp_path / "ds")
    shard = out / "train-00000.bin"
    size = shard.stat().st_size
    shard.write_bytes(shard.read_bytes()[: size - 10])
    proc = run_ember("data", "inspect", str(out))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip() == f"error: shard file train-00000.bin is truncated: {size - 10} bytes, manifest says {size} ({out})"
    verify = run_ember("data", "verify", str(out))
    assert verify.returncode == 2 and "train-00000.bin" in verify.stderr


def test_tokenizer_fingerprint_mismatch_is_one_clear_error(cli_dataset, tmp_path):
    out = copy_dataset(cli_dataset[0], tmp_path / "ds")
    tok = out / "tokenizer" / "tokenizer.json"
    tok.write_text(tok.read_text().replace('"<|pad|>"', '"<|PAD|>"'))
    import hashlib

    actual = hashlib.sha256(tok.read_bytes()).hexdigest()[:12]
    recorded = json.loads((out / "manifest.json").read_text())["tokenizer"]["fingerprint"][:12]
    proc = run_ember("data", "inspect", str(out))
    assert proc.returncode == 2
    assert proc.stderr.strip() == f"error: tokenizer fingerprint mismatch: tokenizer.json hashes to {actual}, manifest says {recorded} ({tok})"


def test_inspect_prints_summary_histogram_and_samples(cli_dataset):
    proc = run_ember("data", "inspect", str(cli_dataset[0]), "--samples", "2")
    assert proc.returncode == 0, proc.stderr
    assert "tokens per document" in proc.stdout and proc.stdout.count("train document") == 2
    assert "doc 8-" in proc.stdout  # decoded text of the generated documents


def bad_sources(root: Path) -> list[tuple[str, str, str]]:
    """(name, source, expected error line) for each bad input."""
    (root / "nofield.jsonl").write_text('{"body": "x", "id": 1}\n')
    (root / "empty.jsonl").write_text("")
    (root / "broken.jsonl.gz").write_bytes(b"this is not gzip")
    (root / "trunc.jsonl.gz").write_bytes(gzip.compress(b'{"text": "a"}\n' * 1000)[:-40])
    (root / "bad.jsonl").write_text('{"text": "fine"}\n{"text": oops}\n')
    return [
        ("missing text field", f"{root}/nofield.jsonl",
         f"error: record has no text field 'text' (fields: body, id); set text_field ({root}/nofield.jsonl:1)"),
        ("empty input", f"{root}/empty.jsonl", f"error: no documents to train the tokenizer on: read 0, dropped none ({root}/empty.jsonl)"),
        ("unreadable file", f"{root}/broken.jsonl.gz", f"error: cannot read file: Not a gzipped file (b'th') ({root}/broken.jsonl.gz)"),
        ("truncated archive", f"{root}/trunc.jsonl.gz",
         f"error: cannot read file: Compressed file ended before the end-of-stream marker was reached ({root}/trunc.jsonl.gz)"),
        ("malformed json", f"{root}/bad.jsonl", f"error: malformed JSON line: Expecting value at column 10 ({root}/bad.jsonl:2)"),
        ("no glob match", f"{root}/nothing-*.jsonl",
         f"error: no supported files match the glob (.jsonl, .json, .parquet, .txt, optionally .gz/.zst) ({root}/nothing-*.jsonl)"),
        ("missing path", f"{root}/absent.jsonl", f"error: source not found: no such file, directory or glob match ({root}/absent.jsonl)"),
    ]


@pytest.mark.parametrize("case", range(7), ids=["missing-field", "empty", "unreadable", "truncated-gz", "malformed", "no-glob", "missing"])
def test_bad_input_is_one_error_line_exit_2_and_nothing_written(case, tmp_path):
    name, source, expected = bad_sources(tmp_path)[case]
    out = tmp_path / "out"
    proc = prepare_cli(source, out, "--set", "tokenizer_train.vocab_size=300")
    assert proc.returncode == 2, (name, proc.stderr)
    assert proc.stderr.strip() == expected, name
    assert_nothing_written(out)


def test_undecodable_bytes_are_counted_drops(tmp_path):
    src = tmp_path / "mixed.jsonl"
    src.write_bytes(b"".join(json.dumps({"text": d}).encode() + b"\n" for d in make_docs(40)) + b'{"text": "\xff\xfe"}\n')
    proc = prepare_cli(src, tmp_path / "out", "--set", "tokenizer_train.vocab_size=300")
    assert proc.returncode == 0, proc.stderr
    assert "dropped: undecodable" in proc.stdout
    assert json.loads((tmp_path / "out" / "manifest.json").read_text())["accounting"]["dropped"] == {"undecodable": 1}


def test_existing_output_needs_overwrite(cli_dataset, tmp_path):
    out = copy_dataset(cli_dataset[0], tmp_path / "ds")
    src = write_jsonl(tmp_path / "d.jsonl", make_docs(30, seed=1))
    proc = prepare_cli(src, out, "--set", f"tokenizer={out}/tokenizer", "--quiet")
    assert proc.returncode == 2
    assert proc.stderr.strip() == f"error: output directory already exists; pass --overwrite to replace it ({out})"
    proc = prepare_cli(src, out, "--set", f"tokenizer={out}/tokenizer", "--quiet", "--overwrite")
    assert proc.returncode == 0, proc.stderr
    assert json.loads((out / "manifest.json").read_text())["accounting"]["documents_read"] == 30


def test_tokenizer_train_then_prepare_with_it(tmp_path):
    from transformers import AutoTokenizer

    from ember.data.tokenizer import fingerprint

    src = write_jsonl(tmp_path / "d.jsonl", make_docs(100, seed=2))
    tok_dir = tmp_path / "tok"
    proc = run_ember("data", "tokenizer", "train", "stdlib", "--set", f"source={src}", "--set", "tokenizer_train.vocab_size=300",
                     "--set", f"output_dir={tmp_path / 'unused'}", "--out", str(tok_dir))
    assert proc.returncode == 0, proc.stderr
    tok = AutoTokenizer.from_pretrained(tok_dir)
    assert len(tok) == 300 and tok.eos_token == "<|endoftext|>" and tok.pad_token == "<|pad|>"
    text = "naïve café 日本語 ✓"
    assert tok.decode(tok(text)["input_ids"]) == text
    proc = prepare_cli(src, tmp_path / "ds", "--set", f"tokenizer={tok_dir}", "--quiet")
    assert proc.returncode == 0, proc.stderr
    manifest = json.loads((tmp_path / "ds" / "manifest.json").read_text())
    assert manifest["tokenizer"]["fingerprint"] == fingerprint(tok_dir)


@pytest.mark.parametrize("sig,code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)], ids=["sigint", "sigterm"])
def test_interrupted_prepare_leaves_no_half_dataset(sig, code, tmp_path, tiny_tokenizer):
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "ember", "data", "prepare", "stdlib", "--set", f"output_dir={out}", "--set", f"tokenizer={tiny_tokenizer}",
           "--set", "shard_tokens=65536"]
    # A suite started in the background by a non-interactive shell inherits SIGINT ignored, and so would the
    # child: give it the default disposition, as a terminal's Ctrl-C would find it.
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        deadline = time.monotonic() + 120
        while not list(tmp_path.glob(".out.tmp-*/train-00001.bin")):  # shards are being written
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[1]
            time.sleep(0.05)
        proc.send_signal(sig)
        _, stderr = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == code, stderr
    assert "Traceback" not in stderr
    assert_nothing_written(out)
