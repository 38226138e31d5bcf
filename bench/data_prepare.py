"""Tokenisation throughput of `ember data prepare` against the standard Hugging Face recipe.

Both tokenise the built-in corpus (the stdlib source) with the same 8k byte-level BPE, in
one invocation:
  - ember:    `ember data prepare stdlib --set tokenizer=<tok>` (a subprocess, start-up and
              manifest included), tokens/s = tokens written / wall time;
  - baseline: read the same files, `datasets.Dataset.from_dict`, `.map(tokenizer, batched,
              num_proc=cores)`, `.map(group_texts)` into 1024-token blocks, caching off;
              tokens/s = tokens produced / wall time.
Also printed: ember's own encode-phase rate from its manifest, and a one-process floor
(the tokenizer's batch encode plus a uint16 write, nothing else).

    .venv/bin/python bench/data_prepare.py [--work-dir DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
BLOCK = 1024


def read_corpus() -> list[str]:
    from ember.data.sources import SourceStats, resolve_source

    return list(resolve_source("builtin:python-stdlib").documents(SourceStats()))


def run_ember(tok_dir: Path, out: Path) -> tuple[float, int, float]:
    """(wall s, tokens, encode-phase tokens/s) of one `ember data prepare` subprocess."""
    cmd = [sys.executable, "-m", "ember", "data", "prepare", "stdlib", "--set", f"tokenizer={tok_dir}", "--set", f"output_dir={out}",
           "--set", "filters.min_chars=0", "--set", "val_fraction=0", "--quiet"]
    t0 = time.perf_counter()
    subprocess.run(cmd, cwd=REPO, check=True)
    wall = time.perf_counter() - t0
    manifest = json.loads((out / "manifest.json").read_text())
    return wall, manifest["accounting"]["tokens"], manifest["timing"]["tokens_per_s"]


def run_hf_recipe(tok_dir: Path, num_proc: int) -> tuple[float, int]:
    """(wall s, tokens) of the datasets.map + group_texts recipe, reading the corpus included."""
    import datasets
    from transformers import AutoTokenizer

    datasets.disable_caching()
    datasets.disable_progress_bars()
    tokenizer = AutoTokenizer.from_pretrained(tok_dir)
    t0 = time.perf_counter()
    ds = datasets.Dataset.from_dict({"text": read_corpus()})
    ids = ds.map(lambda b: tokenizer(b["text"]), batched=True, num_proc=num_proc, remove_columns=["text"])

    def group_texts(batch):
        flat = [t for seq in batch["input_ids"] for t in seq]
        n = len(flat) // BLOCK * BLOCK
        return {"input_ids": [flat[i : i + BLOCK] for i in range(0, n, BLOCK)]}

    blocks = ids.map(group_texts, batched=True, num_proc=num_proc, remove_columns=ids.column_names)
    wall = time.perf_counter() - t0
    num_tokens = sum(len(x) for x in ids["input_ids"])
    assert len(blocks) > 0
    return wall, num_tokens


def run_encode_floor(tok_dir: Path, out: Path) -> tuple[float, int]:
    """One process: batch encode (tokenizers' own threads) and a flat uint16 write, nothing else."""
    import numpy as np
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tok_dir / "tokenizer.json"))
    docs = read_corpus()
    t0 = time.perf_counter()
    n = 0
    with open(out, "wb") as f:
        for i in range(0, len(docs), 256):
            arrays = [np.array(e.ids, dtype=np.uint16) for e in tok.encode_batch_fast(docs[i : i + 256], add_special_tokens=False)]
            data = np.concatenate(arrays)
            f.write(data.tobytes())
            n += len(data)
    return time.perf_counter() - t0, n


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
        e_wall, e_tokens, e_encode_rate = run_ember(tok_dir, work / "ember")
        h_wall, h_tokens = run_hf_recipe(tok_dir, num_proc)
        f_wall, f_tokens = run_encode_floor(tok_dir, work / "floor.bin")
    e_rate, h_rate, f_rate = e_tokens / e_wall, h_tokens / h_wall, f_tokens / f_wall
    print(f"corpus: Python stdlib source, {e_tokens:,} tokens (8k byte-level BPE); {num_proc} cores")
    print(f"{'method':58s} {'wall s':>7s} {'M tokens/s':>11s}")
    print(f"{'HF recipe: datasets.map + group_texts (num_proc=' + str(num_proc) + ')':58s} {h_wall:7.2f} {h_rate / 1e6:11.3f}")
    print(f"{'one process: encode_batch_fast + uint16 write':58s} {f_wall:7.2f} {f_rate / 1e6:11.3f}")
    print(f"{'ember data prepare (end to end, CLI start-up included)':58s} {e_wall:7.2f} {e_rate / 1e6:11.3f}")
    print(f"{'ember data prepare (encode phase, from its manifest)':58s} {'':7s} {e_encode_rate / 1e6:11.3f}")
    print(f"ratio ember / HF recipe (end to end): {e_rate / h_rate:.2f}x (goal >= 3x)")


if __name__ == "__main__":
    main()
