"""Decoder LLMs on the kernels, and the decoder rules' ops on their own: ``explain(backend="triton")`` equals the
reference path on every family (GQA, sliding windows, left padding, Gemma's sandwich norms, Phi-3's fused projections,
GPT-2) in float64 (TRITON_INTERPRET=1 on a CPU); the RMSNorm mode of the fused norm op against autograd; the rotary
embedding's gradient (against autograd) and z-rule (by hand, conservation); the gate product's rule; the LM head's
row-restricted rules against the full-matrix rules."""

import _decoders as D
import pytest
import torch
from _device import DEVICE, on_device
from _poison import nan_buffers

import transformer_lrp as tl
from transformer_lrp.ops import (
    gate_relevance,
    layernorm_relevance,
    linear_alpha1beta0_ref,
    linear_alpha1beta0_separate,
    linear_rows_relevance,
    rms_norm,
    rotary_apply,
    rotary_cos_sin,
    rotary_grad,
    rotary_relevance,
)


def _relative(a, b):
    return float((a.double() - b.double()).abs().max() / b.double().abs().max().clamp(min=1e-300))


@pytest.mark.parametrize("method", ["transformer_attribution", "gae", "rollout", "attention_gradcam", "full_lrp"])
@pytest.mark.parametrize("kind", ["llama", "mistral", "gemma3", "phi3", "gpt2"])
def test_triton_explain_equals_the_reference_path(kind, method, monkeypatch):
    if DEVICE.type == "cuda":
        pytest.skip("float64 attention runs the torch op on a GPU; the GPU tests compare float32 and bf16")
    model, inputs = on_device(D.causal_lm(kind)), on_device(D.batch())
    ref = tl.explain(model, inputs, method=method, backend="torch")
    with nan_buffers(monkeypatch):
        out = tl.explain(model, inputs, method=method, backend="triton")
    assert torch.equal(out.target, ref.target)
    assert _relative(out.relevance, ref.relevance) < 1e-10


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("offset", [0.0, 1.0], ids=["llama", "gemma"])
def test_rms_norm_mode_of_the_fused_norm_op(offset, backend, monkeypatch):
    """RMSNorm's gradient (the fused op against autograd on ``rms_norm``), the residual gradient added, and the
    relevance's clone and normalized-add split unchanged from LayerNorm's."""
    g = torch.Generator().manual_seed(0)
    u, v, dy, r, dres, rres = (torch.randn(2, 5, 24, generator=g, dtype=torch.float64).to(DEVICE) for _ in range(6))
    w = torch.randn(24, generator=g, dtype=torch.float64).to(DEVICE)
    with torch.enable_grad():
        leaf = (u + v).requires_grad_(True)
        y = rms_norm(leaf, w, 1e-6, offset, scale_in_float32=offset == 1.0)
        grad = torch.autograd.grad(y, leaf, dy)[0] + dres
    with nan_buffers(monkeypatch):
        d, r_u, r_v = layernorm_relevance(u, v, w, None, 1e-6, dy, r, dres, rres, backend=backend, rms=True,
                                          weight_offset=offset)
    assert _relative(d, grad) < 1e-12
    ref = layernorm_relevance(u, v, w, None, 1e-6, dy, r, dres, rres, backend="torch")  # LayerNorm's relevance
    assert _relative(r_u, ref[1]) < 1e-12 and _relative(r_v, ref[2]) < 1e-12
    # by hand: RMSNorm of x is x · rsqrt(mean(x²) + eps) · (w + offset)
    x = u + v
    by_hand = x * (x.pow(2).mean(-1, keepdim=True) + 1e-6).rsqrt() * (w + offset)
    torch.testing.assert_close(rms_norm(x, w, 1e-6, offset), by_hand)


@pytest.mark.parametrize("rotated", [8, 4], ids=["full", "partial"])
def test_rotary_gradient_and_relevance(rotated):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, 5, 8, generator=g, dtype=torch.float64)
    positions = torch.arange(5).expand(2, 5)
    inv_freq = 1.0 / (100.0 ** (torch.arange(0, rotated, 2, dtype=torch.float64) / rotated))
    cos, sin = rotary_cos_sin(positions, inv_freq, 1.0, torch.float64)
    # the map, by hand for one pair: (a, b) → (a cos − b sin, b cos + a sin)
    y = rotary_apply(x, cos, sin)
    a, b = x[..., 0], x[..., rotated // 2]
    c, s = cos[..., 0], sin[..., 0]
    torch.testing.assert_close(y[..., 0], a * c - b * s)
    torch.testing.assert_close(y[..., rotated // 2], b * c + a * s)
    if rotated < 8:
        assert torch.equal(y[..., rotated:], x[..., rotated:])
    # gradient: the transpose, against autograd
    gy = torch.randn(y.shape, generator=g, dtype=torch.float64)
    with torch.enable_grad():
        leaf = x.clone().requires_grad_(True)
        auto = torch.autograd.grad(rotary_apply(leaf, cos, sin), leaf, gy)[0]
    torch.testing.assert_close(rotary_grad(gy, cos, sin), auto)
    # relevance: the z-rule x ⊙ Mᵀ(R ⊘ y) conserves per row (a rotation has no bias)
    r = torch.randn(y.shape, generator=g, dtype=torch.float64)
    rx = rotary_relevance(x, cos, sin, r)
    torch.testing.assert_close(rx.sum(-1), r.sum(-1), rtol=1e-7, atol=1e-7)
    torch.testing.assert_close(rx[..., : rotated], (x * rotary_grad(r / (y + 1e-9), cos, sin))[..., :rotated])


def test_gate_product_rule():
    r = torch.randn(3, 7, dtype=torch.float64)
    half_a, half_b = gate_relevance(r)
    torch.testing.assert_close(half_a + half_b, r)
    assert torch.equal(half_a, half_b)
    none, all_ = gate_relevance(r, hold_gate=True)
    assert none is None and torch.equal(all_, r)


@pytest.mark.parametrize("rule", ["alpha1beta0", "separate"])
def test_lm_head_rows_equal_the_full_matrix_rule(rule):
    """Only the explained rows of a vocabulary-sized Linear carry relevance: the row-restricted rule equals the full
    rule on a one-hot (or ±1 contrast) start."""
    g = torch.Generator().manual_seed(2)
    x = torch.randn(4, 16, generator=g, dtype=torch.float64)
    weight = torch.randn(50, 16, generator=g, dtype=torch.float64)
    target, versus = torch.tensor([3, 7, 7, 49]), torch.tensor([1, 0, 2, 3])
    seed = torch.zeros(4, 50, dtype=torch.float64)
    seed[torch.arange(4), target] = 1
    seed[torch.arange(4), versus] = -1
    full = (linear_alpha1beta0_ref if rule == "alpha1beta0" else linear_alpha1beta0_separate)(x, weight, seed)
    columns = torch.stack([target, versus], 1)
    rows = linear_rows_relevance(x, weight[columns], torch.tensor([[1.0, -1.0]] * 4, dtype=torch.float64), rule)
    torch.testing.assert_close(rows, full)
