"""The CUDA C++ extension (csrc/): built and importable where nvcc exists (scripts/install.sh compiles it on the
CPU machine), its torch.library schemas, dispatch, and (on a GPU) the normalized add and the LayerNorm relevance
against their reference rules, with torch.library.opcheck."""

import shutil

import pytest
import torch

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


@pytest.mark.skipif(not (BUILT and torch.cuda.is_available()), reason="needs the extension and a GPU")
@pytest.mark.parametrize("variant", ["pre_ln", "post_ln", "no_affine"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_cuda_layernorm_matches_reference(dtype, variant):
    from transformer_lrp.ops.layernorm import layernorm_relevance

    g = torch.Generator().manual_seed(1)

    def rnd(*shape):  # rounded to dtype first: the reference sees the kernel's inputs
        return torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype).double()

    u, v, g_ln, r_ln, g_res, r_res = (rnd(3, 7, 301) for _ in range(6))
    v[0] -= 3 * u[0].abs()
    weight = None if variant == "no_affine" else rnd(301)
    residual = variant != "post_ln"
    args = (u, v, weight, None, 1e-6, g_ln, r_ln, g_res if residual else None, r_res if residual else None)
    ref = layernorm_relevance(*args)
    out = layernorm_relevance(*(t.to("cuda", dtype) if torch.is_tensor(t) else t for t in args), backend="cuda")
    tol = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 2e-2}[dtype]
    for a, b in zip(out, ref):
        assert a.dtype == dtype and torch.isfinite(a).all()
        assert (a.double().cpu() - b).abs().max() <= tol * b.abs().max()
    cuda_args = tuple(t.cuda() if torch.is_tensor(t) else t for t in (u, v, weight, 1e-6, g_ln, r_ln, g_res, r_res))
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


@pytest.mark.skipif(not BUILT, reason="CUDA extension not built")
@pytest.mark.parametrize("setting", ["ta_maskadd", "gae_norm", "map_only", "grad_only", "baseline_maskadd"])
def test_attention_fake_kernels_match_reference_shapes(setting):
    """The fake kernels (torch.compile, meta tensors) give the outputs, shapes and dtypes of the reference, through
    ops.attention_relevance's own conversion of the op's tuple."""
    from test_cuda_attention_host import SETTING_IDS, SETTINGS, _inputs, _kwargs

    from transformer_lrp.ops.attention import _relevance_cuda, attention_forward_ref, attention_relevance_ref

    inputs = _inputs((2, 3, 2, 9, 16), torch.float32, masked=True)
    q, k, v = inputs[:3]
    kw = _kwargs(SETTINGS[SETTING_IDS.index(setting)], inputs)
    kw = {"mask_add": False, "normalize_rows": False, "inputs": True, "mask_add_normalized": True, **kw}
    o, lse = attention_forward_ref(q, k, v, 0.3, kw["key_mask"])
    ref = attention_relevance_ref(q, k, v, o, lse, 0.3, **kw)

    def meta(t):
        return t.to("meta") if torch.is_tensor(t) else t

    fake_o, fake_lse = torch.ops.tlrp.attention_forward(meta(q), meta(k), meta(v), 0.3, meta(kw["key_mask"]), False)
    assert (fake_o.shape, fake_lse.shape, fake_lse.dtype) == (o.shape, lse.shape, lse.dtype)
    out = _relevance_cuda(*(meta(t) for t in (q, k, v, o, lse)), 0.3, **{n: meta(t) for n, t in kw.items()})
    assert set(out) == set(ref)
    for name in ref:
        assert (out[name].shape, out[name].dtype) == (ref[name].shape, ref[name].dtype), name


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
    torch.library.opcheck(torch.ops.tlrp.attention_forward.default, (q, k, v, 0.37, inputs[3], False))
    torch.library.opcheck(torch.ops.tlrp.attention_relevance.default,
                          (q, k, v, o, lse, 0.37, kw["grad_out"], kw["rel_out"], inputs[3], True, 1, kw["rollout"],
                           False, True, True, True, False))


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


def test_cuda_backend_routing(monkeypatch):
    """Inside an explanation on backend="cuda": the ops with a CUDA C++ kernel stay on it, the α1β0 passes take the
    Triton kernels where Triton can run (else the reference), a head dimension over 128 takes the reference (warned,
    with the reason); an explicit single op says why it cannot run."""
    from transformer_lrp import _backend

    small, wide = torch.zeros(1, 2, 3, 64), torch.zeros(1, 2, 3, 160)
    for op in _backend.CUDA_OPS:
        assert _backend.route(op, "cuda", (small,)) == "cuda"
    with pytest.warns(UserWarning, match="at most 128 entries"):
        assert _backend.route("attention_relevance", "cuda", (wide,)) == "torch"
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert _backend.route("linear_alpha1beta0", "cuda", (small,)) == "triton"
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert _backend.route("linear_alpha1beta0", "cuda", (small,)) == "torch"
    reasons = _backend.not_supported_reasons("cuda", (wide,), op="attention_forward")
    assert any("not CUDA tensors" in r for r in reasons) and any("at most 128" in r for r in reasons)
