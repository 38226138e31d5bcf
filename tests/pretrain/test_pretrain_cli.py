"""`ember pretrain` mistakes end with one clear line and exit 2, before anything is trained or written."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from ember_cli import run_ember  # noqa: E402
from pretrain_runs import write_config  # noqa: E402


def last_line(proc) -> str:
    return proc.stderr.strip().splitlines()[-1]


def test_a_global_batch_that_does_not_split_names_the_fields(tmp_path, small_dataset):
    config = write_config(tmp_path / "run.yaml", small_dataset, tmp_path / "run")
    proc = run_ember("pretrain", str(config), "--set", "train.global_batch_size=10", "--set", "train.micro_batch_size=4")
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "train.global_batch_size" in last_line(proc) and "train.micro_batch_size" in last_line(proc)
    assert "Traceback" not in proc.stderr and not (tmp_path / "run").exists()


def test_a_model_vocabulary_smaller_than_the_data_is_refused(tmp_path, small_dataset):
    config = write_config(tmp_path / "run.yaml", small_dataset, tmp_path / "run")
    proc = run_ember("pretrain", str(config), "--set", "model.vocab_size=100")
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert last_line(proc).startswith("error: model.vocab_size 100 is smaller than the dataset vocabulary")
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_a_missing_config_file_is_one_line(tmp_path):
    proc = run_ember("pretrain", str(tmp_path / "nope.yaml"))
    assert proc.returncode == 2 and last_line(proc).startswith("error: config file not found")


def test_help_documents_the_fault_injection_switch():
    proc = run_ember("pretrain", "--help")
    assert proc.returncode == 0 and "EMBER_POISON_STEP" in proc.stdout and "--set" in proc.stdout
