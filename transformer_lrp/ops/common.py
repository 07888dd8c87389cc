"""``safe_divide``: the reference code's stabilised division (SPEC §2.2), reproduced bit for bit."""

from __future__ import annotations

import functools

import torch

# The reference adds this to every denominator (not a sign-aware epsilon).
EPS = 1e-9


def safe_divide(a: torch.Tensor, b: torch.Tensor, eps: float = EPS) -> torch.Tensor:
    r"""``a / (b + 1e-9)``, and exactly 0 where ``b == 0``.

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


def profiled(fn):
    """Label every call of a relevance op as ``tlrp::<name>`` for ``torch.profiler`` (the per-op breakdown of
    ``bench/bench_explain.py --profile``); costs a microsecond when no profiler runs."""
    label = f"tlrp::{fn.__name__}"

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with torch.profiler.record_function(label):
            return fn(*args, **kwargs)

    return wrapper
