"""Continued pretraining: `ember finetune --from PARENT` with `finetune.kind: pretrain` on a new corpus prepared
with the parent's tokenizer starts from the parent's weights and records the parent."""

from __future__ import annotations

import json
import sysconfig
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml
from ember_cli import run_ember

from pretrain_runs import records

SEQ, ROWS, EVAL_BATCHES, SEED = 32, 8, 2, 5


def write_corpus(path: Path, tokenizer: str | None, vocab_size: int = 0) -> Path:
    """The stdlib's xml.dom modules cut into 20-line documents, prepared into a dataset (20% held out as val)."""
    from ember.data.config import PrepareConfig
    from ember.data.prepare import prepare

    lines = [line for f in sorted((Path(sysconfig.get_paths()["stdlib"]) / "xml" / "dom").glob("*.py"))
             for line in f.read_text().splitlines(keepends=True)]
    source = path.with_suffix(".jsonl")
    source.write_text("".join(json.dumps({"text": "".join(lines[i:i + 20])}) + "\n" for i in range(0, len(lines), 20)))
    extra = {"tokenizer": tokenizer} if tokenizer else {"tokenizer_train": {"vocab_size": vocab_size}}
    return prepare(PrepareConfig(source=str(source), output_dir=path, val_fraction=0.2, num_proc=1, shard_tokens=1 << 16,
                                 **extra), show_progress=False)


def continued_config(path: Path, corpus: Path, run_dir: Path) -> Path:
    path.write_text(yaml.safe_dump({
        "run_dir": str(run_dir), "seed": SEED, "finetune": {"task": str(corpus), "kind": "pretrain"},
        "train": {"seq_len": SEQ, "global_batch_size": ROWS, "micro_batch_size": 4, "max_steps": 3, "eval_every": 3,
                  "eval_batches": EVAL_BATCHES, "lr": 3e-3, "warmup_steps": 0, "log_every": 1, "cpu_matmul": "torch",
                  "precision": "fp32"},
        "tracking": {"wandb": "disabled"}}))
    return path


@torch.no_grad()
def parent_val_loss(parent: Path, corpus: Path) -> float:
    """The parent's HF export scored on the corpus's first validation windows (those the run evaluates), by hand."""
    from transformers import AutoModelForCausalLM

    from ember.data.loader import build_loader

    model = AutoModelForCausalLM.from_pretrained(parent / "hf", torch_dtype=torch.float32).eval()
    loader = build_loader([corpus], [1.0], split="val", seq_len=SEQ, global_batch_size=ROWS, rank=0, world_size=1, seed=SEED)
    total, count = 0.0, 0
    for _, batch in zip(range(EVAL_BATCHES), loader):
        tokens = batch.tokens  # (rows, seq + 1)
        logits = model(input_ids=tokens[:, :-1]).logits.float()  # (rows, seq, vocab)
        total += float(F.cross_entropy(logits.transpose(1, 2), tokens[:, 1:], reduction="sum"))
        count += tokens[:, 1:].numel()
    return total / count


@pytest.mark.slow
def test_continued_pretraining_starts_from_the_parent_and_records_it(parent, tmp_path):
    corpus = write_corpus(tmp_path / "corpus", tokenizer=str(parent / "hf"))
    run = tmp_path / "run"
    proc = run_ember("finetune", str(continued_config(tmp_path / "cpt.yaml", corpus, run)), "--from", str(parent))
    assert proc.returncode == 0, proc.stderr[-4000:]
    start = records(run, "finetune")[0]
    assert start["task_kind"] == "pretrain" and start["parent_run_dir"] == str(parent) and start["parent_step"] == 6
    saved = yaml.safe_load((run / "config.yaml").read_text())["finetune"]
    assert saved["parent_run_dir"] == str(parent) and saved["parent_step"] == 6
    evals = records(run, "eval")
    assert [r["step"] for r in evals] == [0, 3]
    # Before any update the model is the parent: its loss on the new corpus is the parent's, scored independently.
    assert evals[0]["val_loss"] == pytest.approx(parent_val_loss(parent, corpus), abs=1e-5)
    assert [r["step"] for r in records(run, "train")] == [1, 2, 3]
    assert evals[-1]["val_loss"] < evals[0]["val_loss"]  # it learns the new corpus
    summary = records(run, "summary")[-1]
    assert summary["parent_step"] == 6 and summary["hf_dir"] == str(run / "hf")


def test_a_corpus_with_another_tokenizer_or_none_prepared_is_refused(parent, tmp_path):
    from ember.config import load_config
    from ember.errors import UserError
    from ember.finetune.run import finetune
    from ember.run_config import FinetuneRunConfig

    def refused(corpus: Path) -> str:
        cfg = load_config(continued_config(tmp_path / "cpt.yaml", corpus, tmp_path / "run"), FinetuneRunConfig,
                          [f"finetune.init_from={parent}"], kind="finetune")
        with pytest.raises(UserError) as error:
            finetune(cfg)
        assert not (tmp_path / "run").exists()
        return error.value.line()

    assert "another tokenizer than the parent's" in refused(write_corpus(tmp_path / "corpus", tokenizer=None, vocab_size=300))
    (tmp_path / "raw").mkdir()
    assert "needs a dataset prepared by `ember data prepare`" in refused(tmp_path / "raw")
