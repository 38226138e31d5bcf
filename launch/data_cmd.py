"""`ember data`: tokenizer training, dataset preparation, inspection and verification. Not built yet."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    from ember.launch.cli import _not_built

    p = sub.add_parser("data", help="tokenizer training, dataset preparation, inspection and verification (not built yet)")
    p.add_argument("args", nargs=argparse.REMAINDER, help="ignored until the command is built")
    p.set_defaults(func=_not_built("data"))
