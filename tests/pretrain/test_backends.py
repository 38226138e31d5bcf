"""The backend interface: config translation for DeepSpeed, gradient clipping, the non-finite skip, offline
weight loading from DCP and ZeRO checkpoints, and clear errors."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent / "backend_scripts"))
from backend_runs import ALL_BACKENDS, launch, losses, standard_runs, workdir  # noqa: E402

from ember.config import validate
from ember.errors import UserError
from ember.pretrain.backends import build_backend, load_full_weights
from ember.pretrain.backends.zero_config import deepspeed_config
from ember.pretrain.distributed import DistEnv
from ember.pretrain.optim import build_optimizer
from ember.run_config import RunConfig

TINY_MODEL = {"arch": "llama", "hidden_size": 32, "num_layers": 2, "num_heads": 4, "ffn_hidden_size": 64,
              "vocab_size": 128, "max_seq_len": 32}


def run_config(**train) -> RunConfig:
    return validate({"data": {"datasets": [{"path": "unused"}]}, "model": TINY_MODEL,
                     "train": {"seq_len": 16, "global_batch_size": 8, "micro_batch_size": 2, **train}}, RunConfig)


def state_digest(state):
    from train_steps import state_digest as digest

    return digest(state)


# --- DeepSpeed config translation --------------------------------------------------------------------------

def test_deepspeed_config_translates_the_recipe():
    cfg = run_config(backend="deepspeed", zero_stage=2, grad_clip=0.7)
    ds = deepspeed_config(cfg, world_size=2, device=torch.device("cpu"), num_params=10_000)
    assert ds["train_micro_batch_size_per_gpu"] == 2
    assert ds["gradient_accumulation_steps"] == 2
    assert ds["train_batch_size"] == 8
    assert ds["zero_optimization"]["stage"] == 2
    assert ds["gradient_clipping"] == 0.7
    assert "bf16" not in ds and "fp16" not in ds  # fp32 on CPU
    assert "offload_optimizer" not in ds["zero_optimization"]
    # Buckets follow the model's size, not DeepSpeed's 2 GB default.
    assert ds["zero_optimization"]["reduce_bucket_size"] == 1 << 20


def test_deepspeed_config_offload_bf16_and_user_keys_on_top():
    cfg = run_config(backend="deepspeed", zero_stage=3, cpu_offload=True,
                     deepspeed={"zero_optimization": {"reduce_bucket_size": 1234}, "steps_per_print": 10})
    ds = deepspeed_config(cfg, world_size=4, device=torch.device("cuda", 0), num_params=10_000)
    zero = ds["zero_optimization"]
    assert zero["offload_optimizer"] == {"device": "cpu"} and zero["offload_param"] == {"device": "cpu"}
    assert zero["stage"] == 3 and zero["reduce_bucket_size"] == 1234  # merged, not replaced
    assert ds["steps_per_print"] == 10
    assert ds["bf16"] == {"enabled": True}  # GPU + precision auto
    assert ds["gradient_accumulation_steps"] == 1


def test_global_batch_that_does_not_split_is_a_user_error():
    cfg = run_config(global_batch_size=10, micro_batch_size=4)
    with pytest.raises(UserError, match="does not split"):
        cfg.train.accumulation_steps(2)


# --- single process, in this process ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def single_backend():
    cfg = run_config(backend="single", grad_clip=0.5)
    return build_backend(cfg, lambda m: build_optimizer(m, cfg.train))


def backward_once(backend, seed=0):
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, 128, (2, 17), generator=gen)
    logits = backend.model(input_ids=tokens[:, :-1]).logits
    loss = F.cross_entropy(logits.reshape(-1, 128), tokens[:, 1:].reshape(-1))
    backend.backward(loss, last_micro_batch=True)


def test_clip_grad_norm_measures_then_clips(single_backend):
    b = single_backend
    backward_once(b)
    grads = [p.grad.clone() for p in b.module.parameters()]
    expected = torch.linalg.vector_norm(torch.stack([g.norm() for g in grads])).item()
    assert b.clip_grad_norm(0.0) == pytest.approx(expected, rel=1e-6)  # max_norm 0: only measure
    assert all(torch.equal(g, p.grad) for g, p in zip(grads, b.module.parameters()))
    max_norm = expected / 2
    assert b.clip_grad_norm(max_norm) == pytest.approx(expected, rel=1e-6)  # returns the pre-clip norm
    clipped = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in b.module.parameters()])).item()
    assert clipped == pytest.approx(max_norm, rel=1e-4)
    b.skip_step()
    assert all(p.grad is None for p in b.module.parameters())


def test_full_state_dict_has_hf_names(single_backend):
    from ember.pretrain.model import build_meta_model

    full = single_backend.full_state_dict()
    cfg = run_config()
    assert set(full) == set(build_meta_model(cfg.model).state_dict())
    assert all(t.dtype == torch.float32 and t.device.type == "cpu" for t in full.values())


def test_load_from_a_folder_without_checkpoint_is_a_user_error(single_backend, tmp_path):
    with pytest.raises(UserError, match="metadata"):
        single_backend.load(tmp_path)
    with pytest.raises(UserError, match="neither"):
        load_full_weights(tmp_path)


def test_single_backend_refuses_several_processes(monkeypatch):
    cfg = run_config(backend="single")
    # As if torchrun had started 2 processes: rank 0 of 2.
    monkeypatch.setattr("ember.pretrain.backends.init_distributed", lambda: DistEnv(0, 2, 0, torch.device("cpu")))
    with pytest.raises(UserError, match="single"):
        build_backend(cfg, lambda m: build_optimizer(m, cfg.train))


# --- distributed: non-finite skip and offline weights ----------------------------------------------------------

@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("backend", ["single", *ALL_BACKENDS.split(",")])
def test_nan_on_one_rank_skips_the_step_everywhere_without_touching_state(backend):
    single, runs = standard_runs()
    results = [single] if backend == "single" else runs[backend]
    for rank, result in enumerate(results):
        poisoned = result["steps"][2]
        assert poisoned["skipped"] and math.isnan(poisoned["loss"]), (backend, rank)
        assert result["optimizer_unchanged_by_skip"], (backend, rank)
        assert all(math.isfinite(s["loss"]) and not s["skipped"] for i, s in enumerate(result["steps"]) if i != 2)
    assert results[0]["weights_unchanged_by_skip"]


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("backend", ["single", *ALL_BACKENDS.split(",")])
def test_load_full_weights_offline_equals_the_saved_weights(backend):
    single, runs = standard_runs()
    result = single if backend == "single" else runs[backend][0]
    full = load_full_weights(workdir() / "ckpt" / backend.replace(":", "_"))
    assert state_digest(full) == result["saved_digest"]


@pytest.mark.slow
@pytest.mark.distributed
def test_tied_embeddings_shard_and_load_back():
    single = launch(1, "single", "--tie", "--steps", "3", "--save-at", "2", "--ckpt-root", str(workdir() / "tied"))[0][0]
    ranks = launch(2, "fsdp,deepspeed:3", "--tie", "--steps", "3", "--save-at", "2", "--ckpt-root", str(workdir() / "tied"))
    for result in ranks[0]:
        assert result["init_digest"] == single["init_digest"]
        for got, want in zip(losses(result["steps"]), losses(single["steps"])):
            assert abs(got - want) <= 1e-4 * want, result["backend"]
        full = load_full_weights(workdir() / "tied" / result["backend"].replace(":", "_"))
        assert torch.equal(full["lm_head.weight"], full["model.embed_tokens.weight"])


class Payload:
    """Stands for any class a tampered checkpoint could make the unpickler build."""


def test_deepspeed_checkpoint_files_load_weights_only(tmp_path):
    from ember.pretrain.backends.safe_load import weights_only_torch_load

    original = torch.load
    good, bad = tmp_path / "good.pt", tmp_path / "bad.pt"
    torch.save({"w": torch.ones(2)}, good)
    torch.save({"w": torch.ones(2), "extra": Payload()}, bad)
    with weights_only_torch_load(tmp_path):
        # DeepSpeed passes weights_only=False; it is overridden.
        assert torch.equal(torch.load(good, weights_only=False)["w"], torch.ones(2))
    with pytest.raises(UserError, match="Payload"):
        with weights_only_torch_load(tmp_path):
            torch.load(bad, weights_only=False)
    assert torch.load is original  # restored, also after the error


class Exploit:
    def __reduce__(self):
        return (print, ("unpickled!",))


def test_dcp_metadata_is_read_without_arbitrary_unpickling(single_backend, tmp_path):
    import pickle

    single_backend.save(tmp_path / "ckpt")
    full = load_full_weights(tmp_path / "ckpt")  # DCP's own metadata classes are allowed
    assert state_digest(full) == state_digest(single_backend.full_state_dict())
    single_backend.load(tmp_path / "ckpt")
    (tmp_path / "ckpt" / ".metadata").write_bytes(pickle.dumps(Exploit()))
    with pytest.raises(UserError, match="builtins.print"):
        load_full_weights(tmp_path / "ckpt")
    with pytest.raises(UserError, match="builtins.print"):
        single_backend.load(tmp_path / "ckpt")
