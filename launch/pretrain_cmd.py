"""`ember pretrain`: pretrain a model. Not built yet."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    from ember.launch.cli import _not_built

    p = sub.add_parser("pretrain", help="pretrain a model (not built yet)")
    p.add_argument("args", nargs=argparse.REMAINDER, help="ignored until the command is built")
    p.set_defaults(func=_not_built("pretrain"))
