"""The `ember` command line. Each command group lives in its own module with `register(subparsers)`."""

from __future__ import annotations

import argparse
import os
import sys
import traceback

import ember
from ember.errors import UserError
from ember.logs import setup_logging
from ember.pretrain.faults import EXIT_PREEMPTED, EXIT_USER_ERROR, Preempted, end_on_user_error, peer_user_error

def build_parser() -> argparse.ArgumentParser:
    from ember.launch import (config_cmd, data_cmd, demo_cmd, estimate_cmd, finetune_cmd, launch_cmd, pretrain_cmd, report_cmd,
                              scaling_cmd)

    parser = argparse.ArgumentParser(prog="ember", description="Distributed pretraining pipeline for transformer language models.")
    parser.add_argument("--version", action="version", version=f"ember {ember.__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for module in (config_cmd, data_cmd, pretrain_cmd, finetune_cmd, launch_cmd, estimate_cmd, scaling_cmd, report_cmd, demo_cmd):
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    setup_logging(verbose=args.verbose)
    worker = int(os.environ.get("WORLD_SIZE", "1")) > 1  # a torchrun worker
    try:
        code = args.func(args) or 0
    except UserError as e:
        code = end_on_user_error(e.line()) if worker else print(e.line(), file=sys.stderr) or EXIT_USER_ERROR
    except Preempted as e:
        if int(os.environ.get("RANK", "0")) == 0:
            print(e, file=sys.stderr)
        code = EXIT_PREEMPTED
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        code = 130
    except Exception:
        if not worker:
            raise
        # A collective that failed because a peer stopped on a user error: end quietly, as that peer did.
        if peer_user_error():
            code = end_on_user_error(None)
        else:
            traceback.print_exc()
            code = 1
    if worker:
        from ember.pretrain.distributed import exit_worker

        exit_worker(code)
    sys.exit(code)
