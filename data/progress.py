"""Progress bar and summary table of `ember data prepare` (rich, on stderr / stdout)."""

from __future__ import annotations

import sys
import time

from rich.console import Console
from rich.progress import BarColumn, Progress, ProgressColumn, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text


def _si(x: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(x) >= scale:
            return f"{x / scale:.2f}{unit}"
    return f"{x:.0f}"


class _RatesColumn(ProgressColumn):
    """documents, documents/s and tokens/s since the start."""

    def render(self, task) -> Text:
        f = task.fields
        elapsed = max(time.perf_counter() - f["t0"], 1e-9)
        return Text(f"{f['docs']:,} docs  {_si(f['docs'] / elapsed)} docs/s  {_si(f['tokens'])} tok  {_si(f['tokens'] / elapsed)} tok/s")


class PrepareProgress:
    """A progress bar over the source's bytes (or open-ended when unknown) with docs/s and tokens/s."""

    def __init__(self, total_bytes: int | None, enabled: bool = True):
        self.enabled, self.total = enabled, total_bytes
        self.docs = self.tokens = 0
        self.t0 = time.perf_counter()
        if enabled:
            self.progress = Progress(TextColumn("tokenising"), BarColumn(), TextColumn("{task.percentage:>5.1f}%"), _RatesColumn(),
                                     TimeElapsedColumn(), console=Console(stderr=True), transient=False)
            self.task = self.progress.add_task("tokenise", total=total_bytes, docs=0, tokens=0, t0=self.t0)

    def __enter__(self):
        if self.enabled:
            self.progress.start()
        return self

    def __exit__(self, *exc):
        if self.enabled:
            self.progress.stop()

    def advance(self, num_docs: int, num_tokens: int, bytes_done: int) -> None:
        self.docs += num_docs
        self.tokens += num_tokens
        if self.enabled:
            done = min(bytes_done, self.total) if self.total else bytes_done
            self.progress.update(self.task, completed=done, docs=self.docs, tokens=self.tokens)


def print_prepare_summary(manifest, elapsed_s: float) -> None:
    """The final table: documents, drops by reason, tokens and shards per split, throughput."""
    raw = manifest.raw
    acct = raw["accounting"]
    table = Table(title=f"prepared {manifest.dir}", show_header=True, header_style="bold")
    table.add_column("what")
    table.add_column("value", justify="right")
    table.add_row("source", f"{raw['source']['spec']} ({raw['source']['kind']}, {raw['source']['num_files']} files)")
    table.add_row("documents read / kept", f"{acct['documents_read']:,} / {acct['documents_kept']:,}")
    for reason, n in acct["dropped"].items():
        table.add_row(f"  dropped: {reason}", f"{n:,}")
    table.add_row("bytes read", f"{acct['bytes_read']:,}")
    for split in ("train", "val"):
        s = raw["splits"][split]
        table.add_row(f"{split}: tokens / documents / shards", f"{s['num_tokens']:,} / {s['num_documents']:,} / {len(s['shards'])}")
    tok = raw["tokenizer"]
    table.add_row("tokenizer", f"vocab {tok['vocab_size']:,}, eos {tok['eos_id']}, {raw['dtype']}, {tok['fingerprint'][:12]}")
    table.add_row("tokenise throughput", f"{_si(raw['timing']['tokens_per_s'])} tokens/s")
    table.add_row("total time", f"{elapsed_s:.1f} s")
    Console(file=sys.stdout).print(table)
