"""The CUDA C++ attention op's math on the CPU: csrc/attention_math.cuh, compiled by g++ into the host harness
tests/host/attention_host.cpp (the kernels' row programs as loops), against the torch reference
(``attention_forward_ref``, ``attention_relevance_ref``) on every setting the sweep uses. The launcher's tensor work
(Δ, hS, the rollout weights, the mask add's factor) is written here as csrc/attention_relevance.cu writes it."""

import ctypes
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from transformer_lrp._numerics import normalized_add_factors, safe_divide
from transformer_lrp.ops.attention import MAP_MODES, attention_forward_ref, attention_relevance_ref

HARNESS = Path(__file__).parent / "host" / "attention_host.cpp"


@pytest.fixture(scope="module")
def lib(tmp_path_factory):
    cxx = shutil.which("g++") or shutil.which("c++")
    if cxx is None:
        pytest.skip("no C++ compiler")
    so = tmp_path_factory.mktemp("host") / "attention_host.so"
    subprocess.run([cxx, "-O2", "-std=c++17", "-shared", "-fPIC", "-Wall", "-Werror", str(HARNESS), "-o", str(so)],
                   check=True, capture_output=True, text=True)
    return ctypes.CDLL(str(so))


def _ptr(t):
    return ctypes.c_void_p(0 if t is None else t.data_ptr())


def _suffix(dtype):
    return {torch.float64: "f64", torch.float32: "f32"}[dtype]


def _scalar(dtype, x):
    return (ctypes.c_double if dtype == torch.float64 else ctypes.c_float)(x)


def _sizes(b, h, nq, nk, d):
    return torch.tensor([b, h, nq, nk, d], dtype=torch.int64)


def host_forward(lib, q, k, v, scale, key_mask=None, causal=False):
    b, h, nq, d = q.shape
    nk = k.shape[2]
    out, lse = torch.empty_like(q), q.new_empty(b, h, nq)
    keep = None if key_mask is None else key_mask.to(torch.uint8).contiguous()
    sizes = _sizes(b, h, nq, nk, d)
    getattr(lib, f"tlrp_host_forward_{_suffix(q.dtype)}")(
        _ptr(q), _ptr(k), _ptr(v), _ptr(keep), _ptr(out), _ptr(lse), _ptr(sizes), _scalar(q.dtype, scale),
        ctypes.c_int64(int(causal)))
    return out, lse


def host_relevance(lib, q, k, v, out, lse, scale, grad_out=None, rel_out=None, key_mask=None, mask_add=False,
                   map_mode=None, rollout=None, normalize_rows=False, want_map=False, inputs=True,
                   mask_add_normalized=True, causal=False):
    """attention_relevance_cuda's host code with the harness in place of the two kernels."""
    b, h, nq, d = q.shape
    nk = k.shape[2]
    mode = MAP_MODES.index(map_mode)
    reads_grad, reads_rel = map_map(mode)
    need_grad, need_rel = inputs and grad_out is not None, inputs and rel_out is not None
    rolling, want_map = rollout is not None and mode != 0, want_map and mode != 0
    delta = (grad_out * out).sum(-1).contiguous() if need_grad else None
    half_s = safe_divide(rel_out, out).mul_(0.5).contiguous() if (need_rel or reads_rel) else None
    need_dp, need_ra = need_grad or reads_grad, need_rel or reads_rel
    keep = None if key_mask is None else key_mask.to(torch.uint8).contiguous()
    sizes = _sizes(b, h, nq, nk, d)
    new = q.new_empty
    dq, rq = (new(b, h, nq, d) if need_grad else None), (new(b, h, nq, d) if need_rel else None)
    want_rowsum = rolling and normalize_rows
    rowsum = new(b, h, nq) if want_rowsum else None
    call = getattr(lib, f"tlrp_host_backward_{_suffix(q.dtype)}")
    common = (_ptr(q), _ptr(k), _ptr(v), _ptr(grad_out), _ptr(half_s), _ptr(lse), _ptr(delta), _ptr(keep))
    if need_grad or need_rel or want_rowsum:  # the query-side kernel
        flags = torch.tensor([need_grad, need_rel, mask_add and need_rel, mode, need_dp, need_ra,
                              mode if want_rowsum else 0, causal], dtype=torch.int64)
        call(*common, _ptr(None), _ptr(dq), _ptr(rq), _ptr(rowsum), *(_ptr(None),) * 7, _ptr(sizes),
             _scalar(q.dtype, scale), _ptr(flags))
    result = {}
    if need_grad:
        result["grad_query"] = dq
    if need_rel:
        result["rel_query"] = rq
    weights = None
    if rolling:
        weights = rollout / (1 + rowsum.sum(1) / h) if normalize_rows else rollout
        result["rollout_rows"] = weights
        weights = (weights / h).contiguous()
    dk, dv = (new(b, h, nk, d), new(b, h, nk, d)) if need_grad else (None, None)
    rk, rv = (new(b, h, nk, d), new(b, h, nk, d)) if need_rel else (None, None)
    roll = new(b, h, nk) if rolling else None
    sums = new(b, h, nk, 2) if (mask_add and need_rel) else None
    mapout = q.new_zeros(b, nq, nk) if want_map else None
    if need_grad or need_rel or rolling or want_map:  # the key-side kernel
        flags = torch.tensor([need_grad, need_rel, mask_add and need_rel, mode, need_dp, need_ra, 0, causal],
                             dtype=torch.int64)
        call(*common, _ptr(weights), *(_ptr(None),) * 3, _ptr(dk), _ptr(dv), _ptr(rk), _ptr(rv), _ptr(roll),
             _ptr(sums), _ptr(mapout), _ptr(sizes), _scalar(q.dtype, scale), _ptr(flags))
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


