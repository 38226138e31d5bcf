"""Document sources: the built-in stdlib corpus, local files and globs, `save_to_disk` directories, hub datasets.

A source yields documents as `str`, in a fixed order, and counts what it read into a
`SourceStats`. Bytes that are not valid UTF-8 drop that document and are counted, never
fatal; structural problems (a missing text field, malformed JSON, an unreadable file)
are user errors that name the file and, where it helps, the line.
"""

from __future__ import annotations

import glob
import gzip
import io
import json
import re
import sysconfig
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from ember.errors import UserError

BUILTIN_STDLIB = "builtin:python-stdlib"
TEXT_SUFFIXES = (".jsonl", ".json", ".parquet", ".txt", ".py", ".md")
COMPRESSIONS = (".gz", ".zst")
_HUB_NAME = re.compile(r"^[\w.-]+(/[\w.-]+)?$")


@dataclass
class SourceStats:
    """What a source read: every document it saw, and the ones it could not decode."""

    num_documents_read: int = 0
    num_bytes_read: int = 0
    dropped: dict[str, int] = field(default_factory=dict)

    def drop(self, reason: str) -> None:
        self.dropped[reason] = self.dropped.get(reason, 0) + 1


@dataclass
class Source:
    """A resolved source: a description, its files (if local) and the reader that walks them."""

    spec: str
    kind: str  # builtin | files | saved | hub
    files: list[Path]
    text_field: str = "text"
    hub_config: str | None = None
    hub_split: str = "train"
    streaming: bool = False

    @property
    def total_bytes(self) -> int | None:
        """Bytes on disk (for a progress bar); None when unknown (hub, save_to_disk)."""
        return sum(p.stat().st_size for p in self.files) if self.kind in ("builtin", "files") else None

    def documents(self, stats: SourceStats) -> Iterator[str]:
        if self.kind == "hub":
            yield from _read_hub(self, stats)
        elif self.kind == "saved":
            yield from _read_saved(self.files[0], self.text_field, self.hub_split, stats)
        else:
            for path in self.files:
                yield from read_file(path, self.text_field, stats)


def stdlib_files() -> list[Path]:
    """Every .py of the running interpreter's standard library outside site-packages, sorted by path."""
    root = Path(sysconfig.get_paths()["stdlib"])
    return sorted(p for p in root.rglob("*.py") if "site-packages" not in p.parts and "dist-packages" not in p.parts and p.is_file())


def resolve_source(spec: str, text_field: str = "text", hub_config: str | None = None, hub_split: str = "train", streaming: bool = False) -> Source:
    """Turn the `source` string of a config into a `Source`, checking that it exists."""
    common = dict(text_field=text_field, hub_config=hub_config, hub_split=hub_split, streaming=streaming)
    if spec == BUILTIN_STDLIB:
        return Source(spec, "builtin", stdlib_files(), **common)
    if spec.startswith("builtin:"):
        raise UserError(f"unknown built-in source '{spec}', the built-in corpus is '{BUILTIN_STDLIB}'", "source")
    if spec.startswith("hf:"):
        return Source(spec[3:], "hub", [], **common)
    if any(c in spec for c in "*?["):
        matches = sorted(Path(p) for p in glob.glob(spec, recursive=True))
        files = [p for p in matches if p.is_file() and _is_supported(p)]
        if not files:
            raise UserError("no supported files match the glob (.jsonl, .json, .parquet, .txt, optionally .gz/.zst)", spec)
        return Source(spec, "files", files, **common)
    path = Path(spec)
    if path.is_dir():
        if is_saved_dataset(path):
            return Source(spec, "saved", [path], **common)
        files = sorted(p for p in path.rglob("*") if p.is_file() and _is_supported(p))
        if not files:
            raise UserError("the directory holds no supported files (.jsonl, .json, .parquet, .txt, optionally .gz/.zst)", spec)
        return Source(spec, "files", files, **common)
    if path.is_file():
        if not _is_supported(path):
            raise UserError(f"unsupported file type '{''.join(path.suffixes)}' (use .jsonl, .json, .parquet, .txt, optionally .gz/.zst)", spec)
        return Source(spec, "files", [path], **common)
    if _HUB_NAME.match(spec) and not spec.endswith(TEXT_SUFFIXES + COMPRESSIONS):
        return Source(spec, "hub", [], **common)
    raise UserError("source not found: no such file, directory or glob match", spec)


def is_saved_dataset(path: Path) -> bool:
    """A directory written by `datasets`' save_to_disk (a Dataset or a DatasetDict)."""
    return path.is_dir() and ((path / "dataset_dict.json").is_file() or (path / "state.json").is_file())


def dataset_split(ds, split: str, where: str, field: str = "hub_split"):
    """`split` of a DatasetDict (a Dataset as it is); a UserError naming the splits and `field` when it has none."""
    import datasets

    if not isinstance(ds, datasets.DatasetDict):
        return ds
    if split not in ds:
        raise UserError(f"no split '{split}' (splits: {', '.join(ds)}); set {field}", where)
    return ds[split]


def _is_supported(path: Path) -> bool:
    name = path.name
    for c in COMPRESSIONS:
        name = name.removesuffix(c)
    return name.endswith(TEXT_SUFFIXES)


def _format_of(path: Path) -> str:
    name = path.name
    for c in COMPRESSIONS:
        name = name.removesuffix(c)
    return Path(name).suffix


