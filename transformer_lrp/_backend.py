"""Backend choice: ``backend="torch" | "triton" | "cuda" | None`` per call, or the ``TLRP_BACKEND`` variable.

``torch`` is the reference path and runs everywhere (CPU/GPU, float32/float64). ``triton`` runs the sweep's ops
that have a Triton kernel (the method's normalized add and α1β0 Linear) through it and the others through the
reference; it needs CUDA tensors or ``TRITON_INTERPRET=1``. No CUDA C++ op is built yet. ``None``/``auto`` picks
``torch`` until the Triton kernels have been validated on a GPU. An explicit backend that cannot run raises
``NotImplementedError`` naming every reason. No device is queried at import.
"""

from __future__ import annotations

import os

BACKENDS = ("torch", "triton", "cuda")
ENV_VAR = "TLRP_BACKEND"


def _choice(requested: str | None) -> str:
    """The per-call argument, else ``TLRP_BACKEND``, else ``"auto"``."""
    return requested if requested is not None else os.environ.get(ENV_VAR, "auto") or "auto"


def not_supported_reasons(backend: str, tensors: tuple = ()) -> list[str]:
    """Why ``explain`` cannot run ``backend`` on these input tensors (empty: it can)."""
    if backend == "torch":
        return []
    if backend == "triton":
        return _triton_reasons(tensors)
    if backend == "cuda":
        return ["the CUDA C++ relevance ops are not part of this build"]
    return [f"unknown backend {backend!r}; choose one of {BACKENDS} or None"]


def select_backend(requested: str | None, tensors: tuple = ()) -> str:
    """Resolve the backend of one ``explain`` call: the argument, else ``TLRP_BACKEND``, else automatic."""
    choice = _choice(requested)
    if choice == "auto":
        return "torch"
    reasons = not_supported_reasons(choice, tensors)
    if reasons:
        source = "backend argument" if requested is not None else f"{ENV_VAR}={choice}"
        raise NotImplementedError(f"backend {choice!r} ({source}) cannot run: " + "; ".join(reasons))
    return choice


def _triton_reasons(tensors: tuple) -> list[str]:
    reasons = []
    try:
        import triton  # noqa: F401
    except ImportError as exc:
        reasons.append(f"triton is not importable ({exc})")
    interpreting = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
    if any(not t.is_cuda for t in tensors) and not interpreting:
        reasons.append("inputs are on the CPU and TRITON_INTERPRET=1 is not set")
    return reasons


def op_backend(op: str, kernels: dict[str, tuple[str, ...]], tensors: tuple, requested: str | None) -> str:
    """Backend for one call of a single op. ``kernels[op]`` lists the backends with a kernel for it.

    Automatic choice: ``triton`` when it has a kernel and can run on these tensors, else ``torch``. An explicit
    request that cannot run raises ``NotImplementedError`` naming every reason.
    """
    choice = _choice(requested)
    if choice == "auto":
        if "triton" in kernels.get(op, ()) and not _triton_reasons(tensors):
            return "triton"
        return "torch"
    reasons = []
    if choice not in BACKENDS:
        reasons.append(f"unknown backend {choice!r}; choose one of {BACKENDS} or None")
    elif choice != "torch":
        if choice not in kernels.get(op, ()):
            reasons.append(f"no {choice} kernel for {op}")
        if choice == "triton":
            reasons += _triton_reasons(tensors)
    if reasons:
        raise NotImplementedError(f"{op}: backend {choice!r} cannot run: " + "; ".join(reasons))
    return choice
