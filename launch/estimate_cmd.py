"""`ember estimate CONFIG --gpus N`: parameters, training FLOPs and memory per rank of a run config, as tables.

With `--simulate`, rank R of the N-rank job is also built and stepped on fake tensors (ember.pretrain.simulate),
and its measured per-rank memory is shown beside the formulas', with whether it fits `--gpu-mem` and the largest
micro-batch that does.
"""

from __future__ import annotations

import argparse

from rich.console import Console
from rich.table import Table

from ember.errors import UserError

GIB = 1024**3
_UNITS = {"": 1, "b": 1, "k": 1024, "kib": 1024, "kb": 1000, "m": 1024**2, "mib": 1024**2, "mb": 1000**2,
          "g": GIB, "gib": GIB, "gb": 1000**3, "t": 1024**4, "tib": 1024**4, "tb": 1000**4}


def parse_bytes(text: str, where: str) -> int:
    """'80GiB', '80GB' (decimal), '80G' (binary), '8.6e10' (bytes) -> bytes."""
    import re

    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([a-z]*)\s*", text.lower())
    if not match or match.group(2) not in _UNITS or float(match.group(1)) <= 0:
        raise UserError(f"not a memory size: {text!r} (e.g. 80GiB, 40GB, 24G)", where)
    return int(float(match.group(1)) * _UNITS[match.group(2)])


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
    gpu_mem = parse_bytes(args.gpu_mem, "--gpu-mem")
    cfg = load_config(args.config, RunConfig, args.overrides, kind="pretrain")
    console = Console(width=max(Console().width, 120))
    console.print(_model_table(cfg, args.gpus))
    console.print(_memory_table(cfg, args.gpus))
    if args.gpu_type:
        console.print(_speed_line(cfg, args.gpus, args.gpu_type, args.mfu))
    if args.simulate:
        report = simulation_report(cfg, args.gpus, args.rank, args.target, gpu_mem)
        print_simulation(console, report)
        if args.json:
            _write_json(args.json, report)
    return 0


# ---------------------------------------------------------------- --simulate

# Why the simulation and the formulas may differ, per row (shown where they differ by more than 10%).
_DIFFERENCE = {
    "weights": "simulation counts FSDP2's padded shards; formula divides exactly",
    "grads": "simulation counts FSDP2's padded shards; formula divides exactly",
    "optimizer": "simulation adds AdamW's step counters",
    "gathered": "formula: root + two blocks gathered + one block's unsharded grads; simulation: what was alive "
                "at the peak (one block when it falls in forward)",
    "activations": "formula: tensors saved for backward; simulation adds backward's temporaries (activation "
                   "gradients) alive at the peak",
    "peak": "sum of the rows above at their own maxima (formula) vs the largest total alive at once (simulation)",
}
_ROWS = (("weights", "weights"), ("grads", "grads"), ("optimizer", "optimizer"), ("gathered", "gathered"),
         ("activations", "activations"), ("peak", "total"))


def simulation_report(cfg, num_gpus: int, rank: int, target: str, gpu_mem: int) -> dict:
    """The simulated rank's bytes beside the formulas', with fit and the largest micro-batch (JSON-ready)."""
    from ember.pretrain import accounting
    from ember.pretrain.simulate import SIMULATED_BACKENDS, simulate
    from ember.pretrain.simulate.rank import check_at_scale

    backend = accounting.backend_name(cfg.train)
    if not 0 <= rank < num_gpus:
        raise UserError(f"--rank {rank} is not one of the {num_gpus} ranks", "--rank")
    check_at_scale(cfg, num_gpus)
    formula = accounting.memory_per_rank(cfg, num_gpus, on_gpu=target == "gpu")
    report = {"backend": backend, "gpus": num_gpus, "rank": rank, "target": target, "gpu_mem": gpu_mem,
              "precision": accounting.resolve_precision(cfg.train.precision, on_gpu=target == "gpu"),
              "micro_batch_size": cfg.train.micro_batch_size, "seq_len": cfg.train.seq_len,
              "activation_checkpointing": cfg.train.activation_checkpointing,
              "formula": {row: formula[key] for row, key in _ROWS}}
    if cfg.train.backend not in SIMULATED_BACKENDS:
        report["simulated"] = None
        report["not_simulated"] = (f"{backend} is not simulated (the simulation's memory tracker follows FSDP2 "
                                   "modules only); its figures above come from the formulas")
        return report
    result = simulate(cfg, num_gpus, rank, target, gpu_mem)
    simulated = result["bytes"]
    report.update(simulated={row: simulated[row] for row, _ in _ROWS},
                  ratio={row: simulated[row] / report["formula"][row] if report["formula"][row] else None
                         for row, _ in _ROWS},
                  fits=simulated["peak"] <= gpu_mem, headroom_bytes=gpu_mem - simulated["peak"],
                  largest_micro_batch=result["largest_micro_batch"], probes=result["probes"],
                  wall_s=result["wall_s"], max_rss_bytes=result["max_rss_bytes"])
    return report


