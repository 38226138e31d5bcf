"""Every backend trains exactly like one process: same losses at every step, bit-identical resume, reshardable
checkpoints. Real torchrun, 2 processes, gloo, fp32, a tiny Llama on fixed synthetic tokens."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent / "backend_scripts"))
sys.path.insert(0, str(Path(__file__).parent))  # pretrain_runs: the shared helper that runs `ember pretrain`
from backend_runs import ALL_BACKENDS, launch, losses, standard_runs, workdir  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.distributed]

REL_TOL = 1e-4


def assert_close_losses(got: list[float], want: list[float], what: str) -> None:
    assert len(got) == len(want), what
    for step, (g, w) in enumerate(zip(got, want)):
        if math.isnan(w):
            assert math.isnan(g), f"{what}: step {step} should be NaN (poisoned), got {g}"
            continue
        assert abs(g - w) <= REL_TOL * abs(w), f"{what}: step {step} loss {g} vs single-process {w}"


@pytest.mark.parametrize("backend", ALL_BACKENDS.split(","))
def test_losses_match_single_process_at_every_step(backend):
    single, runs = standard_runs()
    reference = losses(single["steps"])
    assert all(math.isfinite(x) for i, x in enumerate(reference) if i != 2)
    # The losses must move, or matching them would prove little.
    assert reference[-1] < reference[0] - 0.1
    for rank, result in enumerate(runs[backend]):
        assert result["world_size"] == 2
        assert_close_losses(losses(result["steps"]), reference, f"{backend} rank {rank}")


@pytest.mark.parametrize("backend", ["single", *ALL_BACKENDS.split(",")])
def test_initial_weights_equal_single_process(backend):
    # FSDP on meta: shards initialised in place would be equal copies; the full weights must be rank 0's init.
    single, runs = standard_runs()
    result = single if backend == "single" else runs[backend][0]
    assert result["init_digest"] == single["init_digest"]


@pytest.mark.parametrize("backend", ALL_BACKENDS.split(","))
def test_optimizer_keeps_the_decay_groups(backend):
    # ZeRO-3 parameters are empty placeholders outside forward: grouping by ndim must still see matrices.
    single, runs = standard_runs()
    assert single["param_groups"] == [["decay", 0.1], ["no_decay", 0.0]]
    assert runs[backend][0]["param_groups"] == single["param_groups"]


@pytest.mark.parametrize("backend", ["single", *ALL_BACKENDS.split(",")])
def test_save_load_round_trip_continues_bit_identically(backend):
    single, runs = standard_runs()
    for result in [single] if backend == "single" else runs[backend]:
        assert losses(result["resumed"]) == losses(result["steps"][3:])
    head = single if backend == "single" else runs[backend][0]
    assert head["resumed_final_digest"] == head["final_digest"]
    assert head["saved_digest"] != head["final_digest"]


def fsdp_checkpoint() -> tuple[Path, list[float]]:
    """The 2-rank fsdp checkpoint at step 3 and the 2-rank run's losses after it."""
    _, runs = standard_runs()
    return workdir() / "ckpt" / "fsdp", losses(runs["fsdp"][0]["steps"][3:])


@pytest.mark.parametrize("backend", ["single", "fsdp"])
def test_two_rank_fsdp_checkpoint_continues_on_one_rank(backend):
    ckpt, two_rank = fsdp_checkpoint()
    result = launch(1, backend, "--steps", "6", "--load-from", str(ckpt), "--load-step", "3")[0][0]
    assert result["world_size"] == 1
    assert_close_losses(losses(result["steps"]), two_rank, f"{backend} on 1 rank from a 2-rank fsdp checkpoint")


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_two_rank_zero_checkpoint_continues_on_one_rank(stage):
    # Another world size goes through DeepSpeed's universal checkpoint format, converted into the checkpoint once.
    _, runs = standard_runs()
    spec = f"deepspeed:{stage}"
    ckpt = workdir() / "ckpt" / spec.replace(":", "_")
    result = launch(1, spec, "--steps", "6", "--load-from", str(ckpt), "--load-step", "3")[0][0]
    assert result["world_size"] == 1 and (ckpt / "universal" / "latest_universal").is_file()
    assert_close_losses(losses(result["steps"]), losses(runs[spec][0]["steps"][3:]), f"ZeRO-{stage} on 1 rank")


