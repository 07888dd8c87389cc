"""Backend choice: ``backend="torch" | "triton" | "cuda" | None`` per call, or the ``TLRP_BACKEND`` variable.

Every explanation runs the same sweep (``sweep.py``); the backend chooses the ops under it. ``torch``: the
reference ops, everywhere (CPU/GPU, float64 included). ``triton``: the kernels (flash-style attention with its
relevance backward and head-weighted map, LayerNorm + residual, normalized add, α1β0 Linear passes); it needs CUDA
tensors or ``TRITON_INTERPRET=1``. ``cuda``: the CUDA C++ extension (``csrc/``, ``torch.ops.tlrp``) for the
attention (forward, relevance backward, head-weighted map), the LayerNorm relevance and the normalized add, torch
(cuBLAS) for the GEMMs, and the Triton kernels for the α1β0 Linear's elementwise passes (the torch reference where
Triton is missing); it needs the built extension and CUDA tensors.
``None``/``auto`` picks ``torch`` for ``explain`` until the kernels have been validated on a GPU (per op:
``triton`` where it can run). An explicit backend that cannot run raises ``NotImplementedError`` naming every
reason. No device is queried at import.

Inside an explanation, an op whose Triton kernel cannot take the tensors while the rest of the sweep can is
routed to its torch reference (``route``, warned once, the reason from ``not_supported_reasons(..., op=...)``):
float64 attention on a GPU on ``triton`` is one such case; on ``cuda``, the ops without a CUDA C++ kernel take
the Triton kernel or the reference, and attention with a head dimension over 256 takes the reference.
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
        return _cuda_reasons(tensors) + (_cuda_op_reasons(op, tensors) if op is not None else [])
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
    """The backend an explanation running on ``backend`` uses for ``op``: the same, or another where that op has
    no kernel on it or its kernel cannot take these tensors (warned once per op and reason)."""
    if backend == "triton":
        reasons = _triton_op_reasons(op, tensors)
        return "torch" if _warn_routed(op, reasons) else backend
    if backend == "cuda":
        if op not in CUDA_OPS:  # the α1β0 passes: shared with the Triton path
            return "triton" if not _triton_reasons(tensors) else "torch"
        reasons = _cuda_op_reasons(op, tensors)
        return "torch" if _warn_routed(op, reasons) else backend
    return backend


def _warn_routed(op: str, reasons: list[str]) -> bool:
    if not reasons:
        return False
    if (op, reasons[0]) not in _ROUTED:
        _ROUTED.add((op, reasons[0]))
        warnings.warn(f"{op} runs on the torch reference: {reasons[0]}", stacklevel=4)
    return True


# The ops with a CUDA C++ kernel (csrc/, torch.ops.tlrp.*).
CUDA_OPS = ("attention_forward", "attention_relevance", "attention_weighted_map", "normalized_add",
            "layernorm_relevance")
CUDA_MAX_HEAD_DIM = 256  # csrc/attention_relevance.cu: at most 8 entries of a row per lane of a warp


def _cuda_op_reasons(op: str, tensors: tuple) -> list[str]:
    if op in PRODUCT_OPS and any(t.dim() == 4 and t.shape[-1] > CUDA_MAX_HEAD_DIM for t in tensors):
        return [f"the CUDA C++ attention holds rows of at most {CUDA_MAX_HEAD_DIM} entries per head (a warp's "
                "registers); this head dimension runs the torch reference op"]
    return []


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
    def _(u, v, weight, ln_eps, grad_norm_out, rel_norm_out, grad_residual, rel_residual, rms, weight_offset):
        return tuple(u.new_empty(u.shape) for _ in range(3))

    def acc(t):  # statistics, maps and sums: float64 for float64 inputs, float32 otherwise
        return torch.float64 if t.dtype == torch.float64 else torch.float32

    @torch.library.register_fake("tlrp::attention_forward")
    def _(query, key, value, scale, key_mask, causal, window):
        return query.new_empty(query.shape), query.new_empty(query.shape[:3], dtype=acc(query))

    @torch.library.register_fake("tlrp::attention_relevance")
    def _(query, key, value, out, lse, scale, grad_out, rel_out, key_mask, mask_add, map_mode, rollout,
          normalize_rows, want_map, inputs, mask_add_normalized, causal, window):
        # an empty [0] tensor where an output is not asked for; distinct tensors (outputs may not alias); the key
        # and value ones shaped like key (GQA: H_kv heads)
        b, nq, nk = query.shape[0], query.shape[2], key.shape[2]
        rolling, mapping = rollout is not None and map_mode != 0, want_map and map_mode != 0

        def like(t, asked, *shape, dtype=None):
            return t.new_empty(shape if asked else (0,), dtype=dtype)

        outputs = []
        for asked in (inputs and grad_out is not None, inputs and rel_out is not None):
            outputs += [like(query, asked, *query.shape), like(key, asked, *key.shape), like(key, asked, *key.shape)]
        a = acc(query)
        return (*outputs, like(query, rolling, b, nq, dtype=a), like(query, rolling, b, nk, dtype=a),
                like(query, mapping, b, nq, nk, dtype=a))

    @torch.library.register_fake("tlrp::attention_weighted_map")
    def _(query, key, lse, scale, weights, key_mask, rows, causal, window):
        b, nk = query.shape[0], key.shape[2]
        return (query.new_empty(b, nk, dtype=acc(query)), query.new_empty(b, dtype=acc(query)),
                query.new_empty(b, dtype=acc(query)))

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
            reasons += _cuda_reasons(tensors) + _cuda_op_reasons(op, tensors)
    if reasons:
        raise NotImplementedError(f"{op}: backend {choice!r} cannot run: " + "; ".join(reasons))
    return choice
