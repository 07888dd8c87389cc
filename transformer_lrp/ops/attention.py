"""Relevance of the two attention matmuls (SPEC §2.6): the G rule, then halved.

``O = A V`` and ``dots = Q Kᵀ`` are bilinear, so each operand's G-rule relevance already sums to the full output
relevance; the reference divides both by 2. The softmax between them is an identity (SPEC §2.7), and so are the
``d^{-1/2}`` scaling and (in the method's rules) the padding-mask add, which is handled by the caller.
Shapes: ``A [B, H, N, N]``, ``Q, K, V, O [B, H, N, d]``.
"""

from __future__ import annotations

import torch

from transformer_lrp.ops.common import EPS, safe_divide


def attention_av_relevance(
    attn: torch.Tensor, value: torch.Tensor, out: torch.Tensor, relevance: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    r"""``O = A V``: returns ``(R_A, R_V)``, each half of the G rule.

    ``S = safe_divide(R_O, O)``, ``R_A = A ⊙ (S Vᵀ) / 2``, ``R_V = V ⊙ (Aᵀ S) / 2``.
    ``R_A`` is the block's attention relevance of the method (``attn_cam`` in the original).
    """
    half_s = safe_divide(relevance, out).mul_(0.5)  # halving folded into the [B, H, N, d] factor
    r_attn = (half_s @ value.transpose(-1, -2)).mul_(attn)
    r_value = (attn.transpose(-1, -2) @ half_s).mul_(value)
    return r_attn, r_value


def attention_qk_relevance(
    query: torch.Tensor, key: torch.Tensor, scores: torch.Tensor, relevance: torch.Tensor, scale: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    r"""``Q Kᵀ``: returns ``(R_Q, R_K)``, each half of the G rule.

    The reference's ``matmul1`` outputs the unscaled ``dots = Q Kᵀ``; the forward keeps ``scores = scale · dots``
    instead (no extra ``[B, H, N, N]`` buffer), and ``safe_divide(R, dots) = scale · safe_divide(R, scores,
    scale · eps)`` recovers the reference exactly.
    """
    s = safe_divide(relevance, scores, EPS * scale)
    factor = 0.5 * scale
    r_query = (s @ key).mul_(query).mul_(factor)
    r_key = (s.transpose(-1, -2) @ query).mul_(key).mul_(factor)
    return r_query, r_key
