"""`ember demo`: the main job on the built-in default, stage by stage, saying what is not built yet."""

from __future__ import annotations

import argparse
import logging

log = logging.getLogger("ember.demo")


def run(args: argparse.Namespace) -> int:
    from ember.config import load_config, to_yaml
    from ember.run_config import RunConfig

    cfg = load_config("configs/pretrain/tiny.yaml", RunConfig, [f"run_dir={args.run_dir}"])
    print("== resolved config of the tiny preset (configs/pretrain/tiny.yaml)")
    print(to_yaml(cfg), end="")
    print("== data preparation: not built yet")
    print("== pretraining: not built yet")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="run the built-in demo: prepare the stdlib corpus, pretrain the tiny model, export, sample")
    p.add_argument("--run-dir", default="runs/demo", help="where the demo writes its data and run")
    p.set_defaults(func=run)
