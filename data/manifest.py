"""`manifest.json`: what a prepared dataset holds, and the checks that it is still intact.

`read_manifest` is cheap (no hashing of shards): it checks the format, that every shard
and index exists with its recorded size, and that the stored tokenizer still has the
recorded fingerprint. `verify_dataset` also recomputes every checksum.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ember.data.shards import ShardInfo, file_sha256
from ember.data.tokenizer import fingerprint as tokenizer_fingerprint
from ember.errors import UserError

FORMAT = "ember-token-shards"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
SPLITS = ("train", "val")


@dataclass
class Manifest:
    """A prepared dataset directory, as described by its manifest."""

    dir: Path
    raw: dict

    @property
    def name(self) -> str:
        return self.dir.name

    @property
    def vocab_size(self) -> int:
        return int(self.raw["tokenizer"]["vocab_size"])

    @property
    def eos_id(self) -> int:
        return int(self.raw["tokenizer"]["eos_id"])

    @property
    def pad_id(self) -> int | None:
        pad = self.raw["tokenizer"].get("pad_id")
        return None if pad is None else int(pad)

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(self.raw["dtype"]).newbyteorder("<")

    @property
    def tokenizer_dir(self) -> Path:
        return self.dir / self.raw["tokenizer"]["path"]

    @property
    def tokenizer_fingerprint(self) -> str:
        return self.raw["tokenizer"]["fingerprint"]

    @property
    def fingerprint(self) -> str:
        return self.raw["fingerprint"]

    def shards(self, split: str) -> list[ShardInfo]:
        if split not in SPLITS:
            raise UserError(f"unknown split '{split}', use one of {', '.join(SPLITS)}", str(self.dir))
        return [ShardInfo(**s) for s in self.raw["splits"][split]["shards"]]

    def num_tokens(self, split: str) -> int:
        return sum(s.num_tokens for s in self.shards(split))

    def num_documents(self, split: str) -> int:
        return sum(s.num_documents for s in self.shards(split))


def dataset_fingerprint(tokenizer_fp: str, dtype: str, splits: dict) -> str:
    """One hash naming the exact token content: tokenizer, dtype and every shard checksum in order."""
    h = hashlib.sha256(f"{FORMAT}/{FORMAT_VERSION}/{tokenizer_fp}/{dtype}".encode())
    for split in SPLITS:
        for shard in splits[split]["shards"]:
            h.update(f"/{split}/{shard['name']}/{shard['sha256']}/{shard['index_sha256']}".encode())
    return h.hexdigest()


def write_json_atomic(path: Path, data: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)


def read_manifest(dataset_dir: str | Path) -> Manifest:
    """The manifest of a prepared dataset, after cheap integrity checks (sizes, tokenizer fingerprint)."""
    d = Path(dataset_dir)
    path = d / MANIFEST
    if not d.is_dir():
        raise UserError("dataset directory not found", str(d))
    if not path.is_file():
        raise UserError("not a prepared dataset: no manifest.json", str(d))
    try:
        raw = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"unreadable manifest: {e}", str(path)) from None
    if not isinstance(raw, dict) or raw.get("format") != FORMAT:
        raise UserError(f"not an ember dataset manifest (format is not '{FORMAT}')", str(path))
    if raw.get("format_version") != FORMAT_VERSION:
        raise UserError(f"unsupported dataset format version {raw.get('format_version')} (this ember reads {FORMAT_VERSION})", str(path))
    m = Manifest(d, raw)
    _check_files(m)
    return m


def _check_files(m: Manifest) -> None:
    for split in SPLITS:
        for s in m.shards(split):
            for name, size in ((s.name, s.num_bytes), (s.index_name, s.index_num_bytes)):
                p = m.dir / name
                if not p.is_file():
                    raise UserError(f"missing shard file {name}", str(m.dir))
                actual = p.stat().st_size
                if actual != size:
                    what = "truncated" if actual < size else "too long"
                    raise UserError(f"shard file {name} is {what}: {actual} bytes, manifest says {size}", str(m.dir))
    if not (m.tokenizer_dir / "tokenizer.json").is_file():
        raise UserError("the dataset's tokenizer is missing (tokenizer/tokenizer.json)", str(m.dir))
    actual_fp = tokenizer_fingerprint(m.tokenizer_dir)
    if actual_fp != m.tokenizer_fingerprint:
        raise UserError(f"tokenizer fingerprint mismatch: tokenizer.json hashes to {actual_fp[:12]}, manifest says {m.tokenizer_fingerprint[:12]}",
                        str(m.tokenizer_dir / "tokenizer.json"))


def verify_dataset(dataset_dir: str | Path) -> tuple[Manifest | None, list[str]]:
    """Recompute every checksum; returns the manifest (None if unreadable) and one line per problem,
    each starting with the file it is about (`train-00000.bin: checksum mismatch (corrupt)`)."""
    d = Path(dataset_dir)
    try:
        raw = json.loads((d / MANIFEST).read_text())
        m = Manifest(d, raw)
        shards = {split: m.shards(split) for split in SPLITS}
    except (OSError, ValueError, KeyError, TypeError) as e:
        return None, [f"{MANIFEST}: unreadable ({e})"]
    problems = []
    for split in SPLITS:
        for s in shards[split]:
            for name, size, digest in ((s.name, s.num_bytes, s.sha256), (s.index_name, s.index_num_bytes, s.index_sha256)):
                p = d / name
                if not p.is_file():
                    problems.append(f"{name}: missing")
                elif p.stat().st_size != size:
                    problems.append(f"{name}: {p.stat().st_size} bytes, manifest says {size} (truncated or extended)")
                elif file_sha256(p) != digest:
                    problems.append(f"{name}: checksum mismatch (corrupt)")
    tok = m.tokenizer_dir / "tokenizer.json"
    if not tok.is_file():
        problems.append("tokenizer/tokenizer.json: missing")
    elif tokenizer_fingerprint(m.tokenizer_dir) != m.tokenizer_fingerprint:
        problems.append("tokenizer/tokenizer.json: fingerprint mismatch")
    if not problems and dataset_fingerprint(m.tokenizer_fingerprint, raw["dtype"], raw["splits"]) != m.fingerprint:
        problems.append("manifest.json: dataset fingerprint does not match its shard checksums")
    return m, problems