def map_map(mode):
    """(the map reads ∇A, the map reads R_A) of a map mode, as attn::map_reads_gradient / map_reads_relevance."""
    return mode in (1, 2), mode in (1, 4)


# (B, H, NQ, NK, d): square, the pooled top block's one or two query rows, odd sizes
SHAPES = [(2, 3, 9, 9, 12), (1, 1, 1, 20, 5), (2, 2, 2, 37, 16), (1, 2, 33, 33, 64)]
IDS = ["x".join(map(str, s)) for s in SHAPES]


def _inputs(shape, dtype, masked, seed=0):
    b, h, nq, nk, d = shape
    g = torch.Generator().manual_seed(seed)

    def rnd(*s):
        return torch.randn(*s, generator=g, dtype=torch.float64).to(dtype)

    q, k, v = rnd(b, h, nq, d), rnd(b, h, nk, d), rnd(b, h, nk, d)
    key_mask = None
    if masked:
        key_mask = torch.ones(b, nk, dtype=torch.bool)
        key_mask[-1, max(1, nk // 2):] = False
    return q, k, v, key_mask, rnd(b, h, nq, d), rnd(b, h, nq, d), torch.rand(b, nq, generator=g).to(dtype)


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
    # a query with no real key: O = 0, not 0/0
    if key_mask is not None:
        key_mask = torch.zeros_like(key_mask)
        out, lse = host_forward(lib, q, k, v, 0.37, key_mask)
        assert torch.isfinite(out).all() and (out == 0).all() and torch.isfinite(lse).all()


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
    ref64 = attention_relevance_ref(*(x.double() for x in (q, k, v, o)), lse.double(), 0.37, **kw64)
    for name in ref:
        own = (ref[name].double() - ref64[name]).abs().max() / ref64[name].abs().max()
        _close(out[name], ref64[name].to(dtype), max(4 * float(own), 3e-6), name)


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


# ----------------------------------------------------------- a whole explanation through torch.ops.tlrp.* on CPU

@pytest.fixture
def tlrp_ops_on_cpu(lib, monkeypatch):
    """CPU implementations of the torch.ops.tlrp ops (the attention by the host harness, the other two by their
    references), registered under the extension's own schemas, and the CUDA-tensor requirement lifted: so that
    explain(backend="cuda") runs its whole dispatch (routing, the op calls by schema, the tuple-to-dict conversion)
    on the CPU. Only the CUDA launchers and kernels are left out."""
    from transformer_lrp import _backend
    from transformer_lrp.ops.attention import attention_weighted_map_ref
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

    def forward(q, k, v, scale, key_mask, causal):
        return host_forward(lib, q.contiguous(), k.contiguous(), v.contiguous(), scale, key_mask, causal)

    def relevance(q, k, v, out, lse, scale, grad_out, rel_out, key_mask, mask_add, map_mode, rollout,
                  normalize_rows, want_map, inputs, mask_add_normalized, causal):
        def c(t):
            return None if t is None else t.contiguous()

        res = host_relevance(lib, c(q), c(k), c(v), c(out), c(lse), scale, grad_out=c(grad_out), rel_out=c(rel_out),
                             key_mask=key_mask, mask_add=mask_add, map_mode=MAP_MODES[map_mode], rollout=rollout,
                             normalize_rows=normalize_rows, want_map=want_map, inputs=inputs,
                             mask_add_normalized=mask_add_normalized, causal=causal)
        names = ("grad_query", "grad_key", "grad_value", "rel_query", "rel_key", "rel_value", "rollout_rows",
                 "rollout_product", "map")
        return tuple(res[n] if n in res else q.new_empty(0) for n in names)

    impls = dict(
        attention_forward=forward, attention_relevance=relevance,
        attention_weighted_map=lambda q, k, lse, scale, w, mask, rows, causal: attention_weighted_map_ref(
            q, k, lse, scale, w, mask, rows, causal),
        layernorm_relevance=lambda u, v, w, eps, g, r, g_res, r_res: layernorm_relevance_ref(
            u, v, w, None, eps, g, r, g_res, r_res),
        normalized_add=normalized_add_ref)
    for name, fn in impls.items():
        cpu.impl(name, counted(name, fn), "CPU")
    monkeypatch.setattr(_backend, "_cuda_reasons", lambda tensors: [])
    yield calls
    cpu._destroy()


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
