"""Parameter counts against built models, FLOPs against a hand count, memory scaling by backend and world size,
the activation formula against the tensors autograd really saves, and the `ember estimate` command."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from ember_cli import run_ember

import ember
from ember.config import load_config
from ember.pretrain import accounting
from ember.pretrain.config import ModelConfig
from ember.pretrain.fused_loss import enable_fused_loss
from ember.pretrain.model import build_meta_model, init_weights
from ember.run_config import RunConfig

CONFIGS = Path(ember.__file__).parent / "configs"
TINY = str(CONFIGS / "pretrain" / "tiny.yaml")
SMALL = dict(hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, ffn_hidden_size=64, vocab_size=97)
VARIANTS = [
    dict(arch="llama"),
    dict(arch="llama", tie_embeddings=True),
    dict(arch="llama", hf_overrides={"attention_bias": True, "mlp_bias": True, "head_dim": 16}),
    dict(arch="mistral"),
    dict(arch="qwen2"),
    dict(arch="gpt_neox", num_kv_heads=4),
    dict(arch="mixtral", hf_overrides={"num_local_experts": 4, "num_experts_per_tok": 2}),
    dict(arch="gpt2", num_kv_heads=4),  # not in the formula table: counted on a meta build
]


def model_cfg(**kw) -> ModelConfig:
    return ModelConfig(**{**SMALL, **kw})


@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: f"{v['arch']}-{sorted(v)}")
def test_counts_equal_the_built_model(variant):
    cfg = model_cfg(**variant)
    model = build_meta_model(cfg)
    counts = accounting.count_params(cfg)
    assert counts["total"] == sum(p.numel() for p in model.parameters())
    embed = model.get_input_embeddings().weight
    head = model.get_output_embeddings().weight
    assert counts["embedding"] == embed.numel() + (0 if head is embed else head.numel())
    assert counts["non_embedding"] == counts["total"] - counts["embedding"]


def test_flops_per_token_by_hand():
    cfg = model_cfg()  # hidden 32, 2 layers, 4 heads of 8, 2 kv heads, ffn 64, vocab 97, untied
    attention = 32 * 32 + 2 * (32 * 16) + 32 * 32  # q, k, v, o
    mlp = 3 * 32 * 64  # gate, up, down
    head = 97 * 32
    matmul = 2 * (attention + mlp) + head
    assert accounting.matmul_params_per_token(cfg) == matmul == 21536
    assert accounting.flops_per_token(cfg, 16) == 6 * 21536 + 12 * 2 * 32 * 16 == 141504


def test_moe_flops_count_active_experts_only():
    dense = model_cfg(arch="mistral")
    moe = model_cfg(arch="mixtral", hf_overrides={"num_local_experts": 4, "num_experts_per_tok": 2})
    router = 2 * 4 * 32
    extra_expert = 2 * 3 * 32 * 64  # one more active expert per layer
    assert accounting.matmul_params_per_token(moe) == accounting.matmul_params_per_token(dense) + extra_expert + router
    # all four experts hold parameters, but only two run per token
    assert accounting.count_params(moe)["total"] > accounting.matmul_params_per_token(moe)


def test_seven_b_flops_near_six_n():
    cfg = load_config(CONFIGS / "models" / "llama-7b.yaml", ModelConfig, kind="models")
    n = accounting.count_params(cfg)["non_embedding"]
    per_token = accounting.flops_per_token(cfg, 4096)
    # 6N plus the head and the attention term: within 25% above 6 * non-embedding params at 4k context
    assert 6 * n < per_token < 1.25 * 6 * n


def run_cfg(*overrides: str) -> RunConfig:
    return load_config(TINY, RunConfig, ["model=llama-125m", *overrides])


def state(mem: dict) -> tuple[int, int, int]:
    return mem["weights"], mem["grads"], mem["optimizer"]


def test_fp32_single_holds_sixteen_bytes_per_param():
    cfg = run_cfg("train.precision=fp32")
    n = accounting.count_params(cfg.model)["total"]
    mem = accounting.memory_per_rank(cfg, 1, backend="single")
    assert state(mem) == (4 * n, 4 * n, 8 * n)
    assert mem["gathered"] == 0
    assert mem["total"] == 16 * n + mem["activations_full"]


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_sharding_divides_what_each_backend_shards(precision):
    cfg = run_cfg(f"train.precision={precision}")
    n = accounting.count_params(cfg.model)["total"]
    full = {b: state(accounting.memory_per_rank(cfg, 1, backend=b)) for b in accounting.BACKENDS}
    four = {b: state(accounting.memory_per_rank(cfg, 4, backend=b)) for b in accounting.BACKENDS}

    def quarter(x):
        return -(-x // 4)

    w, g, o = full["ddp"]
    assert four["ddp"] == four["single"] == full["ddp"]
    assert four["fsdp"] == (quarter(w), quarter(g), quarter(o))
    wz, gz, oz = full["zero1"]
    assert four["zero1"] == (wz, gz, quarter(oz))
    # ZeRO-2's gradient partition holds the parameters straddling its edge whole (bounded by the largest one).
    straddling = accounting.largest_param_numel(cfg.model) * gz // n
    assert four["zero2"] == (wz, quarter(gz) + straddling, quarter(oz))
    assert four["zero2"][1] < four["zero1"][1]
    w3, g3, o3 = full["zero3"]
    assert four["zero3"] == (quarter(w3), quarter(g3), quarter(o3))
    if precision == "bf16":  # DeepSpeed: bf16 params and grads, fp32 master + AdamW
        assert full["zero1"] == full["zero3"] == (2 * n, 2 * n, 12 * n)
    else:  # fp32: ZeRO-1/2 keep an fp32 master copy beside the weights; ember's ZeRO-3 makes them one
        assert full["zero1"] == (4 * n, 4 * n, 12 * n) and full["zero3"] == full["ddp"] == (4 * n, 4 * n, 8 * n)


def test_world_size_two_halves_fsdp_and_zero3_state():
    cfg = run_cfg("train.precision=fp32")
    for backend in ("fsdp", "zero3"):
        one, two = (accounting.memory_per_rank(cfg, ws, backend=backend) for ws in (1, 2))
        assert sum(state(two)) == pytest.approx(sum(state(one)) / 2, abs=4)
        assert two["gathered"] > 0 and one["gathered"] == 0
        assert two["activations"] == one["activations"]  # activations do not shard with data parallelism


def test_configured_backend_and_checkpointing_are_used():
    cfg = run_cfg("train.backend=deepspeed", "train.zero_stage=2", "train.activation_checkpointing=true")
    mem = accounting.memory_per_rank(cfg, 2)
    assert mem == accounting.memory_per_rank(cfg, 2, backend="zero2")
    assert mem["activations"] == mem["activations_checkpointed"] < mem["activations_full"]


def test_cpu_offload_moves_state_to_host():
    cfg = run_cfg("train.backend=fsdp", "train.cpu_offload=true", "train.precision=fp32")
    mem = accounting.memory_per_rank(cfg, 2)
    n = accounting.count_params(cfg.model)["total"]
    assert state(mem) == (0, 0, 0) and mem["offloaded"] == 8 * n


def test_checkpointing_every_kth_block_lies_between():
    cfg = model_cfg(num_layers=8)
    full = accounting.activation_bytes(cfg, 2, 64, "fp32", False)
    every = [accounting.activation_bytes(cfg, 2, 64, "fp32", True, k) for k in (1, 2, 4)]
    assert every[0] < every[1] < every[2] < full
    assert accounting.activation_bytes(cfg, 4, 64, "fp32", False) == 2 * full  # linear in the micro-batch
    assert accounting.activation_bytes(cfg, 2, 64, "bf16", False) < full


@pytest.mark.parametrize("fused_loss", [False, True])
def test_activation_formula_matches_saved_tensors(fused_loss):
    # Sum the bytes autograd saves for backward in a real forward + loss, and compare with the formula.
    cfg = model_cfg(hidden_size=128, num_layers=4, num_heads=4, num_kv_heads=2, ffn_hidden_size=352, vocab_size=512)
    model = build_meta_model(cfg)
    model.to_empty(device="cpu")
    init_weights(model, cfg, 0)
    param_storages = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in param_storages:
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    batch, seq = 4, 64
    tokens = torch.randint(0, cfg.vocab_size, (batch, seq + 1), generator=torch.Generator().manual_seed(0))
    inputs, labels = tokens[:, :-1], tokens[:, 1:]
    logits_bytes = 0
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        if fused_loss:
            assert enable_fused_loss(model)
            model(input_ids=inputs, loss_labels=labels)
        else:
            logits = model(input_ids=inputs).logits  # (batch, seq, vocab), alive until the loss is reduced
            torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), labels.flatten())
            logits_bytes = logits.numel() * logits.element_size()
    measured = sum(saved.values()) + logits_bytes
    estimate = accounting.activation_bytes(cfg, batch, seq, "fp32", False, fused_loss=fused_loss)
    assert estimate == pytest.approx(measured, rel=0.15)


def test_estimate_command_prints_counts_and_memory():
    proc = run_ember("estimate", TINY, "--gpus", "8", "--set", "model=llama-7b",
                     "--set", "train.seq_len=4096", "--gpu-type", "H100")
    assert proc.returncode == 0, proc.stderr
    total = accounting.count_params(load_config(CONFIGS / "models" / "llama-7b.yaml", ModelConfig, kind="models"))["total"]
    assert f"{total:,}" in proc.stdout
    for word in ("zero3", "fsdp", "optimizer", "activations", "GiB", "tokens/s"):
        assert word in proc.stdout


@pytest.mark.parametrize("args, where", [(["--gpus", "0"], "--gpus"), (["--set", "train.nope=1"], "train.nope"),
                                         (["--gpu-type", "Voodoo5"], "--gpu-type")])
def test_estimate_bad_input_is_one_line_exit_2(args, where):
    proc = run_ember("estimate", TINY, *args)
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("error:") and where in proc.stderr
    assert "Traceback" not in proc.stderr


# ---------------------------------------------------------------- peak FLOP/s and MFU

@pytest.mark.parametrize("name, dtype, tflops", [
    ("NVIDIA H100 80GB HBM3", torch.bfloat16, 989.4),
    ("NVIDIA H100 PCIe", "bf16", 756.0),
    ("NVIDIA H100 NVL", "bf16", 835.5),
    ("NVIDIA H200", torch.bfloat16, 989.4),
    ("NVIDIA GH200 480GB", "bf16", 989.4),
    ("NVIDIA B200", "bf16", 2250.0),
    ("NVIDIA A100-SXM4-80GB", torch.float32, 19.5),
    ("NVIDIA A100 80GB PCIe", "bf16", 312.0),
    ("NVIDIA L4", "bf16", 121.0),
    ("NVIDIA L40S", "bf16", 362.1),
    ("NVIDIA A10", "fp32", 31.2),
    ("NVIDIA GeForce RTX 4090", "bf16", 165.2),
])
def test_gpu_table_matches_device_names(name, dtype, tflops):
    from ember.pretrain.peak import gpu_peak_flops

    assert gpu_peak_flops(name, dtype) == pytest.approx(tflops * 1e12)


def test_unknown_gpu_or_dtype_has_no_peak():
    from ember.pretrain.peak import gpu_peak_flops, mfu

    assert gpu_peak_flops("NVIDIA A10G", "bf16") is None  # not the A10: must not match it
    assert gpu_peak_flops("Tesla V100-SXM2-16GB", torch.bfloat16) is None  # no bf16 on Volta
    assert mfu(1000.0, 1e9, None) is None


def test_cpu_peak_is_measured_once_per_process():
    import time

    from ember.pretrain.peak import device_peak_flops, mfu

    first = device_peak_flops("cpu", torch.float32)
    assert 1e8 < first < 1e14  # some plausible FLOP/s of one CPU, far from 0 or inf
    start = time.perf_counter()
    assert device_peak_flops(torch.device("cpu")) == first  # cached: same number
    assert time.perf_counter() - start < 0.05
    assert mfu(2000.0, first / 4000.0, first) == pytest.approx(0.5)
    assert mfu(2000.0, first / 4000.0, first, num_devices=2) == pytest.approx(0.25)


def test_peak_override_from_environment(monkeypatch):
    from ember.pretrain.peak import device_peak_flops

    monkeypatch.setenv("EMBER_PEAK_FLOPS", "1.5e12")
    assert device_peak_flops("cpu") == 1.5e12
