"""Training throughput on this CPU: ember against the Hugging Face Trainer, same model, data, batch, optimiser and
precision, in fp32 and in bf16 autocast, in one invocation.

    .venv/bin/python bench/train_throughput.py [--precisions fp32,bf16] [--steps 30] [--bf16-steps 10] [--threads 1] [--rounds 2]

Both train the tiny preset's shape (Llama, 4 layers, 256 wide, vocab of the data) from the same initial
weights (ember's init_weights) on the same token sequences (a small corpus prepared once with
`ember data prepare`; the Trainer reads the batches ember's loader yields), with the same batch, seq_len,
AdamW (fused, betas 0.9/0.95, decay 0.1), warmup + cosine schedule and gradient clipping.

- ember runs through its CLI, `ember pretrain configs/pretrain/tiny.yaml --set ...`, in a subprocess; its
  tokens/s are the `tokens_per_s` of the train records in `run_dir/metrics.jsonl` (logged every step).
- "ember, Trainer's kernels" is the same run with `train.cpu_matmul=torch train.fused_loss=false`: torch's
  default GEMM (MKL) and full logits, the kernels the Trainer runs. It separates what the loop does from what
  ember's kernel choices (oneDNN GEMMs, chunked LM head + cross-entropy) do. `--ablation` adds one row for
  each choice undone alone.
- the Trainer runs in a subprocess of this script; a callback times each optimiser step
  (on_step_begin -> on_step_end: forward, backward, clip, optimiser, like ember's step time).
- bf16: ember with `train.precision=bf16`, the Trainer with `bf16=True` (both: bf16 autocast, fp32 weights,
  fp32 loss). On a CPU without AMX bf16 autocast is many times slower than fp32, so bf16 runs `--bf16-steps`.
  The ember row of the precision that `train.precision: auto` picks on this machine is marked "(auto)".

Each engine runs `--rounds` times, alternating, in fresh processes with the same thread count. Per round, the
per-step tokens/s after `--warmup` steps give a 90th percentile (the least disturbed steps: on a shared machine
slow steps mostly measure the neighbours) and a median; the best round counts, and both are printed. MFU = tokens/s x
(6 x matmul params + attention FLOPs per token) over the matmul peak of the precision in use, measured here
(ember.pretrain.peak: the faster of torch's and oneDNN's GEMM) with the same thread count. Every ratio is
printed with the CPU model and its bf16/AMX support.

Wall-clock tokens/s on a machine shared with other work measure the neighbours too. So each round also runs
both engines stopped after the warm-up, and the CPU seconds per measured step (full run minus short run, from
the children's rusage) give tokens per CPU-second: time spent waiting for a core is not counted.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
TINY = REPO / "configs" / "pretrain" / "tiny.yaml"


def ember_overrides(args: argparse.Namespace, data_dir: Path, run_dir: Path, precision: str = "fp32") -> list[str]:
    """The --set overrides that make tiny.yaml the benchmark run (also used to build the Trainer's twin)."""
    return [
        f"run_dir={run_dir}", f"data.datasets=[{{path: {data_dir}}}]", "tracking.wandb=disabled",
        f"train.max_steps={args.steps}", f"train.warmup_steps={args.warmup}", f"train.seq_len={args.seq_len}",
        f"train.global_batch_size={args.batch}", f"train.micro_batch_size={args.batch}", f"train.precision={precision}",
        "train.log_every=1", "train.eval_every=0", "train.eval_batches=1", "train.export_hf=false",
        f"train.lr={args.lr}", f"seed={args.seed}",
    ]


def thread_env(threads: int) -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
            "TOKENIZERS_PARALLELISM": "false", "WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1"}


def prepare_data(args: argparse.Namespace, data_dir: Path) -> None:
    if (data_dir / "manifest.json").is_file():
        return
    cmd = [sys.executable, "-m", "ember", "data", "prepare", str(REPO / "configs" / "data" / "stdlib.yaml"), "--quiet",
           "--set", f"output_dir={data_dir}", "--set", f"max_documents={args.documents}", "--set", "num_proc=1"]
    print(f"preparing the benchmark corpus: {' '.join(cmd[1:])}", flush=True)
    subprocess.run(cmd, check=True, env=thread_env(args.threads), cwd=REPO)


