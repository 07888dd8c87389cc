"""The CUDA C++ extension (csrc/): built and importable where nvcc exists (scripts/install.sh compiles it on the
CPU machine), its torch.library schemas, dispatch, and (on a GPU) the normalized add and the LayerNorm relevance
against their reference rules, with torch.library.opcheck."""

import contextlib
import shutil

import pytest
import torch
from test_cuda_attention_host import DECODER_CASES, DECODER_IDS

from transformer_lrp._backend import load_cuda_extension
from transformer_lrp.ops.residual import normalized_add, normalized_add_ref

try:
    load_cuda_extension()
    BUILT, WHY = True, ""
except ImportError as exc:
    BUILT, WHY = False, str(exc)


def test_extension_built_where_nvcc_exists():
    if shutil.which("nvcc") is None:
        pytest.skip("no nvcc: the extension is not built on this machine")
    assert BUILT, f"nvcc is installed but transformer_lrp._C does not import: {WHY}"


@pytest.mark.skipif(not BUILT, reason="CUDA extension not built")
def test_schema_registered():
    schema = str(torch.ops.tlrp.normalized_add.default._schema)
    assert schema == "tlrp::normalized_add(Tensor relevance, Tensor u, Tensor v) -> (Tensor, Tensor)"


def test_dispatch_rejects_cpu_tensors():
    r = torch.randn(2, 3, 4)
    with pytest.raises(NotImplementedError, match="not CUDA tensors"):
        normalized_add(r, r, r, backend="cuda")


@pytest.mark.skipif(not (BUILT and torch.cuda.is_available()), reason="needs the extension and a GPU")
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_cuda_kernel_matches_reference(dtype):
    g = torch.Generator().manual_seed(0)
    r, u, v = (torch.randn(3, 7, 301, generator=g, dtype=torch.float64) for _ in range(3))
    v[0] -= 3 * u[0].abs()  # sign-flip path
    r, u, v = (t.to(dtype).double() for t in (r, u, v))  # the reference sees the same rounded inputs
    out = normalized_add(*(t.to("cuda", dtype) for t in (r, u, v)), backend="cuda")
    ref = normalized_add_ref(r, u, v)
    tol = {torch.float64: 1e-12, torch.float32: 2e-6, torch.bfloat16: 2e-2}[dtype]
    for a, b in zip(out, ref):
        assert a.dtype == dtype and torch.isfinite(a).all()
        assert (a.double().cpu() - b).abs().max() <= tol * b.abs().max()
    torch.library.opcheck(torch.ops.tlrp.normalized_add.default, tuple(t.cuda() for t in (r, u, v)))


@pytest.mark.skipif(not BUILT, reason="CUDA extension not built")
def test_layernorm_schema_registered():
    schema = str(torch.ops.tlrp.layernorm_relevance.default._schema)
    assert schema.startswith("tlrp::layernorm_relevance(Tensor u, Tensor v, Tensor? weight, float ln_eps")
    assert "Tensor? rel_residual, bool rms, float weight_offset) -> " in schema  # RMSNorm: decoder LLMs


@pytest.mark.skipif(not BUILT, reason="CUDA extension not built")
@pytest.mark.parametrize("rms", [False, True], ids=["layernorm", "rmsnorm"])
def test_layernorm_fake_kernel_matches_reference_shapes(rms):
    """On meta tensors the fake kernel gives the reference's three outputs (shape and dtype of u)."""
    from test_cuda_attention_host import norm_grad_ref

    from transformer_lrp.ops.layernorm import layernorm_relevance_ref

    u, v, g, r = (torch.randn(2, 5, 24, dtype=torch.bfloat16) for _ in range(4))
    ref = (norm_grad_ref(u, v, None, g, None, 1e-6, rms, 1.0), *layernorm_relevance_ref(u, v, None, None, 1e-6, g,
                                                                                        r)[1:])
    fake = torch.ops.tlrp.layernorm_relevance(*(t.to("meta") for t in (u, v)), None, 1e-6,
                                              *(t.to("meta") for t in (g, r)), None, None, rms, 1.0)
    assert [(t.shape, t.dtype, t.device.type) for t in fake] == [(t.shape, t.dtype, "meta") for t in ref]


