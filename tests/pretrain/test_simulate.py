"""The simulation of rank R of N (`ember estimate --simulate`) against real torchrun runs of the same config: the
simulated per-rank bytes of weights, gradients and optimizer state within 2% of the measured ones and the
simulated peak within 15% of the measured peak, at 2 and 4 ranks on CPU in fp32; the presets at 8 GPUs; the
bisection for the largest micro-batch; errors that only show at scale."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from ember_cli import run_ember

import ember
from ember.pretrain.simulate import simulate
from ember.pretrain.simulate.rank import largest_fitting

sys.path.insert(0, str(Path(__file__).parent))
from memory_runs import ALL_BACKENDS, config_path, measured, run_config  # noqa: E402

TINY = str(Path(ember.__file__).parent / "configs" / "pretrain" / "tiny.yaml")
STATE = ("weights", "grads", "optimizer")


def assert_matches_real_run(simulated: dict, real: dict) -> None:
    for k in STATE:
        assert simulated[k] == pytest.approx(real["state"][k], rel=0.02), k
    assert simulated["peak"] == pytest.approx(real["peak_bytes"], rel=0.15)


@pytest.mark.slow
@pytest.mark.distributed
def test_estimate_simulate_matches_a_real_two_rank_run(tmp_path):
    out = tmp_path / "sim.json"
    proc = run_ember("estimate", str(config_path()), "--gpus", "2", "--simulate", "--target", "cpu",
                     "--gpu-mem", "40MiB", "--json", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "simulated rank 0 of 2" in proc.stdout and "fits" in proc.stdout
    report = json.loads(out.read_text())
    assert report["fits"] and report["largest_micro_batch"] >= report["micro_batch_size"]
    # rank 0 here; the real run's rank 0 (the ranks of this config hold the same bytes)
    assert_matches_real_run(report["simulated"], measured(2, ALL_BACKENDS)["fsdp"][0])
    for row, ratio in report["ratio"].items():
        assert ratio == pytest.approx(report["simulated"][row] / report["formula"][row])


@pytest.mark.slow
@pytest.mark.distributed
def test_simulated_rank_of_four_matches_a_real_four_rank_run():
    result = simulate(run_config(), 4, rank=3, target="cpu")
    assert result["rank"] == 3 and result["num_micro_batches"] == 1
    assert_matches_real_run(result["bytes"], measured(4, "fsdp")["fsdp"][3])


@pytest.mark.slow
def test_llama_1b_at_eight_gpus_fits_and_shards():
    from ember.config import load_config
    from ember.pretrain import accounting
    from ember.run_config import RunConfig

    cfg = load_config(TINY, RunConfig, ["model=llama-1b", "train.backend=fsdp", "train.seq_len=4096",
                                        "train.micro_batch_size=1", "train.global_batch_size=8"], kind="pretrain")
    result = simulate(cfg, 8, rank=5, target="gpu")
    simulated, formula = result["bytes"], accounting.memory_per_rank(cfg, 8, on_gpu=True)
    for k in STATE:  # fp32 master shards, fp32 gradient shards, AdamW moments: an eighth of 16 bytes per parameter
        assert simulated[k] == pytest.approx(formula[k], rel=0.02), k
    assert 4 * 2**30 < simulated["peak"] < 80 * 2**30 and result["max_rss_bytes"] < 4e9


def test_bisection_finds_the_largest_fitting_micro_batch_in_few_steps():
    def peak(m: int) -> int:  # constant state plus activations linear in the micro-batch, with a bump
        return 10_000 + 700 * m + (500 if m > 9 else 0)

    for budget, slope in [(b, s) for b in (10_500, 11_000, 16_300, 16_999, 17_000, 18_000, 90_000)
                          for s in (700, 600, 900)]:  # the line right, too flat, too steep
        calls = []
        largest, probes = largest_fitting(lambda m: calls.append(m) or peak(m), budget, 2, peak(2), slope)
        expected = max([m for m in range(0, 200) if m == 0 or peak(m) <= budget])
        assert largest == expected, (budget, slope)
        assert len(set(calls)) == len(calls) and dict(probes)[2] == peak(2)
        if slope == 700 and budget < 90_000:
            assert len(calls) <= 3, (budget, calls)


@pytest.mark.parametrize("args, where", [
    (["--gpus", "3"], "train.global_batch_size"),  # 16 sequences do not split over 3 ranks x 8
    (["--gpus", "2", "--gpu-mem", "80XB"], "--gpu-mem"),
])
def test_errors_at_scale_are_one_line_exit_2(args, where):
    proc = run_ember("estimate", TINY, "--simulate", "--set", "train.backend=fsdp", *args)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.strip().startswith("error:") and where in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr


def tiny_cfg(*overrides: str):
    from ember.config import load_config
    from ember.run_config import RunConfig

    return load_config(TINY, RunConfig, ["train.backend=fsdp", *overrides], kind="pretrain")


@pytest.mark.parametrize("overrides, num_gpus, rank, where", [
    (["train.seq_len=4096", "train.global_batch_size=64"], 8, 0, "train.seq_len"),  # beyond llama-5m's context
    (["train.global_batch_tokens=40960"], 8, 0, "train.global_batch_tokens"),  # 160 sequences over 8 x 8
    ([], 2, 2, "--rank"),
])
def test_bad_plans_name_the_field(overrides, num_gpus, rank, where):
    from ember.errors import UserError
    from ember.launch.estimate_cmd import simulation_report

    with pytest.raises(UserError) as err:  # found before any child process starts
        simulation_report(tiny_cfg(*overrides), num_gpus, rank, "gpu", 80 * 2**30)
    assert where in err.value.line()


def test_deepspeed_and_ddp_are_said_to_come_from_the_formulas():
    from ember.launch.estimate_cmd import simulation_report

    for backend, name in (("deepspeed", "zero3"), ("ddp", "ddp")):
        report = simulation_report(tiny_cfg(f"train.backend={backend}"), 2, 0, "gpu", 80 * 2**30)
        assert report["simulated"] is None and report["formula"]["peak"] > 0
        assert f"{name} is not simulated" in report["not_simulated"] and "formulas" in report["not_simulated"]


def test_launch_dry_run_simulate_checks_the_job_it_would_launch(tmp_path):
    proc = run_ember("launch", TINY, "--scheduler", "torchrun", "--nodes", "3", "--procs-per-node", "2", "--dry-run",
                     "--simulate", "--set", f"run_dir={tmp_path / 'run'}", "--set", "train.backend=fsdp")
    assert proc.returncode == 2, proc.stderr[-2000:]  # 16 sequences over 6 ranks x 8
    assert proc.stderr.strip().startswith("error:") and "train.global_batch_size" in proc.stderr
    assert not (tmp_path / "run" / "launch").exists()  # refused before the launch files were written
    proc = run_ember("launch", TINY, "--simulate", "--set", f"run_dir={tmp_path / 'run'}")
    assert proc.returncode == 2 and "--dry-run" in proc.stderr
