"""`ember estimate CONFIG --gpus N`: parameters, training FLOPs and memory per rank of a run config, as tables."""

from __future__ import annotations

import argparse

from rich.console import Console
from rich.table import Table

from ember.errors import UserError

GIB = 1024**3


def _human(n: float, unit: str = "") -> str:
    for scale, suffix in ((1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {suffix}{unit}".rstrip()
    return f"{n:.0f} {unit}".rstrip()


def _model_table(cfg, num_gpus: int) -> Table:
    from ember.pretrain import accounting

    model, train = cfg.model, cfg.train
    counts = accounting.count_params(model)
    per_token = accounting.flops_per_token(model, train.seq_len)
    attention = per_token - 6.0 * accounting.matmul_params_per_token(model)
    batch = train.global_batch_sequences(num_gpus)
    table = Table("model", "value", title=f"{model.arch}: {model.num_layers} layers x {model.hidden_size} wide", title_justify="left")
    table.add_row("parameters", f"{_human(counts['total'])}  ({counts['total']:,})")
    table.add_row("non-embedding", f"{_human(counts['non_embedding'])}  ({counts['non_embedding']:,})")
    table.add_row("embedding" + (" (tied)" if model.tie_embeddings else " + head"), f"{_human(counts['embedding'])}  ({counts['embedding']:,})")
    table.add_row("matmul params per token", _human(accounting.matmul_params_per_token(model)))
    table.add_row(f"train FLOPs / token (seq {train.seq_len})", f"{_human(per_token, 'FLOP')}  (attention {attention / per_token:.1%})")
    table.add_row(f"train FLOPs / step ({batch} x {train.seq_len} tokens)", _human(per_token * batch * train.seq_len, "FLOP"))
    return table


def _memory_table(cfg, num_gpus: int) -> Table:
    from ember.pretrain import accounting

    train = cfg.train
    precision = accounting.resolve_precision(train.precision, on_gpu=True)
    configured = accounting.backend_name(train)
    rows = {b: accounting.memory_per_rank(cfg, num_gpus, on_gpu=True, backend=b) for b in accounting.BACKENDS}
    unit, scale = ("GiB", GIB) if max(m["total"] for m in rows.values()) >= GIB else ("MiB", 1024**2)
    title = (f"memory per rank, {unit}: {num_gpus} GPU(s), {precision}, micro batch {train.micro_batch_size} x {train.seq_len}"
             f"{', cpu offload' if train.cpu_offload else ''}  (* = configured backend; AC = activation checkpointing)")
    table = Table("backend", "weights", "grads", "optimizer", "gathered", "activations", "act. AC", "total", "total AC",
                  title=title, title_justify="left")
    if train.cpu_offload:
        table.add_column("host")
    for backend, mem in rows.items():
        state = mem["weights"] + mem["grads"] + mem["optimizer"] + mem["gathered"]
        cells = [mem["weights"], mem["grads"], mem["optimizer"], mem["gathered"], mem["activations_full"],
                 mem["activations_checkpointed"], state + mem["activations_full"], state + mem["activations_checkpointed"]]
        if train.cpu_offload:
            cells.append(mem["offloaded"])
        name = f"* {backend}" if backend == configured else f"  {backend}"
        table.add_row(name, *(f"{c / scale:.2f}" for c in cells), style="bold" if backend == configured else None)
    return table


def _speed_line(cfg, num_gpus: int, gpu: str, mfu: float) -> str:
    from ember.pretrain import accounting, peak

    precision = accounting.resolve_precision(cfg.train.precision, on_gpu=True)
    flops = peak.gpu_peak_flops(gpu, precision)
    if flops is None:
        raise UserError(f"no {precision} peak FLOP/s known for GPU {gpu!r}", "--gpu-type")
    per_token = accounting.flops_per_token(cfg.model, cfg.train.seq_len)
    tokens_per_s = mfu * flops * num_gpus / per_token
    step_tokens = cfg.train.global_batch_sequences(num_gpus) * cfg.train.seq_len
    return (f"at {mfu:.0%} MFU on {num_gpus} x {gpu} ({_human(flops, 'FLOP/s')} {precision} each): "
            f"{_human(tokens_per_s)} tokens/s ({_human(tokens_per_s / num_gpus)} per GPU), "
            f"{step_tokens / tokens_per_s:.2f} s per step")


def run(args: argparse.Namespace) -> int:
    from ember.config import load_config
    from ember.run_config import RunConfig

    if args.gpus < 1:
        raise UserError(f"--gpus must be at least 1, got {args.gpus}", "--gpus")
    if not 0 < args.mfu <= 1:
        raise UserError(f"--mfu must be in (0, 1], got {args.mfu}", "--mfu")
    cfg = load_config(args.config, RunConfig, args.overrides, kind="pretrain")
    console = Console(width=max(Console().width, 120))
    console.print(_model_table(cfg, args.gpus))
    console.print(_memory_table(cfg, args.gpus))
    if args.gpu_type:
        console.print(_speed_line(cfg, args.gpus, args.gpu_type, args.mfu))
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    from ember.launch.options import add_set_option

    p = sub.add_parser(
        "estimate", help="parameters, FLOPs and memory per rank of a config",
        description="Parameters, training FLOPs per token (6N + PaLM attention term) and memory per rank for every "
                    "backend (weights, grads, AdamW states, activations with and without checkpointing).",
    )
    p.add_argument("config", help="run config YAML, or a preset name from configs/pretrain/")
    p.add_argument("--gpus", type=int, default=1, help="number of GPUs (world size), default 1")
    p.add_argument("--gpu-type", default=None, help="GPU name (e.g. H100, A100) to print tokens/s and step time at --mfu")
    p.add_argument("--mfu", type=float, default=0.4, help="assumed model FLOPs utilisation for --gpu-type (default 0.4)")
    add_set_option(p)
    p.set_defaults(func=run)
