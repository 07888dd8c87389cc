"""Running the sweep by hand in tests: relevance from the head to the encoder input, observed after every block."""

from __future__ import annotations

import transformer_lrp as tl
from transformer_lrp import sweep


def relevance_totals(model, inputs, rules: sweep.Rules, pooled: bool = True, carry_gradient: bool = False) -> dict:
    """The relevance after the head and after each block, ``rules`` all the way to the encoder input (the argmax
    class explained); the gradient is carried along with it when ``carry_gradient``."""
    enc = tl.build_encoder(model)
    emb = enc.embed(inputs)
    x, caches, rows = sweep.forward(enc, emb, 0, pooled, rules.backend)
    logits, head, target, grad = sweep.head_gradient(enc, x, rows, None, lambda logits, t: logits.argmax(-1))
    rel = sweep.head_relevance(enc, head, logits, target, rules)
    totals = {"head": rel}
    sweep.reverse(enc, caches, grad if carry_gradient else None, rel, emb.key_mask, rules, None, None, False, -1,
                  observe=totals.__setitem__)
    return totals
