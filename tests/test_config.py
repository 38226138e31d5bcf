"""The typed config tree: loading, presets, extends, overrides, and one clear line per mistake."""

from __future__ import annotations

import pytest
import yaml
from ember_cli import run_ember

from ember.config import deep_merge, describe_fields, load_config, parse_override, to_yaml
from ember.errors import UserError
from ember.run_config import RunConfig

TINY = "configs/pretrain/tiny.yaml"


def write(tmp_path, text: str, name: str = "cfg.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return path


# ------------------------------------------------------------------ loading


def test_tiny_preset_resolves_model_by_name():
    cfg = load_config(TINY, RunConfig)
    assert cfg.model.hidden_size == 256 and cfg.model.arch == "llama"
    assert cfg.data.datasets[0].prepare == "stdlib"


def test_overrides_are_typed():
    cfg = load_config(TINY, RunConfig, ["train.lr=3e-4", "train.compile=true", "train.betas=[0.8, 0.9]", "seed=7"])
    assert cfg.train.lr == pytest.approx(3e-4) and isinstance(cfg.train.lr, float)
    assert cfg.train.compile is True
    assert cfg.train.betas == (0.8, 0.9)
    assert cfg.seed == 7


def test_override_inside_a_preset_keeps_the_rest_of_it():
    cfg = load_config(TINY, RunConfig, ["model.num_layers=2"])
    assert (cfg.model.num_layers, cfg.model.hidden_size) == (2, 256)


def test_override_can_swap_the_preset():
    cfg = load_config(TINY, RunConfig, ["model=llama-5m", "model.hidden_size=128"])
    assert cfg.model.hidden_size == 128


def test_extends_refines_a_section_named_by_preset(tmp_path):
    path = write(tmp_path, "extends: tiny\nmodel: {num_layers: 2}\ntrain: {max_steps: 30}\n")
    cfg = load_config(path, RunConfig)
    assert (cfg.model.num_layers, cfg.model.hidden_size, cfg.train.max_steps) == (2, 256, 30)
    assert cfg.train.seq_len == 256  # inherited from tiny


def test_resolved_yaml_round_trips(tmp_path):
    cfg = load_config(TINY, RunConfig, ["train.lr=1e-3"])
    again = load_config(write(tmp_path, to_yaml(cfg)), RunConfig)
    assert again == cfg


def test_deep_merge_top_wins_and_nests():
    assert deep_merge({"a": {"b": 1, "c": 2}, "d": 1}, {"a": {"b": 3}}) == {"a": {"b": 3, "c": 2}, "d": 1}


def test_parse_override_reads_yaml_values():
    assert parse_override("a.b=1") == ("a.b", 1)
    assert parse_override("a=x=y") == ("a", "x=y")
    assert parse_override("a=") == ("a", "")


def test_every_field_is_described():
    rows = describe_fields(RunConfig)
    missing = [name for name, _, _, desc in rows if not desc]
    assert not missing, f"fields without a description: {missing}"
    assert any(name == "train.lr" for name, *_ in rows)


def test_user_error_line_format():
    assert UserError("bad", "here").line() == "error: bad (here)"
    assert UserError("bad").line() == "error: bad"


# ------------------------------------------------------------------ mistakes, through the real CLI

BAD_FILES = [
    ("nested unknown key", "extends: tiny\ntrain: {not_a_field: 1}\n", "error: unknown config key 'train.not_a_field' ({f})"),
    ("unknown key, suggestion", "extends: tiny\ntrain: {lrr: 1.0}\n", "error: unknown config key 'train.lrr', did you mean 'train.lr'? ({f})"),
    ("unknown top-level key", "extends: tiny\ntrian: {lr: 1.0}\n", "error: unknown config key 'trian', did you mean 'train'? ({f})"),
    ("wrong type", "extends: tiny\ntrain: {lr: fast}\n", "error: train.lr: expected a number, got 'fast' ({f})"),
    ("bad enum", "extends: tiny\ntrain: {backend: tpu}\n", "error: train.backend: 'tpu' is not one of 'single', 'ddp', 'fsdp' or 'deepspeed' ({f})"),
    ("negative batch size", "extends: tiny\ntrain: {micro_batch_size: -4}\n", "error: train.micro_batch_size: -4 must be greater than 0 ({f})"),
    ("missing required field", "extends: tiny\nmodel: {arch: llama, hidden_size: 64, num_heads: 4, ffn_hidden_size: 128, vocab_size: 256}\n",
     None),  # refines the preset, so nothing is missing: checked separately below
    ("missing required section", "model: llama-5m\n", "error: data: required field is missing ({f})"),
    ("malformed YAML", "extends: tiny\ntrain: [1\n", "error: malformed YAML: expected ',' or ']', but got '<stream end>' ({f}:3:1)"),
    ("missing preset", "extends: tiny\nmodel: llama-5x\n", "error: unknown models preset 'llama-5x', did you mean 'llama-5m'? (known: {models})"),
    ("missing extends target", "extends: no-such-recipe\n", "error: unknown pretrain preset 'no-such-recipe' (known: {recipes})"),
    ("not a mapping", "- a\n- b\n", "error: a config file must hold a mapping, got list ({f})"),
    ("cross-field check", "extends: tiny\nmodel: {hidden_size: 250}\n", "error: model: hidden_size 250 is not divisible by num_heads 4 ({f})"),
    ("exclusive fields", "extends: tiny\ntrain: {global_batch_tokens: 4096}\n",
     "error: train: give global_batch_size or global_batch_tokens, not both ({f})"),
    ("empty list", "extends: tiny\ndata: {datasets: []}\n", "error: data.datasets: needs at least 1 item(s), got 0 ({f})"),
    ("bool expected", "extends: tiny\ntrain: {compile: maybe}\n", "error: train.compile: expected true or false, got 'maybe' ({f})"),
    ("dataset without source", "extends: tiny\ndata: {datasets: [{weight: 1.0}]}\n",
     "error: data.datasets.0: give `path` (a prepared dataset) or `prepare` (a data-prepare config) ({f})"),
]


def _known(kind: str) -> str:
    from ember.config import PRESET_ROOT

    return ", ".join(sorted(p.stem for p in (PRESET_ROOT / kind).glob("*.yaml")))


@pytest.mark.parametrize("case", [c for c in BAD_FILES if c[2]], ids=lambda c: c[0])
def test_bad_config_file_gives_one_line_and_exit_2(tmp_path, case):
    _, text, expected = case
    path = write(tmp_path, text)
    proc = run_ember("config", "show", str(path))
    want = expected.format(f=path.resolve(), models=_known("models"), recipes=_known("pretrain"))
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip() == want
    assert proc.stdout == ""


def test_missing_required_model_field(tmp_path):
    path = write(tmp_path, "data: {datasets: [{prepare: stdlib}]}\nmodel: {hidden_size: 64, num_heads: 4, ffn_hidden_size: 128, vocab_size: 256}\n")
    proc = run_ember("config", "show", str(path))
    assert proc.returncode == 2
    assert proc.stderr.strip() == f"error: model.num_layers: required field is missing ({path.resolve()})"


def test_extends_cycle(tmp_path):
    a, b = tmp_path / "a.yaml", tmp_path / "b.yaml"
    a.write_text("extends: b.yaml\n")
    b.write_text("extends: a.yaml\n")
    proc = run_ember("config", "show", str(a), cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: `extends:` cycle (") and str(a.resolve()) in proc.stderr


BAD_SETS = [
    ("unknown path", "train.lrr=1", "error: unknown config key 'train.lrr', did you mean 'train.lr'? (--set train.lrr=1)"),
    ("unknown section", "optim.lr=1", "error: unknown config key 'optim' (--set optim.lr=1)"),
    ("unparsable value", "train.lr=[1", "error: cannot parse the value of train.lr: '[1' (--set train.lr=[1)"),
    ("wrong type", "model.num_layers=two", "error: model.num_layers: expected an integer, got 'two' (--set model.num_layers=two)"),
    ("float for int", "train.max_steps=1.5", "error: train.max_steps: expected an integer, got 1.5 (--set train.max_steps=1.5)"),
    ("bad enum", "train.zero_stage=4", "error: train.zero_stage: 4 is not one of 1, 2 or 3 (--set train.zero_stage=4)"),
    ("negative", "train.lr=-1", "error: train.lr: -1 must be greater than 0 (--set train.lr=-1)"),
    ("no equals sign", "train.lr", "error: --set expects KEY=VALUE, got 'train.lr' (--set)"),
    ("empty key part", "train..lr=1", "error: --set has an empty key in 'train..lr=1' (--set)"),
    ("cross-field from --set", "model.hidden_size=250", "error: model: hidden_size 250 is not divisible by num_heads 4 (--set model.hidden_size=250)"),
    ("into a scalar", "seed.x=1", "error: unknown config key 'seed.x' (--set seed.x=1)"),
]


@pytest.mark.parametrize("case", BAD_SETS, ids=lambda c: c[0])
def test_bad_set_gives_one_line_and_exit_2(case):
    _, override, expected = case
    proc = run_ember("config", "show", TINY, "--set", override)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip() == expected


def test_missing_config_file(tmp_path):
    proc = run_ember("config", "show", str(tmp_path / "nope.yaml"))
    assert proc.returncode == 2
    assert proc.stderr.strip() == f"error: config file not found ({tmp_path / 'nope.yaml'})"


def test_config_show_prints_resolved_yaml_with_override():
    proc = run_ember("config", "show", TINY, "--set", "train.lr=3e-4")
    assert proc.returncode == 0, proc.stderr
    cfg = yaml.safe_load(proc.stdout)
    assert cfg["train"]["lr"] == pytest.approx(3e-4)
    assert cfg["model"]["hidden_size"] == 256  # the preset, resolved
