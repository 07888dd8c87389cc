"""The CUDA C++ attention op's math on the CPU: csrc/attention_math.cuh, compiled by g++ into the host harness
tests/host/attention_host.cpp (the kernels' row programs as loops, in the kernels' blocks over the ranges they
visit), against the torch reference (``attention_forward_ref``, ``attention_relevance_ref``,
``attention_weighted_map_ref``) on every setting the sweep uses, and on what decoders add: shared key/value heads
(GQA/MQA), the causal mask over left padding, sliding windows, head dim 256. The launcher's tensor work (Δ, hS, the
real-key ranges, the rollout weights, the mask add's factor) is written here as csrc/attention_relevance.cu writes
it. The LayerNorm/RMSNorm gradient row program (csrc/norm_math.cuh, tests/host/layernorm_host.cpp) against
autograd. Last, a whole explanation and the decoder ops through torch.ops.tlrp.* with these harnesses as their CPU
implementations."""

import ctypes
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from transformer_lrp._numerics import normalized_add_factors, safe_divide
from transformer_lrp.ops.attention import (
    EMPTY_ROW_LSE,
    MAP_MODES,
    attention_forward_ref,
    attention_relevance_ref,
    attention_weighted_map_ref,
)

HARNESS = Path(__file__).parent / "host" / "attention_host.cpp"
NORM_HARNESS = Path(__file__).parent / "host" / "layernorm_host.cpp"


def _build(tmp_path_factory, source):
    cxx = shutil.which("g++") or shutil.which("c++")
    if cxx is None:
        pytest.skip("no C++ compiler")
    so = tmp_path_factory.mktemp("host") / f"{source.stem}.so"
    subprocess.run([cxx, "-O2", "-std=c++17", "-shared", "-fPIC", "-Wall", "-Werror", str(source), "-o", str(so)],
                   check=True, capture_output=True, text=True)
    return ctypes.CDLL(str(so))


@pytest.fixture(scope="module")
def lib(tmp_path_factory):
    return _build(tmp_path_factory, HARNESS)


@pytest.fixture(scope="module")
def norm_lib(tmp_path_factory):
    return _build(tmp_path_factory, NORM_HARNESS)


def _ptr(t):
    """The address of a tensor the caller keeps alive (a temporary's memory would be freed before the call)."""
    return ctypes.c_void_p(0 if t is None else t.data_ptr())


def _suffix(dtype):
    return {torch.float64: "f64", torch.float32: "f32"}[dtype]


def _scalar(dtype, x):
    return (ctypes.c_double if dtype == torch.float64 else ctypes.c_float)(x)


def _sizes(q, k):
    b, h, nq, d = q.shape
    return torch.tensor([b, h, k.shape[1], nq, k.shape[2], d], dtype=torch.int64)


def _mask_args(causal, window):
    return torch.tensor([int(causal), int(window or 0)], dtype=torch.int64)


def _keep(key_mask):
    return None if key_mask is None else key_mask.to(torch.uint8).contiguous()


def key_range(key_mask):
    """Each sample's real keys [first, end) as the CUDA launcher computes them (key_range_of): the first 1 of the
    mask and one past the last ([0, NK) for a sample without any)."""
    if key_mask is None:
        return None
    keep = key_mask.to(torch.int32)
    return torch.stack([keep.argmax(1), keep.shape[1] - keep.flip(1).argmax(1)], 1).to(torch.int64).contiguous()


def host_forward(lib, q, k, v, scale, key_mask=None, causal=False, window=None, visits=None):
    """attention_forward_cuda with the harness in place of its kernel; ``visits``: an int64 [1] counter of the
    (query, key) pairs the kernel's blocks visit."""
    out, lse = torch.empty_like(q), q.new_empty(q.shape[:3])
    keep, krange, sizes, mask_args = _keep(key_mask), key_range(key_mask), _sizes(q, k), _mask_args(causal, window)
    getattr(lib, f"tlrp_host_forward_{_suffix(q.dtype)}")(
        _ptr(q), _ptr(k), _ptr(v), _ptr(keep), _ptr(krange), _ptr(out), _ptr(lse), _ptr(sizes),
        _scalar(q.dtype, scale), _ptr(mask_args), _ptr(visits))
    return out, lse


