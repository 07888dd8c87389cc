"""Rotary position embeddings (RoPE) on queries and keys (docs/method.md §2.12): a fixed linear map per position.

``x [B, H, N, d]``, ``cos, sin [B, 1, N, r]`` with ``r ≤ d`` the rotated width (Phi-3's partial rotary: the first
``r`` features rotate, the rest pass). The half-split convention of the Hugging Face models:
``rope(x) = x ⊙ cos + rotate_half(x) ⊙ sin`` with ``rotate_half([x₁, x₂]) = [−x₂, x₁]``, i.e. each pair
``(x_i, x_{i+r/2})`` turns by the angle of its frequency at that position.

* **Gradient**: the map's transpose, ``g ⊙ cos + rotate_half⁻¹(g ⊙ sin)`` with ``rotate_half⁻¹([y₁, y₂]) = [y₂, −y₁]``.
* **Relevance**: the z-rule (LRP-0) of that linear map, ``R_x = x ⊙ Mᵀ(R ⊘ rope(x))``: it conserves relevance
  exactly (no bias), as a rotation should. The method's α1β0 would drop every output whose two contributions are
  both negative (a rotation has two inputs per output, so that is common), losing relevance that the model did move.
  The pass-through features (partial rotary) keep their relevance.
"""

from __future__ import annotations

import torch

from transformer_lrp._numerics import safe_divide
from transformer_lrp.ops.common import profiled


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def _unrotate_half(y: torch.Tensor) -> torch.Tensor:
    """The transpose of ``rotate_half``."""
    y1, y2 = y.chunk(2, dim=-1)
    return torch.cat((y2, -y1), dim=-1)


def rotary_cos_sin(positions: torch.Tensor, inv_freq: torch.Tensor, scaling: float, dtype: torch.dtype
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(cos, sin)`` `[B, 1, N, r]` of the angles ``positions ⊗ inv_freq``, computed in float32 (float64 for a
    float64 model: the stock models round them to float32 even then) and cast to the model's dtype, as the models
    do."""
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    freqs = positions.to(acc)[..., None] * inv_freq.to(device=positions.device, dtype=acc)
    angles = torch.cat((freqs, freqs), dim=-1)[:, None]
    return (angles.cos() * scaling).to(dtype), (angles.sin() * scaling).to(dtype)


def rotary_apply(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    r = cos.shape[-1]
    if r == x.shape[-1]:
        return x * cos + rotate_half(x) * sin
    rot, rest = x[..., :r], x[..., r:]
    return torch.cat((rot * cos + rotate_half(rot) * sin, rest), dim=-1)


def rotary_grad(grad: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Gradient of ``rotary_apply`` with respect to ``x``: the map's transpose."""
    r = cos.shape[-1]
    if r == grad.shape[-1]:
        return grad * cos + _unrotate_half(grad * sin)
    rot, rest = grad[..., :r], grad[..., r:]
    return torch.cat((rot * cos + _unrotate_half(rot * sin), rest), dim=-1)


@profiled
def rotary_relevance(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, relevance: torch.Tensor,
                     out: torch.Tensor | None = None) -> torch.Tensor:
    """The z-rule of the rotation: ``R_x = x ⊙ Mᵀ(R ⊘ rope(x))`` (``out``: ``rope(x)`` if the caller has it)."""
    r = cos.shape[-1]
    if out is None:
        out = rotary_apply(x, cos, sin)
    if r == x.shape[-1]:
        return x * rotary_grad(safe_divide(relevance, out), cos, sin)
    rot = x[..., :r] * rotary_grad(safe_divide(relevance[..., :r], out[..., :r]), cos, sin)
    return torch.cat((rot, relevance[..., r:]), dim=-1)