@pytest.mark.skipif(not (BUILT and torch.cuda.is_available()), reason="needs the extension and a GPU")
@pytest.mark.parametrize("norm", [dict(), dict(rms=True), dict(rms=True, weight_offset=1.0)],
                         ids=["layernorm", "rmsnorm", "rmsnorm_gemma"])
@pytest.mark.parametrize("variant", ["pre_ln", "post_ln", "no_affine"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_cuda_layernorm_matches_reference(dtype, variant, norm):
    """LayerNorm and RMSNorm (gain w or Gemma's 1 + w): dL/dz against autograd (the RMS reference written out in
    tests/test_cuda_attention_host.py), the relevance against the reference rules; opcheck on the op."""
    from test_cuda_attention_host import norm_grad_ref

    from transformer_lrp.ops.layernorm import layernorm_relevance

    g = torch.Generator().manual_seed(1)

    def rnd(*shape):  # rounded to dtype first: the reference sees the kernel's inputs
        return torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype).double()

    u, v, g_ln, r_ln, g_res, r_res = (rnd(3, 7, 301) for _ in range(6))
    v[0] -= 3 * u[0].abs()
    weight = None if variant == "no_affine" else rnd(301)
    residual = variant != "post_ln"
    args = (u, v, weight, None, 1e-6, g_ln, r_ln, g_res if residual else None, r_res if residual else None)
    ref = (norm_grad_ref(u, v, weight, g_ln, args[7], 1e-6, norm.get("rms", False), norm.get("weight_offset", 0.0)),
           *layernorm_relevance(*args)[1:])
    out = layernorm_relevance(*(t.to("cuda", dtype) if torch.is_tensor(t) else t for t in args), backend="cuda",
                              **norm)
    tol = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 2e-2}[dtype]
    for a, b in zip(out, ref):
        assert a.dtype == dtype and torch.isfinite(a).all()
        assert (a.double().cpu() - b).abs().max() <= tol * b.abs().max()
    cuda_args = tuple(t.cuda() if torch.is_tensor(t) else t for t in (u, v, weight, 1e-6, g_ln, r_ln, g_res, r_res,
                                                                      norm.get("rms", False),
                                                                      norm.get("weight_offset", 0.0)))
    torch.library.opcheck(torch.ops.tlrp.layernorm_relevance.default, cuda_args)


# ------------------------------------------------------------------------------------------- the attention op

ATTENTION_OPS = ("attention_forward", "attention_relevance", "attention_weighted_map")


@pytest.mark.skipif(not BUILT, reason="CUDA extension not built")
def test_attention_ops_registered():
    """torch.ops.tlrp lists the attention ops next to the others, with their schemas."""
    for name in ATTENTION_OPS + ("normalized_add", "layernorm_relevance"):
        assert hasattr(torch.ops.tlrp, name), name
    schema = str(torch.ops.tlrp.attention_relevance.default._schema)
    assert schema.startswith("tlrp::attention_relevance(Tensor query, Tensor key, Tensor value, Tensor out, "
                             "Tensor lse, float scale, Tensor? grad_out, Tensor? rel_out, Tensor? key_mask")
    for name in ATTENTION_OPS:  # the sliding window follows the causal flag
        assert "bool causal, int window) -> " in str(getattr(torch.ops.tlrp, name).default._schema), name


# (B, H, H_kv, NQ, NK, d, causal, window): pooled query rows; a decoder's GQA with a window; MQA at head dim 256
FAKE_SHAPES = [(2, 3, 3, 2, 9, 16, False, None), (2, 6, 2, 9, 9, 16, True, 4), (1, 4, 1, 5, 5, 256, True, None)]


