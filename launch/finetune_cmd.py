"""`ember finetune CONFIG --from RUN_DIR|CHECKPOINT|HF_DIR` (alone or under torchrun)."""

from __future__ import annotations

import argparse
from pathlib import Path


def run_finetune(args: argparse.Namespace) -> int:
    from ember.config import load_config
    from ember.finetune.run import finetune
    from ember.run_config import FinetuneRunConfig

    cfg = load_config(args.config, FinetuneRunConfig, args.overrides, kind="finetune")
    if args.init_from is not None:
        cfg.finetune.init_from = Path(args.init_from)
    summary = finetune(cfg)
    return 0 if summary["finished"] or cfg.train.stop_after_steps else 1


def register(sub: argparse._SubParsersAction) -> None:
    from ember.launch.options import add_set_option

    p = sub.add_parser(
        "finetune", help="fine-tune a checkpoint on a downstream task (alone, or under torchrun -m ember finetune ...)",
        description="Fine-tune an ember run / checkpoint or a Hugging Face model directory on a task (classification, "
                    "SFT, DPO) with the pretraining backends. Resumes from the newest checkpoint in run_dir; exports the best "
                    "weights to run_dir/hf.",
    )
    p.add_argument("config", help="fine-tuning config YAML, or a preset name from configs/finetune/ (e.g. stdlib-topic)")
    p.add_argument("--from", dest="init_from", metavar="RUN_DIR|CHECKPOINT|HF_DIR",
                   help="the starting weights (default: finetune.init_from; neither: random init of the config's model)")
    add_set_option(p)
    p.set_defaults(func=run_finetune)
