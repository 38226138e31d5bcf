"""`ember scaling plan`: an IsoFLOP grid of runs, written as a sweep file of run configs.

For each compute budget C and each size of the ladder (N parameters, embeddings included), the run
trains on D = C / (6 N) tokens. Learning rate and batch follow the rule OLMo-core's model ladder takes
from Porian et al. 2024 ("Resolving Discrepancies in Compute-Optimal Scaling of Language Models"):
lr = lr_ref * (N / params_ref)^(-1/3) and batch tokens = batch_tokens_ref * (N / params_ref)^(2/3),
the reference point given by the sweep config (OLMo-core's: 0.0047 and 160 x 2048 tokens at 108M
parameters). `batch_exponent: 0` holds the batch, for a ladder whose every size trains below its
critical batch: there a larger batch buys nothing and would make the largest runs differ from the rest.
The batch is rounded to whole micro-batches and capped so each run takes at least `min_steps` optimiser
steps; a run that would still be shorter, or that would train on fewer than
`min_tokens_per_param` or more than `max_tokens_per_param` tokens per parameter, is left out and said so.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import yaml
from pydantic import Field, model_validator

from ember.config import Section, find_preset, load_config, load_with_extends, parse_override
from ember.errors import UserError

SWEEP_FILE = "sweep.json"


class BatchRule(Section):
    """Learning rate and batch per model size: power laws in N through a reference point."""

    params_ref: float = Field(108e6, gt=0, description="parameters of the reference model")
    lr_ref: float = Field(0.0047, gt=0, description="peak learning rate at params_ref; scales as N^(-1/3)")
    batch_tokens_ref: int = Field(160 * 2048, gt=0, description="tokens per optimiser step at params_ref; scales as N^batch_exponent")
    batch_exponent: float = Field(2 / 3, ge=0, description="batch tokens grow as N^batch_exponent (Porian et al.: 2/3; 0 holds the batch)")
    min_steps: int = Field(20, gt=0, description="fewest optimiser steps of a run: the batch shrinks to keep them")
    min_tokens_per_param: float | None = Field(None, gt=0, description="leave out runs of fewer tokens per parameter "
                                               "(the large-model end of an IsoFLOP curve: data-starved runs the law does not follow)")
    max_tokens_per_param: float | None = Field(None, gt=0, description="leave out runs of more tokens per parameter "
                                               "(the small-model end of an IsoFLOP curve: far from its minimum, and the most steps)")
    warmup_fraction: float = Field(0.1, ge=0, lt=1, description="linear warm-up as a fraction of the run's steps")
    checkpoints_per_run: int = Field(4, gt=0, description="checkpoints a run saves (an interrupted run resumes from the last)")


class SweepConfig(Section):
    """An IsoFLOP sweep: a base run config, compute budgets, a ladder of model sizes."""

    name: str = Field("sweep", description="sweep name (the W&B group of its runs)")
    base: str = Field(description="run config YAML (or configs/pretrain/ preset) every run starts from")
    budgets: list[float] = Field(min_length=1, description="compute budgets C in FLOPs (C = 6 N D)")
    ladder: list[Any] = Field(min_length=2, description="model sizes: configs/models/ preset names or model mappings with a `name`")
    rule: BatchRule = Field(default_factory=BatchRule, description="learning rate and batch per size")
    sets: list[str] = Field(default_factory=list, description="--set overrides applied to every run (e.g. train.eval_batches=8)")
    val_tokens: int = Field(65536, gt=0, description="validation tokens of each run's evaluation (same for every run)")

    @model_validator(mode="after")
    def _positive(self):
        if any(not (c > 0 and math.isfinite(c)) for c in self.budgets):
            raise ValueError("budgets must be positive FLOP counts")
        return self


def ladder_models(entries: list, where: str) -> list[tuple[str, dict]]:
    """(name, model mapping) per ladder entry: a preset name is read from configs/models/."""
    from ember.config import validate
    from ember.pretrain.config import ModelConfig

    models = []
    for entry in entries:
        if isinstance(entry, str):
            name, model = Path(entry).stem, load_with_extends(find_preset(entry, "models"), "models", {})
        elif isinstance(entry, dict) and isinstance(entry.get("name"), str):
            name, model = entry["name"], {k: v for k, v in entry.items() if k != "name"}
        else:
            raise UserError(f"a ladder entry is a preset name or a mapping with a `name`, got {entry!r}", where)
        validate(model, ModelConfig, default_where=f"{where}: ladder entry {name}")
        models.append((name, model))
    return models


def full_model(model: dict) -> dict:
    """Every field of the model section, so a run's model replaces the base config's whole (no field merges in)."""
    from ember.pretrain.config import ModelConfig

    return ModelConfig(**model).model_dump(mode="json")


def num_params(model: dict) -> int:
    from ember.pretrain.accounting import count_params
    from ember.pretrain.config import ModelConfig

    return count_params(ModelConfig(**model))["total"]


def batch_for(params: int, tokens: float, seq_len: int, micro_batch: int, rule: BatchRule) -> int:
    """Sequences per step: the rule's batch, in whole micro-batches, at most tokens / min_steps."""
    wanted = rule.batch_tokens_ref * (params / rule.params_ref) ** rule.batch_exponent / seq_len
    most = tokens / (rule.min_steps * seq_len)
    return max(micro_batch, int(min(wanted, most) // micro_batch) * micro_batch)


def admits_tokens(rule: BatchRule, params: int, tokens: float) -> bool:
    """Whether tokens per parameter lie inside the rule's window."""
    low, high = rule.min_tokens_per_param, rule.max_tokens_per_param
    return (low is None or tokens >= low * params) and (high is None or tokens <= high * params)


def plan_run(name: str, model: dict, budget: float, base, rule: BatchRule, val_tokens: int) -> dict | None:
    """One run of the grid (its settings as --set overrides), or None when the rule leaves it out."""
    t = base.train
    n = num_params(model)
    tokens = budget / (6 * n)
    batch = batch_for(n, tokens, t.seq_len, t.micro_batch_size, rule)
    steps = round(tokens / (batch * t.seq_len))
    if steps < rule.min_steps or not admits_tokens(rule, n, tokens):
        return None
    lr = rule.lr_ref * (n / rule.params_ref) ** (-1 / 3)
    sets = {"model": full_model(model), "train.max_steps": steps, "train.global_batch_size": batch, "train.global_batch_tokens": None,
            "train.lr": float(f"{lr:.4g}"), "train.warmup_steps": max(1, round(rule.warmup_fraction * steps)),
            "train.eval_every": 0, "train.eval_batches": max(1, math.ceil(val_tokens / (batch * t.seq_len))),
            "train.log_every": max(1, steps // 20), "train.checkpoint_every": max(1, steps // rule.checkpoints_per_run),
            "train.export_hf": False}
    return {"name": name, "size": name.split("@")[0], "budget": budget, "params": n, "tokens": steps * batch * t.seq_len,
            "steps": steps, "sets": sets}


def plan(sweep: SweepConfig, sweep_dir: Path, where: str) -> dict:
    """The grid of runs of `sweep`, each with its run config written under sweep_dir/configs/."""
    from ember.run_config import RunConfig

    base_path = find_preset(sweep.base, "pretrain", Path(where).parent if Path(where).is_file() else None)
    base = load_config(base_path, RunConfig, sweep.sets)
    models = ladder_models(sweep.ladder, where)
    runs, skipped = [], []
    for budget in sorted(sweep.budgets):
        for size, model in models:
            run = plan_run(f"{size}@{budget:.3g}", model, budget, base, sweep.rule, sweep.val_tokens)
            (runs if run else skipped).append(run or f"{size}@{budget:.3g}")
    if not runs:
        raise UserError(f"no run of the grid reaches rule.min_steps={sweep.rule.min_steps} steps within the rule's tokens per "
                        "parameter: change the budgets", where)
    return {"name": sweep.name, "base": str(base_path.resolve()), "sets": sweep.sets, "rule": sweep.rule.model_dump(),
            "val_tokens": sweep.val_tokens, "ladder": [{"name": s, **m} for s, m in models], "runs": runs, "skipped": skipped}


def run_config_yaml(sweep: dict, run: dict, sweep_dir: Path) -> str:
    """The run config of one sweep run: the base, the sweep's sets, the run's own settings, its run dir and W&B group."""
    data = {"extends": sweep["base"], "run_dir": str((sweep_dir / "runs" / run["name"]).resolve())}
    data["tracking"] = {"group": sweep["name"], "job_type": "scaling-sweep", "name": f"{sweep['name']}-{run['name']}"}
    # The sweep's own --set overrides first (they are read as on the command line), then the run's settings.
    overrides = dict(parse_override(text) for text in sweep.get("sets", []))
    for key, value in {**overrides, **run["sets"]}.items():
        node = data
        *parents, last = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[last] = value
    return f"# ember pretrain {sweep_dir / 'configs' / (run['name'] + '.yaml')}\n" + yaml.safe_dump(data, sort_keys=False)


def write_sweep(sweep: dict, sweep_dir: Path) -> Path:
    """sweep_dir/sweep.json and one config per run; written under temporary names, then renamed."""
    configs = sweep_dir / "configs"
    configs.mkdir(parents=True, exist_ok=True)
    for run in sweep["runs"]:
        path = configs / f"{run['name']}.yaml"
        run["config"] = str(path.resolve())
        run["run_dir"] = str((sweep_dir / "runs" / run["name"]).resolve())
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(run_config_yaml(sweep, run, sweep_dir))
        tmp.replace(path)
    out = sweep_dir / SWEEP_FILE
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(json.dumps(sweep, indent=1))
    tmp.replace(out)
    return out


def read_sweep(sweep_dir: Path) -> dict:
    path = Path(sweep_dir) / SWEEP_FILE if Path(sweep_dir).is_dir() else Path(sweep_dir)
    if not path.is_file():
        raise UserError("no sweep here (expected a sweep directory written by `ember scaling plan`)", str(path))
    try:
        return json.loads(path.read_text())
    except ValueError as e:
        raise UserError(f"unreadable sweep file: {e}", str(path)) from None
