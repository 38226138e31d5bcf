"""Planning at scale on this CPU: `ember estimate --simulate` of the ladder presets, its wall time and resident memory,
against one real training step of the tiny preset measured in the same invocation.

    .venv/bin/python bench/simulate.py [--cases 1b@8,7b@8,70b@1024,70b@1024+ac] [--gpu-mem 80GiB]

Each case simulates rank 0 of N GPUs (fsdp, bf16 compute with fp32 masters and reduction, context 4096,
micro-batch 1, activation checkpointing with `+ac`) in its own child process: two training steps on fake tensors,
then the bisection for the largest micro-batch that fits --gpu-mem. The baseline is one real fsdp-free training
step (single process, fp32) of configs/pretrain/tiny.yaml's model at its own batch, in a child process too. Prints
one markdown row per case with the simulated per-rank bytes, the formulas' ratios to them, wall time, resident
memory (the child's maximum) and the ratio of wall time to the baseline step, with the CPU model.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
TINY = REPO / "configs" / "pretrain" / "tiny.yaml"
GIB = 1024**3
ROWS = ("weights", "grads", "optimizer", "gathered", "activations", "peak")

BASELINE = """
import time, torch
from ember.config import load_config
from ember.pretrain.backends import build_backend
from ember.pretrain.optim import build_optimizer
from ember.pretrain.step import lm_batch, train_step
from ember.run_config import RunConfig
cfg = load_config({tiny!r}, RunConfig, ["train.precision=fp32", "train.cpu_matmul=torch"], kind="pretrain")
backend = build_backend(cfg, lambda m: build_optimizer(m, cfg.train))
tokens = torch.randint(0, cfg.model.vocab_size, (cfg.train.global_batch_size, cfg.train.seq_len + 1))
times = []
for _ in range(3):
    start = time.perf_counter()
    train_step(backend, lm_batch(tokens), micro_batch_size=cfg.train.micro_batch_size, grad_clip=1.0)
    backend.step()
    times.append(time.perf_counter() - start)
print(min(times))
"""


def baseline_step_s() -> float:
    out = subprocess.run([sys.executable, "-c", BASELINE.format(tiny=str(TINY))], capture_output=True, text=True,
                         check=True, cwd=REPO)
    return float(out.stdout.strip().splitlines()[-1])


def case_config(case: str):
    from ember.config import load_config
    from ember.run_config import RunConfig

    size, _, rest = case.partition("@")
    gpus, _, technique = rest.partition("+")
    overrides = [f"model=llama-{size}", "train.backend=fsdp", "train.seq_len=4096", "train.micro_batch_size=1",
                 f"train.global_batch_size={gpus}", f"train.activation_checkpointing={'true' if technique == 'ac' else 'false'}"]
    return load_config(TINY, RunConfig, overrides, kind="pretrain"), int(gpus)


def main() -> None:
    from ember.launch.estimate_cmd import parse_bytes, simulation_report
    from ember.pretrain.cpu_matmul import describe_cpu

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", default="1b@8,7b@8,70b@1024,70b@1024+ac")
    parser.add_argument("--gpu-mem", default="80GiB")
    args = parser.parse_args()
    budget = parse_bytes(args.gpu_mem, "--gpu-mem")
    print(f"CPU: {describe_cpu()}")
    step_s = baseline_step_s()
    print(f"baseline: one real training step of the tiny preset (1 process, fp32): {step_s:.3f} s")
    print()
    print("| case | wall s | x tiny step | RSS GB | " + " | ".join(f"{r} GiB (formula/sim)" for r in ROWS)
          + f" | fits {args.gpu_mem} | largest micro-batch (probes) |")
    print("|" + "---|" * (6 + len(ROWS)))
    for case in args.cases.split(","):
        cfg, gpus = case_config(case)
        started = time.perf_counter()
        report = simulation_report(cfg, gpus, 0, "gpu", budget)
        wall = time.perf_counter() - started
        sim, formula = report["simulated"], report["formula"]
        cells = [f"{sim[r] / GIB:.2f} ({formula[r] / sim[r]:.2f})" if sim[r] else f"0 ({formula[r] / GIB:.2f})"
                 for r in ROWS]
        probes = ", ".join(str(m) for m, _ in report["probes"])
        print(f"| llama-{case} | {wall:.0f} | {wall / step_s:.0f} | {report['max_rss_bytes'] / 1e9:.2f} | "
              + " | ".join(cells) + f" | {'yes' if report['fits'] else 'no'} "
              f"({report['headroom_bytes'] / GIB:+.1f} GiB) | {report['largest_micro_batch']} ({probes}) |", flush=True)


if __name__ == "__main__":
    main()