def child_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


# ember variants: name -> extra --set overrides. The last two run with --ablation only.
EMBER_VARIANTS = {"ember": [], "ember_trainer_kernels": ["train.cpu_matmul=torch", "train.fused_loss=false"],
                  "ember_torch_gemm": ["train.cpu_matmul=torch"], "ember_full_logits": ["train.fused_loss=false"]}
LABELS = {"ember": "ember", "ember_trainer_kernels": "ember, Trainer's kernels", "ember_torch_gemm": "ember, torch GEMM",
          "ember_full_logits": "ember, full logits", "trainer": "HF Trainer"}


def run_ember(args: argparse.Namespace, data_dir: Path, run_dir: Path, precision: str, extra: list[str] = ()) -> dict:
    """One `ember pretrain` process; returns its per-step tokens/s (after warm-up) and losses."""
    shutil.rmtree(run_dir, ignore_errors=True)  # a run dir with checkpoints would resume instead of training
    sets = [x for o in [*ember_overrides(args, data_dir, run_dir, precision), *extra] for x in ("--set", o)]
    cmd = [sys.executable, "-m", "ember", "pretrain", str(TINY), *sets]
    started, cpu = time.perf_counter(), child_cpu_seconds()
    proc = subprocess.run(cmd, env=thread_env(args.threads), cwd=REPO, capture_output=True, text=True)
    if proc.returncode:
        sys.exit(f"ember pretrain failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    train = [r for r in records if r["kind"] == "train"]
    return {"tokens_per_s": [r["tokens_per_s"] for r in train if r["step"] > args.warmup],
            "losses": [r["loss"] for r in train], "wall_s": time.perf_counter() - started,
            "cpu_s": child_cpu_seconds() - cpu}


def run_trainer(args: argparse.Namespace, data_dir: Path, out_dir: Path, precision: str) -> dict:
    """One Hugging Face Trainer process (this script with --trainer-worker); returns what it measured."""
    result = out_dir / "trainer_result.json"
    result.unlink(missing_ok=True)
    cmd = [sys.executable, __file__, "--trainer-worker", str(result), "--data-dir", str(data_dir), "--work-dir", str(out_dir),
           f"--precisions={precision}", *(f"--{k.replace('_', '-')}={v}" for k, v in worker_args(args).items())]
    started, cpu = time.perf_counter(), child_cpu_seconds()
    proc = subprocess.run(cmd, env=thread_env(args.threads), cwd=REPO, capture_output=True, text=True)
    if proc.returncode:
        sys.exit(f"Trainer run failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return {**json.loads(result.read_text()), "wall_s": time.perf_counter() - started, "cpu_s": child_cpu_seconds() - cpu}


def worker_args(args: argparse.Namespace) -> dict:
    return {k: getattr(args, k) for k in ("steps", "warmup", "batch", "seq_len", "lr", "seed", "threads")}


def trainer_worker(args: argparse.Namespace) -> None:
    """Train with transformers.Trainer on the batches ember's loader yields, timing each optimiser step."""
    import torch
    from transformers import Trainer, TrainerCallback, TrainingArguments, default_data_collator

    try:
        import accelerate  # noqa: F401  (the Trainer needs it; ember itself does not)
    except ImportError:
        sys.exit("the Hugging Face Trainer baseline needs accelerate: pip install 'accelerate>=1.1' "
                 "(or put a folder holding it on PYTHONPATH)")

    from ember.config import load_config
    from ember.data.loader import build_loader
    from ember.pretrain.model import build_meta_model, init_weights
    from ember.run_config import RunConfig

    work = Path(args.work_dir)
    cfg = load_config(TINY, RunConfig, ember_overrides(args, Path(args.data_dir), work / "unused"))
    model = build_meta_model(cfg.model)
    model.to_empty(device="cpu")
    init_weights(model, cfg.model, cfg.seed)  # the same initial weights as the ember run

    loader = build_loader([Path(args.data_dir)], [1.0], split="train", seq_len=args.seq_len, global_batch_size=args.batch,
                          rank=0, world_size=1, seed=cfg.seed)
    samples = []
    for batch, _ in zip(loader, range(args.steps)):
        # tokens: (batch, seq_len + 1); HF shifts labels itself, so both are the seq_len inputs.
        samples += [{"input_ids": row[:-1].clone(), "labels": row[:-1].clone()} for row in batch.tokens]

    class InOrder(Trainer):
        def _get_train_sampler(self, *unused, **unused_kw):
            return torch.utils.data.SequentialSampler(self.train_dataset)  # ember's order, not a reshuffle

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.times, self.losses, self._start = [], [], 0.0

        def on_step_begin(self, *unused, **unused_kw):
            self._start = time.perf_counter()

        def on_step_end(self, *unused, **unused_kw):
            self.times.append(time.perf_counter() - self._start)

        def on_log(self, _args, _state, _control, logs=None, **unused):
            if logs and "loss" in logs:
                self.losses.append(logs["loss"])

    t = cfg.train
    targs = TrainingArguments(
        output_dir=str(work / "trainer"), max_steps=args.steps, per_device_train_batch_size=args.batch,
        learning_rate=t.lr, weight_decay=t.weight_decay, adam_beta1=t.betas[0], adam_beta2=t.betas[1],
        adam_epsilon=t.eps, max_grad_norm=t.grad_clip, warmup_steps=t.warmup_steps, lr_scheduler_type="cosine",
        optim="adamw_torch_fused", use_cpu=True, bf16=args.precisions == "bf16", fp16=False, seed=cfg.seed, data_seed=cfg.seed,
        logging_steps=1, save_strategy="no", eval_strategy="no", report_to=[], disable_tqdm=True,
        dataloader_num_workers=0, dataloader_pin_memory=False,
    )
    timer = StepTimer()
    InOrder(model=model, args=targs, train_dataset=samples, data_collator=default_data_collator, callbacks=[timer]).train()
    tokens = args.batch * args.seq_len
    Path(args.trainer_worker).write_text(json.dumps({
        "tokens_per_s": [tokens / s for s in timer.times[args.warmup:]], "losses": timer.losses,
        "threads": torch.get_num_threads()}))


def percentile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, round(q * (len(xs) - 1)))]


