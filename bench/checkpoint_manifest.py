"""What the checkpoint manifest costs: sha256 of every file at save, and the check at resume, against the write.

Baseline, in the same invocation: the checkpoint write itself (torch DCP, model + AdamW state, as
the single/ddp/fsdp backends write it). Measured: `write_manifest` (sizes + sha256 of every file,
run once per save on rank 0) and `manifest_problem` (the full check a resume runs on the newest
checkpoint). Prints both as ratios of the write, and the CPU model.

    .venv/bin/python bench/checkpoint_manifest.py [--model llama-20m] [--repeats 3]
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import torch


def build(model_name: str):
    from ember.config import find_preset, load_with_extends, validate
    from ember.pretrain.config import ModelConfig
    from ember.pretrain.model import build_model, hf_config

    cfg = validate(load_with_extends(find_preset(model_name, "models"), "models", {}, ModelConfig), ModelConfig)
    model = build_model(hf_config(cfg))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    model(input_ids=torch.zeros(1, 8, dtype=torch.long)).logits.sum().backward()
    optimizer.step()  # AdamW's moments exist: the checkpoint holds 3x the weights
    return model, optimizer


def best(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> None:
    from ember.pretrain.backends.dcp_io import save_dcp
    from ember.pretrain.checkpoint import manifest_problem, write_manifest
    from ember.pretrain.cpu_matmul import cpu_model

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="llama-20m", help="model preset (configs/models/)")
    parser.add_argument("--repeats", type=int, default=3, help="best of this many timings of each")
    args = parser.parse_args()
    model, optimizer = build(args.model)
    root = Path(tempfile.mkdtemp(prefix="ember-bench-ckpt-"))
    try:
        def write() -> None:
            shutil.rmtree(root / "ckpt", ignore_errors=True)
            save_dcp(model, optimizer, root / "ckpt")

        write_s = best(write, args.repeats)
        size = sum(p.stat().st_size for p in (root / "ckpt").rglob("*") if p.is_file())
        manifest_s = best(lambda: write_manifest(root / "ckpt"), args.repeats)
        assert manifest_problem(root / "ckpt") is None
        check_s = best(lambda: manifest_problem(root / "ckpt"), args.repeats)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print(f"CPU: {cpu_model()}")
    print(f"checkpoint of {args.model}: {size / 1e6:.0f} MB (weights + AdamW state), best of {args.repeats}")
    print(f"  write (DCP, baseline)      {write_s:7.3f} s  ({size / write_s / 1e9:.2f} GB/s)")
    print(f"  manifest at save (sha256)  {manifest_s:7.3f} s  ratio to the write {manifest_s / write_s:.2f}")
    print(f"  check at resume            {check_s:7.3f} s  ratio to the write {check_s / write_s:.2f}")


if __name__ == "__main__":
    main()
