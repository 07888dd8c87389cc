"""The flash-style attention kernels (forward; backward with gradient, relevance and the head-reduced map) against
their reference (TRITON_INTERPRET=1 on CPU), the reference against hand-derived properties, the autograd.Function
and dispatch."""

import pytest
import torch
from _device import DEVICE, skip_fp64_attention_on_gpu
from _poison import nan_buffers

from transformer_lrp.ops.attention import (
    attention_av_relevance,
    attention_forward,
    attention_relevance,
    attention_relevance_ref,
    attention_weighted_map,
    lrp_attention,
)

# (B, H, NQ, NK, d): square, odd head counts and head dims, one or two query rows (the pooled top block),
# more keys than a tile, model-sized heads (64: the wide tiles and 8 warps, the narrower float64 ones), also with
# the pooled top block's one or two query rows
SHAPES = [(2, 3, 9, 9, 12), (1, 1, 1, 20, 5), (2, 5, 2, 37, 16), (1, 2, 70, 70, 8), (1, 2, 67, 67, 64),
          (2, 4, 1, 50, 64), (2, 3, 2, 37, 64)]
IDS = ["x".join(map(str, s)) for s in SHAPES]


def _inputs(shape, dtype, masked, seed=0):
    b, h, nq, nk, d = shape
    g = torch.Generator().manual_seed(seed)

    def rnd(*s):
        return torch.randn(*s, generator=g, dtype=torch.float64).to(DEVICE, dtype)

    q, k, v = rnd(b, h, nq, d), rnd(b, h, nk, d), rnd(b, h, nk, d)
    key_mask = None
    if masked:
        key_mask = torch.ones(b, nk, dtype=torch.bool, device=DEVICE)
        key_mask[-1, max(1, nk // 2):] = False  # right padding of the last sample (key 0 stays real)
    return q, k, v, key_mask, rnd(b, h, nq, d), rnd(b, h, nq, d), torch.rand(b, nq, generator=g).to(DEVICE, dtype)


def _close(out, ref, tol, name):
    assert out.dtype == ref.dtype and out.shape == ref.shape, name
    assert torch.isfinite(out).all(), f"{name}: non-finite (unwritten) entries"
    err = (out.double() - ref.double()).abs().max() / ref.double().abs().max().clamp(min=1e-30)
    assert err <= tol, f"{name}: relative error {err:.2e}"


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
@pytest.mark.parametrize("masked", [False, True], ids=["dense", "padded"])
@pytest.mark.parametrize("shape", SHAPES, ids=IDS)
def test_forward_matches_reference(shape, masked, dtype, monkeypatch):
    skip_fp64_attention_on_gpu(dtype)
    q, k, v, key_mask = _inputs(shape, dtype, masked)[:4]
    ref_o, ref_lse = attention_forward(q, k, v, 0.37, key_mask, backend="torch")
    with nan_buffers(monkeypatch):
        o, lse = attention_forward(q, k, v, 0.37, key_mask, backend="triton")
    tol = 1e-12 if dtype == torch.float64 else 2e-6
    _close(o, ref_o, tol, "O")
    _close(lse, ref_lse, tol, "lse")
    # the reference itself is softmax attention with padded keys at probability 0
    scores = (q.double() * 0.37) @ k.double().transpose(-1, -2)
    if key_mask is not None:
        scores = scores.masked_fill(~key_mask[:, None, None, :], float("-inf"))
    torch.testing.assert_close(ref_o.double(), scores.softmax(-1) @ v.double(), rtol=tol * 10, atol=tol * 10)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
@pytest.mark.parametrize("shape", SHAPES, ids=IDS)
@pytest.mark.parametrize(
    "setting",
    [
        dict(map_mode="transformer_attribution", mask_add=True, normalize_rows=False),
        dict(map_mode="transformer_attribution", mask_add=False, normalize_rows=True),
        dict(map_mode="gae", mask_add=False, normalize_rows=True),
        dict(map_mode="rollout", mask_add=False, normalize_rows=True),
        dict(map_mode=None, mask_add=True, mask_add_normalized=False),
        dict(map_mode="partial_lrp", mask_add=True, mask_add_normalized=False, normalize_rows=False),
    ],
    ids=["ta_maskadd", "ta_norm", "gae_norm", "rollout", "baseline_maskadd", "partial_lrp"],
)
def test_backward_matches_reference(shape, setting, dtype, monkeypatch):
    skip_fp64_attention_on_gpu(dtype)
    q, k, v, key_mask, d_o, r_o, roll = _inputs(shape, dtype, masked=True)
    o, lse = attention_forward(q, k, v, 0.37, key_mask, backend="torch")
    kw = dict(grad_out=d_o, rel_out=r_o, key_mask=key_mask, rollout=roll, want_map=True, **setting)
    if setting["map_mode"] is None:  # relevance only (the baselines' full LRP)
        kw.update(grad_out=None, rollout=None, want_map=False)
    if setting["map_mode"] in ("gae", "rollout"):
        kw["rel_out"] = None
    if setting["map_mode"] in ("rollout", "partial_lrp"):  # no gradient needed
        kw["grad_out"] = None
    ref = attention_relevance(q, k, v, o, lse, 0.37, backend="torch", **kw)
    with nan_buffers(monkeypatch):
        out = attention_relevance(q, k, v, o, lse, 0.37, backend="triton", **kw)
    assert set(out) == set(ref)
    if dtype == torch.float64:
        for name in ref:
            _close(out[name], ref[name], 1e-11, name)
        return
    # float32: R_Q, R_K divide by the scores (docs/method.md §2.6), and near-zero scores amplify rounding in any
    # implementation; so the kernel's error against float64 must stay within a few times the reference's own.
    ref64 = attention_relevance(*(x.double() for x in (q, k, v, o)), lse.double(), 0.37, backend="torch",
                                **{key: (val.double() if torch.is_tensor(val) and val.is_floating_point() else val)
                                   for key, val in kw.items()})
    for name in ref:
        own = (ref[name].double() - ref64[name]).abs().max() / ref64[name].abs().max()
        _close(out[name], ref64[name].to(dtype), max(4 * float(own), 3e-6), name)


def test_backward_map_only_and_gradient_only():
    """The reduced launches (the lowest block's map only; the gradient only) equal the reference's."""
    skip_fp64_attention_on_gpu(torch.float64)
    q, k, v, key_mask, d_o, r_o, roll = _inputs(SHAPES[0], torch.float64, masked=True)
    o, lse = attention_forward(q, k, v, 0.5, key_mask)
    cases = [dict(grad_out=d_o, rel_out=r_o, map_mode="transformer_attribution", rollout=roll, inputs=False),
             dict(grad_out=d_o, map_mode="gae", rollout=roll, normalize_rows=True, inputs=False),
             dict(grad_out=d_o)]
    expected_keys = [{"rollout_rows", "rollout_product"}] * 2 + [{"grad_query", "grad_key", "grad_value"}]
    for kw, keys in zip(cases, expected_keys):
        ref = attention_relevance(q, k, v, o, lse, 0.5, key_mask=key_mask, backend="torch", **kw)
        out = attention_relevance(q, k, v, o, lse, 0.5, key_mask=key_mask, backend="triton", **kw)
        assert set(ref) == set(out) == keys
        for name in keys:
            _close(out[name], ref[name], 1e-11, name)


def test_reference_rules_by_hand():
    """The reference's outputs against docs/method.md §2.6 written out on one tiny case, plus conservation."""
    q, k, v, _, d_o, r_o, roll = _inputs((1, 2, 4, 4, 3), torch.float64, masked=False)
    scale = 0.5
    o, lse = attention_forward(q, k, v, scale)
    out = attention_relevance_ref(q, k, v, o, lse, scale, grad_out=d_o, rel_out=r_o,
                                  map_mode="transformer_attribution", rollout=roll, want_map=True)
    a = ((q * scale) @ k.transpose(-1, -2)).softmax(-1)
    # R_A = A ⊙ (S Vᵀ)/2, R_V = V ⊙ (Aᵀ S)/2 with S = R_O / (O + eps)
    s = r_o / (o + 1e-9)
    r_a = a * (s @ v.transpose(-1, -2)) / 2
    torch.testing.assert_close(out["rel_value"], v * (a.transpose(-1, -2) @ s) / 2)
    # scores relevance = R_A (softmax identity); R_Q = Q ⊙ (T K)·scale/2 with T = R_A / (scale·QKᵀ + scale·eps)·scale
    dots = q @ k.transpose(-1, -2)
    t = r_a / (dots + 1e-9)
    torch.testing.assert_close(out["rel_query"], q * (t @ k) / 2)
    torch.testing.assert_close(out["rel_key"], k * (t.transpose(-1, -2) @ q) / 2)
    # conservation: Σ R_V = Σ R_A = ½ Σ R_O and Σ R_Q = Σ R_K = ½ Σ R_A (up to the rule's eps)
    half = 0.5 * (r_o * o / (o + 1e-9)).sum()
    torch.testing.assert_close(r_a.sum(), half)
    torch.testing.assert_close(out["rel_value"].sum(), half)
    for name in ("rel_query", "rel_key"):
        torch.testing.assert_close(out[name].sum(), half / 2, rtol=1e-5, atol=1e-9)  # eps next to small scores
    # the map: head mean of (∇A ⊙ R_A)⁺ with ∇A = dO Vᵀ; the rollout product v·Ē
    e = ((d_o @ v.transpose(-1, -2)) * r_a).clamp(min=0).mean(1)
    torch.testing.assert_close(out["map"], e)
    torch.testing.assert_close(out["rollout_product"], (roll[:, None] @ e)[:, 0])
    # gradients: those of O = softmax(scale·QKᵀ) V by autograd, also with padded keys
    key_mask = torch.tensor([[True, True, True, False]], device=DEVICE)
    o_masked, lse_masked = attention_forward(q, k, v, scale, key_mask)  # the backward reads its forward's lse
    masked = attention_relevance_ref(q, k, v, o_masked, lse_masked, scale, grad_out=d_o, key_mask=key_mask)
    for mask, res in ((None, out), (key_mask, masked)):
        qq, kk, vv = (x.clone().requires_grad_(True) for x in (q, k, v))
        sc = (qq * scale) @ kk.transpose(-1, -2)
        if mask is not None:
            sc = sc.masked_fill(~mask[:, None, None, :], float("-inf"))
        ((sc.softmax(-1) @ vv) * d_o).sum().backward()
        for name, leaf in (("grad_query", qq), ("grad_key", kk), ("grad_value", vv)):
            torch.testing.assert_close(res[name], leaf.grad)


def test_function_backward_returns_relevance():
    skip_fp64_attention_on_gpu(torch.float64)
    q, k, v, key_mask, _, r_o, _ = _inputs(SHAPES[2], torch.float64, masked=True)
    for backend in ("torch", "triton"):
        leaves = [x.clone().requires_grad_(True) for x in (q, k, v)]
        o = lrp_attention(*leaves, 0.3, key_mask, backend)
        ref_o, lse = attention_forward(q, k, v, 0.3, key_mask)
        torch.testing.assert_close(o, ref_o)
        o.backward(r_o)
        ref = attention_relevance_ref(q, k, v, ref_o, lse, 0.3, rel_out=r_o, key_mask=key_mask)
        for leaf, name in zip(leaves, ("rel_query", "rel_key", "rel_value")):
            torch.testing.assert_close(leaf.grad, ref[name], rtol=1e-10, atol=1e-12)
    # R_V is the A·V rule's share (the other half of R_O goes to A)
    torch.testing.assert_close(ref["rel_value"], attention_av_relevance(
        ((q * 0.3) @ k.transpose(-1, -2)).masked_fill(~key_mask[:, None, None, :], float("-inf")).softmax(-1),
        v, ref_o, r_o)[1])


def test_argument_and_dispatch_errors(monkeypatch):
    q, k, v, _, d_o, r_o, roll = _inputs(SHAPES[0], torch.float64, masked=False)
    o, lse = attention_forward(q, k, v, 0.5)
    with pytest.raises(ValueError, match="needs grad_out"):
        attention_relevance(q, k, v, o, lse, 0.5, rel_out=r_o, map_mode="gae")
    with pytest.raises(ValueError, match="needs rel_out"):
        attention_relevance(q, k, v, o, lse, 0.5, grad_out=d_o, map_mode="transformer_attribution")
    with pytest.raises(ValueError, match="need a map_mode"):
        attention_relevance(q, k, v, o, lse, 0.5, grad_out=d_o, rollout=roll)
    with pytest.raises(ValueError, match="map_mode must be one of"):
        attention_relevance(q, k, v, o, lse, 0.5, grad_out=d_o, map_mode="raw_attention")
    with pytest.raises(NotImplementedError, match="attention_relevance: backend 'cuda'.*not CUDA tensors"):
        attention_relevance(q.cpu(), k.cpu(), v.cpu(), o.cpu(), lse.cpu(), 0.5, grad_out=d_o.cpu(), backend="cuda")
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # CPU tensors without the interpreter: Triton cannot run
    with pytest.raises(NotImplementedError, match="TRITON_INTERPRET=1 is not set"):
        attention_forward(q.cpu(), k.cpu(), v.cpu(), 0.5, backend="triton")


@pytest.mark.parametrize("shape", SHAPES, ids=IDS)
def test_kernels_bfloat16(shape, monkeypatch):
    """bf16 operands (fp32 accumulation): within bf16 rounding of the float64 reference of the same inputs, for
    everything but R_Q/R_K (their division by near-zero scores is ill-conditioned in any bf16 implementation).
    Under the interpreter the products run in float32; on a GPU in bf16 (tensor cores)."""
    q, k, v, key_mask, d_o, r_o, roll = _inputs(shape, torch.bfloat16, masked=True)
    with nan_buffers(monkeypatch):
        o, lse = attention_forward(q, k, v, 0.37, key_mask, backend="triton")
    ref_o, ref_lse = attention_forward(q.double(), k.double(), v.double(), 0.37, key_mask)
    _close(o.double(), ref_o, 1e-2, "O")
    kw = dict(grad_out=d_o, rel_out=r_o, key_mask=key_mask, map_mode="transformer_attribution", rollout=roll)
    with nan_buffers(monkeypatch):
        out = attention_relevance(q, k, v, o, lse, 0.37, backend="triton", **kw)
    ref = attention_relevance(q.double(), k.double(), v.double(), o.double(), lse.double(), 0.37,
                              **{key: (val.double() if torch.is_tensor(val) and val.is_floating_point() else val)
                                 for key, val in kw.items()})
    for name in ("grad_query", "grad_key", "grad_value", "rel_value", "rollout_rows", "rollout_product"):
        _close(out[name].double(), ref[name], 3e-2, name)


def test_query_without_real_keys_attends_to_nothing():
    """A sample whose keys are all padding (a left-padded position of a decoder) gets O = 0 from the kernel and from
    the reference, rather than 0/0 or uniform attention over the masked keys."""
    q, k, v = _inputs(SHAPES[0], torch.float32, masked=False)[:3]
    key_mask = torch.ones(q.shape[0], k.shape[2], dtype=torch.bool, device=DEVICE)
    key_mask[0] = False
    o, lse = attention_forward(q, k, v, 0.5, key_mask, backend="triton")
    ref = attention_forward(q, k, v, 0.5, key_mask, backend="torch")[0]
    assert torch.equal(o[0], torch.zeros_like(o[0])) and torch.equal(ref[0], torch.zeros_like(ref[0]))
    assert torch.isfinite(o).all() and torch.isfinite(lse).all()


SQUARE = [s for s in SHAPES if s[2] == s[3]]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
@pytest.mark.parametrize("masked", [False, True], ids=["dense", "padded"])
@pytest.mark.parametrize("shape", SQUARE, ids=["x".join(map(str, s)) for s in SQUARE])
def test_weighted_map_matches_reference(shape, masked, dtype, monkeypatch):
    """GradCAM's head-weighted map: the kernel's CLS row, min and max against the reference."""
    skip_fp64_attention_on_gpu(dtype)
    q, k, v, key_mask = _inputs(shape, dtype, masked)[:4]
    _, lse = attention_forward(q, k, v, 0.37, key_mask)
    weights = torch.randn(shape[0], shape[1], generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    weights = weights.to(DEVICE, dtype)
    ref = attention_weighted_map(q, k, lse, 0.37, weights, key_mask, backend="torch")
    with nan_buffers(monkeypatch):
        out = attention_weighted_map(q, k, lse, 0.37, weights, key_mask, backend="triton")
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    for name, a, b in zip(("row", "min", "max"), out, ref):
        assert torch.isfinite(a).all(), name
        assert (a.double() - b.double()).abs().max() <= tol * max(float(b.abs().max()), 1e-12), name


def test_weighted_map_reference_by_hand():
    q, k, v = _inputs((2, 3, 5, 5, 4), torch.float64, masked=False)[:3]
    key_mask = torch.tensor([[True] * 5, [True, True, True, False, False]], device=DEVICE)
    _, lse = attention_forward(q, k, v, 0.5, key_mask)
    weights = torch.tensor([[1.0, -2.0, 0.5], [0.3, 0.2, -1.0]], dtype=torch.float64, device=DEVICE)
    row, lo, hi = attention_weighted_map(q, k, lse, 0.5, weights, key_mask)
    for b in range(2):
        n = int(key_mask[b].sum())
        a = ((q[b, :, :n] * 0.5) @ k[b, :, :n].transpose(-1, -2)).softmax(-1)  # the real tokens alone
        e = (weights[b, :, None, None] * a).mean(0).clamp(min=0)
        torch.testing.assert_close(row[b, :n], e[0])
        assert torch.equal(row[b, n:], torch.zeros_like(row[b, n:]))  # padded keys: A = 0
        torch.testing.assert_close(lo[b], e.min())
        torch.testing.assert_close(hi[b], e.max())


@pytest.mark.parametrize("shape", [(2, 3, 9, 9, 12), (1, 2, 67, 67, 64)], ids=["9", "67"])
def test_causal_kernels_match_reference(shape, monkeypatch):
    """A causal mask with right padding (the CLIP text tower): forward, backward (transformer attribution with
    gradient and relevance, GAE map only) and the GradCAM map with a per-sample row, against the reference; the
    reference's forward is softmax attention with the future and padded keys at probability 0."""
    skip_fp64_attention_on_gpu(torch.float64)
    q, k, v, key_mask, d_o, r_o, roll = _inputs(shape, torch.float64, masked=True)
    o, lse = attention_forward(q, k, v, 0.37, key_mask, backend="torch", causal=True)
    scores = (q * 0.37) @ k.transpose(-1, -2)
    attend = key_mask[:, None, None, :] & torch.ones(shape[2], shape[3], dtype=torch.bool, device=DEVICE).tril()
    torch.testing.assert_close(o, scores.masked_fill(~attend, float("-inf")).softmax(-1) @ v)
    with nan_buffers(monkeypatch):
        o_t, lse_t = attention_forward(q, k, v, 0.37, key_mask, backend="triton", causal=True)
    _close(o_t, o, 1e-12, "O")
    _close(lse_t, lse, 1e-12, "lse")
    for kw in (dict(grad_out=d_o, rel_out=r_o, map_mode="transformer_attribution", rollout=roll, want_map=True),
               dict(grad_out=d_o, map_mode="gae", rollout=roll, normalize_rows=True, inputs=False)):
        ref = attention_relevance(q, k, v, o, lse, 0.37, key_mask=key_mask, causal=True, backend="torch", **kw)
        with nan_buffers(monkeypatch):
            out = attention_relevance(q, k, v, o, lse, 0.37, key_mask=key_mask, causal=True, backend="triton", **kw)
        assert set(out) == set(ref)
        for name in ref:
            _close(out[name], ref[name], 1e-11, name)
    rows = torch.tensor([shape[2] - 1, 1], device=DEVICE)[: shape[0]]
    w = torch.randn(shape[0], shape[1], dtype=torch.float64, device=DEVICE)
    ref = attention_weighted_map(q, k, lse, 0.37, w, key_mask, rows, backend="torch", causal=True)
    out = attention_weighted_map(q, k, lse, 0.37, w, key_mask, rows, backend="triton", causal=True)
    for a, b, name in zip(out, ref, ("row", "min", "max")):
        _close(a, b, 1e-11, name)
