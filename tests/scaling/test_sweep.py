"""A sweep through the real CLI: plan, train (killed in the middle and started again), fit, report."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from ember_cli import REPO, run_ember

sys.path.insert(0, str(Path(__file__).parents[1] / "pretrain"))
from pretrain_runs import write_config  # noqa: E402

LADDER = [{"name": f"h{h}-l{layers}", "arch": "llama", "hidden_size": h, "num_layers": layers, "num_heads": 2,
           "ffn_hidden_size": 2 * h, "vocab_size": 512, "max_seq_len": 64, "tie_embeddings": True}
          for h, layers in ((16, 1), (24, 2), (32, 2))]


def sweep_config(tmp_path: Path, dataset: Path, **extra) -> Path:
    base = write_config(tmp_path / "base.yaml", dataset, tmp_path / "unused")
    cfg = {"name": "test-sweep", "base": str(base), "budgets": [3.0e8, 6.0e8], "ladder": LADDER,
           "rule": {"params_ref": 5.3e6, "lr_ref": 3e-3, "batch_tokens_ref": 4096, "min_steps": 20, "checkpoints_per_run": 4},
           "val_tokens": 2048, **extra}
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def summary(run_dir: Path) -> dict | None:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines() if (run_dir / "metrics.jsonl").is_file() else []
    return next((r for r in map(json.loads, reversed(lines)) if r["kind"] == "summary"), None)


@pytest.mark.slow
def test_sweep_killed_resumes_then_fit_and_report(tmp_path, small_dataset):
    sweep_dir = tmp_path / "sweep"
    proc = run_ember("scaling", "plan", str(sweep_config(tmp_path, small_dataset)), "--out", str(sweep_dir))
    assert proc.returncode == 0, proc.stderr
    sweep = json.loads((sweep_dir / "sweep.json").read_text())
    runs = sweep["runs"]
    assert [r["name"] for r in runs] == [f"{m['name']}@{c:.3g}" for c in (3e8, 6e8) for m in LADDER]
    for r in runs:  # D = C / (6 N), to within one optimiser step of tokens
        batch_tokens = r["sets"]["train.global_batch_size"] * 32
        assert abs(r["tokens"] - r["budget"] / (6 * r["params"])) <= batch_tokens / 2 + 1, r
    assert runs[0]["sets"]["train.lr"] > runs[2]["sets"]["train.lr"]  # smaller models take larger learning rates

    # Kill the whole sweep (runner and its training process) once the second run has saved a checkpoint.
    sweep_cmd = [sys.executable, "-m", "ember", "scaling", "sweep", str(sweep_dir)]
    first = subprocess.Popen(sweep_cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    second_run = Path(runs[1]["run_dir"])
    deadline = time.time() + 600
    while not any((second_run / "checkpoints").glob("step_*[0-9]")):
        assert first.poll() is None and time.time() < deadline, "the sweep ended before its second run checkpointed"
        time.sleep(0.02)
    os.killpg(first.pid, signal.SIGKILL)
    first.wait(60)
    assert summary(Path(runs[0]["run_dir"]))["finished"] and summary(second_run) is None
    finished_before = (Path(runs[0]["run_dir"]) / "metrics.jsonl").read_bytes()

    again = run_ember("scaling", "sweep", str(sweep_dir), "--jobs", "2")  # two at a time: still skips and resumes
    assert again.returncode == 0, again.stdout[-2000:] + again.stderr[-2000:]
    assert f"{runs[0]['name']}: finished before, skipped" in again.stdout
    assert f"{runs[1]['name']}: " in again.stdout and "(resuming from its checkpoint)" in again.stdout
    assert (Path(runs[0]["run_dir"]) / "metrics.jsonl").read_bytes() == finished_before
    resumed = summary(second_run)
    assert resumed["finished"] and resumed["resumed_from"] > 0, resumed
    assert all(summary(Path(r["run_dir"]))["finished"] for r in runs)
    # Every run is its own W&B run, grouped under the sweep's name.
    cfg = yaml.safe_load((second_run / "config.yaml").read_text())
    assert cfg["tracking"]["group"] == "test-sweep" and cfg["tracking"]["job_type"] == "scaling-sweep"

    proc = run_ember("scaling", "fit", "--sweep", str(sweep_dir), "--bootstrap", "50", "--json")
    assert proc.returncode == 0, proc.stderr
    fit = json.loads(proc.stdout)
    assert fit["num_runs"] == len(runs) and all(k in fit["se"] for k in ("E", "A", "B", "alpha", "beta"))
    stored = json.loads((sweep_dir / "fit.json").read_text())
    assert len(stored["samples"]) == 50 and len(stored["runs"]) == len(runs)

    proc = run_ember("scaling", "report", str(sweep_dir), "--wandb", "offline")
    assert proc.returncode == 0, proc.stderr
    from PIL import Image

    for name in ("loss_vs_compute", "isoflops", "residuals"):
        png = sweep_dir / "report" / f"{name}.png"
        assert png.stat().st_size > 10_000 and Image.open(png).size[0] >= 600, name
    page = (sweep_dir / "report" / "index.html").read_text()
    assert all(f"<td>{r['name']}</td>" in page for r in runs)
    assert list((sweep_dir / "wandb").glob("offline-run-*/run-*.wandb")), "the report was not logged to W&B"


def test_a_failed_run_stops_the_queue(tmp_path, small_dataset):
    sweep_dir = tmp_path / "sweep"
    assert run_ember("scaling", "plan", str(sweep_config(tmp_path, small_dataset)), "--out", str(sweep_dir)).returncode == 0
    runs = json.loads((sweep_dir / "sweep.json").read_text())["runs"]
    for run in runs[:2]:  # both workers' first runs fail at once, on a field no config has
        with open(run["config"], "a") as f:
            f.write("no_such_field: 1\n")
    proc = run_ember("scaling", "sweep", str(sweep_dir), "--jobs", "2")
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert proc.stderr.startswith(f"error: sweep run {runs[0]['name']} failed with exit code 2"), proc.stderr
    assert f"{len(runs) - 2} queued run(s) not started" in proc.stdout, proc.stdout
    assert not any(Path(r["run_dir"]).with_suffix(".out").exists() for r in runs[2:])


@pytest.mark.parametrize("args, message", [
    (["--budgets", "1e8,-3"], "--budgets expects positive numbers"),
    (["--budgets", "lots"], "--budgets expects numbers separated by commas"),
    (["--set", "ladder=[llama-1m,no-such-size]"], "unknown models preset 'no-such-size'"),
    (["--set", "ladder=[llama-1m]"], "ladder: needs at least 2 item(s), got 1"),
    (["--set", "rule.min_steps=100000"], "no run of the grid reaches rule.min_steps=100000"),
])
def test_bad_plan_is_one_error_line(tmp_path, small_dataset, args, message):
    out = tmp_path / "sweep"
    proc = run_ember("scaling", "plan", str(sweep_config(tmp_path, small_dataset)), "--out", str(out), *args)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], lines
    assert not (out / "sweep.json").exists()


def test_sweep_and_report_of_a_missing_sweep(tmp_path):
    for args in (["sweep", str(tmp_path / "none")], ["report", str(tmp_path / "none")], ["check", str(tmp_path / "none")]):
        proc = run_ember("scaling", *args)
        assert proc.returncode == 2 and proc.stderr.startswith("error: no sweep here"), (args, proc.stderr)


def test_run_configs_carry_the_sweep_sets_under_the_run_settings(tmp_path):
    from ember.pretrain.scaling.plan import run_config_yaml

    sweep = {"name": "s", "base": "base.yaml", "sets": ["train.eval_batches=8", "train.lr=1.0"]}
    run = {"name": "r", "sets": {"train.lr": 0.01, "train.max_steps": 40}}
    data = yaml.safe_load(run_config_yaml(sweep, run, tmp_path))
    assert data["train"] == {"eval_batches": 8, "lr": 0.01, "max_steps": 40}  # the run's own lr wins


def test_plan_leaves_out_runs_outside_the_tokens_per_param_window(tmp_path, small_dataset):
    from ember.config import load_config
    from ember.pretrain.scaling.plan import SweepConfig, plan

    path = sweep_config(tmp_path, small_dataset)
    uncapped = plan(load_config(path, SweepConfig, [], kind="scaling"), tmp_path / "sweep", str(path))
    ratio = lambda r: r["budget"] / (6 * r["params"] ** 2)  # noqa: E731  tokens per parameter as planned, D = C / (6N)
    ratios = sorted(map(ratio, uncapped["runs"]))
    low, high = ratios[1], ratios[-2]  # each bound cuts at least one run
    window = [f"rule.min_tokens_per_param={low}", f"rule.max_tokens_per_param={high}"]
    sweep = plan(load_config(path, SweepConfig, window, kind="scaling"), tmp_path / "sweep", str(path))
    assert sweep["runs"] and all(low <= ratio(r) <= high for r in sweep["runs"])
    cut = [r["name"] for r in uncapped["runs"] if not low <= ratio(r) <= high]
    assert len(cut) >= 2 and set(sweep["skipped"]) == set(cut), (cut, sweep["skipped"])


def test_heldout_run_is_the_admitted_size_nearest_the_optimum(tmp_path, small_dataset):
    from types import SimpleNamespace

    from ember.config import load_config
    from ember.errors import UserError
    from ember.launch.scaling_cmd import heldout_run
    from ember.pretrain.scaling.law import Law
    from ember.pretrain.scaling.plan import SweepConfig, plan

    path = sweep_config(tmp_path, small_dataset)
    sweep = plan(load_config(path, SweepConfig, [], kind="scaling"), tmp_path / "sweep", str(path))
    budget = 3 * max(r["budget"] for r in sweep["runs"])
    largest = max(sweep["runs"], key=lambda r: r["params"])
    # At 3x the largest budget, ask for more tokens per parameter than the largest size would get there.
    low = 1.01 * budget / (6 * largest["params"] ** 2)
    sweep["rule"]["min_tokens_per_param"] = low
    fit = SimpleNamespace(law=Law(E=1.0, A=1e12, B=1.0, alpha=0.5, beta=0.5))  # N*(C) far beyond the ladder
    run = heldout_run(sweep, fit, 3.0, None)
    assert run["size"] != largest["size"] and run["tokens"] >= low * run["params"] * 0.99, run
    assert run["params"] == max(r["params"] for r in sweep["runs"] if r["size"] != largest["size"])
    with pytest.raises(UserError, match="fewer than rule.min_tokens_per_param"):
        heldout_run(sweep, fit, 3.0, largest["size"])


def test_batch_exponent_zero_holds_the_batch_across_the_ladder(tmp_path, small_dataset):
    from ember.config import load_config
    from ember.pretrain.scaling.plan import SweepConfig, plan

    path = sweep_config(tmp_path, small_dataset)
    batches = lambda sets: {r["sets"]["train.global_batch_size"] for r in plan(  # noqa: E731
        load_config(path, SweepConfig, sets, kind="scaling"), tmp_path / "sweep", str(path))["runs"]}
    # The reference batch is large enough that the N^(2/3) rule gives the ladder's sizes different batches.
    ref = ["rule.params_ref=30000", "rule.batch_tokens_ref=512", "rule.min_steps=1"]
    assert len(batches(ref)) > 1
    assert batches([*ref, "rule.batch_exponent=0"]) == {512 // 32}
