"""Methods: how each explanation is aggregated from the engine's per-block outputs (SPEC §3–5).

Every method yields the CLS row over all tokens ``[B, N]`` (the API then drops prefix tokens for vision and
applies the text conventions). Rollout-style products are streamed top-down: the output is one row of
``C = M⁽ᴸ⁻¹⁾ ⋯ M⁽ˢ⁾``, so the row vector ``v`` (start ``e_CLS``) is updated ``v ← v·M⁽ᵇ⁾`` as the sweep passes
block ``b``, and no ``[B, N, N]`` product is ever formed.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from transformer_lrp import engine, fused
from transformer_lrp.adapters.spec import Embedded, EncoderSpec
from transformer_lrp.explanation import min_max
from transformer_lrp.ops import z_add

METHODS = (
    "transformer_attribution",
    "gae",
    "rollout",
    "raw_attention",
    "attention_gradcam",
    "partial_lrp",
    "full_lrp",
)
# Methods that aggregate over blocks start_layer … L-1; the others read the last block (or all, for full LRP).
LAYERED = ("transformer_attribution", "gae", "rollout")
# The original code's legacy name for the method.
ALIASES = {"grad": "transformer_attribution"}


@dataclass
class MethodOutput:
    row: torch.Tensor  # [B, N]: the CLS row over all tokens (full LRP: token relevance of the input)
    logits: torch.Tensor  # [B, C]
    target: torch.Tensor  # [B]
    pixels: torch.Tensor | None = None  # full LRP, vision: [B, H, W]
    patch_tokens: torch.Tensor | None = None  # full LRP, vision: [B, P]


class StreamingRollout:
    """``v ← v · M`` with ``M = I + E`` (or ``(I + E) / rowsum`` when normalizing), starting at ``e_CLS``."""

    def __init__(self, batch: int, tokens: int, normalize: bool, like: torch.Tensor):
        self.v = torch.zeros(batch, tokens, dtype=like.dtype, device=like.device)
        self.v[:, 0] = 1
        self.normalize = normalize

    def update(self, e: torch.Tensor, rows: list[int] | None = None) -> None:
        """``e``: `[B, N, N]`, or `[B, len(rows), N]` when only ``rows`` of it are known (the pooled top block:
        valid there because ``v`` is still ``e_CLS``, zero outside those rows)."""
        v_rows = self.v if rows is None else self.v[:, rows]
        if self.normalize:
            v_rows = v_rows / (1 + e.sum(dim=-1))
        self.apply(v_rows, (v_rows.unsqueeze(1) @ e).squeeze(1), rows)

    def apply(self, v_rows: torch.Tensor, product: torch.Tensor, rows: list[int] | None = None) -> None:
        """The update from its two parts, computed elsewhere (the fused attention backward): ``v_rows``, the
        (normalized) ``v`` at the map's rows, and ``product = v_rows · E`` `[B, N]`."""
        v = v_rows.to(self.v.dtype) if rows is None else self.v.clone().index_copy_(
            1, torch.tensor(rows, device=self.v.device), v_rows.to(self.v.dtype))
        self.v = v + product.to(self.v.dtype)