def host_relevance(lib, q, k, v, out, lse, scale, grad_out=None, rel_out=None, key_mask=None, mask_add=False,
                   map_mode=None, rollout=None, normalize_rows=False, want_map=False, inputs=True,
                   mask_add_normalized=True, causal=False, window=None, visits=None):
    """attention_relevance_cuda's host code with the harness in place of the two kernels; ``visits``: an int64 [2]
    counter of the pairs visited by the query-side and the key-side kernel."""
    b, h, nq, d = q.shape
    hk, nk = k.shape[1], k.shape[2]
    mode = MAP_MODES.index(map_mode)
    reads_grad, reads_rel = map_map(mode)
    need_grad, need_rel = inputs and grad_out is not None, inputs and rel_out is not None
    rolling, want_map = rollout is not None and mode != 0, want_map and mode != 0
    delta = (grad_out * out).sum(-1).contiguous() if need_grad else None
    half_s = safe_divide(rel_out, out).mul_(0.5).contiguous() if (need_rel or reads_rel) else None
    need_dp, need_ra = need_grad or reads_grad, need_rel or reads_rel
    keep, krange, sizes, mask_args = _keep(key_mask), key_range(key_mask), _sizes(q, k), _mask_args(causal, window)
    new = q.new_empty
    dq, rq = (new(b, h, nq, d) if need_grad else None), (new(b, h, nq, d) if need_rel else None)
    want_rowsum = rolling and normalize_rows
    rowsum = new(b, h, nq) if want_rowsum else None
    call = getattr(lib, f"tlrp_host_backward_{_suffix(q.dtype)}")
    common = (_ptr(q), _ptr(k), _ptr(v), _ptr(grad_out), _ptr(half_s), _ptr(lse), _ptr(delta), _ptr(keep),
              _ptr(krange))
    if need_grad or need_rel or want_rowsum:  # the query-side kernel
        flags = torch.tensor([need_grad, need_rel, mask_add and need_rel, mode, need_dp, need_ra,
                              mode if want_rowsum else 0], dtype=torch.int64)
        call(*common, _ptr(None), _ptr(dq), _ptr(rq), _ptr(rowsum), *(_ptr(None),) * 7, _ptr(sizes),
             _scalar(q.dtype, scale), _ptr(mask_args), _ptr(flags), _ptr(visits))
    result = {}
    if need_grad:
        result["grad_query"] = dq
    if need_rel:
        result["rel_query"] = rq
    weights = None
    if rolling:
        weights = rollout.clone()  # as the launcher: an output of a custom op may not alias an input
        if normalize_rows:
            weights = weights / (1 + rowsum.sum(1) / h)
        result["rollout_rows"] = weights
        weights = (weights / h).contiguous()
    dk, dv = (new(b, hk, nk, d), new(b, hk, nk, d)) if need_grad else (None, None)
    rk, rv = (new(b, hk, nk, d), new(b, hk, nk, d)) if need_rel else (None, None)
    roll = new(b, hk, nk) if rolling else None
    sums = new(b, hk, nk, 2) if (mask_add and need_rel) else None
    mapout = q.new_zeros(b, nq, nk) if want_map else None
    if need_grad or need_rel or rolling or want_map:  # the key-side kernel
        flags = torch.tensor([need_grad, need_rel, mask_add and need_rel, mode, need_dp, need_ra, 0],
                             dtype=torch.int64)
        call(*common, _ptr(weights), *(_ptr(None),) * 3, _ptr(dk), _ptr(dv), _ptr(rk), _ptr(rv), _ptr(roll),
             _ptr(sums), _ptr(mapout), _ptr(sizes), _scalar(q.dtype, scale), _ptr(mask_args), _ptr(flags),
             _ptr(visits))
    if need_grad:
        result.update(grad_key=dk, grad_value=dv)
    if need_rel:
        result.update(rel_key=rk, rel_value=rv)
        if mask_add and mask_add_normalized:
            s_u, s_r = sums.double().sum(dim=(1, 2)).unbind(-1)
            factor = normalized_add_factors(s_u, torch.zeros_like(s_u), s_r)[0].to(q.dtype)[:, None, None, None]
            result["rel_query"] = result["rel_query"] * factor
            result["rel_key"] = result["rel_key"] * factor
    if rolling:
        result["rollout_product"] = roll.sum(1)
    if want_map:
        result["map"] = mapout
    return result


def host_weighted_map(lib, q, k, lse, scale, weights, key_mask=None, row=0, causal=False, window=None):
    """attention_weighted_map_cuda with the harness in place of its kernel."""
    b, h = q.shape[:2]
    nk = k.shape[2]
    rows = torch.as_tensor(row).to(torch.int64).expand(b).contiguous()
    w, lse = (weights.to(q.dtype) / h).contiguous(), lse.contiguous()
    keep, sizes, mask_args = _keep(key_mask), _sizes(q, k), _mask_args(causal, window)
    row_out, part = q.new_empty(b, nk), q.new_empty(b, nk, 2)
    getattr(lib, f"tlrp_host_weighted_map_{_suffix(q.dtype)}")(
        _ptr(q), _ptr(k), _ptr(lse), _ptr(keep), _ptr(w), _ptr(rows), _ptr(row_out), _ptr(part), _ptr(sizes),
        _scalar(q.dtype, scale), _ptr(mask_args))
    return row_out, part[..., 0].amin(1), part[..., 1].amax(1)


def map_map(mode):
    """(the map reads ∇A, the map reads R_A) of a map mode, as attn::map_reads_gradient / map_reads_relevance."""
    return mode in (1, 2), mode in (1, 4)


# (B, H, NQ, NK, d): square, the pooled top block's one or two query rows, odd sizes
SHAPES = [(2, 3, 9, 9, 12), (1, 1, 1, 20, 5), (2, 2, 2, 37, 16), (1, 2, 33, 33, 64)]
IDS = ["x".join(map(str, s)) for s in SHAPES]


