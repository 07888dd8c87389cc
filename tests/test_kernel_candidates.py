"""Every tile configuration the autotuner may pick computes the same result: each distinct candidate of each kernel
(over every product class, head width and arch) is forced onto a shape that does not shrink its tiles and checked
against the reference (under the interpreter on CPU, compiled on a GPU). Warps and stages do not change what an
interpreted kernel computes; the compile check covers them."""

import pytest
import torch
from _device import DEVICE
from _poison import nan_buffers
from transformer_lrp.triton_kernels import attention_lrp, layernorm_lrp, linear_lrp, residual_lrp
from transformer_lrp.triton_kernels._launch import force_candidate

from transformer_lrp import ops

PRODUCTS = ("half", "tf32", "ieee", "fp64")
ARCHS = (80, 90)


def _attention_tiles(kernel: str) -> list:
    """The distinct (BLOCK_M, BLOCK_N) of every candidate list of ``kernel``, at a size none of them clamps."""
    seen = {}
    for products in PRODUCTS:
        for block_d in (64, 128):
            for arch in ARCHS:
                for heavy in (False, True):
                    for c in attention_lrp.attention_candidates(kernel, products, block_d, 4096, 4096, arch, heavy):
                        seen.setdefault(c.tiles, c)
    return list(seen.values())


# float64 under the interpreter; float32 on a GPU, where float64 attention goes to the torch reference
DTYPE = torch.float64 if DEVICE.type == "cpu" else torch.float32


def _rand(*shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64).to(DEVICE, DTYPE)


def _err(out, ref):
    return float((out.double() - ref.double()).abs().max() / ref.double().abs().max().clamp(min=1e-30))


def _close(out, ref, name, ref64=None):
    """float64: ≤ 1e-11 of the reference. float32: within 4× the float32 reference's own error against float64
    (``ref64``, the same inputs in float64), at least 1e-5."""
    assert torch.isfinite(out).all(), f"{name}: unwritten entries"
    tol = 1e-11 if ref64 is None or DTYPE == torch.float64 else max(4 * _err(ref, ref64), 1e-5)
    target = ref if ref64 is None else ref64
    assert _err(out, target) <= tol, f"{name}: relative error {_err(out, target):.1e} > {tol:.1e}"


def _double(obj):
    if isinstance(obj, dict):
        return {k: _double(v) for k, v in obj.items()}
    if isinstance(obj, (tuple, list)):
        return type(obj)(_double(v) for v in obj)
    return obj.double() if torch.is_tensor(obj) and obj.is_floating_point() else obj


# 130 tokens: more than any tile (128), not a multiple of one; head dim 40: BLOCK_D 64 with masked columns
B, H, N, D = 1, 2, 130, 40


def _attention_inputs():
    q, k, v = _rand(B, H, N, D, seed=1), _rand(B, H, N, D, seed=2), _rand(B, H, N, D, seed=3)
    mask = torch.ones(B, N, dtype=torch.bool, device=DEVICE)
    mask[:, 101:] = False
    return q, k, v, mask


@pytest.mark.slow
@pytest.mark.parametrize("kernel, name", [("fwd", "_attn_fwd_kernel"), ("map", "_attn_weighted_map_kernel")])
def test_attention_forward_and_map_candidates(kernel, name, monkeypatch):
    q, k, v, mask = _attention_inputs()
    weights = _rand(B, H, seed=4)
    ref = ops.attention_forward(q, k, v, 0.3, mask, backend="torch")
    ref64 = ops.attention_forward(*_double((q, k, v)), 0.3, mask, backend="torch")
    lse = ref[1]
    if kernel == "map":
        ref = ops.attention_weighted_map(q, k, lse, 0.3, weights, mask, backend="torch")
        ref64 = ops.attention_weighted_map(*_double((q, k, ref64[1], 0.3, weights)), mask, backend="torch")
    for cand in _attention_tiles(kernel):
        with force_candidate(name, cand), nan_buffers(monkeypatch):
            if kernel == "fwd":
                out = ops.attention_forward(q, k, v, 0.3, mask, backend="triton")
            else:
                out = ops.attention_weighted_map(q, k, lse, 0.3, weights, mask, backend="triton")
        for what, a, b, b64 in zip(("O/row", "lse/min", "max"), out, ref, ref64):
            _close(a, b, f"{what} {cand.label}", b64)


