"""AdamW parameter groups: norms and biases never decayed, embeddings per `decay_embeddings`."""

from __future__ import annotations

import torch

from ember.pretrain.config import ModelConfig, TrainConfig
from ember.pretrain.model import build_meta_model, init_weights
from ember.pretrain.optim import build_optimizer, split_decay_groups

TINY = dict(hidden_size=32, num_layers=2, num_heads=4, ffn_hidden_size=64, vocab_size=128, max_seq_len=64)


def model_of(arch: str = "llama", **kw):
    cfg = ModelConfig(arch=arch, **{**TINY, **kw})
    model = build_meta_model(cfg)
    model.to_empty(device="cpu")
    init_weights(model, cfg, seed=0)
    return model


def test_norms_biases_and_embeddings_are_not_decayed_by_default():
    decay, no_decay = split_decay_groups(model_of(), decay_embeddings=False)
    assert "model.embed_tokens.weight" in no_decay
    assert "lm_head.weight" in decay  # an untied head is an ordinary matrix
    assert any(n.endswith("input_layernorm.weight") for n in no_decay)
    assert "model.norm.weight" in no_decay
    assert all(n.endswith(("proj.weight", "lm_head.weight")) for n in decay)
    assert not set(decay) & set(no_decay)


def test_decay_embeddings_moves_them_to_the_decayed_group():
    decay, no_decay = split_decay_groups(model_of(), decay_embeddings=True)
    assert "model.embed_tokens.weight" in decay
    assert all(n.endswith("norm.weight") for n in no_decay)


def test_tied_head_is_one_embedding_parameter():
    model = model_of(tie_embeddings=True)
    decay, no_decay = split_decay_groups(model, decay_embeddings=False)
    assert "lm_head.weight" not in decay + no_decay
    assert "model.embed_tokens.weight" in no_decay
    assert len(decay) + len(no_decay) == len(list(model.parameters()))


def test_biases_are_not_decayed():
    decay, no_decay = split_decay_groups(model_of("gpt_neox"), decay_embeddings=False)
    biases = [n for n in decay + no_decay if n.endswith(".bias")]
    assert biases and set(biases) <= set(no_decay)


def test_optimizer_groups_carry_the_decay_and_cover_every_parameter():
    model = model_of()
    opt = build_optimizer(model, TrainConfig(weight_decay=0.1, lr=1e-3))
    by_name = {g["group"]: g for g in opt.param_groups}
    assert by_name["decay"]["weight_decay"] == 0.1 and by_name["no_decay"]["weight_decay"] == 0.0
    covered = {id(p) for g in opt.param_groups for p in g["params"]}
    assert covered == {id(p) for p in model.parameters()}
    assert opt.defaults["fused"] is True  # torch >= 2.4 has a fused AdamW kernel on CPU too


def test_weight_decay_applies_to_matrices_only():
    model = model_of()
    opt = build_optimizer(model, TrainConfig(weight_decay=0.5, lr=1e-2))
    norm, down = model.model.norm.weight, model.model.layers[0].mlp.down_proj.weight
    norm_before, down_before = norm.detach().clone(), down.detach().clone()
    for p in model.parameters():  # zero gradients: the Adam update is 0, only weight decay can move a weight
        p.grad = torch.zeros_like(p)
    opt.step()
    assert torch.equal(norm, norm_before)
    torch.testing.assert_close(down, down_before * (1 - 1e-2 * 0.5))