def print_simulation(console: Console, report: dict) -> None:
    if report["simulated"] is None:
        console.print(report["not_simulated"])
        return
    unit, scale = ("GiB", GIB) if report["gpu_mem"] >= GIB else ("MiB", 1024**2)

    def size(n: int) -> str:
        return f"{n / scale:.2f}"

    title = (f"simulated rank {report['rank']} of {report['gpus']} ({report['target']}), {report['backend']}, "
             f"{report['precision']}, micro batch {report['micro_batch_size']} x {report['seq_len']}"
             f"{', activation checkpointing' if report['activation_checkpointing'] else ''}: {unit} per rank")
    table = Table("", "simulated", "formula", "sim / formula", "difference", title=title, title_justify="left")
    for row, _ in _ROWS:
        ratio = report["ratio"][row]
        off = ratio is None or abs(ratio - 1) > 0.10
        table.add_row(row, size(report["simulated"][row]), size(report["formula"][row]),
                      f"{ratio:.2f}" if ratio is not None else "-", _DIFFERENCE[row] if off else "")
    console.print(table)
    budget, peak = report["gpu_mem"], report["simulated"]["peak"]
    if report["fits"]:
        console.print(f"fits {size(budget)} {unit}: peak {size(peak)} {unit} leaves {size(budget - peak)} {unit} "
                      f"({(budget - peak) / budget:.0%}) headroom")
    else:
        console.print(f"does NOT fit {size(budget)} {unit}: peak {size(peak)} {unit} is {size(peak - budget)} {unit} over")
    sizes = ", ".join(str(m) for m, _ in report["probes"])
    console.print(f"largest micro-batch that fits {size(budget)} {unit}: {report['largest_micro_batch']} "
                  f"(simulated steps at micro-batch {sizes})")
    console.print(f"simulated in {report['wall_s']:.0f} s, {report['max_rss_bytes'] / 1e9:.2f} GB resident (child process)")


def _write_json(path: str, report: dict) -> None:
    import json
    from pathlib import Path

    out = Path(path)
    if not out.parent.is_dir():
        raise UserError(f"no such directory: {out.parent}", "--json")
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(json.dumps(report, indent=1) + "\n")
    tmp.replace(out)


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
    p.add_argument("--simulate", action="store_true",
                   help="also build and step rank --rank of the --gpus job on fake tensors (fsdp) and show its measured "
                        "memory beside the formulas, whether it fits --gpu-mem and the largest micro-batch that does")
    p.add_argument("--rank", type=int, default=0, help="the rank to simulate (default 0)")
    p.add_argument("--gpu-mem", default="80GiB", help="memory of one GPU for --simulate (default 80GiB)")
    p.add_argument("--target", choices=("gpu", "cpu"), default="gpu",
                   help="what the job runs on, for its precision policy: gpu (default; auto precision = bf16 "
                        "compute, fp32 masters and reduction) or cpu (auto = fp32)")
    p.add_argument("--json", default=None, metavar="FILE", help="with --simulate: also write the report as JSON")
    add_set_option(p)
    p.set_defaults(func=run)
