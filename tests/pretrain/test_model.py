"""Model building and weight init: every supported architecture builds from a ModelConfig and trains a step."""

from __future__ import annotations

import math

import pytest
import torch

from ember.errors import UserError
from ember.pretrain.config import ModelConfig
from ember.pretrain.model import build_meta_model, hf_config, init_weights, is_residual_output

ARCHS = {
    "llama": {},
    "gpt_neox": {"num_kv_heads": 4},
    "qwen2": {},
    "mistral": {},
    "mixtral": {"hf_overrides": {"num_local_experts": 4, "num_experts_per_tok": 2}},
}


def tiny(arch: str = "llama", **kw) -> ModelConfig:
    fields = dict(arch=arch, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, ffn_hidden_size=64,
                  vocab_size=97, max_seq_len=64)
    fields.update(ARCHS.get(arch, {}))
    fields.update(kw)
    return ModelConfig(**fields)


def materialised(cfg: ModelConfig, seed: int = 0) -> torch.nn.Module:
    model = build_meta_model(cfg)
    model.to_empty(device="cpu")
    init_weights(model, cfg, seed)
    return model


@pytest.mark.parametrize("arch", sorted(ARCHS))
@pytest.mark.parametrize("init", ["scaled", "hf"])
def test_each_arch_builds_and_trains_a_step(arch, init):
    cfg = tiny(arch, init=init)
    meta = build_meta_model(cfg)
    assert all(p.is_meta for p in meta.parameters())
    model = materialised(cfg)
    assert model.config.model_type == arch
    tokens = torch.randint(0, cfg.vocab_size, (2, 17), generator=torch.Generator().manual_seed(0))
    out = model(input_ids=tokens[:, :-1], labels=tokens[:, 1:])
    assert out.logits.shape == (2, 16, cfg.vocab_size)
    # Untrained: loss near log(vocab) (uniform predictions), not inf/nan from garbage memory.
    assert abs(out.loss.item() - math.log(cfg.vocab_size)) < 0.5
    out.loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    torch.optim.AdamW(model.parameters(), lr=1e-3).step()
    assert any(not torch.equal(before[n], p) for n, p in model.named_parameters())


@pytest.mark.parametrize("init", ["scaled", "hf"])
def test_same_seed_gives_identical_weights_other_seed_differs(init):
    cfg = tiny(init=init)
    a, b, c = (materialised(cfg, seed) for seed in (7, 7, 8))
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not torch.equal(sa["model.embed_tokens.weight"], sc["model.embed_tokens.weight"])


def test_init_overwrites_whatever_memory_held():
    # to_empty leaves arbitrary memory; a model filled with junk must end with the same weights.
    cfg = tiny()
    clean = materialised(cfg, 5)
    dirty = build_meta_model(cfg)
    dirty.to_empty(device="cpu")
    with torch.no_grad():
        for t in list(dirty.parameters()) + list(dirty.buffers()):
            t.fill_(float("nan"))
    init_weights(dirty, cfg, 5)
    ref_buffers = dict(clean.named_buffers())
    for name, t in list(dirty.named_parameters()) + list(dirty.named_buffers()):
        src = dict(clean.named_parameters()).get(name, ref_buffers.get(name))
        assert torch.equal(t, src), name


def test_scaled_init_statistics():
    num_layers = 8
    cfg = tiny(hidden_size=256, num_layers=num_layers, num_heads=4, num_kv_heads=4, ffn_hidden_size=512,
               vocab_size=1000, init_std=0.02)
    model = materialised(cfg, 1)
    params = dict(model.named_parameters())
    residual_std = 0.02 / math.sqrt(2 * num_layers)
    for name, p in params.items():
        if p.ndim == 1:
            assert torch.all(p == 1.0), name  # norm scales
        elif is_residual_output(name):
            assert name.endswith(("o_proj.weight", "down_proj.weight"))
            assert p.std().item() == pytest.approx(residual_std, rel=0.05), name
        else:
            assert p.std().item() == pytest.approx(0.02, rel=0.05), name
        if p.ndim > 1:
            assert abs(p.mean().item()) < 0.002, name
    assert sum(is_residual_output(n) for n in params) == 2 * num_layers


def test_gpt_neox_residual_and_biases():
    cfg = tiny("gpt_neox", num_layers=3)
    params = dict(materialised(cfg).named_parameters())
    residual = sorted(n for n in params if is_residual_output(n) and n.endswith("weight"))
    assert residual == sorted(f"gpt_neox.layers.{i}.{m}.weight" for i in range(3) for m in ("attention.dense", "mlp.dense_4h_to_h"))
    assert all(torch.all(p == 0) for n, p in params.items() if n.endswith("bias") and "norm" not in n)


def test_tied_embeddings_share_storage_after_init():
    cfg = tiny(tie_embeddings=True)
    model = materialised(cfg)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert model.lm_head.weight.std().item() == pytest.approx(0.02, rel=0.1)


def test_hf_config_maps_fields():
    cfg = tiny(rope_theta=5e5, norm_eps=1e-6, hf_overrides={"attention_bias": True})
    hf = hf_config(cfg)
    assert (hf.hidden_size, hf.num_hidden_layers, hf.num_attention_heads, hf.num_key_value_heads) == (32, 2, 4, 2)
    assert (hf.intermediate_size, hf.vocab_size, hf.max_position_embeddings) == (64, 97, 64)
    assert hf.rope_parameters["rope_theta"] == 5e5 and hf.rms_norm_eps == 1e-6
    assert hf.attention_dropout == 0.0 and hf.attention_bias is True and hf.use_cache is False
    assert hf_config(tiny("gpt_neox")).layer_norm_eps == 1e-5
    assert hf_config(tiny("gpt_neox")).hidden_dropout == 0.0


def test_bad_arch_and_gqa_mismatch_are_user_errors():
    with pytest.raises(UserError, match="model.arch"):
        hf_config(tiny("no_such_arch"))
    with pytest.raises(UserError, match="num_kv_heads"):
        hf_config(tiny("gpt_neox", num_kv_heads=2))


def test_init_refuses_meta_model():
    cfg = tiny()
    with pytest.raises(ValueError, match="materialised"):
        init_weights(build_meta_model(cfg), cfg, 0)


@pytest.mark.parametrize("tie", [False, True])
def test_materialize_fixes_buffers_and_ties_for_loading(tie):
    from ember.pretrain.model import materialize

    cfg = tiny(tie_embeddings=tie)
    reference = materialised(cfg, 3)
    plain = build_meta_model(cfg)
    plain.to_empty(device="cpu")
    # the pitfall materialize exists for: to_empty unties shared weights
    assert plain.lm_head.weight is not plain.model.embed_tokens.weight
    loaded = materialize(build_meta_model(cfg), "cpu")
    assert (loaded.lm_head.weight is loaded.model.embed_tokens.weight) == tie
    loaded.load_state_dict(reference.state_dict())
    tokens = torch.randint(0, cfg.vocab_size, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=tokens).logits, reference(input_ids=tokens).logits)


def test_wrapper_prefixes_do_not_change_the_init():
    cfg = tiny()
    plain = materialised(cfg, 11)
    wrapped = torch.nn.Module()
    wrapped.module = build_meta_model(cfg)  # named like DDP's wrapper: "module.model.layers..."
    wrapped.module.to_empty(device="cpu")
    from ember.pretrain.model import _scaled_init

    _scaled_init(wrapped, cfg, 11)
    for (name, a), (_, b) in zip(plain.named_parameters(), wrapped.module.named_parameters()):
        assert torch.equal(a, b), name
