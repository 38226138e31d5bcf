"""The chunked LM head + cross-entropy against the plain logits path."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from ember.pretrain import cpu_matmul, fused_loss
from ember.pretrain.fused_loss import IGNORE_INDEX, enable_fused_loss, has_fused_loss, linear_cross_entropy
from ember.pretrain.step import causal_lm_loss

sys.path.insert(0, str(Path(__file__).parent))
from test_model import ARCHS, materialised, tiny  # noqa: E402

needs_onednn = pytest.mark.skipif(not cpu_matmul.onednn_available(), reason="torch built without oneDNN")


def reference_losses(hidden, weight, labels, z_loss):
    logits = hidden @ weight.t()  # (N, V)
    ce = F.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX)
    valid = labels != IGNORE_INDEX
    z = torch.logsumexp(logits, dim=-1)[valid].square().mean()
    return ce + z_loss * z, ce


def problem(dtype, rows=37, dim=16, vocab=50, seed=0):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(rows, dim, generator=gen, dtype=dtype)
    weight = torch.randn(vocab, dim, generator=gen, dtype=dtype) * 0.5
    labels = torch.randint(0, vocab, (rows,), generator=gen)
    labels[::5] = IGNORE_INDEX  # rows without a target take no part in the means
    return hidden, weight, labels


@pytest.fixture
def small_chunks(monkeypatch):
    """Chunks of 8 rows, so the problems here span several chunks and a ragged last one."""
    monkeypatch.setattr(fused_loss, "CHUNK_ELEMENTS", 8 * 50)
    monkeypatch.setattr(fused_loss, "MIN_CHUNK_ROWS", 1)


@pytest.mark.parametrize("z_loss", [0.0, 1e-2])
def test_loss_and_gradients_equal_the_logits_path_in_float64(small_chunks, z_loss):
    hidden, weight, labels = problem(torch.float64)
    ours_h, ours_w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    ref_h, ref_w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    loss, ce = linear_cross_entropy(ours_h, ours_w, labels, z_loss)
    ref_loss, ref_ce = reference_losses(ref_h, ref_w, labels, z_loss)
    (3.0 * loss).backward()  # a non-unit upstream gradient must scale the stored ones
    (3.0 * ref_loss).backward()
    torch.testing.assert_close(loss, ref_loss, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ce, ref_ce, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ours_h.grad, ref_h.grad, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(ours_w.grad, ref_w.grad, rtol=1e-10, atol=1e-12)
    assert not ce.requires_grad  # reported, not optimised


def test_without_grad_the_loss_is_the_same(small_chunks):
    hidden, weight, labels = problem(torch.float64)
    with torch.no_grad():
        loss, ce = linear_cross_entropy(hidden, weight, labels, 1e-2)
    ref_loss, ref_ce = reference_losses(hidden, weight, labels, 1e-2)
    torch.testing.assert_close((loss, ce), (ref_loss, ref_ce), rtol=1e-12, atol=1e-12)


def test_rows_without_targets_give_zero_loss_and_gradient():
    hidden, weight, _ = problem(torch.float32)
    hidden.requires_grad_()
    labels = torch.full((hidden.shape[0],), IGNORE_INDEX)
    loss, ce = linear_cross_entropy(hidden, weight, labels)
    loss.backward()
    assert loss.item() == 0.0 and ce.item() == 0.0
    assert torch.count_nonzero(hidden.grad) == 0


def test_bf16_autocast_computes_in_bf16_and_reduces_in_fp32():
    hidden, weight, labels = problem(torch.float32, rows=64, dim=32, vocab=128)
    hidden.requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, _ = linear_cross_entropy(hidden, weight, labels)
    loss.backward()
    ref_loss, _ = reference_losses(hidden.detach(), weight, labels, 0.0)
    assert loss.dtype == torch.float32 and hidden.grad.dtype == torch.float32
    assert abs(loss.item() - ref_loss.item()) < 2e-2 * ref_loss.item()


@needs_onednn
def test_onednn_matmuls_give_the_fp32_result(small_chunks):
    hidden, weight, labels = problem(torch.float32)
    ours_h, ref_h = hidden.clone().requires_grad_(), hidden.double().requires_grad_()
    ours_w, ref_w = weight.clone().requires_grad_(), weight.double().requires_grad_()
    loss, _ = linear_cross_entropy(ours_h, ours_w, labels, 1e-2, matmul_nt=cpu_matmul.onednn_matmul_nt)
    ref_loss, _ = reference_losses(ref_h, ref_w, labels, 1e-2)
    loss.backward()
    ref_loss.backward()
    torch.testing.assert_close(loss.double(), ref_loss, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(ours_h.grad.double(), ref_h.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ours_w.grad.double(), ref_w.grad, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_fused_model_forward_matches_logits_then_cross_entropy(arch):
    cfg = tiny(arch)
    reference = materialised(cfg)
    model = materialised(cfg)
    assert enable_fused_loss(model) and has_fused_loss(model) and not has_fused_loss(reference)
    tokens = torch.randint(0, cfg.vocab_size, (2, 17), generator=torch.Generator().manual_seed(1))
    inputs, labels = tokens[:, :-1], tokens[:, 1:]
    loss, ce = model(input_ids=inputs, loss_labels=labels, z_loss=1e-3)
    ref_loss, ref_ce = causal_lm_loss(reference(input_ids=inputs).logits, labels, 1e-3)
    loss.backward()
    ref_loss.backward()
    torch.testing.assert_close((loss, ce), (ref_loss, ref_ce), rtol=1e-6, atol=1e-6)
    grads = dict(reference.named_parameters())
    for name, param in model.named_parameters():
        torch.testing.assert_close(param.grad, grads[name].grad, rtol=1e-5, atol=1e-6, msg=name)
    # Without loss_labels it is the HF model: logits, same names, same state dict.
    torch.testing.assert_close(model(input_ids=inputs).logits, reference(input_ids=inputs).logits)
    assert list(model.state_dict()) == list(reference.state_dict())


def test_models_that_post_process_logits_keep_the_plain_forward():
    model = materialised(tiny())
    model.config.logit_scale = 0.5  # as Cohere's head does: logits are not head(hidden) any more
    assert not enable_fused_loss(model)
    assert not has_fused_loss(model) and "forward" not in vars(model)