@pytest.mark.skipif(not BUILT, reason="CUDA extension not built")
@pytest.mark.parametrize("shape", FAKE_SHAPES, ids=["pooled", "gqa_window", "mqa_d256"])
@pytest.mark.parametrize("setting", ["ta_maskadd", "gae_norm", "map_only", "grad_only", "baseline_maskadd"])
def test_attention_fake_kernels_match_reference_shapes(setting, shape):
    """The fake kernels (torch.compile, meta tensors) give the outputs, shapes and dtypes of the reference, through
    ops.attention_relevance's own conversion of the op's tuple; with shared heads, K's gradient and relevance are
    shaped like K."""
    from test_cuda_attention_host import SETTING_IDS, SETTINGS, _inputs, _kwargs

    from transformer_lrp.ops.attention import (
        _relevance_cuda,
        attention_forward_ref,
        attention_relevance_ref,
        attention_weighted_map_ref,
    )

    b, h, hk, nq, nk, d, causal, window = shape
    inputs = _inputs((b, h, nq, nk, d), torch.float32, masked=True, heads_kv=hk)
    q, k, v = inputs[:3]
    kw = _kwargs(SETTINGS[SETTING_IDS.index(setting)], inputs)
    kw = {"mask_add": False, "normalize_rows": False, "inputs": True, "mask_add_normalized": True, **kw,
          "causal": causal, "window": window}
    o, lse = attention_forward_ref(q, k, v, 0.3, kw["key_mask"], causal, window)
    ref = attention_relevance_ref(q, k, v, o, lse, 0.3, **kw)

    def meta(t):
        return t.to("meta") if torch.is_tensor(t) else t

    fake_o, fake_lse = torch.ops.tlrp.attention_forward(meta(q), meta(k), meta(v), 0.3, meta(kw["key_mask"]), causal,
                                                        window or 0)
    assert (fake_o.shape, fake_lse.shape, fake_lse.dtype) == (o.shape, lse.shape, lse.dtype)
    out = _relevance_cuda(*(meta(t) for t in (q, k, v, o, lse)), 0.3, **{n: meta(t) for n, t in kw.items()})
    assert set(out) == set(ref)
    for name in ref:
        assert (out[name].shape, out[name].dtype) == (ref[name].shape, ref[name].dtype), name
    if nq == nk:  # GradCAM's map (its key mask masks the queries too)
        weights, rows = torch.ones(b, h), torch.zeros(b, dtype=torch.int64)
        ref = attention_weighted_map_ref(q, k, lse, 0.3, weights, kw["key_mask"], rows, causal, window)
        fake = torch.ops.tlrp.attention_weighted_map(meta(q), meta(k), meta(lse), 0.3, meta(weights),
                                                     meta(kw["key_mask"]), meta(rows), causal, window or 0)
        assert [(t.shape, t.dtype) for t in fake] == [(t.shape, t.dtype) for t in ref]


def _cuda_ready():
    return BUILT and torch.cuda.is_available()


