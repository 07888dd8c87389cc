"""The Triton-fused sign-split α1β0 Linear rule against the exact reference (TRITON_INTERPRET=1 on CPU)."""

import pytest
import torch
import transformer_lrp.triton_kernels.linear_lrp  # noqa: F401  (installed by setup.py's package_dir)
from _device import DEVICE

from transformer_lrp.ops import linear_alpha1beta0, linear_alpha1beta0_ref

SHAPES = [(1, 1, 5, 3), (2, 7, 37, 23), (3, 5, 300, 130)]  # (B, T, in, out): one row, non-powers of two, >1 block


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
@pytest.mark.parametrize("shape", SHAPES, ids=["x".join(map(str, s)) for s in SHAPES])
def test_kernel_matches_reference(shape, dtype, bias, monkeypatch):
    b, t, k, n = shape
    g = torch.Generator().manual_seed(0)
    x = torch.randn(b, t, k, generator=g, dtype=torch.float64)
    w = torch.randn(n, k, generator=g, dtype=torch.float64)
    w[0] = -x[0, 0].sign() * w[0].abs()  # unit 0 has no positive contribution on the first row: dropped
    r = torch.randn(b, t, n, generator=g, dtype=torch.float64)
    bb = torch.randn(n, generator=g, dtype=torch.float64) if bias else None
    x, w, r = x.to(DEVICE), w.to(DEVICE), r.to(DEVICE)
    bb = bb.to(DEVICE) if bias else None
    y = torch.nn.functional.linear(x, w, bb)
    ref = linear_alpha1beta0_ref(x, w, r)
    real_empty_like = torch.empty_like
    monkeypatch.setattr(torch, "empty_like", lambda a, **kw: real_empty_like(a, **kw).fill_(float("nan")))
    args = [a.to(dtype) if a is not None else None for a in (x, w, r, y, bb)]
    out = linear_alpha1beta0(args[0], args[1], args[2], output=args[3], bias=args[4], backend="triton")
    monkeypatch.undo()
    assert out.dtype == dtype and out.shape == x.shape and torch.isfinite(out).all()
    tol = 1e-10 if dtype == torch.float64 else 2e-4
    assert (out.double() - ref).abs().max() <= tol * ref.abs().max()
    torch.testing.assert_close(out, linear_alpha1beta0(*args[:3], output=args[3], bias=args[4], backend="torch"),
                               rtol=tol, atol=tol * float(ref.abs().max()))


def test_dispatch_errors(monkeypatch):
    x, w, r = torch.randn(2, 4), torch.randn(3, 4), torch.randn(2, 3)
    with pytest.raises(NotImplementedError, match="no cuda kernel for linear_alpha1beta0"):
        linear_alpha1beta0(x, w, r, backend="cuda")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(NotImplementedError, match="TRITON_INTERPRET=1 is not set"):
        linear_alpha1beta0(x, w, r, backend="triton")


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
def test_with_grad_shares_the_gemm(dtype, backend, monkeypatch):
    """``linear_alpha1beta0_with_grad``: the relevance of ``linear_alpha1beta0`` and the gradient ``dY W``."""
    from _poison import nan_buffers

    from transformer_lrp.ops.linear import linear_alpha1beta0_with_grad

    g = torch.Generator().manual_seed(3)
    x, w = torch.randn(2, 5, 37, generator=g, dtype=dtype), torch.randn(23, 37, generator=g, dtype=dtype)
    r, dy, b = (torch.randn(*s, generator=g, dtype=dtype) for s in ((2, 5, 23), (2, 5, 23), (23,)))
    x, w, r, dy, b = (t.to(DEVICE) for t in (x, w, r, dy, b))
    y = torch.nn.functional.linear(x, w, b)
    with nan_buffers(monkeypatch):
        rel, grad = linear_alpha1beta0_with_grad(x, w, r, dy, output=y, bias=b, backend=backend)
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(grad, dy @ w, rtol=tol, atol=tol)
    torch.testing.assert_close(rel, linear_alpha1beta0(x, w, r, output=y, bias=b), rtol=tol * 10, atol=tol)
