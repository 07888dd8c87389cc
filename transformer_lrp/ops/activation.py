"""Activations (GELU, SiLU, tanh, …): identities for relevance (docs/method.md §2.7). AttnLRP's modified gradient
(docs/method.md §12) carries that identity through a gradient × input sweep: ``∂y/∂x`` replaced by ``act(x) / x``, so
that ``x · grad_x = act(x) · grad_y``, i.e. the input gets the output's relevance."""

from __future__ import annotations

import torch

from transformer_lrp.ops.common import profiled

# Added to x as it is (not sign-aware), as LXT does: a sign-aware ε changes relevance measurably (1e-9 on a tiny Llama).
IDENTITY_RULE_EPS = 1e-10


@profiled
def identity_rule_grad(x: torch.Tensor, act_x: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """``grad ⊙ act(x) / (x + 1e-10)``: the modified gradient of an activation under the identity rule."""
    return grad * act_x / (x + IDENTITY_RULE_EPS)
