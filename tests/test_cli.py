"""The `ember` command line: version, help on every command, field listing."""

from __future__ import annotations

import argparse

from ember_cli import run_ember

import ember
from ember.launch.cli import build_parser


def all_parsers(parser: argparse.ArgumentParser, path=("ember",)):
    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from all_parsers(sub, (*path, name))


def test_version():
    proc = run_ember("--version")
    assert proc.returncode == 0 and proc.stdout.strip() == f"ember {ember.__version__}"


def test_python_dash_m_and_console_script_agree():
    proc = run_ember("--help")
    assert proc.returncode == 0
    for group in ("config", "data", "pretrain", "estimate", "finetune", "launch", "scaling", "report", "demo"):
        assert group in proc.stdout


def test_every_option_of_every_command_has_help():
    undocumented = []
    for path, parser in all_parsers(build_parser()):
        for action in parser._actions:
            if isinstance(action, (argparse._HelpAction, argparse._SubParsersAction)):
                continue
            if not action.help:
                undocumented.append(f"{' '.join(path)} {action.dest}")
    assert not undocumented, undocumented


def test_config_fields_lists_descriptions():
    proc = run_ember("config", "fields", "train.")
    assert proc.returncode == 0, proc.stderr
    assert "train.lr" in proc.stdout and "peak learning rate" in proc.stdout
    assert "model.hidden_size" not in proc.stdout


def test_config_fields_unknown_prefix():
    proc = run_ember("config", "fields", "nosuch.")
    assert proc.returncode == 2
    assert proc.stderr.strip() == "error: no config field starts with 'nosuch.' (run)"
