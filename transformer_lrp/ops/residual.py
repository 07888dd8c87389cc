"""Relevance of the residual add (normalized, docs/method.md §2.8; plain z-rule for the baselines), clone (§2.9) and the
CLS select (§2.10). All sums are per sample (over every non-batch dimension), so a sample explained inside a
batch gets what it gets alone (the original sums over the whole batch, which is only right at batch 1)."""

from __future__ import annotations

import torch

from transformer_lrp._backend import op_backend
from transformer_lrp._numerics import normalized_add_factors, safe_divide
from transformer_lrp.ops.common import profiled

# Backends with a kernel, per op of this module.
KERNELS = {"normalized_add": ("triton", "cuda")}


def _per_sample_sum(t: torch.Tensor) -> torch.Tensor:
    return t.sum(dim=tuple(range(1, t.dim())), keepdim=True)


@profiled
def z_add(
    relevance: torch.Tensor, u: torch.Tensor, v: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    r"""Plain z-rule for ``Z = u + v``: ``R_u = u ⊙ R ⊘ Z``, ``R_v = v ⊙ R ⊘ Z``.

    ``v`` may broadcast against ``u`` (a position embedding); ``R_v`` then has ``u``'s shape. ``v=None`` means
    ``v = 0`` (then ``R_v`` is ``None``: nothing to return).
    """
    s = safe_divide(relevance, u if v is None else u + v)
    return u * s, (None if v is None else v * s)


@profiled
def normalized_add(
    relevance: torch.Tensor, u: torch.Tensor, v: torch.Tensor | None, backend: str | None = "torch"
) -> tuple[torch.Tensor, torch.Tensor | None]:
    r"""The normalized add of the method (docs/method.md §2.8), per sample.

    z-rule split, then each branch rescaled so that its total is ``|s_b| / (|s_u| + |s_v|) · Σ R``: the two
    totals add up to ``Σ R``, and a branch whose raw total is negative has its whole map sign-flipped.

    Args:
        relevance: `[B, ...]`, relevance of ``u + v``.
        u, v: the two summands, `[B, ...]` (``v`` may broadcast, or be ``None`` for zero).
        backend: ``"torch"`` (this reference, the default), ``"triton"`` (two fused passes,
            ``triton_kernels/residual_lrp.py``), ``"cuda"`` (the same passes in CUDA C++, ``csrc/normalized_add.cu``;
            needs the built extension) or ``None`` (automatic). The kernels need ``u``, ``v`` of ``relevance``'s
            shape.

    Returns:
        ``(R_u, R_v)``, each with ``relevance``'s shape (``R_v`` is ``None`` when ``v`` is).
    """
    if backend != "torch" and v is not None and u.shape == v.shape == relevance.shape:
        chosen = op_backend("normalized_add", KERNELS, (relevance, u, v), backend)
        if chosen == "triton":
            from transformer_lrp.triton_kernels.residual_lrp import normalized_add_bwd

            return normalized_add_bwd(relevance, u, v)
        if chosen == "cuda":  # csrc/normalized_add.cu, loaded by op_backend
            return tuple(torch.ops.tlrp.normalized_add(relevance, u, v))
    elif backend not in ("torch", None):
        raise NotImplementedError(f"normalized_add: backend {backend!r} needs u and v of the relevance's shape")
    return normalized_add_ref(relevance, u, v)


def normalized_add_ref(
    relevance: torch.Tensor, u: torch.Tensor, v: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The reference rule of ``normalized_add`` (pure PyTorch, any dtype and device)."""
    r_u, r_v = z_add(relevance, u, v)
    s_u, s = _per_sample_sum(r_u), _per_sample_sum(relevance)
    s_v = torch.zeros_like(s_u) if r_v is None else _per_sample_sum(r_v)
    factor_u, factor_v = normalized_add_factors(s_u, s_v, s)
    r_u = r_u.mul_(factor_u)
    return r_u, (None if r_v is None else r_v.mul_(factor_v))


@profiled
def clone_relevance(x: torch.Tensor, *relevances: torch.Tensor) -> torch.Tensor:
    r"""Backward of a k-way copy: ``R_x = x ⊙ Σ_k safe_divide(R_k, x)`` (≈ ``Σ R_k``; 0 where ``x == 0``)."""
    total = relevances[0]
    for r in relevances[1:]:
        total = total + r
    return x * safe_divide(total, x)


@profiled
def select_relevance(tokens: torch.Tensor, index: int | torch.Tensor, relevance: torch.Tensor) -> torch.Tensor:
    r"""G rule of ``tokens[:, index]`` (the CLS pooling): relevance lands on that token only.

    Args:
        tokens: `[B, N, D]`, the tensor the pooling read.
        index: token position, or a `[B]` tensor of positions per sample (CLIP text's EOS pooling).
        relevance: `[B, D]`, relevance of the pooled vector.

    Returns:
        `[B, N, D]`, zero except at ``index``.
    """
    out = torch.zeros_like(tokens)
    at = (slice(None), index) if isinstance(index, int) else (torch.arange(tokens.shape[0], device=tokens.device),
                                                               index)
    picked = tokens[at]
    out[at] = picked * safe_divide(relevance, picked)
    return out


class NormalizedAddFunction(torch.autograd.Function):
    """``u + v`` whose backward returns the normalized add's relevance ``(R_u, R_v)`` for an incoming relevance
    (LRP as a modified gradient), so the rule can sit inside any autograd graph."""

    @staticmethod
    def forward(ctx, u: torch.Tensor, v: torch.Tensor, backend: str | None = None) -> torch.Tensor:
        ctx.save_for_backward(u, v)
        ctx.backend = backend
        return u + v

    @staticmethod
    def backward(ctx, relevance: torch.Tensor):
        u, v = ctx.saved_tensors
        r_u, r_v = normalized_add(relevance, u.expand_as(relevance), v.expand_as(relevance), ctx.backend)
        return r_u, r_v, None


def lrp_add(u: torch.Tensor, v: torch.Tensor, backend: str | None = None) -> torch.Tensor:
    """Functional form of ``NormalizedAddFunction``: ``u + v`` forward, normalized-add relevance backward."""
    return NormalizedAddFunction.apply(u, v, backend)
