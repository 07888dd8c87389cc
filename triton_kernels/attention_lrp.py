"""Softmax attention, forward and relevance backward, flash-attention style: no ``[N, N]`` tile ever reaches memory.

Per (sample, head): ``sc = scale · Q Kᵀ`` (padded keys masked; optionally causal and a sliding window),
``P = softmax(sc)``, ``O = P V``. Keys and values may be shared by a group of query heads (GQA/MQA: ``K, V`` have
``H / GROUP`` heads and query head ``h`` reads key head ``h // GROUP``); nothing is repeated in memory.

``_attn_fwd_kernel`` (grid: query tiles × B·H) writes ``O`` and the row log-sum-exp ``lse`` (online softmax).

``_attn_bwd_prep_kernel`` (grid: query tiles × B·H) forms, from ``O``, the output gradient ``dO`` and the output
relevance ``R_O``, the row terms the backward reads: ``Δ = rowsum(dO ⊙ O)`` and ``hS = safe_divide(R_O, O) / 2``
(the halved G-rule factor, docs/method.md §2.6), so that no float32 ``[B, H, N, d]`` temporary is formed on the host.

The backward recomputes ``P = exp(sc − lse)`` tile by tile and forms
  gradient   ``dP = dO Vᵀ``, ``dS = P ⊙ (dP − Δ)``, ``dQ = scale·dS K``, ``dK = scale·dSᵀ Q``, ``dV = Pᵀ dO``;
  relevance  ``R_A = P ⊙ (hS Vᵀ)``, ``R_V = V ⊙ (Pᵀ hS)``; the softmax is an identity, the BERT mask add a z-rule
             (``R_sc = sc ⊙ safe_divide(R_A, sc)``, its per-sample normalization applied by the launcher), then
             ``T = safe_divide(R_sc, sc, eps·scale)``, ``R_Q = Q ⊙ (T K)·scale/2``, ``R_K = K ⊙ (Tᵀ Q)·scale/2``;
  the map    ``E = (dP ⊙ R_A)⁺`` (transformer attribution), ``(dP ⊙ P)⁺`` (GAE), ``P`` (rollout) or ``R_A⁺``
             (partial LRP), reduced in the kernel: the streaming-rollout product ``Σ_i w_i E_ij`` per key and
             head, the row sums ``Σ_j E_ij`` per query and head, or (on request) the head mean ``[B, Nq, Nk]``
             accumulated atomically.
``_attn_bwd_kv_kernel`` (grid: key tiles × B·H_kv; the group's query heads in a loop, so key-side gradients and
relevance are summed over the group in registers) owns ``dK, dV, R_K, R_V`` and the rollout product;
``_attn_bwd_q_kernel`` (grid: query tiles × B·H) owns ``dQ, R_Q`` and the row sums.

Tiles that are masked whole are never visited: keys before a sample's first real key or after its last one,
keys after the query tile under the causal mask, keys behind the sliding window, and (causal) query rows before a
sample's first real key, which see padding only. ``HEAD_DIM`` is a compile-time constant: with a power-of-two head
width the ``d`` mask disappears and the row loads vectorize (16-byte ``ld.global.v4`` / ``cp.async``).
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl
from transformer_lrp.triton_kernels._common import safe_div
from transformer_lrp.triton_kernels._launch import Candidate, candidate, launch, register_budget

from transformer_lrp._numerics import EPS, accumulation_dtype, normalized_add_factors
from transformer_lrp._target import device_arch, interpreting, tf32_products

_NEG = tl.constexpr(-1.0e30)  # finite "minus infinity": a fully masked tile never produces inf − inf

MAP_NONE, MAP_TA, MAP_GAE, MAP_ATTN, MAP_REL = 0, 1, 2, 3, 4
# Sizes the kernels only compare against (masks, loop bounds): not specialized on their value (1, or divisibility
# by 16), so a new sequence length or head count reuses the compiled kernel. Strides, the head width (a
# constexpr) and the group size (1 or not) stay specialized.
_SIZES = ("H", "NQ", "NK", "WINDOW")
MAP_MODES = {None: MAP_NONE, "transformer_attribution": MAP_TA, "gae": MAP_GAE, "rollout": MAP_ATTN,
             "partial_lrp": MAP_REL}
_NEEDS_RA = (MAP_TA, MAP_REL)  # maps that read R_A


@triton.jit
def _mm(a, b, MM: tl.constexpr, DT: tl.constexpr, PREC: tl.constexpr):
    # operands in the model's dtype (tensor cores for bf16/fp16), accumulation in DT
    return tl.dot(a.to(MM), b.to(MM), input_precision=PREC, out_dtype=DT)


@triton.jit
def _row_mask(mask_rows, mask_d, EVEN_D: tl.constexpr):
    # a power-of-two head width needs no mask along d (the loads and stores then vectorize)
    mask = mask_rows[:, None]
    if not EVEN_D:
        mask = mask & mask_d[None, :]
    return mask


@triton.jit
def _load_rows(ptr, offs, mask_rows, o_d, mask_d, stride_n, DT: tl.constexpr, EVEN_D: tl.constexpr):
    return tl.load(ptr + offs[:, None] * stride_n + o_d[None, :], mask=_row_mask(mask_rows, mask_d, EVEN_D),
                   other=0.0).to(DT)


@triton.jit
def _key_tile(K, V, KEEP, i_b, i_hk, o_n, o_d, m_d, s_kb, s_kh, s_kn, s_vb, s_vh, s_vn, NK,
              HAS_MASK: tl.constexpr, MM: tl.constexpr, EVEN_D: tl.constexpr):
    """K and V rows ``o_n`` of one (sample, key head), and which of them are real keys (in range, not padding)."""
    m_n = o_n < NK
    valid_n = m_n
    if HAS_MASK:
        valid_n = valid_n & (tl.load(KEEP + i_b * NK + o_n, mask=m_n, other=0) != 0)
    b_k = _load_rows(K + i_b * s_kb + i_hk * s_kh, o_n, m_n, o_d, m_d, s_kn, MM, EVEN_D)
    b_v = _load_rows(V + i_b * s_vb + i_hk * s_vh, o_n, m_n, o_d, m_d, s_vn, MM, EVEN_D)
    return valid_n, b_k, b_v


@triton.jit
def _query_tile(Q, DO, HS, LSE, DELTA, i_b, i_h, i_bh, o_m, m_m, o_d, m_d, s_qb, s_qh, s_qn, s_db, s_dh, s_dn,
                s_hb, s_hh, s_hn, NQ, NEED_DP: tl.constexpr, NEED_GRAD: tl.constexpr, NEED_RA: tl.constexpr,
                DT: tl.constexpr, MM: tl.constexpr, EVEN_D: tl.constexpr, BLOCK_M: tl.constexpr,
                BLOCK_D: tl.constexpr):
    """Q, lse and (where needed) dO, hS, Δ rows ``o_m`` of one (sample, head); zeros where not needed. The product
    operands stay in the products' dtype ``MM`` (half the registers for bf16), statistics in ``DT``."""
    b_q = _load_rows(Q + i_b * s_qb + i_h * s_qh, o_m, m_m, o_d, m_d, s_qn, MM, EVEN_D)
    b_lse = tl.load(LSE + i_bh * NQ + o_m, mask=m_m, other=0.0).to(DT)
    b_do = tl.zeros([BLOCK_M, BLOCK_D], dtype=MM)
    b_hs = tl.zeros([BLOCK_M, BLOCK_D], dtype=MM)
    b_delta = tl.zeros([BLOCK_M], dtype=DT)
    if NEED_DP:
        b_do = _load_rows(DO + i_b * s_db + i_h * s_dh, o_m, m_m, o_d, m_d, s_dn, MM, EVEN_D)
    if NEED_GRAD:
        b_delta = tl.load(DELTA + i_bh * NQ + o_m, mask=m_m, other=0.0).to(DT)
    if NEED_RA:
        b_hs = _load_rows(HS + i_b * s_hb + i_h * s_hh, o_m, m_m, o_d, m_d, s_hn, MM, EVEN_D)
    return b_q, b_lse, b_do, b_hs, b_delta


