"""The tiny single-process run end to end through `ember pretrain`: config, metrics, checkpoints, export."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from pretrain_runs import records, trained_run  # noqa: E402

from ember.config import read_yaml, validate  # noqa: E402
from ember.errors import UserError  # noqa: E402
from ember.pretrain.config import TrainConfig  # noqa: E402
from ember.run_config import RunConfig  # noqa: E402

TRAIN_FIELDS = {"kind", "step", "loss", "lr", "grad_norm", "tokens_per_s", "tokens_per_s_per_device", "mfu", "step_time_s",
                "peak_mem_bytes", "tokens_seen", "samples_consumed", "skipped_steps", "tokens_by_source", "time"}


@pytest.fixture(scope="module")
def run(small_dataset, tmp_path_factory) -> Path:
    return trained_run(small_dataset, tmp_path_factory)


def test_resolved_config_is_saved_and_valid(run):
    cfg = validate(read_yaml(run / "config.yaml"), RunConfig)
    assert cfg.run_dir == run and cfg.train.max_steps == 12 and cfg.model.hidden_size == 64
    assert "step 12/12 | loss" in (run / "logs" / "rank0.log").read_text()


def test_train_records_have_every_field_at_the_log_cadence(run):
    train = records(run, "train")
    assert [r["step"] for r in train] == [2, 4, 6, 8, 10, 12]
    for r in train:
        assert TRAIN_FIELDS <= set(r), TRAIN_FIELDS - set(r)
        assert math.isfinite(r["loss"]) and r["grad_norm"] > 0 and r["tokens_per_s"] > 0 and 0 < r["mfu"] < 1
        assert r["tokens_seen"] == r["step"] * 8 * 32 and r["samples_consumed"] == r["step"] * 8
        assert sum(r["tokens_by_source"].values()) == r["tokens_seen"]
        assert r["tokens_per_s_per_device"] == r["tokens_per_s"] and r["skipped_steps"] == 0 and r["peak_mem_bytes"] > 0
    assert train[-1]["loss"] < train[0]["loss"]  # it learns
    assert train[-1]["lr"] == pytest.approx(3e-3 * 0.1)  # the cosine schedule ends at its floor


def test_eval_records_every_n_steps_and_at_the_end(run):
    evals = records(run, "eval")
    assert [r["step"] for r in evals] == [5, 10, 12]
    for r in evals:
        assert r["val_ppl"] == pytest.approx(math.exp(r["val_loss"]))
    summary = records(run, "summary")[-1]
    assert summary["step"] == 12 and summary["finished"] and summary["skipped_steps"] == 0


def test_checkpoints_keep_the_last_two_and_point_latest_at_the_newest(run):
    ckpts = run / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["latest", "step_00000010", "step_00000012"]
    assert (ckpts / "latest").read_text().strip() == "step_00000012"
    state = json.loads((ckpts / "step_00000012" / "trainer_state.json").read_text())
    assert state["step"] == 12 and state["loader"]["samples_consumed"] == 96 and state["skipped_steps"] == 0
    assert (ckpts / "step_00000012" / "rng" / "rank0.pt").is_file()
    assert (ckpts / "step_00000012" / "tokenizer" / "tokenizer.json").is_file()


def test_hf_export_is_written_at_the_end(run):
    names = {p.name for p in (run / "hf").iterdir()}
    assert {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json"} <= names


def test_accumulation_is_derived_from_the_global_batch():
    assert TrainConfig(global_batch_size=16, micro_batch_size=2).accumulation_steps(2) == 4
    assert TrainConfig(global_batch_tokens=4096, seq_len=256, micro_batch_size=4).accumulation_steps(2) == 2
    assert TrainConfig(micro_batch_size=4).accumulation_steps(3) == 1
    with pytest.raises(UserError, match="micro_batch_size") as e:
        TrainConfig(global_batch_size=12, micro_batch_size=4).accumulation_steps(2)
    assert "train.global_batch_size" in e.value.where


def test_loss_is_fp32_cross_entropy_plus_the_z_loss():
    import torch

    from ember.pretrain.step import causal_lm_loss

    logits = torch.randn(2, 5, 11, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)  # (batch, seq, vocab)
    labels = torch.randint(0, 11, (2, 5), generator=torch.Generator().manual_seed(1))
    loss, ce = causal_lm_loss(logits, labels, z_loss=0.0)
    assert loss.dtype == ce.dtype == torch.float32 and loss is ce
    expected_ce = torch.nn.functional.cross_entropy(logits.float().view(-1, 11), labels.view(-1))
    assert torch.equal(ce, expected_ce)
    loss, ce = causal_lm_loss(logits, labels, z_loss=1e-2)
    log_z = torch.logsumexp(logits.float().view(-1, 11), dim=-1)
    torch.testing.assert_close(loss, expected_ce + 1e-2 * log_z.pow(2).mean())
    assert torch.equal(ce, expected_ce)  # the reported loss stays the plain cross-entropy


def test_fault_injection_switch_parses_steps_lists_and_ranges(monkeypatch):
    from ember.pretrain.faults import POISON_ENV, poisoned_steps

    monkeypatch.setenv(POISON_ENV, "3, 7-9,12")
    assert poisoned_steps() == {3, 7, 8, 9, 12}
    monkeypatch.delenv(POISON_ENV)
    assert poisoned_steps() == set()
