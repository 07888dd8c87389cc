"""Numerics that the reference ops and the kernels' launchers share, in a leaf module (it imports torch only), so
that ``ops`` → ``triton_kernels`` stays the only direction between them."""

from __future__ import annotations

import torch

# The reference adds this to every denominator (not a sign-aware epsilon).
EPS = 1e-9


def safe_divide(a: torch.Tensor, b: torch.Tensor, eps: float = EPS) -> torch.Tensor:
    r"""``a / (b + 1e-9)``, and exactly 0 where ``b == 0`` (the original code's stabilised division,
    docs/method.md §2.2).

    The original computes ``clamp(b, min=eps) + clamp(b, max=eps)``, which equals ``b + eps`` for every ``b``;
    where that sum is exactly 0 (``b == -eps``) it uses ``eps``. So ``b`` in ``[-eps, 0)`` flips sign, as in
    the original. Broadcasting follows ``a / b``. ``eps`` is for callers that divide by a scaled ``b``
    (``safe_divide(a, c·b, c·eps) == safe_divide(a, b) / c``).
    """
    den = b + eps
    den.masked_fill_(den == 0, eps)
    return torch.div(a, den).masked_fill_(b == 0, 0)


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """Where maps, statistics and sums accumulate: float64 for float64 inputs, float32 otherwise (half included)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def normalized_add_factors(s_u: torch.Tensor, s_v: torch.Tensor, s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample factors of the normalized add (docs/method.md §2.8) from the raw z-rule totals ``s_u``, ``s_v`` and
    ``s = Σ R``: ``f_b / s_b`` with ``f_b = |s_b| / (|s_u| + |s_v|) · s`` (each division a ``safe_divide``, as the
    reference)."""
    total = s_u.abs() + s_v.abs()
    factor_u = safe_divide(safe_divide(s_u.abs(), total) * s, s_u)
    factor_v = safe_divide(safe_divide(s_v.abs(), total) * s, s_v)
    return factor_u, factor_v
