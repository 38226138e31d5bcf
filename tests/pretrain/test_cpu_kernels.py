"""oneDNN kernels for fp32 CPU training (linear layers, causal attention) against torch's, and when they are used."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ember.errors import UserError
from ember.pretrain import cpu_matmul
from ember.pretrain.backends.parallelize import apply_model_techniques, uses_onednn
from ember.pretrain.config import TrainConfig
from ember.pretrain.fused_loss import has_fused_loss

sys.path.insert(0, str(Path(__file__).parent))
from test_model import ARCHS, materialised, tiny  # noqa: E402

needs_onednn = pytest.mark.skipif(not cpu_matmul.onednn_available(), reason="torch built without oneDNN")


@needs_onednn
@pytest.mark.parametrize("bias", [False, True])
def test_onednn_linear_equals_nn_linear(bias):
    torch.manual_seed(0)
    reference = nn.Linear(24, 40, bias=bias)
    ours = nn.Linear(24, 40, bias=bias)
    ours.load_state_dict(reference.state_dict())
    assert cpu_matmul.use_onednn_linears(nn.Sequential(ours)) == 1 and isinstance(ours, cpu_matmul.OneDNNLinear)
    x = torch.randn(3, 7, 24)
    x_ours, x_ref = x.clone().requires_grad_(), x.clone().requires_grad_()
    out, ref = ours(x_ours), reference(x_ref)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    grad = torch.randn_like(ref)
    out.backward(grad)
    ref.backward(grad)
    torch.testing.assert_close(x_ours.grad, x_ref.grad, rtol=1e-5, atol=1e-6)
    for a, b in zip(ours.parameters(), reference.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-5)


def test_kernel_choice_follows_the_config(monkeypatch):
    cpu = torch.device("cpu")
    assert not uses_onednn(TrainConfig(cpu_matmul="torch"), cpu)
    assert not uses_onednn(TrainConfig(cpu_matmul="onednn", compile=True), cpu)  # inductor picks its kernels
    assert not uses_onednn(TrainConfig(cpu_matmul="onednn", precision="bf16"), cpu)
    assert not uses_onednn(TrainConfig(cpu_matmul="onednn"), torch.device("cuda"))
    monkeypatch.setattr("ember.pretrain.backends.parallelize.onednn_by_default", lambda: True)
    assert uses_onednn(TrainConfig(), cpu)
    monkeypatch.setattr("ember.pretrain.backends.parallelize.onednn_available", lambda: False)
    with pytest.raises(UserError, match="train.cpu_matmul"):
        uses_onednn(TrainConfig(cpu_matmul="onednn"), cpu)


@needs_onednn
def test_techniques_on_a_meta_model_keep_parameter_names():
    from ember.pretrain.model import build_meta_model

    plain, model = build_meta_model(tiny()), build_meta_model(tiny())
    apply_model_techniques(model, TrainConfig(cpu_matmul="onednn"), torch.device("cpu"))
    assert has_fused_loss(model) and model.config._attn_implementation == "ember_onednn"
    assert isinstance(model.model.layers[0].mlp.down_proj, cpu_matmul.OneDNNLinear)
    assert list(model.state_dict()) == list(plain.state_dict())


@needs_onednn
@pytest.mark.parametrize("kv_heads", [4, 2])
def test_onednn_attention_equals_causal_sdpa_in_float64(kv_heads):
    from ember.pretrain.cpu_attention import _CausalAttention

    gen = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, 33, 16, generator=gen, dtype=torch.float64)
    k, v = (torch.randn(2, kv_heads, 33, 16, generator=gen, dtype=torch.float64) for _ in range(2))
    ours = [t.float().requires_grad_() for t in (q, k, v)]
    ref = [t.clone().requires_grad_() for t in (q, k, v)]
    out = _CausalAttention.apply(*ours, 0.25)
    expected = F.scaled_dot_product_attention(*ref, is_causal=True, scale=0.25, enable_gqa=True)
    grad = torch.randn(expected.shape, generator=gen, dtype=torch.float64)
    out.backward(grad.float())
    expected.backward(grad)
    torch.testing.assert_close(out.double(), expected, rtol=0, atol=2e-6)
    for a, b in zip(ours, ref):  # key and value gradients summed over the query heads that share them
        torch.testing.assert_close(a.grad.double(), b.grad, rtol=0, atol=1e-5)


@needs_onednn
@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_model_on_onednn_kernels_matches_the_plain_model(arch, monkeypatch):
    from ember.pretrain.cpu_attention import _CausalAttention

    calls = []
    original = _CausalAttention.apply
    monkeypatch.setattr(_CausalAttention, "apply", lambda *args: calls.append(1) or original(*args))
    cfg = tiny(arch)
    reference, model = materialised(cfg), materialised(cfg)
    apply_model_techniques(model, TrainConfig(cpu_matmul="onednn", fused_loss=False), torch.device("cpu"))
    tokens = torch.randint(0, cfg.vocab_size, (2, 16), generator=torch.Generator().manual_seed(2))
    out, expected = model(input_ids=tokens).logits, reference(input_ids=tokens).logits
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    assert len(calls) == cfg.num_layers  # the oneDNN attention ran, not the sdpa fallback
    out.square().mean().backward()
    expected.square().mean().backward()
    grads = dict(reference.named_parameters())
    for name, param in model.named_parameters():
        torch.testing.assert_close(param.grad, grads[name].grad, rtol=1e-4, atol=1e-6, msg=name)
    # Padding needs a mask: that input takes the sdpa path and still matches.
    mask = torch.ones_like(tokens)
    mask[0, :5] = 0
    torch.testing.assert_close(model(input_ids=tokens, attention_mask=mask).logits,
                               reference(input_ids=tokens, attention_mask=mask).logits, rtol=1e-5, atol=1e-5)


@needs_onednn
def test_attention_that_is_not_plain_causal_takes_the_sdpa_path(monkeypatch):
    from ember.pretrain.cpu_attention import _CausalAttention, onednn_attention_forward

    monkeypatch.setattr(_CausalAttention, "apply", lambda *args: pytest.fail("oneDNN path taken"))
    gen = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, 2, 8, 4, generator=gen) for _ in range(3))
    bidirectional = nn.Module()
    bidirectional.is_causal = False
    out, _ = onednn_attention_forward(bidirectional, q, k, v, None)
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v).transpose(1, 2))
    window, _ = onednn_attention_forward(nn.Module(), q, k, v, None, sliding_window=4)  # window < sequence
    assert window.shape == (1, 8, 2, 4)
