"""The gate product of gated MLPs (SwiGLU, GeGLU: ``a = act(gate(x)) ⊙ up(x)``; docs/method.md §2.13).

An elementwise product of two inputs is bilinear, like the attention matmuls: each operand's G-rule relevance is
the whole output relevance, and the method halves it (as it halves the two attention products, docs/method.md §2.6),
so ``R_act = R_up = R_a / 2``: the uniform rule, which conserves. Holding the gate constant instead (CP-LRP) gives
all of ``R_a`` to the value side.
"""

from __future__ import annotations

import torch

from transformer_lrp.ops.common import profiled


@profiled
def gate_relevance(relevance: torch.Tensor, hold_gate: bool = False) -> tuple[torch.Tensor | None, torch.Tensor]:
    """``(R_gate_side, R_value_side)`` of ``a = s ⊙ u``: halves (the uniform rule), or ``(None, R_a)`` with the gate
    held constant."""
    if hold_gate:
        return None, relevance
    half = relevance * 0.5
    return half, half


def gate_grad(grad: torch.Tensor, gate_act: torch.Tensor, value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradient of ``a = s ⊙ u`` with respect to ``(s, u)``."""
    return grad * value, grad * gate_act