def test_two_rank_fsdp_checkpoint_continues_on_four_ranks():
    ckpt, two_rank = fsdp_checkpoint()
    ranks = launch(4, "fsdp,ddp", "--steps", "6", "--load-from", str(ckpt), "--load-step", "3")
    for rank in ranks:
        for result in rank:
            assert result["world_size"] == 4
            assert_close_losses(losses(result["steps"]), two_rank, f"{result['backend']} on 4 ranks")


def test_activation_checkpointing_keeps_the_losses():
    single, _ = standard_runs()
    ranks = launch(2, "fsdp,deepspeed:3", "--steps", "2", "--ac-every", "1")
    for result in ranks[0]:
        assert result["checkpointed_blocks"] == 2
        assert_close_losses(losses(result["steps"]), losses(single["steps"][:2]), result["backend"])


# --- acceptance: the real `ember pretrain` CLI under torchrun -------------------------------------------------

CLI_STEPS = 20
CLI_BACKENDS = {"ddp": (), "fsdp": (), "deepspeed:1": ("train.zero_stage=1",), "deepspeed:2": ("train.zero_stage=2",),
                "deepspeed:3": ("train.zero_stage=3",)}


@pytest.fixture(scope="module")
def cli_config(small_dataset, tmp_path_factory):
    from pretrain_runs import pretrain, write_config

    root = tmp_path_factory.mktemp("cli-parity")
    config = write_config(root / "run.yaml", small_dataset, root / "single", max_steps=CLI_STEPS, log_every=1)
    pretrain(config)
    return config, root


@pytest.mark.parametrize("backend", list(CLI_BACKENDS))
def test_cli_backends_match_single_process_for_20_steps(cli_config, backend):
    from pretrain_runs import pretrain, train_losses

    config, root = cli_config
    run_dir = root / backend.replace(":", "_")
    name = backend.partition(":")[0]
    pretrain(config, f"run_dir={run_dir}", f"train.backend={name}", *CLI_BACKENDS[backend], nproc=2)
    single, parallel = train_losses(root / "single"), train_losses(run_dir)
    assert sorted(single) == sorted(parallel) == list(range(1, CLI_STEPS + 1))
    assert single[CLI_STEPS] < single[1] - 0.3  # it learns
    for step in single:
        assert abs(parallel[step] - single[step]) <= REL_TOL * abs(single[step]), f"{backend} step {step}"


def test_compiled_checkpointed_fsdp_blocks_keep_the_losses():
    # The one CPU test with torch.compile (~40 s of compilation): compile per block, then every 2nd block
    # checkpointed, then sharded, must still train like the plain single process.
    single, _ = standard_runs()
    ranks = launch(2, "fsdp", "--steps", "2", "--compile", "--ac-every", "2")
    for result in (rank[0] for rank in ranks):
        assert result["checkpointed_blocks"] == 1
        assert_close_losses(losses(result["steps"]), losses(single["steps"][:2]), "compiled fsdp")


def test_ddp_syncs_the_last_micro_batch_even_when_the_loop_splits_otherwise():
    # The config says 2 micro batches per rank, the loop runs 1 of 4: DDP's forward was told not to sync,
    # so the backend must all-reduce after the last backward itself.
    single, _ = standard_runs()
    ranks = launch(2, "ddp", "--steps", "2", "--loop-micro-batch", "4")
    for result in (rank[0] for rank in ranks):
        assert_close_losses(losses(result["steps"]), losses(single["steps"][:2]), "ddp with another split")


@pytest.mark.parametrize("arch", ["qwen2", "gpt_neox", "mixtral"])
def test_other_architectures_shard_like_one_process(arch):
    # Other HF block and init layouts (biases, parallel residual, experts) through fsdp and ZeRO-3.
    jobs = [f"{b}@{a}" for a in ("qwen2", "gpt_neox", "mixtral") for b in ("fsdp", "deepspeed:3")]
    single = {r["backend"]: r for r in launch(1, "single@qwen2,single@gpt_neox,single@mixtral", "--steps", "2")[0]}
    parallel = {r["backend"]: r for r in launch(2, ",".join(jobs), "--steps", "2")[0]}
    reference = single[f"single@{arch}"]
    for backend in ("fsdp", "deepspeed:3"):
        result = parallel[f"{backend}@{arch}"]
        assert result["init_digest"] == reference["init_digest"], backend
        assert result["param_groups"] == reference["param_groups"], backend
        assert_close_losses(losses(result["steps"]), losses(reference["steps"]), f"{backend} {arch}")
