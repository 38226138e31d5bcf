"""`ember pretrain CONFIG` (alone or under torchrun) and `ember export CHECKPOINT --to hf OUT`."""

from __future__ import annotations

import argparse


def run_pretrain(args: argparse.Namespace) -> int:
    from ember.config import load_config
    from ember.pretrain.run import pretrain
    from ember.run_config import RunConfig

    cfg = load_config(args.config, RunConfig, args.overrides, kind="pretrain")
    summary = pretrain(cfg)
    return 0 if summary["finished"] or cfg.train.stop_after_steps else 1


def run_export(args: argparse.Namespace) -> int:
    from pathlib import Path

    from ember.pretrain.export import export_checkpoint

    out = export_checkpoint(Path(args.checkpoint), Path(args.out), overwrite=args.overwrite)
    print(f"exported {args.checkpoint} to {out} (Hugging Face format)")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    from ember.launch.options import add_set_option

    p = sub.add_parser(
        "pretrain", help="pretrain a model (alone, or under torchrun --nproc_per_node N -m ember pretrain ...)",
        description="Pretrain a model from a run config. Resumes from the newest checkpoint in run_dir. "
                    "Exit codes: 0 done, 1 failure, 2 user error, 3 hang, 143 preempted (checkpoint saved; run again to resume). "
                    "Fault injection for tests (pretrain/faults.py): EMBER_POISON_STEP=K (or K1,K2 or K1-K2) makes those steps' "
                    "loss NaN; EMBER_FAULT=KIND@RANK:STEP kills, signals, stalls or fails that rank at that step.",
    )
    p.add_argument("config", help="run config YAML, or a preset name from configs/pretrain/ (e.g. tiny)")
    add_set_option(p)
    p.set_defaults(func=run_pretrain)

    p = sub.add_parser("export", help="export a checkpoint to a Hugging Face model directory")
    p.add_argument("checkpoint", help="a checkpoint directory (checkpoints/step_XXXXXXXX), or a run directory (its newest checkpoint)")
    p.add_argument("--to", choices=["hf"], default="hf", help="export format (hf: config.json + model.safetensors + tokenizer)")
    p.add_argument("out", help="output directory: new, empty, or an earlier ember export (whose files are replaced)")
    p.add_argument("--overwrite", action="store_true",
                   help="write into a non-empty directory that holds no ember export (same-named files are replaced, others kept)")
    p.set_defaults(func=run_export)
