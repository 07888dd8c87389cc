"""Backend choice: ``backend="torch" | "triton" | "cuda" | None`` per call, or the ``TLRP_BACKEND`` variable.

``torch`` is the reference path and runs everywhere (CPU/GPU, float64 included). ``triton`` runs transformer
attribution, GAE and rollout through the fused sweep (``fused.py``: flash-style attention relevance, LayerNorm +
residual, α1β0 Linear kernels), full LRP through the engine with the fused attention and its relevance kernel,
text GradCAM through the head-weighted map kernel, and the methods that read one block's pooled rows through the
reference; it needs CUDA tensors or ``TRITON_INTERPRET=1``. ``cuda``
is the CUDA C++ extension (``csrc/``, ``torch.ops.tlrp``): it holds the normalized add and the LayerNorm
relevance, so it serves single ops (``ops.normalized_add(backend="cuda")``), not a whole explanation.
``None``/``auto`` picks ``torch`` for ``explain`` until the kernels have been validated on a GPU (per op:
``triton`` where it can run). An explicit backend that cannot run raises ``NotImplementedError`` naming every
reason. No device is queried at import.
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
        return ["the CUDA C++ extension holds only the normalized add and the LayerNorm relevance (single ops: "
                "ops.normalized_add / ops.layernorm_relevance with backend='cuda'); explain the whole model with "
                "backend='triton' or 'torch'"]
    return [f"unknown backend {backend!r}; choose one of {BACKENDS} or None"]


# The automatic choice of ``explain`` moves to the Triton path on CUDA inputs once bench/gpu_check.sh has passed on
# a GPU; until then no kernel has been compiled for one, and the reference is the safe default.
TRITON_VALIDATED_ON_GPU = False


def select_backend(requested: str | None, tensors: tuple = ()) -> str:
    """Resolve the backend of one ``explain`` call: the argument, else ``TLRP_BACKEND``, else automatic."""
    choice = _choice(requested)
    if choice == "auto":
        on_gpu = bool(tensors) and all(t.is_cuda for t in tensors)
        if TRITON_VALIDATED_ON_GPU and on_gpu and not _triton_reasons(tensors):
            return "triton"
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


def _cuda_reasons(tensors: tuple) -> list[str]:
    reasons = []
    try:
        load_cuda_extension()
    except ImportError as exc:
        reasons.append(f"the CUDA C++ extension transformer_lrp._C is not built or not importable ({exc}); "
                       "install with TLRP_FORCE_CUDA_BUILD=1 (setup.py)")
    if any(not t.is_cuda for t in tensors):
        reasons.append("inputs are not CUDA tensors")
    return reasons


_EXTENSION_LOADED = False


def load_cuda_extension() -> None:
    """Import ``transformer_lrp._C`` (registers ``torch.ops.tlrp.*``) and its fake kernels for torch.compile."""
    global _EXTENSION_LOADED
    if _EXTENSION_LOADED:
        return
    import torch

    import transformer_lrp._C  # noqa: F401

    @torch.library.register_fake("tlrp::normalized_add")
    def _(relevance, u, v):  # the kernel returns contiguous tensors of the relevance's shape
        return relevance.new_empty(relevance.shape), relevance.new_empty(relevance.shape)

    @torch.library.register_fake("tlrp::layernorm_relevance")
    def _(u, v, weight, ln_eps, grad_norm_out, rel_norm_out, grad_residual, rel_residual):
        return tuple(u.new_empty(u.shape) for _ in range(3))

    _EXTENSION_LOADED = True


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
        if choice == "cuda":
            reasons += _cuda_reasons(tensors)
    if reasons:
        raise NotImplementedError(f"{op}: backend {choice!r} cannot run: " + "; ".join(reasons))
    return choice
