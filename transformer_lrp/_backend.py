"""Backend choice: ``backend="torch" | "triton" | "cuda" | None`` per call, or the ``TLRP_BACKEND`` variable.

Every explanation runs the same sweep (``sweep.py``); the backend chooses the ops under it. ``torch``: the
reference ops, everywhere (CPU/GPU, float64 included). ``triton``: the kernels (flash-style attention with its
relevance backward and head-weighted map, LayerNorm + residual, normalized add, α1β0 Linear passes); it needs CUDA
tensors or ``TRITON_INTERPRET=1``. ``cuda``
is the CUDA C++ extension (``csrc/``, ``torch.ops.tlrp``): it holds the normalized add and the LayerNorm
relevance, so it serves single ops (``ops.normalized_add(backend="cuda")``), not a whole explanation.
``None``/``auto`` picks ``torch`` for ``explain`` until the kernels have been validated on a GPU (per op:
``triton`` where it can run). An explicit backend that cannot run raises ``NotImplementedError`` naming every
reason. No device is queried at import.

Inside an explanation, an op whose Triton kernel cannot take the tensors while the rest of the sweep can is
routed to its torch reference (``route``, warned once, the reason from ``not_supported_reasons(..., op=...)``):
float64 attention on a GPU is the one such case.
"""

from __future__ import annotations

import os
import warnings

import torch

from transformer_lrp._target import interpreting, stands_for_gpu

BACKENDS = ("torch", "triton", "cuda")
ENV_VAR = "TLRP_BACKEND"


def _choice(requested: str | None) -> str:
    """The per-call argument, else ``TLRP_BACKEND``, else ``"auto"``."""
    return requested if requested is not None else os.environ.get(ENV_VAR, "auto") or "auto"


# The ops whose Triton kernels multiply tiles with tl.dot (the attention); the others are elementwise.
PRODUCT_OPS = ("attention_forward", "attention_relevance", "attention_weighted_map")
FP64_PRODUCTS = (
    "float64 tile products on a GPU: Triton's fp64 MMA lowering fails for some tile layouts (Triton 3.8 asserts "
    "'Currently fp64 don't support largeK MMA' for the attention kernels with a padding mask, "
    "bench/compile_check.py) and runs far below cuBLAS's DGEMM, so float64 attention on a GPU runs the torch "
    "reference op; the elementwise kernels (LayerNorm, adds, the α1β0 passes) run in float64"
)


def not_supported_reasons(backend: str, tensors: tuple = (), op: str | None = None) -> list[str]:
    """Why ``backend`` cannot run on these input tensors (empty: it can): for a whole ``explain`` (``op=None``),
    or for one op of the sweep (e.g. ``"attention_relevance"``)."""
    if backend == "torch":
        return []
    if backend == "triton":
        return _triton_reasons(tensors) + (_triton_op_reasons(op, tensors) if op is not None else [])
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
    if any(not stands_for_gpu(t) for t in tensors) and not interpreting():
        reasons.append("inputs are on the CPU and TRITON_INTERPRET=1 is not set")
    return reasons


def _triton_op_reasons(op: str, tensors: tuple) -> list[str]:
    # CUDA tensors, or meta tensors standing for them in the compile check (CPU tensors run the interpreter)
    if op in PRODUCT_OPS and any(stands_for_gpu(t) and t.dtype == torch.float64 for t in tensors):
        return [FP64_PRODUCTS]
    return []


_ROUTED: set[tuple[str, str]] = set()


def route(op: str, backend: str, tensors: tuple) -> str:
    """The backend an explanation running on ``backend`` uses for ``op``: the same, or ``"torch"`` where that op's
    kernel cannot take these tensors (warned once per op and reason)."""
    if backend != "triton":
        return backend
    reasons = _triton_op_reasons(op, tensors)
    if not reasons:
        return backend
    if (op, reasons[0]) not in _ROUTED:
        _ROUTED.add((op, reasons[0]))
        warnings.warn(f"{op} runs on the torch reference: {reasons[0]}", stacklevel=3)
    return "torch"


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
        if "triton" in kernels.get(op, ()) and not _triton_reasons(tensors) + _triton_op_reasons(op, tensors):
            return "triton"
        return "torch"
    reasons = []
    if choice not in BACKENDS:
        reasons.append(f"unknown backend {choice!r}; choose one of {BACKENDS} or None")
    elif choice != "torch":
        if choice not in kernels.get(op, ()):
            reasons.append(f"no {choice} kernel for {op}")
        if choice == "triton":
            reasons += _triton_reasons(tensors) + _triton_op_reasons(op, tensors)
        if choice == "cuda":
            reasons += _cuda_reasons(tensors)
    if reasons:
        raise NotImplementedError(f"{op}: backend {choice!r} cannot run: " + "; ".join(reasons))
    return choice
