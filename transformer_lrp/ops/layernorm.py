"""LayerNorm (and RMSNorm) in the sweep that carries gradient and relevance: its gradient backward, fused with the
relevance rules next to it (docs/method.md §2.7 identity, §2.9 clone, §2.8 normalized add).

RMSNorm (the decoder LLMs': ``y = x · rsqrt(mean(x²) + eps) ⊙ (w + offset)``, Gemma's offset 1) is the same op with
``rms=True``: its gradient differs, its relevance rule (an identity) does not.

``detach_scale=True`` gives AttnLRP's modified gradient (docs/method.md §12): the norm's scale ``1/σ`` (or
``rsqrt(mean(x²) + eps)``) held constant, so the gradient is that of a linear map (the centering and the weight).

Pre-LN blocks (ViT): ``z = x + branch`` feeds ``LN`` and the residual, so ``dz = LN'(dY) + d_res`` and
``R_z = clone(z; R_LN, R_res)``, then split over ``x`` and ``branch``. Post-LN blocks (BERT): ``y = LN(branch + x)``,
so ``dz = LN'(dY)`` and ``R_z = R_y``, then split. Without a second summand the op stops at ``R_z``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from transformer_lrp._backend import op_backend
from transformer_lrp.ops.common import profiled
from transformer_lrp.ops.residual import clone_relevance, normalized_add_ref

KERNELS = {"layernorm_relevance": ("triton", "cuda")}
_HALF = (torch.float16, torch.bfloat16)


def rms_norm(x: torch.Tensor, weight: torch.Tensor | None, eps: float, weight_offset: float = 0.0,
             scale_in_float32: bool = False) -> torch.Tensor:
    """RMSNorm as the decoder families compute it: statistics in float32 for half inputs (in the input's own dtype
    otherwise: a float64 model stays float64, where the stock models round to float32), then the weight: multiplied
    after the cast back (Llama, Mistral, Qwen, Phi-3) or, with ``scale_in_float32``, before it (Gemma's
    ``(1 + w)``)."""
    acc = torch.float32 if x.dtype in _HALF else x.dtype
    h = x.to(acc)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    if weight is None:
        return h.to(x.dtype)
    if scale_in_float32:
        return (h * (weight.to(acc) + weight_offset)).to(x.dtype)
    return (weight + weight_offset) * h.to(x.dtype) if weight_offset else weight * h.to(x.dtype)


def norm_with_constant_scale(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float,
                             rms: bool = False, weight_offset: float = 0.0) -> torch.Tensor:
    """The norm with its scale detached (AttnLRP's identity rule as a modified gradient): the same value, the
    gradient of ``(x − mean) · c ⊙ w + b`` (RMSNorm: ``x · c ⊙ (w + offset)``) for the constant ``c``."""
    acc = torch.float32 if x.dtype in _HALF else x.dtype
    h = x.to(acc)
    if rms:
        scale = torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps).detach()
        out = h * scale
    else:
        centered = h - h.mean(-1, keepdim=True)
        scale = torch.rsqrt(centered.pow(2).mean(-1, keepdim=True) + eps).detach()
        out = centered * scale
    if weight is not None:
        out = out * (weight.to(acc) + weight_offset)
    if bias is not None and not rms:
        out = out + bias.to(acc)
    return out.to(x.dtype)


def layernorm_relevance_ref(
    u: torch.Tensor,
    v: torch.Tensor | None,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    ln_eps: float,
    grad_norm_out: torch.Tensor,
    rel_norm_out: torch.Tensor | None,
    grad_residual: torch.Tensor | None = None,
    rel_residual: torch.Tensor | None = None,
    rms: bool = False,
    weight_offset: float = 0.0,
    detach_scale: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Reference of ``layernorm_relevance``: the norm's gradient by autograd, the relevance by the rules."""
    z = u if v is None else u + v
    with torch.enable_grad():
        leaf = z.detach().requires_grad_(True)
        if detach_scale:
            out = norm_with_constant_scale(leaf, weight, bias, ln_eps, rms, weight_offset)
        elif rms:
            out = rms_norm(leaf, weight, ln_eps, weight_offset, scale_in_float32=True)
        else:
            out = F.layer_norm(leaf, (z.shape[-1],), weight, bias, ln_eps)
        grad = torch.autograd.grad(out, leaf, grad_norm_out)[0]
    if grad_residual is not None:
        grad = grad + grad_residual
    if rel_norm_out is None:
        return grad, None, None
    rel = rel_norm_out if rel_residual is None else clone_relevance(z, rel_norm_out, rel_residual)
    if v is None:
        return grad, rel, None
    r_u, r_v = normalized_add_ref(rel, u, v)
    return grad, r_u, r_v


@profiled
def layernorm_relevance(
    u: torch.Tensor,
    v: torch.Tensor | None,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    ln_eps: float,
    grad_norm_out: torch.Tensor,
    rel_norm_out: torch.Tensor | None,
    grad_residual: torch.Tensor | None = None,
    rel_residual: torch.Tensor | None = None,
    backend: str | None = "torch",
    rms: bool = False,
    weight_offset: float = 0.0,
    detach_scale: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    r"""Gradient and relevance at ``z = u + v`` (or ``z = u``), the input of a LayerNorm (or an RMSNorm).

    Args:
        u, v: the summands, `[B, ..., D]` (``v=None``: ``z = u``, no split).
        weight, bias, ln_eps: the LayerNorm's (the bias does not enter the backward).
        grad_norm_out, rel_norm_out: gradient and relevance of the LayerNorm's output (``rel_norm_out=None``: the
            gradient only).
        grad_residual, rel_residual: gradient and relevance reaching ``z`` by the residual path (pre-LN), if any.
        backend: ``"torch"`` (reference), ``"triton"`` (``triton_kernels/layernorm_lrp.py``, two passes), ``"cuda"``
            (the same passes in CUDA C++, ``csrc/layernorm_relevance.cu``; the split case: ``v`` and
            ``rel_norm_out`` given) or ``None``.
        rms, weight_offset: an RMSNorm (no centering, no bias) with the weight ``w + weight_offset``.
        detach_scale: the gradient with the norm's scale held constant (AttnLRP's modified gradient).

    Returns:
        ``(dL/dz, R_u, R_v)``; without ``v``: ``(dL/dz, R_z, None)``; without relevance: ``(dL/dz, None, None)``.
        The normalized add's sums are per sample.
    """
    tensors = (u, grad_norm_out)
    chosen = "torch" if backend == "torch" else op_backend("layernorm_relevance", KERNELS, tensors, backend)
    if chosen == "triton":
        from transformer_lrp.triton_kernels.layernorm_lrp import layernorm_relevance_bwd

        return layernorm_relevance_bwd(u, v, weight, ln_eps, grad_norm_out, rel_norm_out, grad_residual,
                                       rel_residual, rms=rms, weight_offset=weight_offset,
                                       detach_scale=detach_scale)
    if chosen == "cuda":  # csrc/layernorm_relevance.cu, loaded by op_backend
        if detach_scale:
            raise NotImplementedError("layernorm_relevance: backend 'cuda' has no constant-scale gradient; the "
                                      "Triton kernel or the reference runs it")
        if v is None or rel_norm_out is None:
            raise NotImplementedError("layernorm_relevance: backend 'cuda' covers the split case only (v and "
                                      "rel_norm_out given)")
        return tuple(torch.ops.tlrp.layernorm_relevance(u, v, weight, float(ln_eps), grad_norm_out, rel_norm_out,
                                                        grad_residual, rel_residual, rms, float(weight_offset)))
    return layernorm_relevance_ref(u, v, weight, bias, ln_eps, grad_norm_out, rel_norm_out, grad_residual,
                                   rel_residual, rms, weight_offset, detach_scale)


class AddLayerNormLRPFunction(torch.autograd.Function):
    """``LN(u + v)`` (a post-LN residual) whose backward returns ``(R_u, R_v)`` for an incoming relevance of the
    output: the LayerNorm passes relevance unchanged (docs/method.md §2.7), the add splits it by the normalized add."""

    @staticmethod
    def forward(ctx, u, v, weight=None, bias=None, ln_eps=1e-5, backend=None):
        ctx.save_for_backward(u, v)
        ctx.backend = backend
        return F.layer_norm(u + v, (u.shape[-1],), weight, bias, ln_eps)

    @staticmethod
    def backward(ctx, relevance):
        from transformer_lrp.ops.residual import normalized_add

        u, v = ctx.saved_tensors
        r_u, r_v = normalized_add(relevance, u.expand_as(relevance), v.expand_as(relevance), ctx.backend)
        return r_u, r_v, None, None, None, None


def lrp_add_layernorm(u: torch.Tensor, v: torch.Tensor, weight: torch.Tensor | None = None,
                      bias: torch.Tensor | None = None, ln_eps: float = 1e-5,
                      backend: str | None = None) -> torch.Tensor:
    """Functional form of ``AddLayerNormLRPFunction``."""
    return AddLayerNormLRPFunction.apply(u, v, weight, bias, ln_eps, backend)
