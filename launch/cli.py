"""The `ember` command line. Each command group lives in its own module with `register(subparsers)`."""

from __future__ import annotations

import argparse
import os
import sys

import ember
from ember.errors import UserError
from ember.logs import setup_logging

NOT_BUILT: dict[str, str] = {}  # command groups still to build, each answering "not built yet" (none now)


def _not_built(name: str):
    def run(args: argparse.Namespace) -> int:
        raise UserError(f"`ember {name}` is not built yet", "see the open issues")

    return run


def build_parser() -> argparse.ArgumentParser:
    from ember.launch import (config_cmd, data_cmd, demo_cmd, estimate_cmd, finetune_cmd, launch_cmd, pretrain_cmd, report_cmd,
                              scaling_cmd)

    parser = argparse.ArgumentParser(prog="ember", description="Distributed pretraining pipeline for transformer language models.")
    parser.add_argument("--version", action="version", version=f"ember {ember.__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for module in (config_cmd, data_cmd, pretrain_cmd, finetune_cmd, launch_cmd, estimate_cmd, scaling_cmd, report_cmd, demo_cmd):
        module.register(sub)
    for name, summary in NOT_BUILT.items():
        p = sub.add_parser(name, help=f"{summary} (not built yet)", description=f"{summary}. Not built yet: exits 2.")
        p.add_argument("args", nargs=argparse.REMAINDER, help="ignored until the command is built")
        p.set_defaults(func=_not_built(name))
    return parser


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    setup_logging(verbose=args.verbose)
    try:
        code = args.func(args) or 0
    except UserError as e:
        print(e.line(), file=sys.stderr)
        code = 2
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        code = 130
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # a torchrun worker
        from ember.pretrain.distributed import exit_worker

        exit_worker(code)
    sys.exit(code)
