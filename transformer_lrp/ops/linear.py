"""Linear layer relevance: LRP-α1β0 (docs/method.md §2.4), its sign-split form, and the baselines'
separate-normalizer variant.

Shapes: ``x [..., in]``, ``weight [out, in]``, ``relevance [..., out]`` → ``[..., in]``. The bias never takes
relevance (the reference ignores it).

Sign-split identity (docs/design.md §4): ``(x_j W_ij)⁺ = (x_j W_ij + |x_j||W_ij|) / 2``, so

    z = (x Wᵀ + |x| |W|ᵀ) / 2            and   R_x = (x ⊙ (S W) + |x| ⊙ (S |W|)) / 2,   S = R ⊘ z.

``x Wᵀ`` is the forward's own output minus its bias, so the rule costs 3 GEMMs instead of the reference's 4
(the original code spends 8, half of them on a β term it multiplies by 0). Where ``z`` is tiny next to
``|x| |W|ᵀ`` it is cancellation noise, not positive mass: such units are dropped, as the reference drops units
with ``z == 0`` (the threshold ``sqrt(eps)`` keeps the relative error of every kept unit below ``sqrt(eps)``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from transformer_lrp._backend import op_backend
from transformer_lrp._numerics import EPS, safe_divide
from transformer_lrp.ops.common import profiled

# Backends with a kernel, per op of this module.
KERNELS = {"linear_alpha1beta0": ("triton",)}


def cancellation_tolerance(dtype: torch.dtype) -> float:
    """Relative size below which a sign-split denominator is indistinguishable from rounding noise."""
    return float(torch.finfo(dtype).eps) ** 0.5


def linear_alpha1beta0_ref(x: torch.Tensor, weight: torch.Tensor, relevance: torch.Tensor) -> torch.Tensor:
    r"""LRP-α1β0 exactly as the reference computes it (4 GEMMs, joint denominator).

    ``z_i = Σ_j x_j⁺ W_ij⁺ + x_j⁻ W_ij⁻``; ``R_j = x_j⁺ (S W⁺)_j + x_j⁻ (S W⁻)_j`` with ``S = safe_divide(R, z)``.
    """
    w_pos, w_neg = weight.clamp(min=0), weight.clamp(max=0)
    x_pos, x_neg = x.clamp(min=0), x.clamp(max=0)
    z = F.linear(x_pos, w_pos) + F.linear(x_neg, w_neg)
    s = safe_divide(relevance, z)
    return x_pos * (s @ w_pos) + x_neg * (s @ w_neg)


@profiled
def linear_alpha1beta0(
    x: torch.Tensor,
    weight: torch.Tensor,
    relevance: torch.Tensor,
    output: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    abs_weight: torch.Tensor | None = None,
    backend: str | None = "torch",
) -> torch.Tensor:
    r"""LRP-α1β0 via the sign-split identity (3 GEMMs when the forward's ``output`` is given).

    Args:
        x: the layer's input, `[..., in]`.
        weight: `[out, in]`.
        relevance: relevance of the output, `[..., out]`.
        output: the forward's ``x @ weight.T + bias``, `[..., out]`, reused for ``x Wᵀ``. Computed when absent.
        bias: the bias inside ``output`` (subtracted), if any.
        abs_weight: ``weight.abs()``, when the caller caches it.
        backend: ``"torch"`` (default), ``"triton"`` (the elementwise work fused around the same GEMMs,
            ``triton_kernels/linear_lrp.py``) or ``None`` (automatic).

    Returns:
        Relevance of ``x``, `[..., in]` (a fresh tensor).
    """
    return _alpha1beta0(x, weight, relevance, None, output, bias, abs_weight, backend)[0]


@profiled
def linear_alpha1beta0_with_grad(
    x: torch.Tensor,
    weight: torch.Tensor,
    relevance: torch.Tensor,
    grad_output: torch.Tensor,
    output: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    abs_weight: torch.Tensor | None = None,
    backend: str | None = "torch",
) -> tuple[torch.Tensor, torch.Tensor]:
    r"""``linear_alpha1beta0`` and the input gradient ``grad_output @ weight`` of the same layer, for the sweep that
    carries both: ``S W`` and ``dY W`` are one GEMM over the stacked rows ``[S; dY]`` (one pass over ``W``).

    Returns:
        ``(R_x, dL/dx)``, both `[..., in]`.
    """
    return _alpha1beta0(x, weight, relevance, grad_output, output, bias, abs_weight, backend)


def _alpha1beta0(x, weight, relevance, grad_output, output, bias, abs_weight, backend):
    if output is None:
        output, bias = F.linear(x, weight), None
    if abs_weight is None:
        abs_weight = weight.abs()
    if backend != "torch" and op_backend("linear_alpha1beta0", KERNELS, (x, relevance), backend) == "triton":
        from transformer_lrp.triton_kernels.linear_lrp import linear_alpha1beta0_bwd

        return linear_alpha1beta0_bwd(x, weight, relevance, output, bias, abs_weight,
                                      cancellation_tolerance(x.dtype), grad_output=grad_output)
    # 2-D views: every product below is a plain GEMM. Few fresh [..., out] buffers, the rest in place.
    shape_in, n_out = x.shape, weight.shape[0]
    x, relevance, output = x.reshape(-1, shape_in[-1]), relevance.reshape(-1, n_out), output.reshape(-1, n_out)
    abs_x = x.abs()
    z_abs = abs_x @ abs_weight.t()
    den = torch.add(z_abs, output)  # 2z = x Wᵀ + |x||W|ᵀ (+ b)
    if bias is not None:
        den.sub_(bias)
    # Units with 2z ≤ 2·tol·|x||W|ᵀ have no positive mass above rounding noise: dropped.
    dropped = torch.le(den, z_abs.mul_(2 * cancellation_tolerance(den.dtype)))
    # S/2 = R / (2z + 2·eps) is the reference's R / (z + eps), halved: the identity's 1/2 is folded into S.
    half_s = torch.div(relevance, den.add_(2 * EPS), out=den).masked_fill_(dropped, 0)
    grad_x = None
    if grad_output is None:
        s_w = half_s @ weight
    else:
        s_w, grad_x = (torch.cat([half_s, grad_output.reshape(-1, n_out)]) @ weight).split(x.shape[0])
        grad_x = grad_x.view(shape_in)
    out = s_w.mul_(x)
    return out.addcmul_(abs_x, half_s @ abs_weight).view(shape_in), grad_x


@profiled
def linear_alpha1beta0_separate(x: torch.Tensor, weight: torch.Tensor, relevance: torch.Tensor) -> torch.Tensor:
    r"""The baselines' α1β0 (``layers_lrp.py``, docs/method.md §2.4): each positive group normalized on its own.

    ``S₁ = R ⊘ (x⁺W⁺ᵀ)``, ``S₂ = R ⊘ (x⁻W⁻ᵀ)``, ``R_x = x⁺ ⊙ (S₁W⁺) + x⁻ ⊙ (S₂W⁻)``: each group alone conserves
    ``R``, so the total roughly doubles per layer. Used only by the ``partial_lrp`` and ``full_lrp`` baselines.
    """
    w_pos, w_neg = weight.clamp(min=0), weight.clamp(max=0)
    x_pos, x_neg = x.clamp(min=0), x.clamp(max=0)
    s1 = safe_divide(relevance, F.linear(x_pos, w_pos))
    s2 = safe_divide(relevance, F.linear(x_neg, w_neg))
    return x_pos * (s1 @ w_pos) + x_neg * (s2 @ w_neg)


@profiled
def linear_rows_relevance(x: torch.Tensor, weight_rows: torch.Tensor, relevance: torch.Tensor,
                          rule: str = "alpha1beta0") -> torch.Tensor:
    r"""A Linear's relevance rule when only a few of its outputs carry relevance, each sample its own: the LM head
    at the explained token (one vocabulary row, two for a contrast). The rules are per output row, so the rows
    without relevance contribute nothing and are never formed (no ``[R, vocab]`` relevance, no ``|W|`` of the
    embedding matrix).

    Args:
        x: `[R, D]`, the head's input at each explained position.
        weight_rows: `[R, k, D]`, the weight rows of the outputs that carry relevance.
        relevance: `[R, k]`, their relevance.
        rule: ``"alpha1beta0"`` (the method: ``Σ_i (x_j W_ij)⁺ / Σ_j (x_j W_ij)⁺ · R_i``, joint positive
            normalizer, as ``linear_alpha1beta0_ref``), ``"separate"`` (the baselines: ``x⁺W⁺`` and ``x⁻W⁻`` each
            normalized on its own, as ``linear_alpha1beta0_separate``) or ``"epsilon"`` (``x_j W_ij / (z_i + ε)``).

    Returns:
        `[R, D]`, the relevance of ``x``.
    """
    contrib = x[:, None, :] * weight_rows  # z_ij = x_j W_ij, [R, k, D]
    if rule == "alpha1beta0":
        pos = contrib.clamp(min=0)  # (x_j W_ij)⁺ = x⁺W⁺ + x⁻W⁻
        return (pos * safe_divide(relevance, pos.sum(-1))[..., None]).sum(1)
    if rule == "separate":
        w_pos, w_neg = weight_rows.clamp(min=0), weight_rows.clamp(max=0)
        p1 = x.clamp(min=0)[:, None, :] * w_pos
        p2 = x.clamp(max=0)[:, None, :] * w_neg
        return (p1 * safe_divide(relevance, p1.sum(-1))[..., None]
                + p2 * safe_divide(relevance, p2.sum(-1))[..., None]).sum(1)
    if rule == "epsilon":
        return (contrib * safe_divide(relevance, contrib.sum(-1))[..., None]).sum(1)
    raise ValueError(f"unknown rule {rule!r}")


class LinearLRPFunction(torch.autograd.Function):
    """``x Wᵀ + b`` whose backward returns the α1β0 relevance of ``x`` for an incoming relevance of the output
    (LRP as a modified gradient; the weight and bias take none)."""

    @staticmethod
    def forward(ctx, x, weight, bias=None, backend=None):
        out = F.linear(x, weight, bias)
        ctx.save_for_backward(x, weight, bias, out)
        ctx.backend = backend
        return out

    @staticmethod
    def backward(ctx, relevance):
        x, weight, bias, out = ctx.saved_tensors
        r_x = linear_alpha1beta0(x, weight, relevance, output=out, bias=bias, backend=ctx.backend)
        return r_x, None, None, None


def lrp_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
               backend: str | None = None) -> torch.Tensor:
    """Functional form of ``LinearLRPFunction``: ``F.linear`` forward, α1β0 relevance backward."""
    return LinearLRPFunction.apply(x, weight, bias, backend)
