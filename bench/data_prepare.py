"""Tokenisation throughput of `ember data prepare` against the standard Hugging Face recipe.

Both tokenise the built-in corpus (the stdlib source) with the same 8k byte-level BPE, in
one invocation:
  - ember:    `ember data prepare stdlib --set tokenizer=<tok>` (a subprocess, start-up and
              manifest included), tokens/s = tokens written / wall time;
  - baseline: the run_clm-style recipe: `load_dataset("text", data_files=<the same files>,
              sample_by="document")`, `.map(tokenizer, batched, num_proc=cores)`,
              `.map(group_texts, batched, num_proc=cores)` into 1024-token blocks, with a
              fresh cache directory; tokens/s = tokens produced / wall time.
Also printed: ember's own encode-phase rate from its manifest, and a one-process floor
(the tokenizer's batch encode plus a uint16 write, nothing else): its tokens per CPU-second,
times the cores, is the tokenizer's limit, which ember is measured against. Besides wall time,
each method's CPU seconds (its process and all its children) are measured: on a machine shared
with other work, tokens per CPU-second is the comparison that load does not distort. The CPU
model and its bf16/AMX support are printed beside every ratio.

    .venv/bin/python bench/data_prepare.py [--work-dir DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
BLOCK = 1024


def cpu_seconds() -> float:
    """User + system CPU of this process and of every child it has waited for."""
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


class Timer:
    def __enter__(self):
        self.wall, self.cpu = time.perf_counter(), cpu_seconds()
        return self

    def __exit__(self, *exc):
        self.wall, self.cpu = time.perf_counter() - self.wall, cpu_seconds() - self.cpu


def read_corpus() -> list[str]:
    from ember.data.sources import SourceStats, resolve_source

    return list(resolve_source("builtin:python-stdlib").documents(SourceStats()))


def run_ember(tok_dir: Path, out: Path) -> tuple[Timer, int, float]:
    """(timer, tokens, encode-phase tokens/s) of one `ember data prepare` subprocess."""
    cmd = [sys.executable, "-m", "ember", "data", "prepare", "stdlib", "--set", f"tokenizer={tok_dir}", "--set", f"output_dir={out}",
           "--set", "filters.min_chars=0", "--set", "val_fraction=0", "--quiet"]
    with Timer() as t:
        subprocess.run(cmd, cwd=REPO, check=True)
    manifest = json.loads((out / "manifest.json").read_text())
    return t, manifest["accounting"]["tokens"], manifest["timing"]["tokens_per_s"]


def run_hf_recipe(tok_dir: Path, num_proc: int, cache_dir: Path) -> tuple[Timer, int]:
    """(timer, tokens) of the load_dataset + map + group_texts recipe, reading the corpus included."""
    import datasets
    from transformers import AutoTokenizer

    from ember.data.sources import stdlib_files

    datasets.disable_progress_bars()
    tokenizer = AutoTokenizer.from_pretrained(tok_dir)
    files = [str(p) for p in stdlib_files()]

    def group_texts(batch):
        flat = [t for seq in batch["input_ids"] for t in seq]
        n = len(flat) // BLOCK * BLOCK
        return {"input_ids": [flat[i : i + BLOCK] for i in range(0, n, BLOCK)]}

    with Timer() as t:
        ds = datasets.load_dataset("text", data_files=files, sample_by="document", encoding_errors="replace", split="train",
                                   cache_dir=str(cache_dir))
        ids = ds.map(lambda b: tokenizer(b["text"]), batched=True, num_proc=num_proc, remove_columns=["text"])
        blocks = ids.map(group_texts, batched=True, num_proc=num_proc, remove_columns=ids.column_names)
    num_tokens = sum(len(x) for x in ids["input_ids"])
    assert len(blocks) > 0
    return t, num_tokens


def run_encode_floor(tok_dir: Path, out: Path) -> tuple[Timer, int]:
    """One process: batch encode (tokenizers' own threads) and a flat uint16 write, nothing else."""
    import numpy as np
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tok_dir / "tokenizer.json"))
    docs = read_corpus()
    n = 0
    with Timer() as t, open(out, "wb") as f:
        for i in range(0, len(docs), 256):
            arrays = [np.array(e.ids, dtype=np.uint16) for e in tok.encode_batch_fast(docs[i : i + 256], add_special_tokens=False)]
            data = np.concatenate(arrays)
            f.write(data.tobytes())
            n += len(data)
    return t, n


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--work-dir", help="scratch directory (default: a temporary one)")
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ["TOKENIZERS_PARALLELISM"] = "true"
    num_proc = len(os.sched_getaffinity(0))
    with tempfile.TemporaryDirectory(dir=args.work_dir) as tmp:
        work = Path(tmp)
        tok_dir = work / "tok"
        subprocess.run([sys.executable, "-m", "ember", "data", "tokenizer", "train", "stdlib", "--out", str(tok_dir)],
                       cwd=REPO, check=True, capture_output=True)
        e, e_tokens, e_encode_rate = run_ember(tok_dir, work / "ember")
        h, h_tokens = run_hf_recipe(tok_dir, num_proc, work / "hf-cache")
        f, f_tokens = run_encode_floor(tok_dir, work / "floor.bin")
    from ember.pretrain.cpu_matmul import describe_cpu

    cpu = describe_cpu()
    print(f"corpus: Python stdlib source, {e_tokens:,} tokens (8k byte-level BPE); CPU: {cpu}, {num_proc} cores, "
          f"load average {os.getloadavg()[0]:.1f} at the end")
    print(f"{'method':56s} {'wall s':>7s} {'M tok/s':>8s} {'CPU s':>7s} {'M tok/CPU-s':>12s}")
    rows = [
        (f"HF recipe: load_dataset + map + group_texts (num_proc={num_proc})", h, h_tokens),
        ("one process: encode_batch_fast + uint16 write", f, f_tokens),
        ("ember data prepare (end to end, CLI start-up included)", e, e_tokens),
    ]
    for name, t, n in rows:
        print(f"{name:56s} {t.wall:7.2f} {n / t.wall / 1e6:8.3f} {t.cpu:7.2f} {n / t.cpu / 1e6:12.3f}")
    print(f"{'ember data prepare (encode phase, from its manifest)':56s} {'':7s} {e_encode_rate / 1e6:8.3f}")
    # The tokenizer's limit: the one-process batch encoder's tokens per CPU-second, times the cores.
    floor_per_cpu_s = f_tokens / f.cpu
    print(f"ratio ember / HF recipe, tokens/s end to end: {(e_tokens / e.wall) / (h_tokens / h.wall):.2f}x; "
          f"tokens per CPU-second: {(e_tokens / e.cpu) / (h_tokens / h.cpu):.2f}x  [{cpu}]")
    print(f"ember tokens per CPU-second / the one-process batch encoder's: {(e_tokens / e.cpu) / floor_per_cpu_s:.2f}x "
          f"(goal >= 1)  [{cpu}]")
    print(f"ember tokens/s end to end / {num_proc} x the batch encoder's tokens per CPU-second: "
          f"{(e_tokens / e.wall) / (num_proc * floor_per_cpu_s):.2f} (goal >= 0.85; only meaningful on an idle machine)  [{cpu}]")


if __name__ == "__main__":
    main()