@triton.jit
def _pairs(o_m, o_n, m_m, valid_n, WINDOW, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr):
    """Which (query, key) pairs of a tile attend: queries in range, real keys, and (causal) keys at or before the
    query, (sliding window) less than ``WINDOW`` positions behind it."""
    valid = m_m[:, None] & valid_n[None, :]
    if CAUSAL:
        valid = valid & (o_n[None, :] <= o_m[:, None])
    if HAS_WINDOW:
        valid = valid & (o_m[:, None] - o_n[None, :] < WINDOW)
    return valid


@triton.jit
def _key_range(KRANGE, i_b, m0, NK, WINDOW, HAS_MASK: tl.constexpr, CAUSAL: tl.constexpr,
               HAS_WINDOW: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """The key tiles a query tile starting at ``m0`` can attend: ``[lo, hi)``, ``lo`` on a tile boundary. Tiles
    outside are masked whole (padding before the first or after the last real key, the future, beyond the window)."""
    lo = 0
    hi = NK
    if HAS_MASK:  # KRANGE [B, 2]: the first real key and one past the last
        lo = tl.load(KRANGE + i_b * 2)
        hi = tl.load(KRANGE + i_b * 2 + 1)
    if CAUSAL:
        hi = tl.minimum(hi, m0 + BLOCK_M)
    if HAS_WINDOW:
        lo = tl.maximum(lo, m0 - WINDOW + 1)
    return (lo // BLOCK_N) * BLOCK_N, hi


@triton.jit
def _query_range(KRANGE, i_b, n0, NQ, WINDOW, HAS_MASK: tl.constexpr, CAUSAL: tl.constexpr,
                 HAS_WINDOW: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """The query tiles that attend some key of the key tile starting at ``n0`` (see ``_key_range``); empty for a
    tile of padded keys. Causal: queries before the first real key see padding only."""
    lo = 0
    hi = NQ
    if HAS_MASK:
        first = tl.load(KRANGE + i_b * 2)
        end = tl.load(KRANGE + i_b * 2 + 1)
        hi = tl.where((n0 < end) & (n0 + BLOCK_N > first), hi, 0)
        if CAUSAL:
            lo = first
    if CAUSAL:
        lo = tl.maximum(lo, n0)
    if HAS_WINDOW:
        hi = tl.minimum(hi, n0 + BLOCK_N - 1 + WINDOW)
    return (lo // BLOCK_M) * BLOCK_M, hi


@triton.jit(do_not_specialize=_SIZES)
def _attn_fwd_kernel(
    Q, K, V, KEEP, KRANGE, OUT, LSE,  # Q [B,H,NQ,d], K/V [B,H/GROUP,NK,d] (last stride 1), KEEP [B,NK] int8,
    # KRANGE [B,2] int32, OUT like Q, LSE [B,H,NQ]
    s_qb, s_qh, s_qn, s_kb, s_kh, s_kn, s_vb, s_vh, s_vn, s_ob, s_oh, s_on,
    CONSTS,  # [scale, …] in the compute dtype
    H, GROUP, NQ, NK, WINDOW,
    HEAD_DIM: tl.constexpr, HAS_MASK: tl.constexpr, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr,
    DT: tl.constexpr, MM: tl.constexpr, PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    i_bh = tl.program_id(0).to(tl.int64)
    i_m = tl.program_id(1)
    scale = tl.load(CONSTS)
    i_b, i_h = i_bh // H, i_bh % H
    i_hk = i_h // GROUP
    EVEN_D: tl.constexpr = HEAD_DIM == BLOCK_D
    o_m = i_m * BLOCK_M + tl.arange(0, BLOCK_M)
    o_d = tl.arange(0, BLOCK_D)
    m_m, m_d = o_m < NQ, o_d < HEAD_DIM
    b_q = (_load_rows(Q + i_b * s_qb + i_h * s_qh, o_m, m_m, o_d, m_d, s_qn, MM, EVEN_D) * scale).to(MM)
    row_max = tl.full([BLOCK_M], _NEG, dtype=DT)
    row_sum = tl.zeros([BLOCK_M], dtype=DT)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=DT)
    lo, hi = _key_range(KRANGE, i_b, i_m * BLOCK_M, NK, WINDOW, HAS_MASK, CAUSAL, HAS_WINDOW, BLOCK_M, BLOCK_N)
    for start in range(lo, hi, BLOCK_N):
        o_n = start + tl.arange(0, BLOCK_N)
        valid, b_k, b_v = _key_tile(K, V, KEEP, i_b, i_hk, o_n, o_d, m_d, s_kb, s_kh, s_kn, s_vb, s_vh, s_vn, NK,
                                    HAS_MASK, MM, EVEN_D)
        b_s = _mm(b_q, tl.trans(b_k), MM, DT, PREC)
        valid2 = valid[None, :]  # rows past NQ are not stored: masking them too would cost registers
        if CAUSAL:
            valid2 = valid2 & (o_n[None, :] <= o_m[:, None])
        if HAS_WINDOW:
            valid2 = valid2 & (o_m[:, None] - o_n[None, :] < WINDOW)
        b_s = tl.where(valid2, b_s, _NEG)
        new_max = tl.maximum(row_max, tl.max(b_s, axis=1))
        b_p = tl.where(valid2, tl.exp(b_s - new_max[:, None]), 0.0)
        alpha = tl.exp(row_max - new_max)
        row_sum = row_sum * alpha + tl.sum(b_p, axis=1)
        acc = acc * alpha[:, None] + _mm(b_p, b_v, MM, DT, PREC)
        row_max = new_max
    # a query with no real key (a left-padded position) attends to nothing: O = 0 instead of 0/0, and its lse is a
    # finite "plus infinity", so that the backward's exp(sc − lse) is 0 without overflowing
    empty = row_sum == 0.0
    row_sum = tl.where(empty, 1.0, row_sum)
    b_o = acc / row_sum[:, None]
    o_ptr = OUT + i_b * s_ob + i_h * s_oh + o_m[:, None] * s_on + o_d[None, :]
    tl.store(o_ptr, b_o.to(OUT.dtype.element_ty), mask=_row_mask(m_m, m_d, EVEN_D))
    b_lse = tl.where(empty, -_NEG, row_max + tl.log(row_sum))
    tl.store(LSE + i_bh * NQ + o_m, b_lse.to(LSE.dtype.element_ty), mask=m_m)


@triton.jit(do_not_specialize=("NQ",))
def _attn_bwd_prep_kernel(
    O, DO, RO,  # noqa: E741 — [B,H,NQ,d] (last stride 1): the forward's output, its gradient and its relevance
    DELTA, HS,  # out: Δ [B,H,NQ] (compute dtype), hS [B,H,NQ,d] contiguous (the model's dtype)
    s_ob, s_oh, s_on, s_db, s_dh, s_dn, s_rb, s_rh, s_rn,
    CONSTS,  # [scale, eps·scale, 1/H, eps]
    H, NQ,
    HEAD_DIM: tl.constexpr, NEED_DELTA: tl.constexpr, NEED_HS: tl.constexpr, DT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    i_bh = tl.program_id(0).to(tl.int64)
    i_m = tl.program_id(1)
    i_b, i_h = i_bh // H, i_bh % H
    EVEN_D: tl.constexpr = HEAD_DIM == BLOCK_D
    o_m = i_m * BLOCK_M + tl.arange(0, BLOCK_M)
    o_d = tl.arange(0, BLOCK_D)
    m_m, m_d = o_m < NQ, o_d < HEAD_DIM
    b_o = _load_rows(O + i_b * s_ob + i_h * s_oh, o_m, m_m, o_d, m_d, s_on, DT, EVEN_D)
    if NEED_DELTA:
        b_do = _load_rows(DO + i_b * s_db + i_h * s_dh, o_m, m_m, o_d, m_d, s_dn, DT, EVEN_D)
        tl.store(DELTA + i_bh * NQ + o_m, tl.sum(b_do * b_o, axis=1).to(DELTA.dtype.element_ty), mask=m_m)
    if NEED_HS:
        b_r = _load_rows(RO + i_b * s_rb + i_h * s_rh, o_m, m_m, o_d, m_d, s_rn, DT, EVEN_D)
        b_hs = safe_div(b_r, b_o, tl.load(CONSTS + 3)) * 0.5
        hs_ptr = HS + i_bh * NQ * HEAD_DIM + o_m[:, None] * HEAD_DIM + o_d[None, :]
        tl.store(hs_ptr, b_hs.to(HS.dtype.element_ty), mask=_row_mask(m_m, m_d, EVEN_D))


@triton.jit
def _tile(b_q, b_k, b_v, b_do, b_hs, b_lse, b_delta, valid, scale,
          NEED_DP: tl.constexpr, NEED_RA: tl.constexpr, NEED_GRAD: tl.constexpr, DT: tl.constexpr,
          MM: tl.constexpr, PREC: tl.constexpr):
    """One [BLOCK_M, BLOCK_N] tile of the backward: scores, P, dP, R_A, dS (zeros where not needed)."""
    b_sc = _mm(b_q * scale, tl.trans(b_k), MM, DT, PREC)  # (scale·Q) Kᵀ, rounded as the reference
    b_p = tl.where(valid, tl.exp(b_sc - b_lse[:, None]), 0.0)
    b_dp = tl.zeros_like(b_p)
    b_ra = tl.zeros_like(b_p)
    b_ds = tl.zeros_like(b_p)
    if NEED_DP:
        b_dp = _mm(b_do, tl.trans(b_v), MM, DT, PREC)
    if NEED_RA:
        b_ra = b_p * _mm(b_hs, tl.trans(b_v), MM, DT, PREC)
    if NEED_GRAD:
        b_ds = b_p * (b_dp - b_delta[:, None])
    return b_sc, b_p, b_dp, b_ra, b_ds


@triton.jit
def _score_factor(b_sc, b_ra, eps, eps_scale, MASK_ADD: tl.constexpr):
    """T = safe_divide(R_sc, sc, eps·scale), with R_sc the mask add's z-rule share (unnormalized) or R_A."""
    b_r = b_ra
    if MASK_ADD:
        b_r = b_sc * safe_div(b_ra, b_sc, eps)
    return safe_div(b_r, b_sc, eps_scale), b_r


@triton.jit
def _map_tile(b_p, b_dp, b_ra, MAP: tl.constexpr):
    # MAP 1: transformer attribution (∇A ⊙ R_A)⁺; 2: GAE (∇A ⊙ A)⁺; 3: rollout, A itself; 4: partial LRP, (R_A)⁺
    b_e = b_p
    if MAP == 1:
        b_e = tl.maximum(b_dp * b_ra, 0.0)
    if MAP == 2:
        b_e = tl.maximum(b_dp * b_p, 0.0)
    if MAP == 4:
        b_e = tl.maximum(b_ra, 0.0)
    return b_e


@triton.jit(do_not_specialize=_SIZES)
def _attn_bwd_kv_kernel(
    Q, K, V, DO, HS, LSE, DELTA, KEEP, KRANGE, W,  # DO, HS like Q; LSE, DELTA [B,H,NQ]; W [B,NQ] rollout weights / H
    DK, DV, RK, RV,  # outputs like K (contiguous [B,H/GROUP,NK,d]), summed over the group's query heads
    ROLL,  # out: [B,H/GROUP,NK] Σ_{h in group} Σ_i W_i E_hij
    SUMS,  # out: [B,H/GROUP,NK,2] per key Σ_i R_sc (z-rule share) and Σ_i R_A (the mask add's normalization)
    MAPOUT,  # out (atomic): [B,NQ,NK] head mean of E
    s_qb, s_qh, s_qn, s_kb, s_kh, s_kn, s_vb, s_vh, s_vn, s_db, s_dh, s_dn, s_hb, s_hh, s_hn,
    CONSTS,  # [scale, eps·scale, 1/H, eps] in the compute dtype (a float argument would be float32 on a GPU)
    H, GROUP, NQ, NK, WINDOW,
    HEAD_DIM: tl.constexpr, HAS_MASK: tl.constexpr, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr,
    MASK_ADD: tl.constexpr, NEED_GRAD: tl.constexpr,
    NEED_REL: tl.constexpr, MAP: tl.constexpr, ROLLOUT: tl.constexpr, WANT_MAP: tl.constexpr,
    NEED_DP: tl.constexpr, NEED_RA: tl.constexpr,  # dO Vᵀ, and R_A, are needed (gradient / relevance / map)
    DT: tl.constexpr, MM: tl.constexpr, PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    i_bhk = tl.program_id(0).to(tl.int64)
    i_n = tl.program_id(1)
    scale, eps_scale = tl.load(CONSTS), tl.load(CONSTS + 1)
    inv_heads, eps = tl.load(CONSTS + 2), tl.load(CONSTS + 3)
    heads_kv = H // GROUP
    i_b, i_hk = i_bhk // heads_kv, i_bhk % heads_kv
    EVEN_D: tl.constexpr = HEAD_DIM == BLOCK_D
    o_n = i_n * BLOCK_N + tl.arange(0, BLOCK_N)
    o_d = tl.arange(0, BLOCK_D)
    m_n, m_d = o_n < NK, o_d < HEAD_DIM
    valid_n, b_k, b_v = _key_tile(K, V, KEEP, i_b, i_hk, o_n, o_d, m_d, s_kb, s_kh, s_kn, s_vb, s_vh, s_vn, NK,
                                  HAS_MASK, MM, EVEN_D)
    acc_dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=DT)
    acc_dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=DT)
    acc_rk = tl.zeros([BLOCK_N, BLOCK_D], dtype=DT)
    acc_rv = tl.zeros([BLOCK_N, BLOCK_D], dtype=DT)
    acc_roll = tl.zeros([BLOCK_N], dtype=DT)
    sum_u = tl.zeros([BLOCK_N], dtype=DT)
    sum_r = tl.zeros([BLOCK_N], dtype=DT)
    lo, hi = _query_range(KRANGE, i_b, i_n * BLOCK_N, NQ, WINDOW, HAS_MASK, CAUSAL, HAS_WINDOW, BLOCK_M, BLOCK_N)
    # One flat loop over (query head of the group, query tile): nested loops made ptxas spill loop-invariant pointers
    # (16 B at 48 registers) at head dims 128 and 256.
    n_tiles = tl.cdiv(tl.maximum(hi - lo, 0), BLOCK_M)
    for step in range(0, GROUP * n_tiles):
        i_g = step // n_tiles
        start = lo + (step - i_g * n_tiles) * BLOCK_M
        i_h = i_hk * GROUP + i_g
        i_bh = i_b * H + i_h
        o_m = start + tl.arange(0, BLOCK_M)
        m_m = o_m < NQ
        valid = _pairs(o_m, o_n, m_m, valid_n, WINDOW, CAUSAL, HAS_WINDOW)
        b_q, b_lse, b_do, b_hs, b_delta = _query_tile(
            Q, DO, HS, LSE, DELTA, i_b, i_h, i_bh, o_m, m_m, o_d, m_d, s_qb, s_qh, s_qn, s_db, s_dh, s_dn, s_hb,
            s_hh, s_hn, NQ, NEED_DP, NEED_GRAD, NEED_RA, DT, MM, EVEN_D, BLOCK_M, BLOCK_D)
        b_sc, b_p, b_dp, b_ra, b_ds = _tile(b_q, b_k, b_v, b_do, b_hs, b_lse, b_delta, valid, scale,
                                            NEED_DP, NEED_RA, NEED_GRAD, DT, MM, PREC)
        if NEED_GRAD:
            acc_dv += _mm(tl.trans(b_p), b_do, MM, DT, PREC)
            acc_dk += _mm(tl.trans(b_ds), b_q, MM, DT, PREC)
        if NEED_REL:
            acc_rv += _mm(tl.trans(b_p), b_hs, MM, DT, PREC)
            b_t, b_r = _score_factor(b_sc, b_ra, eps, eps_scale, MASK_ADD)
            acc_rk += _mm(tl.trans(b_t), b_q, MM, DT, PREC)
            if MASK_ADD:
                sum_u += tl.sum(b_r, axis=0)
                sum_r += tl.sum(b_ra, axis=0)
        if MAP != 0:
            b_e = _map_tile(b_p, b_dp, b_ra, MAP)
            if ROLLOUT:
                b_w = tl.load(W + i_b * NQ + o_m, mask=m_m, other=0.0).to(DT)
                acc_roll += tl.sum(b_w[:, None] * b_e, axis=0)
            if WANT_MAP:
                m_ptr = MAPOUT + i_b * NQ * NK + o_m[:, None] * NK + o_n[None, :]
                tl.atomic_add(m_ptr, (b_e * inv_heads).to(MAPOUT.dtype.element_ty), mask=valid)
    kv_off = i_bhk * NK * HEAD_DIM + o_n[:, None] * HEAD_DIM + o_d[None, :]
    m_kv = _row_mask(m_n, m_d, EVEN_D)
    if NEED_GRAD:
        tl.store(DK + kv_off, (acc_dk * scale).to(DK.dtype.element_ty), mask=m_kv)
        tl.store(DV + kv_off, acc_dv.to(DV.dtype.element_ty), mask=m_kv)
    if NEED_REL:
        tl.store(RK + kv_off, (b_k * acc_rk * (0.5 * scale)).to(RK.dtype.element_ty), mask=m_kv)
        tl.store(RV + kv_off, (b_v * acc_rv).to(RV.dtype.element_ty), mask=m_kv)
        if MASK_ADD:
            s_ptr = SUMS + (i_bhk * NK + o_n) * 2
            tl.store(s_ptr, sum_u.to(SUMS.dtype.element_ty), mask=m_n)
            tl.store(s_ptr + 1, sum_r.to(SUMS.dtype.element_ty), mask=m_n)
    if ROLLOUT:
        tl.store(ROLL + i_bhk * NK + o_n, acc_roll.to(ROLL.dtype.element_ty), mask=m_n)


@triton.jit(do_not_specialize=_SIZES)
def _attn_bwd_q_kernel(
    Q, K, V, DO, HS, LSE, DELTA, KEEP, KRANGE,
    DQ, RQ,  # outputs like Q (contiguous [B,H,NQ,d])
    ROWSUM,  # out: [B,H,NQ] Σ_j E_ij
    s_qb, s_qh, s_qn, s_kb, s_kh, s_kn, s_vb, s_vh, s_vn, s_db, s_dh, s_dn, s_hb, s_hh, s_hn,
    CONSTS,  # [scale, eps·scale, 1/H, eps]
    H, GROUP, NQ, NK, WINDOW,
    HEAD_DIM: tl.constexpr, HAS_MASK: tl.constexpr, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr,
    MASK_ADD: tl.constexpr, NEED_GRAD: tl.constexpr,
    NEED_REL: tl.constexpr, MAP: tl.constexpr, WANT_ROWSUM: tl.constexpr,
    NEED_DP: tl.constexpr, NEED_RA: tl.constexpr,
    DT: tl.constexpr, MM: tl.constexpr, PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    i_bh = tl.program_id(0).to(tl.int64)
    i_m = tl.program_id(1)
    scale, eps_scale, eps = tl.load(CONSTS), tl.load(CONSTS + 1), tl.load(CONSTS + 3)
    i_b, i_h = i_bh // H, i_bh % H
    i_hk = i_h // GROUP
    EVEN_D: tl.constexpr = HEAD_DIM == BLOCK_D
    o_m = i_m * BLOCK_M + tl.arange(0, BLOCK_M)
    o_d = tl.arange(0, BLOCK_D)
    m_m, m_d = o_m < NQ, o_d < HEAD_DIM
    b_q, b_lse, b_do, b_hs, b_delta = _query_tile(
        Q, DO, HS, LSE, DELTA, i_b, i_h, i_bh, o_m, m_m, o_d, m_d, s_qb, s_qh, s_qn, s_db, s_dh, s_dn, s_hb, s_hh,
        s_hn, NQ, NEED_DP, NEED_GRAD, NEED_RA, DT, MM, EVEN_D, BLOCK_M, BLOCK_D)
    acc_dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=DT)
    acc_rq = tl.zeros([BLOCK_M, BLOCK_D], dtype=DT)
    acc_row = tl.zeros([BLOCK_M], dtype=DT)
    lo, hi = _key_range(KRANGE, i_b, i_m * BLOCK_M, NK, WINDOW, HAS_MASK, CAUSAL, HAS_WINDOW, BLOCK_M, BLOCK_N)
    for start in range(lo, hi, BLOCK_N):
        o_n = start + tl.arange(0, BLOCK_N)
        valid_n, b_k, b_v = _key_tile(K, V, KEEP, i_b, i_hk, o_n, o_d, m_d, s_kb, s_kh, s_kn, s_vb, s_vh, s_vn, NK,
                                      HAS_MASK, MM, EVEN_D)
        valid = _pairs(o_m, o_n, m_m, valid_n, WINDOW, CAUSAL, HAS_WINDOW)
        b_sc, b_p, b_dp, b_ra, b_ds = _tile(b_q, b_k, b_v, b_do, b_hs, b_lse, b_delta, valid, scale,
                                            NEED_DP, NEED_RA, NEED_GRAD, DT, MM, PREC)
        if NEED_GRAD:
            acc_dq += _mm(b_ds, b_k, MM, DT, PREC)
        if NEED_REL:
            b_t, b_r = _score_factor(b_sc, b_ra, eps, eps_scale, MASK_ADD)
            acc_rq += _mm(b_t, b_k, MM, DT, PREC)
        if WANT_ROWSUM:
            acc_row += tl.sum(_map_tile(b_p, b_dp, b_ra, MAP), axis=1)
    q_off = i_bh * NQ * HEAD_DIM + o_m[:, None] * HEAD_DIM + o_d[None, :]
    m_q = _row_mask(m_m, m_d, EVEN_D)
    if NEED_GRAD:
        tl.store(DQ + q_off, (acc_dq * scale).to(DQ.dtype.element_ty), mask=m_q)
    if NEED_REL:
        tl.store(RQ + q_off, (b_q * acc_rq * (0.5 * scale)).to(RQ.dtype.element_ty), mask=m_q)
    if WANT_ROWSUM:
        tl.store(ROWSUM + i_bh * NQ + o_m, acc_row.to(ROWSUM.dtype.element_ty), mask=m_m)


@triton.jit(do_not_specialize=_SIZES)
def _attn_weighted_map_kernel(
    Q, K, LSE, KEEP, W,  # W [B, H]: per-head weights (already divided by H)
    ROWS,  # [B] int32: the query row returned per sample (the CLS row, or CLIP text's EOS position)
    ROW,  # out: [B, NK] the map's row
    PART,  # out: [B, NK, 2] per key, min and max of the map over the real queries (±inf at padded keys)
    s_qb, s_qh, s_qn, s_kb, s_kh, s_kn,
    CONSTS,  # [scale, …]
    H, GROUP, NQ, NK, WINDOW,
    HEAD_DIM: tl.constexpr, HAS_MASK: tl.constexpr, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr,
    DT: tl.constexpr, MM: tl.constexpr, PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """One key tile of ``E = (Σ_h W_h A_h)⁺`` (attention GradCAM's head-weighted map), heads summed in registers,
    over all query tiles: the requested row and the per-key min and max over real pairs. Never ``[B, H, N, N]``.
    (Outputs per key, not per tile, so that the tile sizes are free to tune.) Every query tile is visited: the
    causal and window zeros count in the minimum."""
    i_b = tl.program_id(0).to(tl.int64)
    i_n = tl.program_id(1)
    scale = tl.load(CONSTS)
    row_index = tl.load(ROWS + i_b)
    EVEN_D: tl.constexpr = HEAD_DIM == BLOCK_D
    o_n = i_n * BLOCK_N + tl.arange(0, BLOCK_N)
    o_d = tl.arange(0, BLOCK_D)
    m_n, m_d = o_n < NK, o_d < HEAD_DIM
    valid_n = m_n
    if HAS_MASK:
        valid_n = valid_n & (tl.load(KEEP + i_b * NK + o_n, mask=m_n, other=0) != 0)
    lo = tl.full([BLOCK_N], float("inf"), dtype=DT)
    hi = tl.full([BLOCK_N], float("-inf"), dtype=DT)
    row = tl.zeros([BLOCK_N], dtype=DT)
    for start in range(0, NQ, BLOCK_M):
        o_m = start + tl.arange(0, BLOCK_M)
        m_m = o_m < NQ
        real_m = m_m
        if HAS_MASK:
            real_m = real_m & (tl.load(KEEP + i_b * NK + o_m, mask=m_m, other=0) != 0)
        valid = _pairs(o_m, o_n, m_m, valid_n, WINDOW, CAUSAL, HAS_WINDOW)
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=DT)
        for i_h in range(H):
            b_k = _load_rows(K + i_b * s_kb + (i_h // GROUP) * s_kh, o_n, m_n, o_d, m_d, s_kn, MM, EVEN_D)
            b_q = _load_rows(Q + i_b * s_qb + i_h * s_qh, o_m, m_m, o_d, m_d, s_qn, MM, EVEN_D)
            b_lse = tl.load(LSE + (i_b * H + i_h) * NQ + o_m, mask=m_m, other=0.0).to(DT)
            b_sc = _mm(b_q * scale, tl.trans(b_k), MM, DT, PREC)
            b_p = tl.where(valid, tl.exp(b_sc - b_lse[:, None]), 0.0)
            acc += tl.load(W + i_b * H + i_h).to(DT) * b_p
        b_e = tl.maximum(acc, 0.0)
        real = real_m[:, None] & valid_n[None, :]
        lo = tl.minimum(lo, tl.min(tl.where(real, b_e, float("inf")), axis=0))
        hi = tl.maximum(hi, tl.max(tl.where(real, b_e, float("-inf")), axis=0))
        row += tl.sum(tl.where(o_m[:, None] == row_index, b_e, 0.0), axis=0)
    tl.store(ROW + i_b * NK + o_n, row.to(ROW.dtype.element_ty), mask=m_n)
    tl.store(PART + (i_b * NK + o_n) * 2, lo.to(PART.dtype.element_ty), mask=m_n)
    tl.store(PART + (i_b * NK + o_n) * 2 + 1, hi.to(PART.dtype.element_ty), mask=m_n)


# ------------------------------------------------------------------------------------------------ launchers


def _compute_dtype(t: torch.Tensor):
    return tl.float64 if t.dtype == torch.float64 else tl.float32


_MM_DTYPES = {torch.float64: tl.float64, torch.float32: tl.float32, torch.bfloat16: tl.bfloat16,
              torch.float16: tl.float16}


def _mm_dtype(t: torch.Tensor):
    """Operand dtype of the products: the input's (bf16/fp16 tensor cores), but float32 under the interpreter,
    whose ``tl.dot`` has no half-precision path (numpy)."""
    if t.dtype in (torch.bfloat16, torch.float16) and interpreting():
        return tl.float32
    return _MM_DTYPES[t.dtype]


def _precision(t: torch.Tensor) -> str:
    # float32 inputs follow torch's TF32 switch for matmuls, as the reference path's GEMMs do
    return "tf32" if tf32_products(t) else "ieee"


def product_class(t: torch.Tensor) -> str:
    """How the products run, which decides the tiles: ``half`` (bf16/fp16 tensor cores), ``tf32``, ``ieee``
    (float32 FMA: operands replicated across threads, the most registers per tile), ``fp64``."""
    if t.dtype in (torch.bfloat16, torch.float16):
        return "half"
    if t.dtype == torch.float64:
        return "fp64"
    return _precision(t)


def head_width(block_d: int) -> str:
    """The tile lists' head-width class: ``narrow`` (d ≤ 64), ``wide`` (65–128), ``xwide`` (129–256, Gemma)."""
    return "narrow" if block_d <= 64 else ("wide" if block_d <= 128 else "xwide")


@functools.cache
def attention_candidates(kernel: str, products: str, block_d: int, nq: int, nk: int, arch: int,
                         heavy: bool = False, causal: bool = False) -> tuple[Candidate, ...]:
    """Tile candidates of one attention launch, the default first (``_ATTENTION_TILES``, plus ``_SM90_EXTRA`` on
    Hopper; ``_CAUSAL_TILES`` in place of the list for a causal mask); tiles shrink to the problem (at least 16, for
    ``tl.dot``) at the candidate's warps, and every shrunk tile of the table's shapes is compile-checked too (a
    shrunk 64 × 16 tile spilled at 8 warps and a shrunk wide 16 × 32 one at 4, so the lists leave out tiles that
    shrink badly rather than rescale warps); duplicates are dropped. Cached: a launch rebuilds nothing.

    ``kernel``: ``fwd``, ``bwd_q``, ``bwd_kv`` or ``map``. ``arch``: the compute capability (``10·major + minor``;
    0 under the interpreter). ``heavy``: the key-tile backward carrying gradient and relevance (four
    ``[BLOCK_N, d]`` accumulators instead of two), which needs smaller tiles. ``causal``: a causal mask, whose
    per-tile comparison costs registers. ``nq``, ``nk``: the sequence lengths, only through the tile caps (callers
    pass them rounded up to a power of two, which is all that matters here).
    """
    name = "bwd_kv_heavy" if kernel == "bwd_kv" and heavy else kernel
    products = "ieee" if products == "fp64" else products
    width = head_width(block_d)
    rows = list(_ATTENTION_TILES[name][products][width])
    if causal:
        rows = list(_CAUSAL_TILES.get(name, {}).get(products, {}).get(width, rows))
    if arch >= 90:
        rows += _SM90_EXTRA.get(name, {}).get(products, {}).get(width, [])
    cap_m, cap_n = max(16, triton.next_power_of_2(nq)), max(16, triton.next_power_of_2(nk))
    budget = kernel != "map"  # the map kernel (not hot) spills less at ptxas's own choice than at one CTA's share
    out = (candidate(w, st, register_budget(w) if budget else None, BLOCK_M=min(bm, cap_m), BLOCK_N=min(bn, cap_n))
           for bm, bn, w, st in rows)
    return tuple(dict.fromkeys(out))


# (BLOCK_M, BLOCK_N, warps, stages) per kernel, product class and head width (narrow: d ≤ 64, wide: 65–128,
# xwide: 129–256),
# default first. Chosen from compile sweeps (bench/compile_check.py, sm_80 and sm_90a, Triton 3.8 and 3.6): every
# candidate builds without spills within its register budget in every flag set of the table. float64 shares the IEEE
# list (it runs only under the interpreter: on a GPU the attention in float64 goes to the torch reference).
_ATTENTION_TILES = {
    "fwd": {
        # half narrow: 64 × 64 at 4 warps spilled 4 B on sm_80 within its 255-register budget (Triton 3.8; 16 B with
        # a causal mask under 3.6), where unbudgeted it used 168 registers and spilled nothing: ptxas does not honour
        # a budget monotonically
        "half": {"narrow": [(128, 64, 8, 3), (64, 32, 4, 3), (128, 32, 8, 2)],
                 "wide": [(64, 64, 8, 2), (64, 32, 4, 3), (128, 32, 8, 3)],
                 "xwide": [(64, 32, 8, 2), (32, 32, 4, 2)]},
        # TF32 wide: 32 × 32 at 8 warps and 32 × 16 at 4 spilled 8–12 B with BERT's padding mask (sm_90a)
        "tf32": {"narrow": [(64, 32, 4, 2), (64, 64, 4, 2), (32, 32, 4, 3), (128, 16, 8, 2)],
                 "wide": [(64, 32, 8, 2), (64, 16, 8, 2)],
                 "xwide": [(32, 32, 8, 2), (16, 32, 8, 2)]},
        # IEEE wide: 64 × 16 at 8 warps spilled 268–308 B under Triton 3.6 (sm_90a)
        "ieee": {"narrow": [(16, 32, 4, 1)], "wide": [(16, 32, 8, 1), (16, 16, 8, 1)],
                 "xwide": [(16, 16, 8, 1)]},
    },
    "map": {
        "half": {"narrow": [(64, 64, 8, 2), (128, 32, 8, 2), (64, 32, 4, 2)],
                 "wide": [(64, 64, 8, 2), (64, 32, 8, 2), (32, 64, 8, 2)], "xwide": [(32, 32, 8, 2)]},
        "tf32": {"narrow": [(64, 32, 8, 2), (64, 64, 8, 2), (32, 32, 4, 2)],
                 "wide": [(32, 32, 8, 2), (64, 16, 8, 2), (64, 32, 8, 2)], "xwide": [(16, 32, 8, 2)]},
        "ieee": {"narrow": [(32, 32, 4, 1), (64, 16, 8, 1), (32, 16, 4, 1)],
                 "wide": [(32, 32, 8, 1), (16, 32, 8, 1), (64, 16, 8, 1)], "xwide": [(16, 16, 8, 1)]},
    },
    "bwd_q": {
        # (128, 16, 8, 2) left the list: shrunk to 64 × 16 at 8 warps (CLIP ViT-B/32's 50 tokens) it spills
        # wide: 64 × 16 at 8 warps spilled 8–60 B on sm_80 under Triton 3.6 (transformer attribution's rows)
        "half": {"narrow": [(64, 16, 4, 2), (32, 16, 4, 2), (64, 32, 8, 2)],
                 "wide": [(32, 16, 4, 2), (32, 64, 8, 2)], "xwide": [(32, 16, 8, 2)]},
        # TF32 narrow: 64 × 16 at 8 warps spilled 8 B on sm_80 under Triton 3.6, at 255 registers
        "tf32": {"narrow": [(32, 32, 8, 2), (32, 16, 8, 2), (16, 32, 4, 2)], "wide": [(16, 32, 4, 2)],
                 "xwide": [(16, 16, 8, 2)]},
        # 16 × 16 at 4 warps spilled 12 B with the BERT mask add's relevance (ptxas at 64 registers), 32 × 16 at 8
        # warps 8 B with a padding mask and the row sums
        "ieee": {"narrow": [(16, 16, 8, 1)], "wide": [(16, 16, 8, 1), (16, 16, 4, 1)],
                 "xwide": [(16, 16, 8, 1)]},
    },
    # gradient only (GAE), relevance only (full LRP), or the map alone (the lowest block): two accumulators at most
    "bwd_kv": {
        # xwide: 16 × 32 spilled 12 B in Gemma's map pass with the gradient (TA), even at 255 registers, and 16 × 16
        # at 4 warps 16–24 B under Triton 3.6
        "half": {"narrow": [(16, 32, 8, 2), (16, 16, 8, 2), (16, 16, 4, 2)], "wide": [(32, 32, 8, 2)],
                 "xwide": [(16, 16, 8, 2)]},
        # TF32 narrow: 32 × 32 at 4 warps spilled 8 B (the rollout's relevance with BERT's mask add, Triton 3.6)
        "tf32": {"narrow": [(32, 32, 8, 2), (16, 32, 4, 2)], "wide": [(16, 32, 8, 2), (16, 16, 8, 2)],
                 "xwide": [(16, 16, 8, 2)]},
        "ieee": {"narrow": [(16, 16, 8, 1), (16, 16, 4, 1), (32, 16, 8, 1)], "wide": [(16, 16, 8, 1), (16, 32, 8, 1)],
                 "xwide": [(16, 16, 8, 1)]},
    },
    # Gradient and relevance together (transformer attribution): dK, dV, R_K and R_V accumulate over the query tiles
    # while each tile forms seven products (QKᵀ, dO·Vᵀ, hS·Vᵀ, Pᵀ·dO, Pᵀ·hS, dSᵀ·Q, Tᵀ·Q) and their elementwise
    # terms. That caps the tiles at 16 queries × 32 keys (16 × 16 for IEEE float32, whose FMA products replicate
    # operands across threads) for no spill. Splitting it into a gradient pass and a relevance pass would allow
    # 64 × 64 tiles but recompute three of the seven products and read Q, dO and hS twice; which is faster is for a
    # GPU to measure (bench/bench_attention.py), so the single pass stays.
    "bwd_kv_heavy": {
        "half": {"narrow": [(16, 32, 4, 2), (16, 16, 8, 2)], "wide": [(16, 32, 8, 2)], "xwide": [(16, 16, 8, 2)]},
        "tf32": {"narrow": [(16, 32, 8, 2)], "wide": [(16, 32, 8, 2)], "xwide": [(16, 16, 8, 1)]},
        # IEEE float32 narrow: at 8 warps, 16 × 16 spilled 4–8 B, 16 × 32 and 32 × 16 4–8 B (the rollout's map pass
        # with BERT's mask add on sm_90a, Triton 3.6; 16 × 32 also with a causal mask on sm_80, Triton 3.8); at 16
        # warps (128 registers) 16 × 32 spills nothing
        "ieee": {"narrow": [(16, 32, 16, 1)], "wide": [(16, 16, 8, 1)], "xwide": [(16, 16, 8, 1)]},
    },
}
# With a causal mask (bench/compile_check.py: the CLIP text tower and the decoders, sm_80 and sm_90a, Triton 3.8 and
# 3.6): IEEE float32's forward and TF32's query-tile backward need a smaller tile or fewer accumulator lanes than
# without it to stay spill-free.
_CAUSAL_TILES = {
    # TF32: 64 × 32 at 4 warps spilled 4 B on sm_80 and 64 × 16 at 8 warps on a 128-wide head (Triton 3.8)
    "fwd": {"ieee": {"narrow": [(16, 16, 4, 1)]},
            "tf32": {"narrow": [(64, 64, 4, 2), (32, 32, 4, 3), (128, 16, 8, 2)],
                     "wide": [(32, 32, 8, 2), (64, 32, 8, 2), (32, 16, 4, 3)]}},
    # IEEE: 16 × 16 at 8 warps spilled 4 B (the row sums of the causal rollout, both Triton versions); the decoders
    # (left padding, shared key/value heads, windows) drop the candidates that spilled in one of their flag sets
    "bwd_q": {"half": {"narrow": [(64, 16, 4, 2)], "wide": [(32, 16, 4, 2)]},
              "tf32": {"narrow": [(16, 32, 4, 2)]},
              "ieee": {"narrow": [(16, 16, 4, 1), (32, 16, 8, 1)], "wide": [(16, 16, 8, 1)]}},
    # The key-tile pass without the heavy pairing (full LRP, GAE, the lowest block's map, the rule sets) on a
    # left-padded causal batch: in float32 every tile from 16 × 16 to 64 × 16 at 2, 4 or 8 warps spilled 4–24 B in
    # some flag set under one Triton or the other (values held across the query heads' loop); at 16 warps a 16 × 32
    # tile is one element per thread and none spills. bf16/fp16: 16 × 32 at 8 warps spilled 4 B (Triton 3.6).
    "bwd_kv": {"half": {"narrow": [(16, 16, 8, 2)]}, "tf32": {"narrow": [(16, 32, 16, 2)]},
               "ieee": {"narrow": [(16, 32, 16, 1)]}},
}
# Hopper only: deeper software pipelines for the forward (more shared memory in flight than on an A100).
_SM90_EXTRA = {
    # (half, wide: 128 × 64 at 8 warps and 3 stages spilled 8 B with a causal mask under Triton 3.6; left out)
    "fwd": {"half": {"narrow": [(128, 64, 8, 4)]}, "tf32": {"narrow": [(64, 64, 4, 3)]}},
}


def _block_d(head_dim: int) -> int:
    return max(16, triton.next_power_of_2(head_dim))  # tl.dot needs ≥ 16


def _pow2(n: int) -> int:
    return triton.next_power_of_2(max(1, n))


def _last_dim_contiguous(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def _keep(key_mask: torch.Tensor | None, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The padding mask as int8 ``[B, NK]`` and each sample's real-key range ``[B, 2]`` (int32: the first real key
    and one past the last), which lets the kernels skip tiles of padding. Device ops only (no host sync)."""
    if key_mask is None:
        dummy = torch.empty(1, dtype=torch.int32, device=like.device)
        return dummy.to(torch.int8), dummy
    keep = key_mask.to(device=like.device, dtype=torch.int8).contiguous()
    n = keep.shape[1]
    first = keep.argmax(dim=1)  # the first 1 (0 for a sample without any real key: its range is then all of it)
    end = n - keep.flip(1).argmax(dim=1)
    return keep, torch.stack([first, end], dim=1).to(torch.int32).contiguous()


_CONSTANTS: dict[tuple, torch.Tensor] = {}


def _constants(scale: float, heads: int, dtype: torch.dtype, device) -> torch.Tensor:
    """``[scale, eps·scale, 1/H, eps]`` as a tensor of the compute dtype: a Python float argument would reach a
    compiled kernel as float32, which float64 inputs cannot afford. Cached per (scale, heads, dtype, device): a
    fresh host-to-device copy per call would synchronize the stream (and break CUDA-graph capture)."""
    acc = accumulation_dtype(dtype)
    key = (float(scale), int(heads), acc, str(device))
    hit = _CONSTANTS.get(key)
    if hit is None:
        hit = _CONSTANTS[key] = torch.tensor([scale, EPS * scale, 1.0 / heads, EPS], dtype=acc, device=device)
    return hit


def _grid_rows(bh: int, n: int, tile: str):
    return lambda meta: (bh, triton.cdiv(n, meta[tile]))


# What the autotuner keys on besides the flags and dtypes: the sequence lengths, rounded up to a power of two (a
# new padded text length must not re-time every candidate).
_SIZE_KEY = ("NQ", "NK")


def _group(q: torch.Tensor, k: torch.Tensor) -> int:
    h, hk = q.shape[1], k.shape[1]
    if hk == 0 or h % hk:
        raise ValueError(f"query heads ({h}) must be a multiple of key/value heads ({hk})")
    return h // hk


def _mask_flags(key_mask, causal: bool, window: int | None, nq: int, nk: int) -> dict:
    if causal and nq != nk:
        raise ValueError(f"causal attention needs as many query rows as keys, got {nq} and {nk}")
    if window and not causal:
        raise ValueError("a sliding window is only defined with the causal mask here")
    return dict(HAS_MASK=key_mask is not None, CAUSAL=causal, HAS_WINDOW=bool(window))


def attention_fwd(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, key_mask: torch.Tensor | None = None,
    out: torch.Tensor | None = None, causal: bool = False, window: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``O = softmax(scale·Q Kᵀ) V`` and ``lse`` (float32, float64 for float64 inputs).

    ``q [B,H,NQ,d]``, ``k, v [B,H/G,NK,d]`` (any strides; G query heads share a key/value head), ``key_mask [B,NK]``
    bool (True = real key). ``out``: a ``[B,H,NQ,d]`` view to write ``O`` into (e.g. the heads-merged ``[B,NQ,H·d]``
    buffer, transposed). ``causal``: keys after the query are masked; ``window``: also keys ``window`` or more
    positions behind it.
    """
    q, k, v = (_last_dim_contiguous(t) for t in (q, k, v))
    b, h, nq, d = q.shape
    nk = k.shape[2]
    group = _group(q, k)
    flags = _mask_flags(key_mask, causal, window, nq, nk)
    if out is None:
        out = torch.empty_like(q)
    lse = torch.empty(b, h, nq, dtype=accumulation_dtype(q.dtype), device=q.device)
    bd = _block_d(d)
    keep, krange = _keep(key_mask, q)
    launch(
        _attn_fwd_kernel, _grid_rows(b * h, nq, "BLOCK_M"),
        (q, k, v, keep, krange, out, lse,
         q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
         v.stride(0), v.stride(1), v.stride(2), out.stride(0), out.stride(1), out.stride(2),
         _constants(scale, h, q.dtype, q.device), h, group, nq, nk, int(window or 0)),
        dict(HEAD_DIM=d, **flags, DT=_compute_dtype(q), MM=_mm_dtype(q), PREC=_precision(q), BLOCK_D=bd),
        attention_candidates("fwd", product_class(q), bd, _pow2(nq), _pow2(nk), device_arch(q.device),
                             causal=causal), _SIZE_KEY)
    return out, lse


# the preparation pass is elementwise over [rows, d]: 32 rows per program at d = 64 (fewer for wider heads; 4096
# elements per program spilled in bfloat16, sm_80 and sm_90a)
def _prep_rows(block_d: int) -> int:
    return max(8, 2048 // block_d)


def attention_bwd(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor, scale: float,
    grad_out: torch.Tensor | None = None, rel_out: torch.Tensor | None = None, key_mask: torch.Tensor | None = None,
    mask_add: bool = False, map_mode: str | None = None, rollout: torch.Tensor | None = None,
    normalize_rows: bool = False, want_map: bool = False, inputs: bool = True, mask_add_normalized: bool = True,
    causal: bool = False, window: int | None = None, skip_query_grad: bool = False,
) -> dict[str, torch.Tensor]:
    """Launcher of the backward; see ``transformer_lrp.ops.attention_relevance`` for the arguments and outputs.
    ``skip_query_grad``: ``grad_query`` is not wanted (CP-LRP): the query-tile kernel runs only if something else
    needs it."""
    q, k, v, out = (_last_dim_contiguous(t) for t in (q, k, v, out))
    b, h, nq, d = q.shape
    hk, nk = k.shape[1], k.shape[2]
    group = _group(q, k)
    flags = _mask_flags(key_mask, causal, window, nq, nk)
    need_grad, need_rel = inputs and grad_out is not None, inputs and rel_out is not None
    mode = MAP_MODES[map_mode]
    rolling = rollout is not None and mode != MAP_NONE
    acc = accumulation_dtype(q.dtype)
    dummy = q.new_empty(1)
    bd = _block_d(d)
    consts = _constants(scale, h, q.dtype, q.device)

    def new(*shape, dtype=q.dtype):
        return torch.empty(*shape, dtype=dtype, device=q.device)

    # Δ = rowsum(dO ⊙ O) and the G rule's halved factor hS = R_O ⊘ 2O, in one pass over the rows
    delta = half_s = dummy
    need_delta, need_hs = need_grad, need_rel or mode in _NEEDS_RA
    if grad_out is not None:
        grad_out = _last_dim_contiguous(grad_out)
    if rel_out is not None and need_hs:
        rel_out = _last_dim_contiguous(rel_out)
    if need_delta or need_hs:
        delta = new(b, h, nq, dtype=acc) if need_delta else dummy
        half_s = new(b, h, nq, d) if need_hs else dummy
        do_, ro_ = (grad_out if need_delta else out), (rel_out if need_hs else out)
        rows = min(_prep_rows(bd), max(16, _pow2(nq)))
        launch(_attn_bwd_prep_kernel, lambda meta: (b * h, triton.cdiv(nq, rows)),
               (out, do_, ro_, delta, half_s, out.stride(0), out.stride(1), out.stride(2),
                do_.stride(0), do_.stride(1), do_.stride(2), ro_.stride(0), ro_.stride(1), ro_.stride(2),
                consts, h, nq),
               dict(HEAD_DIM=d, NEED_DELTA=need_delta, NEED_HS=need_hs, DT=_compute_dtype(q), BLOCK_M=rows,
                    BLOCK_D=bd), (candidate(4),))
    do = grad_out if grad_out is not None else dummy
    do_strides = (do.stride(0), do.stride(1), do.stride(2)) if do.dim() == 4 else (0, 0, 0)
    hs_strides = (half_s.stride(0), half_s.stride(1), half_s.stride(2)) if half_s.dim() == 4 else (0, 0, 0)
    products, arch = product_class(q), device_arch(q.device)
    keep, krange = _keep(key_mask, q)
    common = dict(HEAD_DIM=d, **flags, MASK_ADD=mask_add and need_rel, NEED_GRAD=need_grad, NEED_REL=need_rel,
                  MAP=mode, DT=_compute_dtype(q), MM=_mm_dtype(q), PREC=_precision(q), BLOCK_D=bd)
    strides = (q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
               v.stride(0), v.stride(1), v.stride(2), *do_strides, *hs_strides)
    sizes = (h, group, nq, nk, int(window or 0))
    result: dict[str, torch.Tensor] = {}

    # Query tiles: dQ, R_Q and (normalized rollout) the row sums of E, which the key tiles' weights need first.
    want_rowsum = rolling and normalize_rows
    if (need_grad and not skip_query_grad) or need_rel or want_rowsum:
        dq = new(b, h, nq, d) if need_grad else dummy
        rq = new(b, h, nq, d) if need_rel else dummy
        rowsum = new(b, h, nq, dtype=acc) if want_rowsum else dummy
        launch(
            _attn_bwd_q_kernel, _grid_rows(b * h, nq, "BLOCK_M"),
            (q, k, v, do, half_s, lse, delta, keep, krange, dq, rq, rowsum, *strides, consts, *sizes),
            dict(WANT_ROWSUM=want_rowsum, NEED_DP=need_grad or (want_rowsum and mode in (MAP_TA, MAP_GAE)),
                 NEED_RA=need_rel or (want_rowsum and mode in _NEEDS_RA), **common),
            attention_candidates("bwd_q", products, bd, _pow2(nq), _pow2(nk), arch, causal=causal), _SIZE_KEY)
        if need_grad:
            result["grad_query"] = dq
        if need_rel:
            result["rel_query"] = rq
    weights = dummy
    if rolling:
        weights = rollout.to(acc)
        if normalize_rows:  # rows of I + Ē: the head mean of the per-head row sums
            weights = weights / (1 + rowsum.sum(1) / h)
        result["rollout_rows"] = weights
        weights = (weights / h).contiguous()

    # Key tiles (one program per key head and tile, the group's query heads in its loop): dK, dV, R_K, R_V, the
    # rollout product, the mask add's per-key sums, the head-mean map.
    dk, dv = (new(b, hk, nk, d), new(b, hk, nk, d)) if need_grad else (dummy, dummy)
    rk, rv = (new(b, hk, nk, d), new(b, hk, nk, d)) if need_rel else (dummy, dummy)
    roll = new(b, hk, nk, dtype=acc) if rolling else dummy
    sums = new(b, hk, nk, 2, dtype=acc) if (mask_add and need_rel) else dummy
    want_map = want_map and mode != MAP_NONE
    mapout = torch.zeros(b, nq, nk, dtype=acc, device=q.device) if want_map else dummy
    # Heads wider than 128 (Gemma's 256) carrying gradient and relevance: four [BLOCK_N, d] accumulators spill at
    # every tile (bench/compile_check.py), so the key tiles run twice, the gradient (with the map and the rollout)
    # and then the relevance, each with two accumulators; the second recomputes the tile's products.
    split = need_grad and need_rel and bd > 128
    passes = [(need_grad, need_rel and not split, True)] + ([(False, True, False)] if split else [])
    # TF32 on heads wider than 128: the per-tile products over d (QKᵀ, dO·Vᵀ, hS·Vᵀ) hold each warp's whole
    # 16 × 256 float32 operand in registers and spill 170–210 B even at 255 registers; the key tiles compute them in
    # IEEE float32 instead (FMA products stream their operands; no spill), which is also more exact.
    kv_products, kv_common = products, common
    if products == "tf32" and bd > 128:
        kv_products, kv_common = "ieee", dict(common, PREC="ieee")
    for grad_pass, rel_pass, map_pass in passes:
        if not (grad_pass or rel_pass or (map_pass and (rolling or want_map))):
            continue
        flags_pass = dict(kv_common, NEED_GRAD=grad_pass, NEED_REL=rel_pass, MASK_ADD=mask_add and rel_pass,
                          MAP=mode if map_pass else MAP_NONE)
        launch(
            _attn_bwd_kv_kernel, _grid_rows(b * hk, nk, "BLOCK_N"),
            (q, k, v, do, half_s, lse, delta, keep, krange, weights, dk, dv, rk, rv, roll, sums, mapout, *strides,
             consts, *sizes),
            dict(ROLLOUT=rolling and map_pass, WANT_MAP=want_map and map_pass,
                 NEED_DP=grad_pass or (map_pass and mode in (MAP_TA, MAP_GAE)),
                 NEED_RA=rel_pass or (map_pass and mode in _NEEDS_RA), **flags_pass),
            attention_candidates("bwd_kv", kv_products, bd, _pow2(nq), _pow2(nk), arch, heavy=rel_pass and grad_pass,
                                 causal=causal),
            _SIZE_KEY,
            reset=("MAPOUT",) if want_map and map_pass else ())
    if need_grad:
        result["grad_key"], result["grad_value"] = dk, dv
    if need_rel:
        result["rel_key"], result["rel_value"] = rk, rv
        if mask_add and mask_add_normalized:
            # The padding-mask add's normalization (docs/method.md §2.8 with v = 0), per sample: scales R_Q and R_K.
            s_u, s_r = sums.double().sum(dim=(1, 2)).unbind(-1)
            factor = normalized_add_factors(s_u, torch.zeros_like(s_u), s_r)[0].to(q.dtype)[:, None, None, None]
            result["rel_query"] = result["rel_query"] * factor
            result["rel_key"] = result["rel_key"] * factor
    if rolling:
        result["rollout_product"] = roll.sum(1)
    if want_map:
        result["map"] = mapout
    return result


def attention_weighted_map(
    q: torch.Tensor, k: torch.Tensor, lse: torch.Tensor, scale: float, weights: torch.Tensor,
    key_mask: torch.Tensor | None = None, row: int | torch.Tensor = 0, causal: bool = False,
    window: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Launcher; see ``transformer_lrp.ops.attention_weighted_map``."""
    q, k = _last_dim_contiguous(q), _last_dim_contiguous(k)
    b, h, nq, d = q.shape
    nk = k.shape[2]
    group = _group(q, k)
    flags = _mask_flags(key_mask, causal, window, nq, nk)
    acc = accumulation_dtype(q.dtype)
    bd = _block_d(d)
    row_out = torch.empty(b, nk, dtype=acc, device=q.device)
    rows = torch.as_tensor(row, device=q.device).to(torch.int32).expand(b).contiguous()
    part = torch.empty(b, nk, 2, dtype=acc, device=q.device)
    launch(
        _attn_weighted_map_kernel, lambda meta: (b, triton.cdiv(nk, meta["BLOCK_N"])),
        (q, k, lse, _keep(key_mask, q)[0], (weights.to(acc) / h).contiguous(), rows, row_out, part,
         q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
         _constants(scale, h, q.dtype, q.device), h, group, nq, nk, int(window or 0)),
        dict(HEAD_DIM=d, **flags, DT=_compute_dtype(q), MM=_mm_dtype(q), PREC=_precision(q), BLOCK_D=bd),
        attention_candidates("map", product_class(q), bd, _pow2(nq), _pow2(nk), device_arch(q.device),
                             causal=causal), _SIZE_KEY)
    return row_out, part[..., 0].amin(dim=1), part[..., 1].amax(dim=1)