def summarise(rounds: list[dict], threads: int) -> dict:
    """Per round: the median and the 90th percentile of per-step tokens/s; the best round counts.

    On a machine shared with other work, slow steps measure the neighbours: the 90th percentile is the speed
    of the least disturbed steps, and is the figure compared (the median is printed beside it).
    """
    p90 = [percentile(r["tokens_per_s"], 0.9) for r in rounds]
    medians = [statistics.median(r["tokens_per_s"]) for r in rounds]
    best = max(range(len(rounds)), key=lambda i: p90[i])
    return {"tokens_per_s": p90[best], "median_tokens_per_s": medians[best], "rounds_p90": p90, "rounds_median": medians,
            "first_loss": rounds[best]["losses"][0], "last_loss": rounds[best]["losses"][-1], "wall_s": rounds[best]["wall_s"],
            # CPU time over wall time of the whole process: well below threads x 100% means other work took the cores.
            "cpu_share": rounds[best]["cpu_s"] / (rounds[best]["wall_s"] * threads)}


def measured_peak(dtype, threads: int) -> float:
    """The matmul peak of `dtype` here: the faster of torch's and oneDNN's GEMM (see ember.pretrain.peak)."""
    from ember.pretrain.peak import measured_cpu_peak_flops

    return measured_cpu_peak_flops(dtype, threads, budget_s=2.0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--precisions", default="fp32,bf16", help="comma-separated: fp32, bf16 (autocast); each compared at its own")
    parser.add_argument("--steps", type=int, default=30, help="optimiser steps per fp32 run")
    parser.add_argument("--bf16-steps", type=int, default=10, help="optimiser steps per bf16 run (slow without AMX)")
    parser.add_argument("--warmup", type=int, default=5, help="first steps left out of the measurement (also LR warm-up)")
    parser.add_argument("--batch", type=int, default=8, help="sequences per step (one micro-batch)")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--threads", type=int, default=1, help="torch threads of every run (and of the peak measurement)")
    parser.add_argument("--rounds", type=int, default=2, help="runs per engine, alternating; the best counts")
    parser.add_argument("--documents", type=int, default=400, help="stdlib files in the benchmark corpus")
    parser.add_argument("--work-dir", default=str(REPO / "runs" / "bench" / "throughput"))
    parser.add_argument("--data-dir", default=None, help="prepared dataset (default: WORK_DIR/data, prepared if missing)")
    parser.add_argument("--no-cpu-time", dest="cpu_time", action="store_false",
                        help="skip the short runs that measure CPU seconds per step (the contention-robust figure)")
    parser.add_argument("--ablation", action="store_true",
                        help="also run ember (fp32) with only one of its kernel choices undone (torch GEMM; full logits)")
    parser.add_argument("--trainer-worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.trainer_worker:
        return trainer_worker(args)

    import torch

    from ember.config import load_config
    from ember.pretrain import cpu_matmul
    from ember.pretrain.accounting import count_params, flops_per_token
    from ember.pretrain.kernels import auto_precision
    from ember.pretrain.peak import measured_cpu_peak_flops
    from ember.run_config import RunConfig

    work = Path(args.work_dir)
    data_dir = Path(args.data_dir) if args.data_dir else work / "data"
    work.mkdir(parents=True, exist_ok=True)
    prepare_data(args, data_dir)
    torch.set_num_threads(args.threads)
    precisions = args.precisions.split(",")
    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16}
    peaks = {p: measured_peak(dtypes[p], args.threads) for p in precisions}
    auto = auto_precision(torch.device("cpu"))[0]
    cpu = cpu_matmul.describe_cpu()

    # (precision, engine) pairs; the fp32 kernel rows separate ember's loop from its fp32 kernel choices.
    fp32_extra = ["ember_trainer_kernels", *(["ember_torch_gemm", "ember_full_logits"] if args.ablation else [])]
    jobs = [(p, e) for p in precisions for e in ["ember", *(fp32_extra if p == "fp32" else []), "trainer"]]
    rounds: dict[tuple, list[dict]] = {job: [] for job in jobs}
    cpu_per_step: dict[tuple, list[float]] = {job: [] for job in jobs}

    def job_args(precision: str, short: bool = False) -> argparse.Namespace:
        steps = args.steps if precision == "fp32" else args.bf16_steps
        warmup = min(args.warmup, steps // 3)
        return argparse.Namespace(**{**vars(args), "steps": warmup if short else steps, "warmup": warmup})

    def run(job: tuple, run_args: argparse.Namespace) -> dict:
        precision, name = job
        if name == "trainer":
            return run_trainer(run_args, data_dir, work, precision)
        return run_ember(run_args, data_dir, work / f"{name}-{precision}-run", precision, EMBER_VARIANTS[name])

    for i in range(args.rounds):
        for job in jobs:
            print(f"round {i + 1}/{args.rounds}: {LABELS[job[1]]} {job[0]} ...", flush=True)
            full = job_args(job[0])
            rounds[job].append(run(job, full))
            if args.cpu_time:
                # CPU seconds of a full run minus those of a run stopped after the warm-up: start-up, warm-up, the
                # final eval and save cancel, leaving the measured steps; waiting for a busy core costs no CPU time.
                cpu_per_step[job].append((rounds[job][-1]["cpu_s"] - run(job, job_args(job[0], short=True))["cpu_s"])
                                         / (full.steps - full.warmup))
    # The peaks again after the runs: a busy moment at the start would understate them.
    cpu_matmul.matmul_seconds.cache_clear()
    measured_cpu_peak_flops.cache_clear()
    peaks = {p: max(peaks[p], measured_peak(dtypes[p], args.threads)) for p in precisions}
    threads = torch.get_num_threads()
    gemm = {k: 2.0 * 1024**3 / cpu_matmul.matmul_seconds(k, num_threads=threads) / 1e9
            for k in (["torch", "onednn"] if cpu_matmul.onednn_available() else ["torch"])}

    cfg = load_config(TINY, RunConfig, ember_overrides(args, data_dir, work / "unused"))
    per_token = flops_per_token(cfg.model, args.seq_len)
    results = {job: summarise(rounds[job], args.threads) for job in jobs}
    print(f"\nCPU: {cpu}; `train.precision: auto` picks {auto} here; load average {os.getloadavg()[0]:.1f} at the end")
    print(f"model: {cfg.model.arch} {cfg.model.num_layers} layers x {cfg.model.hidden_size}, vocab {cfg.model.vocab_size}, "
          f"{count_params(cfg.model)['total']:,} params; batch {args.batch} x {args.seq_len} tokens, {args.steps} fp32 / "
          f"{args.bf16_steps} bf16 steps ({args.warmup} warm-up at most), {args.threads} thread(s), {args.rounds} round(s)")
    print(f"FLOPs per token {per_token / 1e6:.2f} M; measured matmul peaks: "
          + ", ".join(f"{p} {peaks[p] / 1e9:.1f} GFLOP/s" for p in precisions)
          + f" (fp32 1024^3 GEMM: {', '.join(f'{k} {v:.1f}' for k, v in gemm.items())} GFLOP/s)")
    print(f"{'engine':32s} {'tokens/s p90':>12s} {'MFU p90':>8s} {'median':>8s} {'MFU med':>8s} {'rounds p90 / median':>24s} {'CPU share':>9s}  loss first -> last")
    tokens = args.batch * args.seq_len
    for job in jobs:
        precision, name = job
        r = results[job]
        r["mfu"] = r["tokens_per_s"] * per_token / peaks[precision]
        r["median_mfu"] = r["median_tokens_per_s"] * per_token / peaks[precision]
        if args.cpu_time:
            r["tokens_per_cpu_s"] = tokens / min(cpu_per_step[job])
        label = f"{LABELS[name]} {precision}" + (" (auto)" if name == "ember" and precision == auto else "")
        rounds_text = " ".join(f"{a:.0f}/{b:.0f}" for a, b in zip(r["rounds_p90"], r["rounds_median"]))
        print(f"{label:32s} {r['tokens_per_s']:12.1f} {r['mfu']:8.1%} {r['median_tokens_per_s']:8.1f} {r['median_mfu']:8.1%} "
              f"{rounds_text:>24s} {r['cpu_share']:9.0%}  {r['first_loss']:.4f} -> {r['last_loss']:.4f}")
        if args.cpu_time:
            print(f"{'':32s} CPU s/step {min(cpu_per_step[job]):.3f} (rounds: {', '.join(f'{x:.3f}' for x in cpu_per_step[job])})"
                  f" -> {r['tokens_per_cpu_s']:.1f} tokens per CPU-second, MFU {r['tokens_per_cpu_s'] * per_token / peaks[precision]:.1%}")
    summary = {"cpu": cpu, "auto_precision": auto, "peak_flops": peaks, "gemm_gflops": gemm, "flops_per_token": per_token,
               "args": vars(args), "results": {f"{name}@{precision}": r for (precision, name), r in results.items()}}
    for precision in precisions:
        ember, trainer = results[(precision, "ember")], results[(precision, "trainer")]
        ratio = ember["tokens_per_s"] / trainer["tokens_per_s"]
        median_ratio = ember["median_tokens_per_s"] / trainer["median_tokens_per_s"]
        cpu_part = f", tokens per CPU-second {ember['tokens_per_cpu_s'] / trainer['tokens_per_cpu_s']:.2f}x" if args.cpu_time else ""
        if precision == "fp32":
            same = results[(precision, "ember_trainer_kernels")]["tokens_per_s"] / trainer["tokens_per_s"]
            print(f"{precision}: ember with the Trainer's kernels / HF Trainer: tokens/s (p90) {same:.2f}x  [{cpu}]")
        print(f"{precision}: ember{' (auto)' if precision == auto else ''} / HF Trainer: tokens/s (p90) {ratio:.2f}x, "
              f"median {median_ratio:.2f}x{cpu_part}; ember MFU {ember['mfu']:.1%} of the {precision} peak  [{cpu}]")
        summary[f"ratio_{precision}"] = ratio
    (work / "results.json").write_text(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