def run(
    enc: EncoderSpec,
    emb: Embedded,
    method: str,
    target: torch.Tensor | None,
    start_layer: int,
    normalize_rows: bool,
    check_target,
    backend: str = "torch",
) -> MethodOutput:
    """Run ``method``; ``check_target(logits, target)`` validates/resolves the target once logits exist."""
    L = enc.depth
    last = L - 1
    b, n = emb.tokens.shape[:2]

    if method in fused.FUSED_METHODS and backend != "torch":
        return fused.run(enc, emb, method, target, start_layer, normalize_rows, check_target, backend)

    if method == "transformer_attribution":
        trace = engine.forward(enc, emb, engine.Plan(grad_from=start_layer, attn_from=start_layer,
                                                     cache_from=start_layer, pooled_top=True))
        t = check_target(trace.logits, target)
        grads = engine.attention_gradients(trace, t, list(range(start_layer, L)))
        agg = StreamingRollout(b, n, normalize_rows, emb.tokens)

        def on_block(i: int, r_attn: torch.Tensor) -> None:
            # in place: the gradient is used once and dropped
            agg.update(grads.pop(i).mul_(r_attn).clamp_(min=0).mean(dim=1), _rows(trace, i, L))

        engine.relevance_sweep(enc, trace, _onehot(trace.logits, t), "method", start_layer, on_block, backend=backend)
        return MethodOutput(agg.v, trace.logits.detach(), t)

    if method == "gae":
        trace = engine.forward(enc, emb, engine.Plan(grad_from=start_layer, attn_from=start_layer, pooled_top=True))
        t = check_target(trace.logits, target)
        grads = engine.attention_gradients(trace, t, list(range(start_layer, L)))
        agg = StreamingRollout(b, n, normalize_rows, emb.tokens)
        with torch.no_grad():
            for i in range(last, start_layer - 1, -1):
                agg.update(grads.pop(i).mul_(trace.attn.pop(i)).clamp_(min=0).mean(dim=1), _rows(trace, i, L))
        return MethodOutput(agg.v, trace.logits.detach(), t)

    if method == "rollout":
        with torch.no_grad():
            trace = engine.forward(enc, emb, engine.Plan(attn_from=start_layer, pooled_top=True))
            t = check_target(trace.logits, target)
            agg = StreamingRollout(b, n, True, emb.tokens)
            for i in range(last, start_layer - 1, -1):
                agg.update(trace.attn.pop(i).mean(dim=1), _rows(trace, i, L))
        return MethodOutput(agg.v, trace.logits, t)

    if method == "raw_attention":
        with torch.no_grad():
            trace = engine.forward(enc, emb, engine.Plan(attn_from=last, pooled_top=True))
            t = check_target(trace.logits, target)
            row = trace.attn[last].mean(dim=1)[:, trace.row_of(0)]
        return MethodOutput(row, trace.logits, t)

    if method == "attention_gradcam" and enc.modality == "text" and backend != "torch":
        return fused.gradcam_text(enc, emb, target, check_target, backend)

    if method == "attention_gradcam":
        # Text GradCAM normalizes over the whole last attention matrix: it needs every row.
        pooled = enc.modality == "vision"
        trace = engine.forward(enc, emb, engine.Plan(grad_from=last, attn_from=last, pooled_top=pooled))
        t = check_target(trace.logits, target)
        grad = engine.attention_gradients(trace, t, [last])[last]
        with torch.no_grad():
            row = _gradcam_row(enc, emb, trace.attn[last].detach(), grad, trace.row_of(0))
        return MethodOutput(row, trace.logits.detach(), t)

    if method == "partial_lrp":
        with torch.no_grad():
            trace = engine.forward(enc, emb, engine.Plan(cache_from=last, pooled_top=True))
        t = check_target(trace.logits, target)
        maps: dict[int, torch.Tensor] = {}
        engine.relevance_sweep(enc, trace, _onehot(trace.logits, t), "baseline", last,
                               lambda i, r: maps.__setitem__(i, r))
        return MethodOutput(maps[last].clamp(min=0).mean(dim=1)[:, trace.row_of(0)], trace.logits, t)

    if method == "full_lrp":
        # Non-reference backends: the fused attention forward (no A kept for any block) and its relevance kernel.
        with torch.no_grad():
            trace = engine.forward(enc, emb, engine.Plan(cache_from=0, pooled_top=True), backend)
        t = check_target(trace.logits, target)
        r_in = engine.relevance_sweep(enc, trace, _onehot(trace.logits, t), "baseline", -1, backend=backend)
        with torch.no_grad():
            tokens, patches = emb.to_input(r_in, z_add)
        if enc.modality == "vision":
            return MethodOutput(torch.empty(0), trace.logits, t, pixels=tokens, patch_tokens=patches)
        return MethodOutput(tokens, trace.logits, t)

    raise AssertionError(method)  # validated by the API


def _rows(trace: engine.Trace, block: int, depth: int) -> list[int] | None:
    """The rows the block's maps hold: the pooled tokens for the last block when it was computed for them only."""
    return trace.top_rows if block == depth - 1 else None


def _onehot(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    onehot = torch.zeros(logits.shape, dtype=logits.dtype, device=logits.device)
    onehot.scatter_(1, target[:, None], 1.0)
    return onehot


def _gradcam_row(enc: EncoderSpec, emb: Embedded, attn: torch.Tensor, grad: torch.Tensor, cls_row: int) -> torch.Tensor:
    """Attention GradCAM (SPEC §4): per-head weights from the gradient, weighted head mean, ReLU, min–max.

    Vision averages the gradient over the CLS row's patch columns; text over the whole (real-token) matrix.
    """
    if enc.modality == "vision":
        p = enc.num_prefix_tokens
        w = grad[:, :, cls_row, p:].mean(dim=-1)  # [B, H]
        cam = (w[:, :, None] * attn[:, :, cls_row, p:]).mean(dim=1).clamp(min=0)  # [B, P]
        row = torch.zeros(attn.shape[0], attn.shape[-1], dtype=attn.dtype, device=attn.device)
        row[:, p:] = min_max(cam, None)
        return row
    mask = emb.key_mask
    if mask is None:
        w = grad.mean(dim=(-1, -2))
        valid = None
    else:
        valid = (mask[:, :, None] & mask[:, None, :])  # [B, N, N]
        count = valid.sum(dim=(-1, -2)).to(grad.dtype)[:, None]
        w = (grad * valid[:, None]).sum(dim=(-1, -2)) / count
    cam = (w[:, :, None, None] * attn).mean(dim=1).clamp(min=0)  # [B, N, N]
    return min_max(cam, valid)[:, 0]