def _inputs(shape, dtype, masked, seed=0, heads_kv=None):
    """(q, k, v, key_mask, dO, R_O, rollout row); ``heads_kv``: K and V with that many heads (GQA/MQA); masked: the
    last sample's second half of keys padded."""
    b, h, nq, nk, d = shape
    hk = heads_kv or h
    g = torch.Generator().manual_seed(seed)

    def rnd(*s):
        return torch.randn(*s, generator=g, dtype=torch.float64).to(dtype)

    q, k, v = rnd(b, h, nq, d), rnd(b, hk, nk, d), rnd(b, hk, nk, d)
    key_mask = None
    if masked:
        key_mask = torch.ones(b, nk, dtype=torch.bool)
        key_mask[-1, max(1, nk // 2):] = False
    return q, k, v, key_mask, rnd(b, h, nq, d), rnd(b, h, nq, d), torch.rand(b, nq, generator=g).to(dtype)


def _fp32_floor(d):
    """The smallest float32 tolerance: 3e-6 up to d = 64, growing as √d beyond (the harness sums its d products in
    one sequential loop, whose rounding errors add up as a random walk; the kernels' lanes sum d/32 each, then a
    shuffle tree, which is no worse)."""
    return 3e-6 * max(1.0, (d / 64) ** 0.5)


def _relative(out, ref):
    """max |out − ref| / max |ref|, in float64."""
    return float((out.double() - ref.double()).abs().max() / ref.double().abs().max().clamp(min=1e-30))


def _close(out, ref, tol, name):
    assert out.shape == ref.shape and out.dtype == ref.dtype, name
    err = (out.double() - ref.double()).abs().max() / ref.double().abs().max().clamp(min=1e-30)
    assert err <= tol, f"{name}: relative error {err:.2e}"


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("masked", [False, True], ids=["dense", "padded"])
@pytest.mark.parametrize("shape", SHAPES, ids=IDS)
def test_forward_math(lib, shape, masked, causal):
    if causal and shape[2] != shape[3]:
        pytest.skip("causal attention: NQ == NK")
    q, k, v, key_mask = _inputs(shape, torch.float64, masked)[:4]
    out, lse = host_forward(lib, q, k, v, 0.37, key_mask, causal)
    ref_o, ref_lse = attention_forward_ref(q, k, v, 0.37, key_mask, causal)
    _close(out, ref_o, 1e-13, "O")
    _close(lse, ref_lse, 1e-13, "lse")
    # a query with no real key: O = 0, not 0/0, and the finite lse the backward's exp(sc − lse) = 0 needs
    if key_mask is not None:
        key_mask = torch.zeros_like(key_mask)
        out, lse = host_forward(lib, q, k, v, 0.37, key_mask)
        assert (out == 0).all() and (lse == EMPTY_ROW_LSE).all()


SETTINGS = [
    dict(map_mode="transformer_attribution", mask_add=True, normalize_rows=False),
    dict(map_mode="transformer_attribution", mask_add=False, normalize_rows=True),
    dict(map_mode="gae", mask_add=False, normalize_rows=True),
    dict(map_mode="rollout", mask_add=False, normalize_rows=True),
    dict(map_mode=None, mask_add=True, mask_add_normalized=False),
    dict(map_mode="partial_lrp", mask_add=True, mask_add_normalized=False, normalize_rows=False),
    dict(map_mode="transformer_attribution", inputs=False),
    dict(map_mode=None),
    dict(map_mode="transformer_attribution", causal=True, normalize_rows=True),
    dict(map_mode="gae", causal=True),
]
SETTING_IDS = ["ta_maskadd", "ta_norm", "gae_norm", "rollout", "baseline_maskadd", "partial_lrp", "map_only",
               "grad_only", "ta_causal", "gae_causal"]


def _kwargs(setting, inputs):
    _, _, _, key_mask, d_o, r_o, roll = inputs
    kw = dict(grad_out=d_o, rel_out=r_o, key_mask=key_mask, rollout=roll, want_map=True, **setting)
    mode = setting["map_mode"]
    if mode is None:
        kw.update(rollout=None, want_map=False)
        kw["grad_out" if setting.get("mask_add") else "rel_out"] = None  # full LRP: relevance only; else gradient
    if mode in ("gae", "rollout"):
        kw["rel_out"] = None
    if mode in ("rollout", "partial_lrp"):
        kw["grad_out"] = None
    return kw


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
@pytest.mark.parametrize("shape", SHAPES, ids=IDS)
@pytest.mark.parametrize("setting", SETTINGS, ids=SETTING_IDS)
def test_backward_math(lib, shape, setting, dtype):
    if setting.get("causal") and shape[2] != shape[3]:
        pytest.skip("causal attention: NQ == NK")
    inputs = _inputs(shape, dtype, masked=True)
    q, k, v = inputs[:3]
    kw = _kwargs(setting, inputs)
    o, lse = attention_forward_ref(q, k, v, 0.37, kw["key_mask"], kw.get("causal", False))
    out = host_relevance(lib, q, k, v, o, lse, 0.37, **kw)
    ref = attention_relevance_ref(q, k, v, o, lse, 0.37, **kw)
    assert set(out) == set(ref)
    if dtype == torch.float64:
        for name in ref:
            _close(out[name], ref[name], 1e-11, name)
        return
    # float32: within a few times the reference's own float32 error against float64 (R_Q, R_K divide by scores)
    kw64 = {key: (val.double() if torch.is_tensor(val) and val.is_floating_point() else val) for key, val in kw.items()}
    # the float64 answer: its own forward's O and lse (the backward reads both)
    o64, lse64 = attention_forward_ref(q.double(), k.double(), v.double(), 0.37, kw["key_mask"],
                                       kw.get("causal", False))
    ref64 = attention_relevance_ref(q.double(), k.double(), v.double(), o64, lse64, 0.37, **kw64)
    for name in ref:
        own = (ref[name].double() - ref64[name]).abs().max() / ref64[name].abs().max()
        _close(out[name], ref64[name].to(dtype), max(4 * float(own), _fp32_floor(q.shape[-1])), name)


def test_pair_rules_by_hand(lib):
    """One pair of tiny vectors written out: P, dS, R_A, the mask add's share, T and each map entry."""
    q = torch.tensor([[[[1.0, 2.0]]]], dtype=torch.float64)
    k = torch.tensor([[[[0.5, -1.0], [2.0, 1.0]]]], dtype=torch.float64)
    v = torch.tensor([[[[1.0, 0.0], [0.0, 3.0]]]], dtype=torch.float64)
    scale = 0.5
    o, lse = host_forward(lib, q, k, v, scale)
    sc = torch.tensor([scale * (0.5 - 2.0), scale * (2.0 + 2.0)], dtype=torch.float64)
    p = sc.softmax(0)
    torch.testing.assert_close(o[0, 0, 0], p[0] * v[0, 0, 0] + p[1] * v[0, 0, 1])
    torch.testing.assert_close(lse[0, 0, 0], sc.logsumexp(0))
    d_o, r_o = torch.tensor([[[[1.0, -1.0]]]], dtype=torch.float64), torch.tensor([[[[0.25, 0.75]]]],
                                                                                    dtype=torch.float64)
    res = host_relevance(lib, q, k, v, o, lse, scale, grad_out=d_o, rel_out=r_o, map_mode="transformer_attribution",
                         rollout=torch.ones(1, 1, dtype=torch.float64), want_map=True)
    dp = torch.stack([d_o[0, 0, 0] @ v[0, 0, j] for j in range(2)])
    hs = r_o[0, 0, 0] / (o[0, 0, 0] + 1e-9) / 2
    ra = p * torch.stack([hs @ v[0, 0, j] for j in range(2)])
    torch.testing.assert_close(res["map"][0, 0], (dp * ra).clamp(min=0))
    t = ra / (sc / scale + 1e-9)  # T·scale: safe_divide(R_A, scale·dots, scale·eps)·scale
    torch.testing.assert_close(res["rel_query"][0, 0, 0], q[0, 0, 0] * (t @ k[0, 0]) / 2)
    ds = p * (dp - d_o[0, 0, 0] @ o[0, 0, 0])
    torch.testing.assert_close(res["grad_query"][0, 0, 0], scale * ds @ k[0, 0])


# ---------------------------------------------------------------------------------------------- decoders

# (B, H, H_kv, N, d, left padding per sample, window): always causal
DECODER_CASES = [
    (2, 6, 2, 70, 16, (0, 37), None),  # GQA 3:1; the second sample's first 37 positions padding
    (2, 4, 1, 45, 8, (5, 0), 9),  # MQA, a window of 9
    (2, 6, 2, 40, 32, (7, 0), 16),  # GQA, left padding and a window of 16
    (1, 3, 3, 33, 64, (0,), 16),  # plain heads, a window of 16
    (2, 4, 1, 21, 256, (3, 11), None),  # Gemma's head dim, MQA
]
DECODER_IDS = [f"h{h}kv{hk}-n{n}-d{d}-pad{'_'.join(map(str, pad))}-w{w}" for _, h, hk, n, d, pad, w in DECODER_CASES]


def _decoder_inputs(case, dtype, seed=0):
    """As ``_inputs``, with K/V of H_kv heads and left padding (a decoder's batch)."""
    b, h, hk, n, d, pad, _ = case
    g = torch.Generator().manual_seed(seed)

    def rnd(*s):
        return torch.randn(*s, generator=g, dtype=torch.float64).to(dtype)

    key_mask = torch.ones(b, n, dtype=torch.bool)
    for i, p in enumerate(pad):
        key_mask[i, :p] = False
    return (rnd(b, h, n, d), rnd(b, hk, n, d), rnd(b, hk, n, d), key_mask if any(pad) else None, rnd(b, h, n, d),
            rnd(b, h, n, d), torch.rand(b, n, generator=g).to(dtype))


def _attended(case, key_mask):
    """[B, N, N] which (query, key) pairs attend, written out: real keys at or before the query, within the window."""
    b, _, _, n, _, _, window = case
    pos = torch.arange(n)
    attend = (pos[None, :] <= pos[:, None]) & (pos[:, None] - pos[None, :] < (window or n))
    attend = attend.expand(b, n, n)
    return attend if key_mask is None else attend & key_mask[:, None, :]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
@pytest.mark.parametrize("case", DECODER_CASES, ids=DECODER_IDS)
def test_decoder_forward_math(lib, case, dtype):
    """O and lse with shared heads, the causal mask, left padding and the window; a left-padded row (no key) has
    O = 0 and lse = EMPTY_ROW_LSE, as the reference and the Triton kernels."""
    q, k, v, key_mask = _decoder_inputs(case, dtype)[:4]
    window = case[-1]
    out, lse = host_forward(lib, q, k, v, 0.3, key_mask, causal=True, window=window)
    ref_o, ref_lse = attention_forward_ref(*(t.double() for t in (q, k, v)), 0.3, key_mask, causal=True,
                                           window=window)
    has_key = _attended(case, key_mask).any(-1)[:, None].expand_as(lse)
    if dtype == torch.float64:
        _close(out, ref_o, 1e-13, "O")
        _close(lse[has_key], ref_lse[has_key], 1e-13, "lse")
    else:  # within a few times the float32 reference's own error
        own_o, own_lse = attention_forward_ref(q, k, v, 0.3, key_mask, causal=True, window=window)
        floor = _fp32_floor(q.shape[-1])
        _close(out, ref_o.float(), max(4 * _relative(own_o, ref_o), floor), "O")
        _close(lse[has_key], ref_lse[has_key].float(), max(4 * _relative(own_lse[has_key], ref_lse[has_key]), floor),
               "lse")
    assert (lse[~has_key] == EMPTY_ROW_LSE).all() and (out[~has_key] == 0).all()
    assert (~has_key).any() == any(case[5])  # the left-padded cases do have empty rows


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
@pytest.mark.parametrize("setting", SETTINGS, ids=SETTING_IDS)
@pytest.mark.parametrize("case", DECODER_CASES, ids=DECODER_IDS)
def test_decoder_backward_math(lib, case, setting, dtype):
    """Every setting of the sweep with shared heads (dK, dV, R_K, R_V summed over each key head's group), the causal
    mask over left padding and the window: float64 within 1e-11 of the reference, float32 within a few times the
    reference's own float32 error."""
    inputs = _decoder_inputs(case, dtype)
    q, k, v = inputs[:3]
    kw = {**_kwargs(setting, inputs), "causal": True, "window": case[-1]}
    o, lse = attention_forward_ref(q, k, v, 0.3, kw["key_mask"], causal=True, window=case[-1])
    out = host_relevance(lib, q, k, v, o, lse, 0.3, **kw)
    ref = attention_relevance_ref(q, k, v, o, lse, 0.3, **kw)
    assert set(out) == set(ref) and ref
    for name in ("grad_key", "grad_value", "rel_key", "rel_value"):
        if name in ref:
            assert out[name].shape == k.shape, name  # one per shared head, not per query head
    if dtype == torch.float64:
        for name in ref:
            _close(out[name], ref[name], 1e-11, name)
        return
    kw64 = {key: (val.double() if torch.is_tensor(val) and val.is_floating_point() else val) for key, val in kw.items()}
    # the float64 answer: its own forward's O and lse (the backward reads both)
    o64, lse64 = attention_forward_ref(q.double(), k.double(), v.double(), 0.3, kw["key_mask"], causal=True,
                                       window=case[-1])
    ref64 = attention_relevance_ref(q.double(), k.double(), v.double(), o64, lse64, 0.3, **kw64)
    for name in ref:
        own = (ref[name].double() - ref64[name]).abs().max() / ref64[name].abs().max()
        _close(out[name], ref64[name].to(dtype), max(4 * float(own), _fp32_floor(q.shape[-1])), name)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
@pytest.mark.parametrize("case", DECODER_CASES, ids=DECODER_IDS)
def test_decoder_weighted_map_math(lib, case, dtype):
    """GradCAM's head-weighted map with shared heads, the causal mask, left padding and the window: the last row (a
    decoder's read-out) and the min and max over real pairs, the masked zeros counted."""
    q, k, v, key_mask = _decoder_inputs(case, dtype)[:4]
    window = case[-1]
    _, lse = attention_forward_ref(q, k, v, 0.3, key_mask, causal=True, window=window)
    weights = torch.randn(q.shape[0], q.shape[1], generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    row = torch.full((q.shape[0],), q.shape[2] - 1)
    out = host_weighted_map(lib, q, k, lse, 0.3, weights.to(dtype), key_mask, row, causal=True, window=window)
    ref = attention_weighted_map_ref(q, k, lse, 0.3, weights.to(dtype), key_mask, row, causal=True, window=window)
    ref64 = attention_weighted_map_ref(*(t.double() for t in (q, k, lse)), 0.3, weights, key_mask, row, causal=True,
                                       window=window)
    for name, a, own, r in zip(("row", "min", "max"), out, ref, ref64):
        tol = 1e-13 if dtype == torch.float64 else max(4 * _relative(own, r), _fp32_floor(q.shape[-1]))
        _close(a, r.to(dtype), tol, name)
    assert (out[1] == 0).all()  # the causal zeros are part of the map: its minimum over real pairs


@pytest.mark.parametrize("case", DECODER_CASES, ids=DECODER_IDS)
def test_kernels_visit_only_what_their_blocks_can_attend(lib, case):
    """The ranges the kernels' blocks visit (attn::key_span, attn::query_span) hold every attended pair (the tests
    above) and little else. A query block of R = kRowsPerBlock rows visits, for each row, its attended keys plus at
    most R − 1 others (keys after the row but before the block's last, or behind its window but not the first row's),
    so a kernel over query rows visits at most attended + N·(R − 1) pairs per head. A key block likewise, plus,
    where it straddles a sample's first real key, its padded keys see that real key's queries: at most another
    (R − 1)·N per head. Dense: N² per head, which the padding and windows of these cases keep far above the bound."""
    rows = 4  # attn::kRowsPerBlock
    inputs = _decoder_inputs(case, torch.float64)
    q, k, v, key_mask, d_o, r_o, _ = inputs
    b, h, hk, n, _, _, window = case
    attended = int(_attended(case, key_mask).sum()) * h  # pairs over every sample and query head
    visits = torch.zeros(1, dtype=torch.int64)
    o, lse = host_forward(lib, q, k, v, 0.3, key_mask, causal=True, window=window, visits=visits)
    assert attended <= visits.item() <= attended + b * h * n * (rows - 1)
    visits = torch.zeros(2, dtype=torch.int64)
    host_relevance(lib, q, k, v, o, lse, 0.3, grad_out=d_o, rel_out=r_o, key_mask=key_mask, causal=True,
                   window=window, visits=visits)
    query_side, key_side = visits.tolist()
    assert attended <= query_side <= attended + b * h * n * (rows - 1)
    assert attended <= key_side <= attended + 2 * b * h * n * (rows - 1)
    if window or any(case[5]):
        assert key_side < 0.75 * b * h * n * n  # what is skipped is more than the causal half


# ------------------------------------------------------------------------------------- LayerNorm / RMSNorm


def host_norm_grad(norm_lib, u, v, weight, grad, grad_residual, eps, rms=False, weight_offset=0.0):
    """dL/dz of csrc/layernorm_relevance.cu's first pass (z = u + v) by the harness."""
    dz = torch.empty_like(u)
    getattr(norm_lib, f"tlrp_host_norm_grad_{_suffix(u.dtype)}")(
        _ptr(u), _ptr(v), _ptr(weight), _ptr(grad), _ptr(grad_residual), _ptr(dz), ctypes.c_int64(u.numel() //
                                                                                                  u.shape[-1]),
        ctypes.c_int64(u.shape[-1]), _scalar(u.dtype, eps), ctypes.c_int64(int(rms)), _scalar(u.dtype, weight_offset))
    return dz


def rms_norm_ref(x, weight, eps, weight_offset=0.0):
    """RMSNorm written out (statistics in float32 for half inputs): ``x·rsqrt(mean(x²) + eps) ⊙ (w + offset)``, no
    scale without a weight."""
    acc = torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype
    y = x.to(acc) * torch.rsqrt(x.to(acc).pow(2).mean(-1, keepdim=True) + eps)
    return (y if weight is None else y * (weight.to(acc) + weight_offset)).to(x.dtype)


def norm_grad_ref(u, v, weight, grad, grad_residual, eps, rms, weight_offset):
    """dL/dz by autograd through F.layer_norm or ``rms_norm_ref``, plus the residual gradient."""
    import torch.nn.functional as F

    with torch.enable_grad():
        z = (u + v).detach().requires_grad_(True)
        y = rms_norm_ref(z, weight, eps, weight_offset) if rms else F.layer_norm(z, z.shape[-1:], weight, None, eps)
        dz = torch.autograd.grad(y, z, grad)[0]
    return dz if grad_residual is None else dz + grad_residual


NORMS = [dict(rms=False), dict(rms=True), dict(rms=True, weight_offset=1.0)]
NORM_IDS = ["layernorm", "rmsnorm", "rmsnorm_gemma"]


@pytest.mark.parametrize("affine", [True, False], ids=["weight", "no_weight"])
@pytest.mark.parametrize("residual", [True, False], ids=["pre_norm", "post_norm"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
@pytest.mark.parametrize("norm", NORMS, ids=NORM_IDS)
def test_norm_gradient_math(norm_lib, norm, dtype, residual, affine):
    """The first pass's dL/dz (LayerNorm; RMSNorm with the gain w or Gemma's 1 + w) against autograd: float64 within
    1e-12, float32 within a few times autograd's own float32 error."""
    g = torch.Generator().manual_seed(5)

    def rnd(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    u, v, grad, g_res = rnd(3, 5, 301), rnd(3, 5, 301), rnd(3, 5, 301), rnd(3, 5, 301)
    u[0] += 2.0  # a row far from zero mean: LayerNorm's centering matters, RMSNorm's statistics differ
    weight = rnd(301) if affine else None
    g_res = g_res if residual else None
    eps = 1e-6
    args64 = (u, v, weight, grad, g_res, eps)
    ref64 = norm_grad_ref(*args64, norm["rms"], norm.get("weight_offset", 0.0))
    args = tuple(t.to(dtype) if torch.is_tensor(t) else t for t in args64)
    out = host_norm_grad(norm_lib, *args, **norm)
    if dtype == torch.float64:
        _close(out, ref64, 1e-12, "dz")
        return
    own = norm_grad_ref(*args, norm["rms"], norm.get("weight_offset", 0.0))
    err_own = float((own.double() - ref64).abs().max() / ref64.abs().max())
    _close(out, ref64.to(dtype), max(4 * err_own, 1e-6), "dz")


def test_rms_gradient_is_the_closed_form(norm_lib):
    """RMSNorm's dz = r·g − z·r³·mean(z ⊙ g), g = dY ⊙ (w + offset), r = rsqrt(mean(z²) + eps), written out by hand
    on two short rows: the harness, and the autograd reference the other tests use, both give it."""
    z = torch.tensor([[1.0, -2.0, 0.5, 3.0], [0.1, 0.2, -0.3, 0.0]], dtype=torch.float64)
    w = torch.tensor([0.5, 1.5, -1.0, 2.0], dtype=torch.float64)
    dy = torch.tensor([[1.0, 0.0, -1.0, 0.5], [2.0, -1.0, 0.0, 1.0]], dtype=torch.float64)
    eps, offset = 1e-5, 1.0
    r = (z.pow(2).mean(-1, keepdim=True) + eps).rsqrt()
    gg = dy * (w + offset)
    expected = r * gg - z * r.pow(3) * (z * gg).mean(-1, keepdim=True)
    half = z / 2  # u + v = z
    out = host_norm_grad(norm_lib, half, half.clone(), w, dy, None, eps, rms=True, weight_offset=offset)
    torch.testing.assert_close(out, expected, rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(norm_grad_ref(half, half, w, dy, None, eps, True, offset), expected, rtol=1e-13,
                               atol=1e-13)


# ----------------------------------------------------------- a whole explanation through torch.ops.tlrp.* on CPU

@pytest.fixture
def tlrp_ops_on_cpu(lib, norm_lib, monkeypatch):
    """CPU implementations of the torch.ops.tlrp ops (the attention and the norm's gradient by the host harnesses,
    the relevance rules around the norm and the normalized add by their references), registered under the
    extension's own schemas, and the CUDA-tensor requirement lifted: so that explain(backend="cuda") and the ops run
    their whole dispatch (routing, the op calls by schema, the tuple-to-dict conversion) on the CPU. Only the CUDA
    launchers and kernels are left out."""
    from transformer_lrp import _backend
    from transformer_lrp.ops.layernorm import layernorm_relevance_ref
    from transformer_lrp.ops.residual import normalized_add_ref

    try:
        _backend.load_cuda_extension()
    except ImportError as exc:
        pytest.skip(f"the CUDA extension is not built ({exc})")
    cpu = torch.library.Library("tlrp", "IMPL")
    calls = {}

    def counted(name, fn):
        def run(*args):
            calls[name] = calls.get(name, 0) + 1
            return fn(*args)
        return run

    def c(t):
        return None if t is None else t.contiguous()

    def forward(q, k, v, scale, key_mask, causal, window):
        return host_forward(lib, c(q), c(k), c(v), scale, key_mask, causal, window)

    def relevance(q, k, v, out, lse, scale, grad_out, rel_out, key_mask, mask_add, map_mode, rollout,
                  normalize_rows, want_map, inputs, mask_add_normalized, causal, window):
        res = host_relevance(lib, c(q), c(k), c(v), c(out), c(lse), scale, grad_out=c(grad_out), rel_out=c(rel_out),
                             key_mask=key_mask, mask_add=mask_add, map_mode=MAP_MODES[map_mode], rollout=rollout,
                             normalize_rows=normalize_rows, want_map=want_map, inputs=inputs,
                             mask_add_normalized=mask_add_normalized, causal=causal, window=window)
        names = ("grad_query", "grad_key", "grad_value", "rel_query", "rel_key", "rel_value", "rollout_rows",
                 "rollout_product", "map")
        return tuple(res[n] if n in res else q.new_empty(0) for n in names)

    def weighted_map(q, k, lse, scale, weights, key_mask, rows, causal, window):
        return host_weighted_map(lib, c(q), c(k), lse, scale, weights, key_mask, rows, causal, window)

    def layernorm(u, v, weight, eps, grad, rel, grad_res, rel_res, rms, weight_offset):
        # the gradient by the kernel's row program, the relevance by the rules (the same for both norms)
        dz = host_norm_grad(norm_lib, c(u), c(v), c(weight), c(grad), c(grad_res), eps, rms, weight_offset)
        return (dz, *layernorm_relevance_ref(u, v, weight, None, eps, grad, rel, grad_res, rel_res)[1:])

    impls = dict(attention_forward=forward, attention_relevance=relevance, attention_weighted_map=weighted_map,
                 layernorm_relevance=layernorm, normalized_add=normalized_add_ref)
    for name, fn in impls.items():
        cpu.impl(name, counted(name, fn), "CPU")
    monkeypatch.setattr(_backend, "_cuda_reasons", lambda tensors: [])
    yield calls
    cpu._destroy()


@pytest.mark.parametrize("case", DECODER_CASES, ids=DECODER_IDS)
def test_decoder_ops_on_the_cuda_dispatch(tlrp_ops_on_cpu, case):
    """ops.attention_forward / attention_relevance / attention_weighted_map with backend="cuda" pass shared heads,
    the causal mask and the window through the op schemas (and head dim 256 past the routing): equal to
    backend="torch" in float64."""
    from transformer_lrp.ops.attention import attention_forward, attention_relevance, attention_weighted_map

    q, k, v, key_mask, d_o, r_o, roll = _decoder_inputs(case, torch.float64)
    mask = dict(causal=True, window=case[-1])
    o, lse = attention_forward(q, k, v, 0.3, key_mask, backend="torch", **mask)
    o_c, lse_c = attention_forward(q, k, v, 0.3, key_mask, backend="cuda", **mask)
    torch.testing.assert_close(o_c, o, rtol=1e-12, atol=1e-13)
    torch.testing.assert_close(lse_c, lse, rtol=1e-12, atol=1e-13)
    kw = dict(grad_out=d_o, rel_out=r_o, key_mask=key_mask, map_mode="transformer_attribution", rollout=roll,
              normalize_rows=True, want_map=True, **mask)
    ref = attention_relevance(q, k, v, o, lse, 0.3, backend="torch", **kw)
    out = attention_relevance(q, k, v, o, lse, 0.3, backend="cuda", **kw)
    assert set(out) == set(ref)
    for name in ref:
        _close(out[name], ref[name], 1e-11, name)
    weights = torch.randn(q.shape[0], q.shape[1], generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    rows = torch.full((q.shape[0],), q.shape[2] - 1)
    ref = attention_weighted_map(q, k, lse, 0.3, weights, key_mask, rows, backend="torch", **mask)
    out = attention_weighted_map(q, k, lse, 0.3, weights, key_mask, rows, backend="cuda", **mask)
    for a, r in zip(out, ref):
        torch.testing.assert_close(a, r, rtol=1e-12, atol=1e-14)
    assert tlrp_ops_on_cpu == dict(attention_forward=1, attention_relevance=1, attention_weighted_map=1)


@pytest.mark.parametrize("norm", NORMS, ids=NORM_IDS)
def test_norm_op_on_the_cuda_dispatch(tlrp_ops_on_cpu, norm):
    """ops.layernorm_relevance with backend="cuda" passes rms and weight_offset through the op schema: dL/dz of the
    norm asked for (autograd), the relevance by the clone and normalized-add rules (identity through the norm)."""
    from transformer_lrp.ops.layernorm import layernorm_relevance, layernorm_relevance_ref

    g = torch.Generator().manual_seed(6)
    u, v, grad, rel, g_res, r_res = (torch.randn(2, 7, 48, generator=g, dtype=torch.float64) for _ in range(6))
    weight = torch.randn(48, generator=g, dtype=torch.float64)
    dz, r_u, r_v = layernorm_relevance(u, v, weight, None, 1e-6, grad, rel, g_res, r_res, backend="cuda", **norm)
    torch.testing.assert_close(dz, norm_grad_ref(u, v, weight, grad, g_res, 1e-6, norm["rms"],
                                                 norm.get("weight_offset", 0.0)), rtol=1e-12, atol=1e-12)
    _, ref_u, ref_v = layernorm_relevance_ref(u, v, weight, None, 1e-6, grad, rel, g_res, r_res)
    torch.testing.assert_close((r_u, r_v), (ref_u, ref_v), rtol=1e-12, atol=1e-12)
    assert tlrp_ops_on_cpu == dict(layernorm_relevance=1)


@pytest.mark.parametrize("family", ["timm_vit", "bert_padded"])
@pytest.mark.parametrize("method", ["transformer_attribution", "gae", "rollout", "partial_lrp", "full_lrp",
                                    "attention_gradcam", "raw_attention"])
def test_explain_on_the_cuda_dispatch(tlrp_ops_on_cpu, family, method):
    """explain(backend="cuda") equals backend="torch" (float64, 1e-10) on every method, vision and padded text."""
    import _models as M

    import transformer_lrp as tl

    model, inputs = {"timm_vit": (M.timm_vit(depth=2), M.images(2)),
                     "bert_padded": (M.hf_bert(), M.text_batch(with_types=True))}[family]
    ref = tl.explain(model, inputs, method=method, backend="torch")
    out = tl.explain(model, inputs, method=method, backend="cuda")
    err = (out.relevance - ref.relevance).abs().max() / ref.relevance.abs().max()
    assert err <= 1e-10, float(err)
    calls = tlrp_ops_on_cpu  # every block's attention ran through the op, and the reverse pass through its ops
    assert calls["attention_forward"] == len(model.blocks if family == "timm_vit" else model.bert.encoder.layer)
    assert calls.get("attention_weighted_map" if method == "attention_gradcam" else "attention_relevance", 0) >= 1
    if method == "transformer_attribution":  # the method's rules: the normalized adds (the baselines' are z-rules)
        assert calls.get("layernorm_relevance", 0) >= 1
