"""Shared structural checks: every module an adapter reads must be of a type whose math it reproduces."""

from __future__ import annotations

import torch
from torch import nn

from transformer_lrp.errors import UnsupportedModelError


def fail(path: str, module: object, why: str) -> None:
    raise UnsupportedModelError(f"unsupported module '{path}' ({type(module).__name__}): {why}")


def expect_type(module: object, path: str, types: tuple[type, ...], why: str = "") -> None:
    if type(module) not in types:
        names = ", ".join(t.__name__ for t in types)
        fail(path, module, why or f"expected exactly one of: {names}")


def expect_identity_or(module: object, path: str, types: tuple[type, ...] = ()) -> bool:
    """True when ``module`` is an identity (``nn.Identity``/``nn.Dropout``); else checks ``types``."""
    if isinstance(module, (nn.Identity, nn.Dropout)):
        return True
    if types and isinstance(module, types):
        return False
    fail(path, module, "only an identity is supported here")
    return False


def expect_linear(module: object, path: str) -> nn.Linear:
    expect_type(module, path, (nn.Linear,), "expected a plain nn.Linear")
    return module  # type: ignore[return-value]


def expect_layernorm(module: object, path: str) -> nn.LayerNorm:
    if not isinstance(module, nn.LayerNorm) or len(module.normalized_shape) != 1:
        fail(path, module, "expected a LayerNorm over the last dimension")
    return module  # type: ignore[return-value]


def activation_name(module: object, path: str) -> str:
    """Name in ``spec.ACTIVATIONS`` of an activation module (torch, timm or transformers)."""
    cls = type(module).__name__
    if isinstance(module, nn.GELU):
        return "gelu_tanh" if module.approximate == "tanh" else "gelu"
    if isinstance(module, nn.ReLU):
        return "relu"
    if isinstance(module, nn.SiLU):
        return "silu"
    if isinstance(module, nn.Tanh):
        return "tanh"
    # timm and transformers activation classes, by name (their math is fixed by the name).
    table = {
        "GELU": "gelu",
        "GELUActivation": "gelu",
        "GELUTanh": "gelu_tanh",
        "NewGELUActivation": "gelu_tanh",
        "GELUPytorchTanh": "gelu_tanh",
        "PytorchGELUTanh": "gelu_tanh",
        "QuickGELU": "quick_gelu",
        "QuickGELUActivation": "quick_gelu",
        "SiLUActivation": "silu",
        "ReLU": "relu",
    }
    if cls in table:
        if cls == "GELUActivation" and getattr(module, "act", None) not in (None, torch.nn.functional.gelu):
            fail(path, module, "GELUActivation with a non-standard function")
        return table[cls]
    fail(path, module, "unsupported activation")
    return ""


def check_float_input(name: str, t: torch.Tensor, like: torch.Tensor) -> None:
    """Dtype, device and finiteness of a floating input against the model's parameter ``like``."""
    from transformer_lrp.errors import InputError

    if not t.is_floating_point():
        raise InputError(f"{name} must be a floating tensor of the model's dtype {like.dtype}, got {t.dtype}")
    if t.dtype != like.dtype:
        raise InputError(f"{name} has dtype {t.dtype} but the model's parameters are {like.dtype}; cast one of them")
    if t.device != like.device:
        raise InputError(f"{name} is on {t.device} but the model is on {like.device}")
    if not bool(torch.isfinite(t).all()):
        raise InputError(f"{name} contains NaN or Inf values")