def _open_binary(path: Path) -> io.BufferedIOBase:
    if path.name.endswith(".gz"):
        return gzip.open(path, "rb")
    if path.name.endswith(".zst"):
        import zstandard

        return zstandard.ZstdDecompressor().stream_reader(open(path, "rb"), closefd=True)
    return open(path, "rb")


def read_file(path: Path, text_field: str, stats: SourceStats) -> Iterator[str]:
    """Documents of one local file; read and decompression errors become UserErrors naming the file."""
    fmt = _format_of(path)
    try:
        if fmt == ".parquet":
            yield from _read_parquet(path, text_field, stats)
        elif fmt in (".jsonl", ".json"):
            yield from _read_json(path, text_field, stats)
        else:
            with _open_binary(path) as f:
                yield from _decode_documents([f.read()], stats)
    except UserError:
        raise
    except (OSError, EOFError) as e:
        raise UserError(f"cannot read file: {getattr(e, 'strerror', None) or e}", str(path)) from None
    except Exception as e:  # zstd / arrow errors have no common base class
        if type(e).__module__.split(".")[0] in ("zstandard", "pyarrow", "zlib"):
            raise UserError(f"cannot read file: {e}", str(path)) from None
        raise


def _decode_documents(raw_docs, stats: SourceStats) -> Iterator[str]:
    for raw in raw_docs:
        stats.num_documents_read += 1
        stats.num_bytes_read += len(raw)
        try:
            yield raw.decode("utf-8")
        except UnicodeDecodeError:
            stats.drop("undecodable")


def _text_of(record, text_field: str, where: str, stats: SourceStats) -> str | None:
    if not isinstance(record, dict):
        raise UserError(f"expected a JSON object per record, got {type(record).__name__}", where)
    if text_field not in record:
        fields = ", ".join(sorted(map(str, record))[:8]) or "none"
        raise UserError(f"record has no text field '{text_field}' (fields: {fields}); set text_field", where)
    text = record[text_field]
    if text is None:
        stats.drop("null_text")
        return None
    if not isinstance(text, str):
        raise UserError(f"text field '{text_field}' holds {type(text).__name__}, not a string", where)
    return text


def _read_json(path: Path, text_field: str, stats: SourceStats) -> Iterator[str]:
    with io.BufferedReader(_open_binary(path), buffer_size=1 << 20) as f:
        if f.peek(4096).lstrip()[:1] == b"[":  # one JSON array of records: read whole
            yield from _read_json_array(path, f.read(), text_field, stats)
            return
        for line_no, line in enumerate(f, 1):  # JSON lines: streamed, any file size
            if not line.strip():
                continue
            stats.num_documents_read += 1
            stats.num_bytes_read += len(line)
            try:
                record = json.loads(line)
            except UnicodeDecodeError:
                stats.drop("undecodable")
                continue
            except json.JSONDecodeError as e:
                raise UserError(f"malformed JSON line: {e.msg} at column {e.colno}", f"{path}:{line_no}") from None
            text = _text_of(record, text_field, f"{path}:{line_no}", stats)
            if text is not None:
                yield text


def _read_json_array(path: Path, data: bytes, text_field: str, stats: SourceStats) -> Iterator[str]:
    try:
        records = json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"malformed JSON: {e}", str(path)) from None
    for i, record in enumerate(records):
        stats.num_documents_read += 1
        text = _text_of(record, text_field, f"{path}: record {i}", stats)
        if text is not None:
            stats.num_bytes_read += len(text)
            yield text


def _read_arrow_column(table_batches, text_field: str, where: str, stats: SourceStats) -> Iterator[str]:
    for batch in table_batches:
        for text in batch.column(text_field).to_pylist():
            stats.num_documents_read += 1
            if text is None:
                stats.drop("null_text")
                continue
            if not isinstance(text, str):
                raise UserError(f"text field '{text_field}' holds {type(text).__name__}, not a string", where)
            stats.num_bytes_read += len(text)
            yield text


def _read_parquet(path: Path, text_field: str, stats: SourceStats) -> Iterator[str]:
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(path)
    names = pf.schema_arrow.names
    if text_field not in names:
        raise UserError(f"no text column '{text_field}' (columns: {', '.join(names[:8])}); set text_field", str(path))
    yield from _read_arrow_column(pf.iter_batches(batch_size=1024, columns=[text_field]), text_field, str(path), stats)


def _read_saved(path: Path, text_field: str, split: str, stats: SourceStats) -> Iterator[str]:
    import datasets

    try:
        ds = datasets.load_from_disk(str(path))
    except Exception as e:
        raise UserError(f"cannot load the save_to_disk dataset: {e}", str(path)) from None
    ds = dataset_split(ds, split, str(path))
    if text_field not in ds.column_names:
        raise UserError(f"no text column '{text_field}' (columns: {', '.join(ds.column_names[:8])}); set text_field", str(path))
    yield from _read_arrow_column(ds.data.table.select([text_field]).to_batches(max_chunksize=1024), text_field, str(path), stats)


def _read_hub(source: Source, stats: SourceStats) -> Iterator[str]:
    import datasets

    try:
        ds = datasets.load_dataset(source.spec, source.hub_config, split=source.hub_split, streaming=source.streaming)
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"cannot load hub dataset: {first}", source.spec) from None
    for i, record in enumerate(ds):
        stats.num_documents_read += 1
        text = _text_of(record, source.text_field, f"{source.spec}: record {i}", stats)
        if text is not None:
            stats.num_bytes_read += len(text)
            yield text
