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
