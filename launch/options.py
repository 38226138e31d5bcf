"""Command-line helpers shared by every `ember` command module (`launch/*_cmd.py`).

Kept apart from `cli.py`, which imports the command modules: they import this instead, so
the imports run one way.
"""

from __future__ import annotations

import argparse


def add_set_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help="override a config field by its dotted path, e.g. --set train.lr=3e-4 (repeatable; values are read as YAML)",
    )
