"""What every op module shares: the ``tlrp::<op>`` profiler label."""

from __future__ import annotations

import functools

import torch


def profiled(fn):
    """Label every call of a relevance op as ``tlrp::<name>`` for ``torch.profiler`` (the per-op breakdown of
    ``bench/bench_explain.py --profile``); costs a microsecond when no profiler runs."""
    label = f"tlrp::{fn.__name__}"

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with torch.profiler.record_function(label):
            return fn(*args, **kwargs)

    return wrapper
