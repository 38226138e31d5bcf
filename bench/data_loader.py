"""Random-order reading of seq-2048 samples: ember's memory-mapped shards against a `datasets` Arrow table.

Both serve the same samples (2049-token windows at multiples of 2048 of the stdlib corpus'
token stream) in the same shuffled order, one process, batches of 8:
  - ember:    `build_loader(...)`, iterating `Batch.tokens` (int64 torch tensors);
  - baselines: the same windows as rows of an Arrow table saved with `save_to_disk` and
              re-opened (memory-mapped) by `load_from_disk`, read three ways:
              per sample as a torch DataLoader over the dataset does (`ds[i]`, default
              python format, then `torch.tensor` of the batch: the usual training path),
              per sample with the torch format (`ds.with_format("torch")[i]`, then stack),
              and per batch with the numpy format (`ds[list_of_indices]`, its fastest path).
The headline ratio is against the usual training path; the others are printed too.

    .venv/bin/python bench/data_loader.py [--dataset DIR] [--batches 200]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
SEQ, BATCH = 2048, 8


REPEATS = 3  # each method's rate is the best of this many timed passes (the machine may be shared)


def ember_rate(dataset: Path, num_batches: int) -> tuple[float, np.ndarray]:
    from ember.data.loader import build_loader

    best = float("inf")
    for _ in range(REPEATS):
        loader = build_loader([dataset], [1.0], split="train", seq_len=SEQ, global_batch_size=BATCH, rank=0, world_size=1, seed=0)
        it = iter(loader)
        first = next(it)  # opens the memmaps
        t0 = time.perf_counter()
        for _ in range(num_batches):
            batch = next(it)
        best = min(best, time.perf_counter() - t0)
    chunks = loader.schedule.locate(BATCH, num_batches * BATCH)[1]
    assert batch.tokens.shape == (BATCH, SEQ + 1) and first is not None
    return num_batches * BATCH * (SEQ + 1) / best, chunks


def arrow_table(dataset: Path, out: Path):
    """The same 2049-token windows as an Arrow table on disk, opened memory-mapped."""
    import datasets

    from ember.data.manifest import read_manifest

    m = read_manifest(dataset)
    stream = np.concatenate([np.fromfile(dataset / s.name, dtype=m.dtype) for s in m.shards("train")]).astype(np.int32)
    num_chunks = (len(stream) - 1) // SEQ
    windows = np.lib.stride_tricks.sliding_window_view(stream, SEQ + 1)[::SEQ][:num_chunks]
    datasets.disable_progress_bars()
    datasets.Dataset.from_dict({"input_ids": windows.tolist()}).save_to_disk(str(out))
    return datasets.load_from_disk(str(out))


def per_sample_python(table, rows):
    import torch

    return torch.tensor([table[int(i)]["input_ids"] for i in rows], dtype=torch.int64)


def per_sample_torch(table, rows):
    import torch

    return torch.stack([table[int(i)]["input_ids"] for i in rows]).to(torch.int64)


def per_batch_numpy(table, rows):
    import torch

    return torch.from_numpy(np.asarray(table[rows.tolist()]["input_ids"], dtype=np.int64))


def arrow_rate(table, read, chunks: np.ndarray, num_batches: int) -> float:
    read(table, chunks[:BATCH])  # warm up the format path
    best = float("inf")
    for _ in range(REPEATS):
        t0 = time.perf_counter()
        for b in range(num_batches):
            tokens = read(table, chunks[b * BATCH : (b + 1) * BATCH])
        best = min(best, time.perf_counter() - t0)
    assert tokens.shape == (BATCH, SEQ + 1)
    return num_batches * BATCH * (SEQ + 1) / best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dataset", help="a prepared dataset directory (default: prepare the stdlib corpus into a temporary one)")
    parser.add_argument("--batches", type=int, default=200, help="batches of 8 x 2049 tokens timed per method")
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    with tempfile.TemporaryDirectory() as tmp:
        dataset = Path(args.dataset) if args.dataset else Path(tmp) / "stdlib"
        if not args.dataset:
            subprocess.run([sys.executable, "-m", "ember", "data", "prepare", "stdlib", "--set", f"output_dir={dataset}", "--quiet"],
                           cwd=REPO, check=True)
        e_rate, chunks = ember_rate(dataset, args.batches)
        table = arrow_table(dataset, Path(tmp) / "arrow")
        rates = {
            "Arrow, per sample, python format (DataLoader-style)": arrow_rate(table, per_sample_python, chunks, args.batches),
            "Arrow, per sample, torch format": arrow_rate(table.with_format("torch"), per_sample_torch, chunks, args.batches),
            "Arrow, per batch of indices, numpy format": arrow_rate(table.with_format("numpy"), per_batch_numpy, chunks, args.batches),
        }
    print(f"random-order seq-{SEQ} samples, batches of {BATCH}, one process, {args.batches} batches per pass, best of {REPEATS} passes")
    print(f"{'method':56s} {'M tokens/s':>11s} {'ember x':>8s}")
    for name, rate in rates.items():
        print(f"{name:56s} {rate / 1e6:11.2f} {e_rate / rate:8.1f}")
    print(f"{'ember build_loader over memory-mapped shards':56s} {e_rate / 1e6:11.2f}")
    usual = next(iter(rates.values()))
    print(f"ratio ember / Arrow (usual per-sample path): {e_rate / usual:.1f}x; against Arrow's fastest (batched numpy): "
          f"{e_rate / max(rates.values()):.1f}x (goals: >= 10x and >= 5M tokens/s)")


if __name__ == "__main__":
    main()