@pytest.mark.slow
@pytest.mark.parametrize("kernel, name", [("bwd_q", "_attn_bwd_q_kernel"), ("bwd_kv", "_attn_bwd_kv_kernel")])
def test_attention_backward_candidates(kernel, name, monkeypatch):
    """Transformer attribution with the mask add and the normalized rollout: every output of both kernels."""
    q, k, v, mask = _attention_inputs()
    o, lse = ops.attention_forward(q, k, v, 0.3, mask, backend="torch")
    kw = dict(grad_out=_rand(B, H, N, D, seed=5), rel_out=_rand(B, H, N, D, seed=6), key_mask=mask, mask_add=True,
              map_mode="transformer_attribution", rollout=_rand(B, N, seed=7).abs(), normalize_rows=True,
              want_map=True)
    ref = ops.attention_relevance(q, k, v, o, lse, 0.3, backend="torch", **kw)
    ref64 = ops.attention_relevance(*_double((q, k, v, o, lse)), 0.3, backend="torch", **_double(kw))
    for cand in _attention_tiles(kernel):
        with force_candidate(name, cand), nan_buffers(monkeypatch):
            out = ops.attention_relevance(q, k, v, o, lse, 0.3, backend="triton", **kw)
        assert set(out) == set(ref)
        for key in ref:
            _close(out[key], ref[key], f"{key} {cand.label}", ref64[key])


def test_elementwise_candidates(monkeypatch):
    """The α1β0 passes (row chunks of 512–2048 over a 1500-wide row), the LayerNorm passes (warps only) and the
    normalized add's scale pass (blocks of 1024 and 2048)."""
    x, w, r = _rand(2, 3, 1500, seed=1), _rand(700, 1500, seed=2), _rand(2, 3, 700, seed=3)
    y = torch.nn.functional.linear(x, w)
    ref = ops.linear_alpha1beta0(x, w, r, output=y, backend="torch")
    ref64 = ops.linear_alpha1beta0(*_double((x, w, r)), output=y.double(), backend="torch")
    for name, tile, width in (("_alpha1beta0_scale_kernel", "BLOCK_N", 700),
                              ("_alpha1beta0_combine_kernel", "BLOCK_K", 1500)):
        for cand in linear_lrp._row_candidates(tile, width):
            with force_candidate(name, cand), nan_buffers(monkeypatch):
                out = ops.linear_alpha1beta0(x, w, r, output=y, backend="triton")
            _close(out, ref, f"{name} {cand.label}", ref64)
    u, v, g, rel = (_rand(2, 5, 1500, seed=s) for s in range(4, 8))
    ref = ops.layernorm_relevance(u, v, None, None, 1e-5, g, rel, backend="torch")
    ref64 = ops.layernorm_relevance(*_double((u, v)), None, None, 1e-5, *_double((g, rel)), backend="torch")
    for name in ("_ln_rel_pass1_kernel", "_ln_rel_pass2_kernel"):
        for cand in layernorm_lrp._row_candidates(2048, layernorm_lrp.tl.float32):
            with force_candidate(name, cand), nan_buffers(monkeypatch):
                out = ops.layernorm_relevance(u, v, None, None, 1e-5, g, rel, backend="triton")
            for a, b, b64 in zip(out, ref, ref64):
                _close(a, b, name, b64)
    ref = ops.normalized_add(rel, u, v, backend="torch")
    ref64 = ops.normalized_add(*_double((rel, u, v)), backend="torch")
    for cand in residual_lrp.SCALE_CANDIDATES:
        with force_candidate("_normalized_add_scale_kernel", cand), nan_buffers(monkeypatch):
            out = ops.normalized_add(rel, u, v, backend="triton")
        for a, b, b64 in zip(out, ref, ref64):
            _close(a, b, f"normalized add {cand.label}", b64)


def test_candidate_lists_are_well_formed():
    """Defaults first, no duplicates, tiles powers of two within [16, 128] and shrunk to small problems."""
    for kernel in ("fwd", "bwd_q", "bwd_kv", "map"):
        for products in PRODUCTS:
            for block_d in (32, 64, 128):
                for arch in (0, *ARCHS):
                    for heavy in (False, True):
                        cands = attention_lrp.attention_candidates(kernel, products, block_d, 4096, 4096, arch,
                                                                   heavy)
                        assert cands and len(set(cands)) == len(cands)
                        for c in cands:
                            for _, t in c.tiles:
                                assert 16 <= t <= 128 and t & (t - 1) == 0
                        small = attention_lrp.attention_candidates(kernel, products, block_d, 1, 20, arch, heavy)
                        assert all(c.meta["BLOCK_M"] == 16 and c.meta["BLOCK_N"] <= 32 for c in small)