@pytest.mark.skipif(not _cuda_ready(), reason="needs the extension and a GPU")
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
@pytest.mark.parametrize("shape", [(2, 3, 9, 9, 12), (2, 2, 2, 37, 16), (1, 2, 67, 67, 64), (2, 2, 5, 40, 128)])
def test_cuda_attention_matches_reference(shape, dtype):
    """Every setting of the sweep, the CUDA C++ op against the reference on the same GPU tensors (float64 1e-11;
    float32 within a few times the reference's own float32 error against float64); opcheck on the op."""
    from test_cuda_attention_host import SETTINGS, _inputs, _kwargs

    from transformer_lrp.ops.attention import attention_forward, attention_relevance

    inputs = tuple(t.cuda() if torch.is_tensor(t) else t for t in _inputs(shape, dtype, masked=True))
    q, k, v = inputs[:3]
    o, lse = attention_forward(q, k, v, 0.37, inputs[3], backend="torch")
    o_c, lse_c = attention_forward(q, k, v, 0.37, inputs[3], backend="cuda")
    tol = 1e-11 if dtype == torch.float64 else 3e-6
    assert (o_c - o).abs().max() <= tol * o.abs().max() and (lse_c - lse).abs().max() <= tol * lse.abs().max()
    for setting in SETTINGS:
        if setting.get("causal") and q.shape[2] != k.shape[2]:
            continue  # a causal mask needs NQ == NK
        kw = _kwargs(setting, inputs)
        o, lse = attention_forward(q, k, v, 0.37, inputs[3], backend="torch", causal=kw.get("causal", False))
        ref = attention_relevance(q, k, v, o, lse, 0.37, backend="torch", **kw)
        out = attention_relevance(q, k, v, o, lse, 0.37, backend="cuda", **kw)
        assert set(out) == set(ref), setting
        ref64 = attention_relevance(*(t.double() for t in (q, k, v, o, lse)), 0.37, backend="torch",
                                    **{n: (t.double() if torch.is_tensor(t) and t.is_floating_point() else t)
                                       for n, t in kw.items()})
        for name in ref:
            scale = ref64[name].abs().max()
            own = float((ref[name].double() - ref64[name]).abs().max() / scale)
            err = float((out[name].double() - ref64[name]).abs().max() / scale)
            assert err <= (tol if dtype == torch.float64 else max(4 * own, tol)), (setting, name, err, own)
    kw = _kwargs(SETTINGS[0], inputs)
    torch.library.opcheck(torch.ops.tlrp.attention_forward.default, (q, k, v, 0.37, inputs[3], False, 0))
    torch.library.opcheck(torch.ops.tlrp.attention_relevance.default,
                          (q, k, v, o, lse, 0.37, kw["grad_out"], kw["rel_out"], inputs[3], True, 1, kw["rollout"],
                           False, True, True, True, False, 0))


@pytest.mark.skipif(not _cuda_ready(), reason="needs the extension and a GPU")
@pytest.mark.parametrize("masked", [False, True])
def test_cuda_weighted_map_matches_reference(masked):
    from test_cuda_attention_host import _inputs

    from transformer_lrp.ops.attention import attention_forward, attention_weighted_map

    q, k, v, key_mask = (t.cuda() if torch.is_tensor(t) else t for t in _inputs((2, 3, 11, 11, 16), torch.float64,
                                                                               masked)[:4])
    _, lse = attention_forward(q, k, v, 0.4, key_mask)
    weights = torch.randn(2, 3, dtype=torch.float64, device="cuda")
    ref = attention_weighted_map(q, k, lse, 0.4, weights, key_mask, 0, backend="torch")
    out = attention_weighted_map(q, k, lse, 0.4, weights, key_mask, 0, backend="cuda")
    for a, b in zip(out, ref):
        torch.testing.assert_close(a, b, rtol=1e-11, atol=1e-13)


@contextlib.contextmanager
def _nan_filled_empty():
    """Under deterministic mode at::empty fills new float tensors with NaN (torch.utils.deterministic), the
    extension's outputs included: an entry a kernel leaves unwritten shows as NaN."""
    was, warn_only = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(was, warn_only=warn_only)


