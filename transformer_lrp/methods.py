"""Methods (docs/method.md §3–5): what each explanation asks of the sweep (``sweep.py``), and how it turns the result
into a row over tokens.

Every method yields the CLS row over all tokens ``[B, N]`` (the API then drops prefix tokens for vision and applies
the text conventions). Rollout-style products are streamed top-down inside the attention op, so no ``[B, N, N]``
product and no attention map is ever kept; every method runs the same forward and reverse pass on any backend.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import torch

from transformer_lrp import sweep
from transformer_lrp._backend import route
from transformer_lrp._numerics import accumulation_dtype
from transformer_lrp.adapters.spec import Embedded, EncoderSpec
from transformer_lrp.conservation import Conservation, measure
from transformer_lrp.explanation import min_max, scale_to_unit
from transformer_lrp.ops import attention_weighted_map, z_add
from transformer_lrp.ops.attention import repeat_kv

METHODS = (
    "transformer_attribution",
    "gae",
    "rollout",
    "raw_attention",
    "attention_gradcam",
    "partial_lrp",
    "full_lrp",
    "attnlrp",
    "cp_lrp",
)
# Methods whose relevance is read at the input as input ⊙ a modified gradient (docs/method.md §12).
MODIFIED_GRADIENT = ("attnlrp", "cp_lrp")
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
    conservation: Conservation | None = None  # methods that carry relevance to the input (full LRP)


class ClsRowOfMap:
    """One block's map read at the CLS row, ``e_CLS·Ē`` (raw attention, partial LRP): the attention op's rollout
    product with ``v = e_CLS``, in the place of a ``sweep.StreamingRollout``."""

    def __init__(self, like: torch.Tensor, seed: torch.Tensor | None = None):
        self._seed = sweep.StreamingRollout(like, seed)
        self.row: torch.Tensor | None = None

    def rows(self, rows: list[int] | None) -> torch.Tensor:
        return self._seed.rows(rows)

    def apply(self, v_rows: torch.Tensor, product: torch.Tensor, rows: list[int] | None = None) -> None:
        self.row = product


def _attention_only(c: sweep.BlockCache, blk) -> sweep.BlockCache:
    # what a map without gradient or relevance reads (rollout, raw attention): the rest is dropped at once
    return replace(c, x=None, proj_out=None, mid=None, fc1_out=None, fc2_out=None)


def run(
    enc: EncoderSpec,
    emb: Embedded,
    method: str,
    target: torch.Tensor | None,
    start_layer: int,
    normalize_rows: bool,
    check_target: Callable,
    backend: str = "torch",
    observe: Callable[[str, torch.Tensor], None] | None = None,
    versus: torch.Tensor | None = None,
) -> MethodOutput:
    """Run ``method``; ``check_target(logits, target)`` validates/resolves the target once logits exist.
    ``observe(where, R)`` (tests): the relevance after the head and after each block, for the LRP methods.
    ``versus`` (`[R]` class indices): explain the target's logit minus this one's (a contrast).

    With ``emb.row_sample`` the explained rows share their samples' forward: the head reads each row's position of
    its sample, and the reverse sweep runs on the rows."""
    last = enc.depth - 1
    method_rules = sweep.Rules(method=True, backend=backend)
    baseline_rules = sweep.Rules(method=False, backend=backend)
    rows_of = emb.row_sample
    like = emb.tokens  # [B or R, N, …] for the rollout's shape and dtype (its seed gives the row count)

    if method in ("transformer_attribution", "gae"):
        # Ē = mean_h (∇A ⊙ R_A)⁺ (transformer attribution) or mean_h (∇A ⊙ A)⁺ (GAE), blocks ≥ start_layer
        x, caches, rows = sweep.forward(enc, emb, start_layer, True, backend)
        logits, head, t, grad = sweep.head_gradient(enc, sweep.per_row(x, rows_of), rows, target, check_target,
                                                    emb.pool_index, versus)
        rel = None
        if method == "transformer_attribution":
            with torch.no_grad():
                rel = sweep.head_relevance(enc, head, logits, t, method_rules, versus)
            if observe is not None:
                observe("head", rel)
        rollout = sweep.StreamingRollout(like, emb.pool_index)
        sweep.reverse(enc, caches, grad, rel, emb.key_mask, method_rules, method, rollout, normalize_rows,
                      start_layer, observe, rows_of)
        return MethodOutput(rollout.v.to(emb.tokens.dtype), logits, t)

    if method in ("rollout", "raw_attention"):
        # rollout: M = (I + mean_h A) / rowsum over blocks ≥ start_layer; raw attention: the last block's mean_h A
        first = start_layer if method == "rollout" else last
        x, caches, rows = sweep.forward(enc, emb, first, True, backend, keep=_attention_only)
        with torch.no_grad():
            logits, _ = sweep.head_forward(enc, sweep.per_row(x, rows_of), rows, emb.pool_index)
        t = check_target(logits, target)
        seed = emb.pool_index
        acc = sweep.StreamingRollout(like, seed) if method == "rollout" else ClsRowOfMap(like, seed)
        sweep.reverse(enc, caches, None, None, emb.key_mask, method_rules, "rollout", acc, method == "rollout",
                      first, row_sample=rows_of)
        row = acc.v if method == "rollout" else acc.row
        return MethodOutput(row.to(emb.tokens.dtype), logits, t)

    if method == "attention_gradcam":
        return _attention_gradcam(enc, emb, target, check_target, method_rules, versus)

    if method in MODIFIED_GRADIENT:
        # AttnLRP / CP-LRP as modified gradients: one forward, the head's modified gradient by autograd, then the
        # gradient alone through every block under the rule set's modifications; relevance = input ⊙ gradient
        rules = sweep.Rules(method=True, backend=backend, modified=method)
        x, caches, rows = sweep.forward(enc, emb, 0, True, backend)
        top = sweep.per_row(x, rows_of)
        logits, head, t, grad = sweep.head_gradient(enc, top, rows, target, check_target, emb.pool_index, versus,
                                                    modified=True)
        if observe is not None:
            observe("head", top * grad)
        d_in, _ = sweep.reverse(enc, caches, grad, None, emb.key_mask, rules, None, None, False, -1, observe,
                                rows_of)
        with torch.no_grad():
            tokens, patches = emb.from_gradient(d_in)
        vision = enc.modality == "vision"
        # the gradient 1 at the explained logit puts in the logit itself as relevance (gradient × input)
        kept = None if versus is not None else measure(logits, t, sweep.explained_logit(logits, t, None),
                                                       (patches if vision else tokens)[..., None],
                                                       tokens if vision else None, absorbing=True)
        if vision:
            return MethodOutput(torch.empty(0), logits, t, pixels=tokens, patch_tokens=patches, conservation=kept)
        return MethodOutput(tokens, logits, t, conservation=kept)

    if method == "partial_lrp":
        # the last block's mean_h (R_A)⁺ at the CLS row, R_A under the baselines' rules
        x, caches, rows = sweep.forward(enc, emb, last, True, backend)
        with torch.no_grad():
            logits, head = sweep.head_forward(enc, sweep.per_row(x, rows_of), rows, emb.pool_index)
            t = check_target(logits, target)
            rel = sweep.head_relevance(enc, head, logits, t, baseline_rules, versus)
        acc = ClsRowOfMap(like, emb.pool_index)
        sweep.reverse(enc, caches, None, rel, emb.key_mask, baseline_rules, "partial_lrp", acc, False, last, observe,
                      rows_of)
        return MethodOutput(acc.row.to(emb.tokens.dtype), logits, t)

    if method == "full_lrp":
        # the baselines' rules all the way to the input: pixels (vision) or token embeddings (text)
        x, caches, rows = sweep.forward(enc, emb, 0, True, backend)
        with torch.no_grad():
            logits, head = sweep.head_forward(enc, sweep.per_row(x, rows_of), rows, emb.pool_index)
            t = check_target(logits, target)
            rel = sweep.head_relevance(enc, head, logits, t, baseline_rules, versus)
        if observe is not None:
            observe("head", rel)
        _, r_in = sweep.reverse(enc, caches, None, rel, emb.key_mask, baseline_rules, None, None, False, -1,
                                observe, rows_of)
        with torch.no_grad():
            tokens, patches = emb.to_input(r_in, z_add)
        vision = enc.modality == "vision"
        # the one-hot start put 1 in at the target's logit (sweep.head_relevance)
        # a contrast puts in +1 and −1: no total to conserve against
        kept = None if versus is not None else measure(logits, t, sweep.onehot(logits, t).sum(1), r_in,
                                                       tokens if vision else None)
        if vision:
            return MethodOutput(torch.empty(0), logits, t, pixels=tokens, patch_tokens=patches, conservation=kept)
        return MethodOutput(tokens, logits, t, conservation=kept)

    raise AssertionError(method)  # validated by the API


def _attention_gradcam(enc: EncoderSpec, emb: Embedded, target, check_target, rules: sweep.Rules,
                       versus: torch.Tensor | None = None) -> MethodOutput:
    """Attention GradCAM (docs/method.md §4): per-head weights ``w_h`` = the mean of ``∇A_h`` (vision: over the CLS
    row's patch columns; text: over the real (query, key) pairs), the map ``(mean_h w_h A_h)⁺``, min–max.
    ``∇A = dO Vᵀ`` makes the weights closed-form means of ``dO`` and ``V``, and the weighted map comes from its own
    op, so no ``[B, H, N, N]`` is formed. Vision reads the CLS row of the pooled top block; text normalizes over the
    whole matrix, so its last block computes every row."""
    vision = enc.modality == "vision"
    last = enc.depth - 1
    x, caches, rows = sweep.forward(enc, emb, last, vision, rules.backend)
    logits, head, t, grad = sweep.head_gradient(enc, sweep.per_row(x, emb.row_sample), rows, target, check_target,
                                                emb.pool_index, versus)
    c, blk = caches[last], enc.blocks[last]
    key_mask = emb.key_mask
    if emb.row_sample is not None:  # explained rows sharing a sample's forward
        c, key_mask = c.for_rows(emb.row_sample), sweep.per_row(key_mask, emb.row_sample)
    with torch.no_grad():
        d_ctx = sweep.to_attention_output(blk, c, grad, None, rules)[0]
        acc = accumulation_dtype(emb.tokens.dtype)
        # shared key/value heads (GQA) serve each of their query heads: ∇A_h = dO_h V_{h // G}ᵀ
        d_out, value = sweep.split_heads(d_ctx, blk.num_heads, blk.head_dim).to(acc), repeat_kv(c.v, blk.num_heads)
        value = value.to(acc)
        backend = route("attention_weighted_map", rules.backend, (c.q,))
        if vision:
            p, cls = enc.num_prefix_tokens, head.row_of(0)
            weights = (d_out[:, :, cls] * value[:, :, p:].mean(2)).sum(-1)  # [B, H]
            row = attention_weighted_map(c.q, c.k, c.lse, blk.scale, weights, None, cls, backend=backend,
                                         causal=blk.causal)[0]
            out = torch.zeros_like(row)
            out[:, p:] = min_max(row[:, p:])
            return MethodOutput(out.to(emb.tokens.dtype), logits, t)
        if blk.causal and emb.pool_index is not None:
            # a causal model's explained row depends on no later token: the map's domain ends at that row (so that
            # a continuation's row is what the same prefix alone gives)
            upto = torch.arange(c.q.shape[2], device=c.q.device)[None, :] <= emb.pool_index[:, None]
            key_mask = upto if key_mask is None else key_mask & upto
        if key_mask is None:
            count = torch.full((d_out.shape[0], 1), float(d_out.shape[2] * value.shape[2]), dtype=acc,
                               device=d_out.device)
            sum_do, sum_v = d_out.sum(2), value.sum(2)
        else:
            real = key_mask[:, None, :, None].to(acc)
            count = key_mask.sum(1, keepdim=True).to(acc) ** 2
            sum_do, sum_v = (d_out * real).sum(2), (value * real).sum(2)
        weights = (sum_do * sum_v).sum(-1) / count  # [B, H]
        # the row the head reads (CLS, CLIP text's EOS, a decoder's explained position)
        read = 0 if emb.pool_index is None else emb.pool_index
        row, lo, hi = attention_weighted_map(c.q, c.k, c.lse, blk.scale, weights, key_mask, read,
                                             backend=backend, causal=blk.causal, window=blk.window)
        return MethodOutput(scale_to_unit(row, lo[:, None], hi[:, None]).to(emb.tokens.dtype), logits, t)
