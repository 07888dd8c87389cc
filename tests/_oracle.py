"""Independent oracles: attention maps and their gradients taken from the stock model's own forward/backward,
and the aggregation formulas of docs/method.md §3–5 written out as explicit matrix products (no streaming)."""

from __future__ import annotations

import copy

import torch


def model_attention_and_grads(model, inputs, target):
    """Per block ``A`` `[B, H, N, N]` and ``∂y_t/∂A`` from the model itself (on a private copy)."""
    model = copy.deepcopy(model)
    captured = []
    if hasattr(model, "blocks"):  # timm
        for blk in model.blocks:
            blk.attn.fused_attn = False
            blk.attn.attn_drop.register_forward_hook(lambda m, i, o: captured.append(o))
        logits = model(inputs)
    else:  # transformers, eager attention
        model.config._attn_implementation = "eager"
        kwargs = inputs if isinstance(inputs, dict) else {"pixel_values": inputs}
        out = model(**kwargs, output_attentions=True)
        logits, captured = out.logits, list(out.attentions)
    for a in captured:
        a.retain_grad()
    if target is None:
        target = logits.argmax(-1)
    logits.gather(1, target[:, None]).sum().backward()
    return [a.detach() for a in captured], [a.grad for a in captured], logits.detach(), target


def product_row(mats, start):
    """CLS row of ``M^(L-1) ⋯ M^(s)`` (later blocks on the left, as the original), as explicit bmm."""
    joint = mats[start]
    for m in mats[start + 1 :]:
        joint = m.bmm(joint)
    return joint[:, 0]


def rollout_row(maps, start, normalize):
    """``product_row`` of ``M = I + E`` (optionally row-normalized)."""
    b, n, _ = maps[0].shape
    eye = torch.eye(n, dtype=maps[0].dtype).expand(b, n, n)
    mats = [eye + e for e in maps]
    if normalize:
        mats = [m / m.sum(-1, keepdim=True) for m in mats]
    return product_row(mats, start)


def gae_row(attn, grads):
    """GAE as docs/method.md §5 writes it: ``R ← I``; for b = 0 … L-1: ``R ← R + mean_h((∇A ⊙ A)⁺) · R``."""
    b, _, n, _ = attn[0].shape
    r = torch.eye(n, dtype=attn[0].dtype).expand(b, n, n).clone()
    for a, g in zip(attn, grads):
        r = r + (g * a).clamp(min=0).mean(1).bmm(r)
    return r[:, 0]
