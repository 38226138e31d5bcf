"""`ember config show|fields`: print a resolved config, or every field with its description."""

from __future__ import annotations

import argparse

from rich.console import Console
from rich.table import Table

from ember.config import describe_fields, load_config, read_yaml, to_yaml
from ember.errors import UserError


def schema_for(path: str):
    """A data-prepare config (top-level `source`) or a run config."""
    from pathlib import Path

    from ember.run_config import RunConfig

    p = Path(path)
    if p.suffix in (".yaml", ".yml") and p.is_file() and "source" in read_yaml(p):
        from ember.data.config import PrepareConfig

        return PrepareConfig, "data"
    return RunConfig, "pretrain"


def show(args: argparse.Namespace) -> int:
    schema, kind = schema_for(args.config)
    cfg = load_config(args.config, schema, args.overrides, kind=kind)
    print(to_yaml(cfg), end="")
    return 0


def fields(args: argparse.Namespace) -> int:
    from ember.run_config import RunConfig

    schema = RunConfig
    if args.kind == "data":
        from ember.data.config import PrepareConfig

        schema = PrepareConfig
    rows = [r for r in describe_fields(schema) if r[0].startswith(args.prefix or "")]
    if not rows:
        raise UserError(f"no config field starts with '{args.prefix}'", args.kind)
    table = Table("field", "type", "default", "description", box=None, pad_edge=False)
    for row in rows:
        table.add_row(*row)
    Console(width=200).print(table)
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    from ember.launch.options import add_set_option

    group = sub.add_parser("config", help="show resolved configs and the fields they may hold")
    cmds = group.add_subparsers(dest="config_command", metavar="SUBCOMMAND", required=True)
    p = cmds.add_parser("show", help="print the fully resolved config (presets, extends and --set applied)")
    p.add_argument("config", help="YAML file, or a preset name from configs/pretrain/")
    add_set_option(p)
    p.set_defaults(func=show)
    p = cmds.add_parser("fields", help="list every config field with its type, default and description")
    p.add_argument("prefix", nargs="?", help="only fields whose dotted name starts with this, e.g. train.")
    p.add_argument("--kind", choices=["run", "data"], default="run", help="run config (pretrain/finetune) or data-prepare config")
    p.set_defaults(func=fields)
