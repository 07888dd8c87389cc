"""LRP-α1β0 of a Linear layer with the sign-split identity (docs/design.md §4): the three GEMMs stay with the BLAS
(``|x||W|ᵀ``, ``S W``, ``S |W|``); Triton fuses the elementwise work around them into two passes.

``_alpha1beta0_scale_kernel``: from ``|x||W|ᵀ``, the forward output ``y`` (``x Wᵀ + b``), the bias and the
relevance, ``S/2 = R / (x Wᵀ + |x||W|ᵀ + 2·eps)``, zero where ``x Wᵀ + |x||W|ᵀ ≤ 2·tol·|x||W|ᵀ`` (positive mass
below rounding noise: the unit is dropped, as the reference drops ``z = 0``). One read of each input, one write.
``_alpha1beta0_combine_kernel``: ``R_x = x ⊙ (S W) + |x| ⊙ (S |W|)``, reading both GEMM outputs once.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl
from transformer_lrp.triton_kernels._common import EPS2_C, eps_like
from transformer_lrp.triton_kernels._launch import candidate, launch


@triton.jit
def _alpha1beta0_scale_kernel(
    ZABS,  # |x| |W|ᵀ, [M, N]
    Y,  # forward output x Wᵀ + b, [M, N]
    BIAS,  # [N] (ignored unless HAS_BIAS)
    R,  # relevance of the output, [M, N]
    S,  # out: S/2, [M, N]
    N,  # output units
    tol2,  # 2 · cancellation tolerance
    HAS_BIAS: tl.constexpr,
    FP64: tl.constexpr,  # compute in float64 (float64 inputs); else in float32 (upcast right after loading)
    BLOCK_N: tl.constexpr,
):
    i_m = tl.program_id(0).to(tl.int64)
    i_n = tl.program_id(1)
    o_n = i_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_n = o_n < N
    row = i_m * N
    b_zabs = tl.load(ZABS + row + o_n, mask=m_n, other=0.0)
    if not FP64:
        b_zabs = b_zabs.to(tl.float32)
    b_y = tl.load(Y + row + o_n, mask=m_n, other=0.0).to(b_zabs.dtype)
    b_r = tl.load(R + row + o_n, mask=m_n, other=0.0).to(b_zabs.dtype)
    if HAS_BIAS:
        b_y -= tl.load(BIAS + o_n, mask=m_n, other=0.0).to(b_zabs.dtype)
    den = b_y + b_zabs  # 2z
    keep = den > tol2 * b_zabs
    b_s = tl.where(keep, b_r / (den + eps_like(den, EPS2_C)), 0.0)
    tl.store(S + row + o_n, b_s.to(S.dtype.element_ty), mask=m_n)


@triton.jit
def _alpha1beta0_combine_kernel(
    X,  # layer input, [M, K]
    SW,  # S W, [M, K]
    SA,  # S |W|, [M, K]
    OUT,  # out: relevance of x, [M, K]
    K,  # input features
    FP64: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    i_m = tl.program_id(0).to(tl.int64)
    o_k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    m_k = o_k < K
    row = i_m * K
    b_x = tl.load(X + row + o_k, mask=m_k, other=0.0)
    if not FP64:
        b_x = b_x.to(tl.float32)
    b_sw = tl.load(SW + row + o_k, mask=m_k, other=0.0).to(b_x.dtype)
    b_sa = tl.load(SA + row + o_k, mask=m_k, other=0.0).to(b_x.dtype)
    tl.store(OUT + row + o_k, (b_x * b_sw + tl.abs(b_x) * b_sa).to(OUT.dtype.element_ty), mask=m_k)


@functools.cache
def _row_candidates(tile: str, width: int):
    """Elementwise passes over rows of ``width``: a program covers a row (or a 1024-wide chunk of it), default
    first; the wider chunk with more warps for long rows (the MLP's 3072)."""
    cap = max(128, triton.next_power_of_2(width))
    return tuple(dict.fromkeys(candidate(w, 1, **{tile: min(b, cap)}) for b, w in ((1024, 4), (512, 4), (2048, 8))))


def linear_alpha1beta0_bwd(
    x: torch.Tensor,
    weight: torch.Tensor,
    relevance: torch.Tensor,
    output: torch.Tensor,
    bias: torch.Tensor | None,
    abs_weight: torch.Tensor,
    tolerance: float,
    grad_output: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Launcher. ``x [..., K]``, ``weight``/``abs_weight [N, K]``, ``relevance``/``output [..., N]`` (``output`` is
    the forward's ``x Wᵀ + bias``). Returns ``(R_x, dL/dx)``, ``[..., K]`` in ``x``'s dtype: the gradient (``None``
    without ``grad_output``) shares the ``S W`` GEMM, stacked as ``[S; dY] W``."""
    shape = x.shape
    k, n = weight.shape[1], weight.shape[0]
    x2 = x.reshape(-1, k).contiguous()
    r2, y2 = relevance.reshape(-1, n).contiguous(), output.reshape(-1, n).contiguous()
    m = x2.shape[0]
    fp64 = x.dtype == torch.float64
    z_abs = x2.abs() @ abs_weight.t()
    # With a gradient, S is written straight into the top half of the stacked [S; dY] operand (no concatenation
    # copy of S), dY into the bottom half.
    stacked = torch.empty(2 * m if grad_output is not None else m, n, dtype=z_abs.dtype, device=z_abs.device)
    half_s = stacked[:m]
    bias_arg = bias if bias is not None else z_abs  # any pointer: not read without HAS_BIAS
    launch(_alpha1beta0_scale_kernel, lambda meta: (m, triton.cdiv(n, meta["BLOCK_N"])),
           (z_abs, y2, bias_arg, r2, half_s, n, 2 * tolerance), dict(HAS_BIAS=bias is not None, FP64=fp64),
           _row_candidates("BLOCK_N", n), ("N",))
    grad_x = None
    if grad_output is None:
        s_w = half_s @ weight
    else:
        stacked[m:].copy_(grad_output.reshape(-1, n))
        s_w, grad_x = (stacked @ weight).split(m)
        grad_x = grad_x.view(shape)
    out = torch.empty_like(x2)
    launch(_alpha1beta0_combine_kernel, lambda meta: (m, triton.cdiv(k, meta["BLOCK_K"])),
           (x2, s_w, half_s @ abs_weight, out, k), dict(FP64=fp64), _row_candidates("BLOCK_K", k), ("K",))
    return out.view(shape), grad_x
