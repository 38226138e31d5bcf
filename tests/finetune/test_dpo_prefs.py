"""DPO on stdlib-prefs through the real CLI, from a tiny pretrained parent: the held-out preference accuracy (the
model's own likelihood of chosen over rejected) rises above the starting model's, the reward margin grows from 0,
and the reference is the starting model, unchanged, to the end."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
import yaml
from ember_cli import run_ember

from pretrain_runs import records, trained_run

pytestmark = pytest.mark.slow  # a DPO run and the margin recomputed outside it: ~40 s on a loaded machine

BETA = 0.1
MAX_LENGTH = 64
EXAMPLES = {"max_train_examples": 192, "max_eval_examples": 160}
SEED = 1234  # the fine-tuning run's default seed: the test rebuilds the same evaluation pairs


def file_digests(directory: Path) -> dict[str, str]:
    return {str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(directory.rglob("*")) if p.is_file()}


def summed_logps(model_dir: Path, rows) -> torch.Tensor:
    """(rows,) each encoded row's summed log-probability of its targets, one unpadded row at a time."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    out = []
    with torch.no_grad():
        for row in rows:
            logits = model(input_ids=torch.tensor([row.ids[:-1]])).logits[0]  # (seq, vocab)
            out.append(-torch.nn.functional.cross_entropy(logits, torch.tensor(row.labels), ignore_index=-100, reduction="sum"))
    return torch.stack(out)


@pytest.fixture(scope="module")
def dpo_run(small_dataset, tmp_path_factory):
    parent = trained_run(small_dataset, tmp_path_factory)
    before = file_digests(parent / "checkpoints")
    root = tmp_path_factory.mktemp("dpo")
    config = root / "prefs.yaml"
    config.write_text(yaml.safe_dump({"finetune": {"task": "stdlib-prefs", "dpo_beta": BETA, "max_length": MAX_LENGTH, **EXAMPLES}}))
    sets = ["train.max_steps=16", "train.warmup_steps=0", "train.eval_every=8", "train.lr=3e-3", "train.global_batch_size=16",
            "train.micro_batch_size=8", "train.log_every=2", "train.precision=fp32", "train.cpu_matmul=torch",
            "tracking.wandb=disabled", f"run_dir={root / 'run'}"]
    proc = run_ember("finetune", str(config), "--from", str(parent), *[a for s in sets for a in ("--set", s)])
    assert proc.returncode == 0, proc.stderr[-4000:]
    return parent, root / "run", before


def test_dpo_beats_the_starting_model_on_held_out_pairs(dpo_run):
    _, run, _ = dpo_run
    evals = records(run, "eval")
    start, end = evals[0], evals[-1]
    assert start["step"] == 0 and start["num_pairs"] >= 32  # the pairs whose prompt leaves room for a response
    # At step 0 the policy is the reference: every implied reward is 0 (ties count half), the loss log 2.
    assert start["reward_margin"] == 0.0 and start["reward_accuracy"] == 0.5
    assert start["val_loss"] == pytest.approx(0.6931472, abs=1e-6)
    assert end["step"] == 16
    assert end["preference_accuracy"] > start["preference_accuracy"] + 0.04, [e["preference_accuracy"] for e in evals]
    assert end["reward_accuracy"] > 0.55
    margins = [e["reward_margin"] for e in evals]
    assert all(m > 0.05 for m in margins[1:]), margins
    assert end["val_loss"] < start["val_loss"]


def test_the_reference_is_the_unchanged_starting_model(dpo_run):
    """The parent's files are bitwise the same after the run, and the margin the run reports at its best step is
    the one recomputed here from the parent's weights as the reference and the exported policy."""
    from ember.finetune.config import FinetuneConfig
    from ember.finetune.data import audit_labels
    from ember.finetune.dpo import encode_pairs
    from ember.finetune.tasks import load_task
    from transformers import AutoTokenizer

    parent, run, before = dpo_run
    assert file_digests(parent / "checkpoints") == before
    best = json.loads((run / "best" / "best.json").read_text())
    reported = next(e for e in records(run, "eval") if e["step"] == best["step"])
    val_fraction = json.loads((Path(yaml.safe_load((parent / "config.yaml").read_text())["data"]["datasets"][0]["path"])
                               / "manifest.json").read_text())["split"]["val_fraction"]
    task = load_task(FinetuneConfig(task="stdlib-prefs", **EXAMPLES), val_fraction, SEED)
    eos_id = json.loads((run / "hf" / "config.json").read_text())["eos_token_id"]
    rows = audit_labels(encode_pairs(task.eval, AutoTokenizer.from_pretrained(run / "hf"), eos_id, MAX_LENGTH), "eval pairs")
    reference, policy = summed_logps(parent / "hf", rows), summed_logps(run / "hf", rows)
    rewards = BETA * (policy - reference)
    margin = float((rewards[0::2] - rewards[1::2]).mean())
    assert len(rows) == 2 * reported["num_pairs"]
    assert margin == pytest.approx(reported["reward_margin"], abs=1e-5)
    assert margin > 0
