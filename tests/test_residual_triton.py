"""The Triton normalized add against its reference rule (TRITON_INTERPRET=1 on CPU), its autograd.Function, and
backend dispatch."""

import pytest
import torch
import transformer_lrp.triton_kernels.residual_lrp  # noqa: E402,F401  (installed by setup.py's package_dir)
from _device import DEVICE

from transformer_lrp.ops.residual import lrp_add, normalized_add, normalized_add_ref

SHAPES = [(1, 1, 5), (3, 7, 37), (2, 130, 9), (4, 1, 3000)]  # one row, non-powers of two, several chunks


def _inputs(shape, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g, dtype=torch.float64).to(DEVICE, dtype) for _ in range(3)]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
@pytest.mark.parametrize("shape", SHAPES, ids=["x".join(map(str, s)) for s in SHAPES])
def test_kernel_matches_reference(shape, dtype, monkeypatch):
    r, u, v = _inputs(shape, dtype)
    v[0] -= 3 * u[0].abs()  # make sample 0's v branch net-negative: the sign-flip path
    real_empty_like = torch.empty_like
    monkeypatch.setattr(torch, "empty_like", lambda t, **k: real_empty_like(t, **k).fill_(float("nan")))
    out_u, out_v = normalized_add(r, u, v, backend="triton")
    monkeypatch.undo()
    ref_u, ref_v = normalized_add_ref(r.double(), u.double(), v.double())
    tol = 1e-12 if dtype == torch.float64 else 2e-5
    for out, ref in ((out_u, ref_u), (out_v, ref_v)):
        assert out.dtype == dtype and out.shape == shape and torch.isfinite(out).all()
        assert (out.double() - ref).abs().max() <= tol * ref.abs().max()
    # conserved per sample, up to the rule's own +1e-9 in its denominators
    totals = out_u.double().sum((1, 2)) + out_v.double().sum((1, 2))
    torch.testing.assert_close(totals, r.double().sum((1, 2)), rtol=max(tol * 10, 1e-8), atol=1e-8)


def test_kernel_zero_cases():
    r = torch.zeros(2, 3, 4, dtype=torch.float64, device=DEVICE)
    u, v = torch.ones_like(r), -torch.ones_like(r)  # u + v == 0 everywhere and no relevance
    out_u, out_v = normalized_add(r, u, v, backend="triton")
    assert torch.equal(out_u, torch.zeros_like(r)) and torch.equal(out_v, torch.zeros_like(r))


def test_function_backward_returns_relevance():
    r, u, v = _inputs((2, 5, 6), torch.float64, seed=1)
    u.requires_grad_(True)
    pos = torch.randn(1, 5, 6, dtype=torch.float64, device=DEVICE, requires_grad=True)  # a broadcast summand
    for backend in ("torch", "triton"):
        u.grad = pos.grad = None
        out = lrp_add(u, pos, backend)
        torch.testing.assert_close(out, u + pos)
        out.backward(r)
        ref_u, ref_v = normalized_add_ref(r, u.detach(), pos.detach().expand_as(r))
        torch.testing.assert_close(u.grad, ref_u, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(pos.grad, ref_v.sum(0, keepdim=True), rtol=1e-10, atol=1e-12)


def test_dispatch(monkeypatch):
    r, u, v = (t.cpu() for t in _inputs((2, 3, 4), torch.float64))  # how CPU tensors are dispatched
    with pytest.raises(NotImplementedError, match="inputs are not CUDA tensors"):
        normalized_add(r, u, v, backend="cuda")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(NotImplementedError, match="TRITON_INTERPRET=1 is not set"):
        normalized_add(r, u, v, backend="triton")
    # automatic choice falls back to the reference where Triton cannot run
    torch.testing.assert_close(normalized_add(r, u, v, backend=None)[0], normalized_add_ref(r, u, v)[0])


def test_kernel_bfloat16(monkeypatch):
    """bf16 in and out (float64 sums inside): within bf16 rounding of the float64 reference of the same inputs."""
    from _poison import nan_buffers

    r, u, v = _inputs((2, 7, 37), torch.bfloat16)
    with nan_buffers(monkeypatch):
        out = normalized_add(r, u, v, backend="triton")
    ref = normalized_add_ref(r.double(), u.double(), v.double())
    for a, b in zip(out, ref):
        assert a.dtype == torch.bfloat16 and torch.isfinite(a).all()
        assert (a.double() - b).abs().max() <= 2e-2 * b.abs().max()
