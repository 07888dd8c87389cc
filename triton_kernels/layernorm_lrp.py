"""LayerNorm backward fused with the relevance rules around it: one row (token) per program.

For ``z = u + v`` (or ``z = u``) feeding ``LN``:
  gradient   ``dz = LN_backward(z; dY) (+ dR)``, with ``dR`` the gradient reaching ``z`` by the residual path;
  relevance  LayerNorm is an identity (docs/method.md §2.7): ``R_z = R_LN``, or ``clone(z; R_LN, R_res)`` when
             ``z`` also feeds the residual (§2.9); then the normalized add (§2.8) splits ``R_z`` over ``u`` and ``v``
             with per-sample totals.
Pass 1 (``_ln_rel_pass1_kernel``) writes ``dz`` and either ``R_z`` (no split) or the row's partial sums of
``u·S``, ``v·S`` and ``R_z`` (``S = safe_divide(R_z, z)``), float64. The host adds a sample's rows and forms the
two factors. Pass 2 (``_ln_rel_pass2_kernel``) recomputes ``R_z`` and writes ``R_u``, ``R_v``.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl
from transformer_lrp.triton_kernels._common import from_f64, safe_div_ref
from transformer_lrp.triton_kernels._launch import candidate, launch, register_budget

from transformer_lrp._numerics import normalized_add_factors


@triton.jit
def _relevance_z(b_z, R_LN, R_RES, off, mask, HAS_RRES: tl.constexpr, DT: tl.constexpr):
    b_r = tl.load(R_LN + off, mask=mask, other=0.0).to(DT)
    if HAS_RRES:  # clone: R = z ⊙ safe_divide(R_LN + R_res, z)
        b_r = b_z * safe_div_ref(b_r + tl.load(R_RES + off, mask=mask, other=0.0).to(DT), b_z)
    return b_r


@triton.jit
def _ln_rel_pass1_kernel(
    U, V, W, G_LN, G_RES, R_LN, R_RES,  # rows [M, D] (W: [D] LayerNorm weight)
    DZ, RZ,  # out: [M, D]
    PART,  # out: [M, 3] float64 partial sums (SPLIT)
    D,
    LN_EPS,  # [1] the LayerNorm's eps in the compute dtype (a float argument would reach a GPU as float32)
    HAS_V: tl.constexpr, HAS_W: tl.constexpr, HAS_GRES: tl.constexpr, HAS_REL: tl.constexpr,
    HAS_RRES: tl.constexpr, SPLIT: tl.constexpr, DT: tl.constexpr, BLOCK_D: tl.constexpr,
    RMS: tl.constexpr = False, W_OFFSET: tl.constexpr = 0.0,  # RMSNorm: no centering, the weight w + W_OFFSET
    CONST_SCALE: tl.constexpr = False,  # the scale 1/σ held constant (AttnLRP's modified gradient)
):
    i_m = tl.program_id(0).to(tl.int64)
    o_d = tl.arange(0, BLOCK_D)
    m_d = o_d < D
    off = i_m * D + o_d
    b_u = tl.load(U + off, mask=m_d, other=0.0).to(DT)
    b_v = tl.zeros_like(b_u)
    if HAS_V:
        b_v = tl.load(V + off, mask=m_d, other=0.0).to(DT)
    b_z = b_u + b_v
    # the norm's backward (statistics recomputed from z); RMSNorm: no mean, no centering
    centered = b_z
    if not RMS:
        centered = tl.where(m_d, b_z - tl.sum(b_z, axis=0) / D, 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(centered * centered, axis=0) / D + tl.load(LN_EPS).to(DT))
    x_hat = centered * rstd
    b_dy = tl.load(G_LN + off, mask=m_d, other=0.0).to(DT)
    if HAS_W:
        b_dy = b_dy * (tl.load(W + o_d, mask=m_d, other=0.0).to(DT) + W_OFFSET)
    c_xhat = tl.sum(b_dy * x_hat, axis=0) / D
    if CONST_SCALE:  # the gradient of the linear map x ↦ (x − mean)·c (RMSNorm: x·c)
        c_xhat = 0.0
    if RMS:
        b_dz = (b_dy - x_hat * c_xhat) * rstd
    else:
        b_dz = (b_dy - x_hat * c_xhat - tl.sum(b_dy, axis=0) / D) * rstd
    if HAS_GRES:
        b_dz += tl.load(G_RES + off, mask=m_d, other=0.0).to(DT)
    tl.store(DZ + off, b_dz.to(DZ.dtype.element_ty), mask=m_d)
    if HAS_REL:
        b_r = _relevance_z(b_z, R_LN, R_RES, off, m_d, HAS_RRES, DT)
        if SPLIT:
            b_s = safe_div_ref(b_r.to(tl.float64), b_z.to(tl.float64))
            tl.store(PART + i_m * 3 + 0, tl.sum(b_u.to(tl.float64) * b_s, axis=0))
            tl.store(PART + i_m * 3 + 1, tl.sum(b_v.to(tl.float64) * b_s, axis=0))
            tl.store(PART + i_m * 3 + 2, tl.sum(b_r.to(tl.float64), axis=0))
        else:
            tl.store(RZ + off, b_r.to(RZ.dtype.element_ty), mask=m_d)


@triton.jit(do_not_specialize=("ROWS",))  # a new sequence length reuses the kernel
def _ln_rel_pass2_kernel(
    U, V, R_LN, R_RES, FU, FV,  # FU, FV: [B] float64 per-sample factors
    RU, RV,  # out: [M, D]
    D, ROWS,  # ROWS: rows per sample
    HAS_RRES: tl.constexpr, DT: tl.constexpr, BLOCK_D: tl.constexpr,
):
    i_m = tl.program_id(0).to(tl.int64)
    o_d = tl.arange(0, BLOCK_D)
    m_d = o_d < D
    off = i_m * D + o_d
    b_u = tl.load(U + off, mask=m_d, other=0.0).to(DT)
    b_v = tl.load(V + off, mask=m_d, other=0.0).to(DT)
    b_z = b_u + b_v
    b_r = _relevance_z(b_z, R_LN, R_RES, off, m_d, HAS_RRES, DT)
    b_s = safe_div_ref(b_r.to(tl.float64), b_z.to(tl.float64))
    i_b = i_m // ROWS
    tl.store(RU + off, from_f64(b_u.to(tl.float64) * b_s * tl.load(FU + i_b), RU.dtype.element_ty), mask=m_d)
    tl.store(RV + off, from_f64(b_v.to(tl.float64) * b_s * tl.load(FV + i_b), RV.dtype.element_ty), mask=m_d)


_EPS: dict[tuple, torch.Tensor] = {}


def _eps_tensor(ln_eps: float, dtype: torch.dtype, device) -> torch.Tensor:
    """The eps as a one-element tensor of the compute dtype, cached (a fresh host-to-device copy per call would
    synchronize the stream): one compiled kernel serves every eps, exact in float64."""
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    key = (float(ln_eps), acc, str(device))
    if key not in _EPS:
        _EPS[key] = torch.tensor([ln_eps], dtype=acc, device=device)
    return _EPS[key]


@functools.cache
def _row_candidates(block_d: int, dt):
    """One row per program, the whole row in registers: about 8 (float64: 4) values per thread and tensor by
    default, then twice as many warps (half as many spills for the widest rows). Compile-checked for spills."""
    per_thread = 4 if dt == tl.float64 else 8
    default = min(16, max(1, block_d // (32 * per_thread)))
    # one CTA's register budget: unbudgeted, ptxas aimed ViT-H's 1280-wide bf16 rows (8 warps) at five CTAs per SM
    # and spilled 4 B at 48 registers; a budget for four (64 at 8 warps, 32 at 16) spilled up to 420 B on the widest
    # rows, which use about 80 registers
    return tuple(dict.fromkeys(candidate(w, 1, register_budget(w)) for w in (default, min(16, 2 * default))))


def layernorm_relevance_bwd(
    u: torch.Tensor, v: torch.Tensor | None, weight: torch.Tensor | None, ln_eps: float, grad_norm_out: torch.Tensor,
    rel_norm_out: torch.Tensor | None, grad_residual: torch.Tensor | None = None,
    rel_residual: torch.Tensor | None = None, rms: bool = False, weight_offset: float = 0.0,
    detach_scale: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Launcher; see ``transformer_lrp.ops.layernorm_relevance``. All `[B, N, D]` tensors of one shape."""
    shape = u.shape
    b, d = shape[0], shape[-1]
    flat = [None if t is None else t.reshape(-1, d).contiguous()
            for t in (u, v, grad_norm_out, grad_residual, rel_norm_out, rel_residual)]
    u2, v2, g_ln, g_res, r_ln, r_res = flat
    m = u2.shape[0]
    dt = tl.float64 if u.dtype == torch.float64 else tl.float32
    block_d = triton.next_power_of_2(d)
    dummy = u2.new_empty(1)
    has_rel = r_ln is not None
    split = v is not None and has_rel
    dz = torch.empty_like(u2)
    rz = torch.empty_like(u2) if has_rel and not split else dummy
    part = torch.empty(m, 3, dtype=torch.float64, device=u.device) if split else dummy
    rows = _row_candidates(block_d, dt)
    launch(_ln_rel_pass1_kernel, lambda meta: (m,),
           (u2, v2 if v2 is not None else dummy, weight if weight is not None else dummy, g_ln,
            g_res if g_res is not None else dummy, r_ln if has_rel else dummy, r_res if r_res is not None else dummy,
            dz, rz, part, d, _eps_tensor(ln_eps, u.dtype, u.device)),
           dict(HAS_V=v2 is not None, HAS_W=weight is not None, HAS_GRES=g_res is not None,
                HAS_REL=has_rel, HAS_RRES=r_res is not None, SPLIT=split, DT=dt, BLOCK_D=block_d, RMS=rms,
                W_OFFSET=float(weight_offset), CONST_SCALE=detach_scale), rows, ("D",))
    if not has_rel:
        return dz.view(shape), None, None
    if not split:
        return dz.view(shape), rz.view(shape), None
    f_u, f_v = normalized_add_factors(*part.view(b, -1, 3).sum(dim=1).unbind(-1))
    r_u, r_v = torch.empty_like(u2), torch.empty_like(u2)
    launch(_ln_rel_pass2_kernel, lambda meta: (m,),
           (u2, v2, r_ln, r_res if r_res is not None else dummy, f_u.contiguous(), f_v.contiguous(), r_u, r_v, d,
            m // b), dict(HAS_RRES=r_res is not None, DT=dt, BLOCK_D=block_d), rows, ("D",))
    return dz.view(shape), r_u.view(shape), r_v.view(shape)
