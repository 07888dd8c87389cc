"""Backend choice: ``backend="torch" | "triton" | "cuda" | None`` per call, or the ``TLRP_BACKEND`` variable.

This build ships the pure-PyTorch reference path (``torch``), which runs everywhere (CPU/GPU, float32/float64).
The fused Triton and CUDA kernels are separate work; asking for them explicitly raises an error that says so,
and ``None``/``auto`` picks the best backend that can run. No device is queried at import.
"""

from __future__ import annotations

import os

BACKENDS = ("torch", "triton", "cuda")
ENV_VAR = "TLRP_BACKEND"


def not_supported_reasons(backend: str) -> list[str]:
    if backend == "torch":
        return []
    if backend in ("triton", "cuda"):
        return [f"the fused {backend} relevance kernels are not part of this build (only the torch reference path is)"]
    return [f"unknown backend {backend!r}; choose one of {BACKENDS} or None"]


def select_backend(requested: str | None) -> str:
    """Resolve the backend for one call: the argument, else ``TLRP_BACKEND``, else automatic."""
    choice = requested if requested is not None else os.environ.get(ENV_VAR, "auto") or "auto"
    if choice == "auto":
        return next(b for b in ("cuda", "triton", "torch") if not not_supported_reasons(b))
    reasons = not_supported_reasons(choice)
    if reasons:
        source = "backend argument" if requested is not None else f"{ENV_VAR}={choice}"
        raise NotImplementedError(f"backend {choice!r} ({source}) cannot run: " + "; ".join(reasons))
    return choice
