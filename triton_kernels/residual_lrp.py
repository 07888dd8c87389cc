"""Normalized add (docs/method.md §2.8) as two Triton passes with per-sample sums.

Pass 1 (``_normalized_add_sums_kernel``): grid ``(B, chunks)``; each program reads a chunk of one sample's
``R``, ``u``, ``v`` and writes its partial sums of ``u·S``, ``v·S`` and ``R`` (``S = safe_divide(R, u + v)``) to
``Partial[b, chunk, 0:3]``. The host adds the chunks (a tiny ``[B, chunks, 3]`` reduction) and turns the sums into
the two per-sample factors ``f_u/s_u`` and ``f_v/s_v``. Pass 2 (``_normalized_add_scale_kernel``) recomputes ``S``
and writes ``R_u = u·S·factor_u`` and ``R_v = v·S·factor_v``. Reads 3 and writes 2 tensors of the input's size,
with no intermediate ``[B, …]`` buffer.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from transformer_lrp.triton_kernels._common import from_f64, safe_div_ref, to_f64
from transformer_lrp.triton_kernels._launch import candidate, launch

from transformer_lrp._numerics import normalized_add_factors


@triton.jit(do_not_specialize=("CHUNKS",))
def _normalized_add_sums_kernel(
    R,  # relevance of u + v, [B, M] (contiguous)
    U,  # first summand, [B, M]
    V,  # second summand, [B, M]
    Partial,  # partial sums, [B, CHUNKS, 3] float32/float64
    M,  # elements per sample
    CHUNKS,  # programs per sample
    BLOCK: tl.constexpr,  # elements per step
    STEPS: tl.constexpr,  # steps per program
):
    i_b = tl.program_id(0).to(tl.int64)
    i_c = tl.program_id(1).to(tl.int64)
    base = i_b * M
    acc_u = tl.zeros([BLOCK], dtype=tl.float64)
    acc_v = tl.zeros([BLOCK], dtype=tl.float64)
    acc_r = tl.zeros([BLOCK], dtype=tl.float64)
    for step in range(STEPS):
        o_m = (i_c * STEPS + step) * BLOCK + tl.arange(0, BLOCK)
        m_m = o_m < M
        b_r = to_f64(tl.load(R + base + o_m, mask=m_m, other=0.0))
        b_u = to_f64(tl.load(U + base + o_m, mask=m_m, other=0.0))
        b_v = to_f64(tl.load(V + base + o_m, mask=m_m, other=0.0))
        b_s = safe_div_ref(b_r, b_u + b_v)
        acc_u += b_u * b_s
        acc_v += b_v * b_s
        acc_r += b_r
    out = Partial + (i_b * CHUNKS + i_c) * 3
    tl.store(out + 0, tl.sum(acc_u, axis=0))
    tl.store(out + 1, tl.sum(acc_v, axis=0))
    tl.store(out + 2, tl.sum(acc_r, axis=0))


@triton.jit
def _normalized_add_scale_kernel(
    R,  # relevance of u + v, [B, M]
    U,  # [B, M]
    V,  # [B, M]
    FU,  # per-sample factor of u, [B] float64
    FV,  # per-sample factor of v, [B] float64
    RU,  # out: relevance of u, [B, M]
    RV,  # out: relevance of v, [B, M]
    M,  # elements per sample
    BLOCK: tl.constexpr,
):
    i_b = tl.program_id(0).to(tl.int64)
    i_m = tl.program_id(1).to(tl.int64)
    o_m = i_m * BLOCK + tl.arange(0, BLOCK)
    m_m = o_m < M
    base = i_b * M
    b_r = to_f64(tl.load(R + base + o_m, mask=m_m, other=0.0))
    b_u = to_f64(tl.load(U + base + o_m, mask=m_m, other=0.0))
    b_v = to_f64(tl.load(V + base + o_m, mask=m_m, other=0.0))
    b_s = safe_div_ref(b_r, b_u + b_v)
    f_u = tl.load(FU + i_b)
    f_v = tl.load(FV + i_b)
    tl.store(RU + base + o_m, from_f64(b_u * b_s * f_u, RU.dtype.element_ty), mask=m_m)
    tl.store(RV + base + o_m, from_f64(b_v * b_s * f_v, RV.dtype.element_ty), mask=m_m)


# The scale pass is elementwise: a block per program, the default first.
SCALE_CANDIDATES = (candidate(4, BLOCK=1024), candidate(8, BLOCK=2048))


def normalized_add_bwd(
    relevance: torch.Tensor, u: torch.Tensor, v: torch.Tensor, block: int = 1024, steps: int = 4
) -> tuple[torch.Tensor, torch.Tensor]:
    """Launcher. Args: ``relevance``, ``u``, ``v`` of one shape `[B, ...]` (same dtype and device).
    Returns ``(R_u, R_v)`` of that shape and dtype; sums are accumulated in float64."""
    shape, b = relevance.shape, relevance.shape[0]
    r2, u2, v2 = (t.reshape(b, -1).contiguous() for t in (relevance, u, v))
    m = r2.shape[1]
    chunks = triton.cdiv(m, block * steps)
    partial = torch.empty(b, chunks, 3, dtype=torch.float64, device=r2.device)
    # BLOCK and STEPS fix the partial-sum buffer's size, so only the warps are free
    launch(_normalized_add_sums_kernel, lambda meta: (b, chunks), (r2, u2, v2, partial, m, chunks),
           dict(BLOCK=block, STEPS=steps), (candidate(4), candidate(8)), ("M",))
    f_u, f_v = normalized_add_factors(*partial.sum(dim=1).unbind(-1))
    r_u, r_v = torch.empty_like(r2), torch.empty_like(r2)
    launch(_normalized_add_scale_kernel, lambda meta: (b, triton.cdiv(m, meta["BLOCK"])),
           (r2, u2, v2, f_u, f_v, r_u, r_v, m), {}, SCALE_CANDIDATES, ("M",))
    return r_u.view(shape), r_v.view(shape)