@pytest.mark.skipif(not _cuda_ready(), reason="needs the extension and a GPU")
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
@pytest.mark.parametrize("case", DECODER_CASES, ids=DECODER_IDS)
def test_cuda_decoder_attention_matches_reference(case, dtype):
    """What decoders add, on the GPU: shared key/value heads (GQA/MQA), the causal mask over left padding, sliding
    windows, head dim 256 (8 entries per lane). The forward (empty rows: O = 0, lse = 1e30), every setting of the
    backward and the GradCAM map against the reference on the same GPU tensors (float64 1e-11; float32 within a few
    times the reference's own float32 error against float64), every output written; opcheck with a window."""
    from test_cuda_attention_host import SETTINGS, _decoder_inputs, _fp32_floor, _kwargs

    from transformer_lrp.ops.attention import attention_forward, attention_relevance, attention_weighted_map

    inputs = tuple(t.cuda() if torch.is_tensor(t) else t for t in _decoder_inputs(case, dtype))
    q, k, v, key_mask = inputs[:4]
    mask = dict(causal=True, window=case[-1])
    tol = 1e-11 if dtype == torch.float64 else _fp32_floor(q.shape[-1])

    def check(out, ref, ref64, what):
        assert torch.isfinite(out).all(), f"{what}: unwritten or non-finite entries"
        scale = ref64.abs().max().clamp(min=1e-30)  # GradCAM's min is 0 (the causal zeros)
        own = float((ref.double() - ref64).abs().max() / scale)
        err = float((out.double() - ref64).abs().max() / scale)
        assert err <= (tol if dtype == torch.float64 else max(4 * own, tol)), (what, err, own)

    def wide(t):
        return t.double() if torch.is_tensor(t) and t.is_floating_point() else t

    with _nan_filled_empty():
        o, lse = attention_forward(q, k, v, 0.3, key_mask, backend="torch", **mask)
        o64, lse64 = attention_forward(*(wide(t) for t in (q, k, v)), 0.3, key_mask, backend="torch", **mask)
        o_c, lse_c = attention_forward(q, k, v, 0.3, key_mask, backend="cuda", **mask)
        check(o_c, o, o64, "O")
        torch.testing.assert_close(lse_c, lse, rtol=10 * tol, atol=10 * tol)  # rows without a key: 1e30 in both
        for setting in SETTINGS:
            kw = {**_kwargs(setting, inputs), **mask}
            ref = attention_relevance(q, k, v, o, lse, 0.3, backend="torch", **kw)
            ref64 = attention_relevance(*(wide(t) for t in (q, k, v, o, lse)), 0.3, backend="torch",
                                        **{n: wide(t) for n, t in kw.items()})
            out = attention_relevance(q, k, v, o, lse, 0.3, backend="cuda", **kw)
            assert set(out) == set(ref), setting
            for name in ref:
                check(out[name], ref[name], ref64[name], (setting, name))
        weights = torch.randn(q.shape[0], q.shape[1], dtype=dtype, device="cuda")
        rows = torch.full((q.shape[0],), q.shape[2] - 1, device="cuda")
        ref = attention_weighted_map(q, k, lse, 0.3, weights, key_mask, rows, backend="torch", **mask)
        ref64 = attention_weighted_map(wide(q), wide(k), lse64, 0.3, wide(weights), key_mask, rows, backend="torch",
                                       **mask)
        out = attention_weighted_map(q, k, lse, 0.3, weights, key_mask, rows, backend="cuda", **mask)
        for name, a, r, r64 in zip(("row", "min", "max"), out, ref, ref64):
            check(a, r, r64, name)
    kw = _kwargs(SETTINGS[1], inputs)
    window = case[-1] or 0
    torch.library.opcheck(torch.ops.tlrp.attention_forward.default, (q, k, v, 0.3, key_mask, True, window))
    torch.library.opcheck(torch.ops.tlrp.attention_relevance.default,
                          (q, k, v, o, lse, 0.3, kw["grad_out"], kw["rel_out"], key_mask, False, 1, kw["rollout"],
                           True, True, True, True, True, window))


def test_cuda_backend_routing(monkeypatch):
    """Inside an explanation on backend="cuda": the ops with a CUDA C++ kernel stay on it (Gemma's head dim 256
    included), the α1β0 passes take the Triton kernels where Triton can run (else the reference), a head dimension
    over 256 takes the reference (warned, with the reason); an explicit single op says why it cannot run."""
    from transformer_lrp import _backend

    small, gemma, wide = torch.zeros(1, 2, 3, 64), torch.zeros(1, 2, 3, 256), torch.zeros(1, 2, 3, 288)
    for op in _backend.CUDA_OPS:
        assert _backend.route(op, "cuda", (small,)) == "cuda"
        assert _backend.route(op, "cuda", (gemma,)) == "cuda"
    with pytest.warns(UserWarning, match="at most 256 entries"):
        assert _backend.route("attention_relevance", "cuda", (wide,)) == "torch"
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert _backend.route("linear_alpha1beta0", "cuda", (small,)) == "triton"
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert _backend.route("linear_alpha1beta0", "cuda", (small,)) == "torch"
    reasons = _backend.not_supported_reasons("cuda", (wide,), op="attention_forward")
    assert any("not CUDA tensors" in r for r in reasons) and any("at most 256" in r for r in reasons)
