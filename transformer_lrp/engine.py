"""The engine: one forward that saves what the reverse sweep needs, then one reverse sweep over the blocks.

The forward recomputes the model from its own parameter tensors (``adapters.spec``), so the model's attention
implementation, hooks and train/eval mode play no part and are never touched. Attention gradients
``∂y_t/∂A`` come from autograd on that forward, restricted to the blocks a method needs (below ``start_layer``
the forward runs without a graph). Relevance is propagated by hand, top-down, with the rules in ``ops``; each
block's attention relevance ``R_A`` is handed to a callback as soon as it is known, so methods can aggregate
(streaming rollout) without keeping every block's ``[B, H, N, N]`` maps.

Dropout, drop-path and patch-dropout are identities: an explanation is of the model's inference function.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Literal

import torch

from transformer_lrp.adapters.spec import ACTIVATIONS, BlockSpec, Embedded, EncoderSpec
from transformer_lrp.ops import (
    attention_av_relevance,
    attention_forward,
    attention_qk_relevance,
    attention_relevance,
    clone_relevance,
    linear_alpha1beta0,
    linear_alpha1beta0_separate,
    normalized_add,
    select_relevance,
    z_add,
)
from transformer_lrp.ops.common import profiled

Rules = Literal["method", "baseline"]
_HALF = (torch.float16, torch.bfloat16)


@dataclass(frozen=True)
class RuleSet:
    """Which file's rules (SPEC §2.4, §2.8): the method's (``layers_ours``) or the baselines' (``layers_lrp``)."""

    linear: Callable
    add: Callable
    normalized_add: bool  # the add rule is the normalized add (else the plain z-rule)
    backend: str = "torch"

    @staticmethod
    def of(rules: Rules, backend: str = "torch") -> RuleSet:
        """``backend`` applies to the method's rules and to the attention (the baselines' other rules run the
        reference)."""
        if rules == "method":
            return RuleSet(linear=partial(_linear_method, backend=backend), add=partial(_add_method, backend=backend),
                           normalized_add=True, backend=backend)
        return RuleSet(linear=_linear_baseline, add=z_add, normalized_add=False, backend=backend)


def _linear_method(x, spec, relevance, y, backend="torch"):
    return linear_alpha1beta0(x, spec.weight, relevance, output=y, bias=spec.bias, abs_weight=spec.abs_weight,
                              backend=backend)


def _add_method(relevance, u, v, backend="torch"):
    # The kernel covers two same-shape summands; the padding-mask add (v = 0) runs the reference.
    if v is None or u.shape != v.shape:
        backend = "torch"
    return normalized_add(relevance, u, v, backend=backend)


def _linear_baseline(x, spec, relevance, y):
    return linear_alpha1beta0_separate(x, spec.weight, relevance)


# ------------------------------------------------------------------------------------------------------ forward


@dataclass
class BlockCache:
    """Tensors one block's relevance rules read (``None`` where not kept)."""

    x: torch.Tensor  # block input [B, N, D]
    h1: torch.Tensor  # attention input (LN(x) for pre-norm, x for post-norm)
    qkv_out: list[torch.Tensor]  # outputs of the q/k/v projection(s), bias included
    q: torch.Tensor  # [B, H, N, d] (unscaled)
    k: torch.Tensor
    v: torch.Tensor
    scores: torch.Tensor  # scale · q kᵀ, before any padding mask [B, H, N, N]
    attn: torch.Tensor  # softmax output A
    out: torch.Tensor  # A v [B, H, N, d]
    ctx: torch.Tensor  # heads merged [B, N, H·d]
    proj_out: torch.Tensor
    branch1: torch.Tensor  # what is added to the residual (LayerScale applied)
    mid: torch.Tensor  # pre-norm: x + branch1; post-norm: LN1(x + branch1)
    h2: torch.Tensor  # MLP input
    fc1_out: torch.Tensor
    act_out: torch.Tensor
    fc2_out: torch.Tensor
    branch2: torch.Tensor
    # Query rows computed (the top block computes only the pooled tokens' rows); None = all. From ``q`` on, the
    # tensors above hold only these rows; ``x``, ``h1``, ``qkv_out``, ``k`` and ``v`` hold all tokens.
    rows: list[int] | None = None
    # Fused attention (``fused.py``): the rows' log-sum-exp replaces ``scores`` and ``attn`` (then None).
    lse: torch.Tensor | None = None


@dataclass
class Trace:
    logits: torch.Tensor  # [B, C]
    attn: dict[int, torch.Tensor] = field(default_factory=dict)  # block → A (in the autograd graph if tracked)
    caches: dict[int, BlockCache] = field(default_factory=dict)
    pooled_inputs: torch.Tensor | None = None  # tokens the head reads (after the final norm)
    # Token positions the last block computed (its output and attention rows), None = all tokens.
    top_rows: list[int] | None = None
    head_inputs: list[list[torch.Tensor]] = field(default_factory=list)  # per branch, input of each head layer
    head_outputs: list[list[torch.Tensor]] = field(default_factory=list)
    branch_logits: list[torch.Tensor] = field(default_factory=list)
    key_mask: torch.Tensor | None = None  # [B, N] True = real token (the fused attention's padding mask)

    def row_of(self, token: int) -> int:
        """Index of ``token`` in the last block's rows (attention rows, output tokens)."""
        return token if self.top_rows is None else self.top_rows.index(token)


def _split_heads(t: torch.Tensor, heads: int, head_dim: int) -> torch.Tensor:
    b, n, _ = t.shape
    return t.view(b, n, heads, head_dim).transpose(1, 2)


def _merge_heads(t: torch.Tensor) -> torch.Tensor:
    b, h, n, d = t.shape
    return t.transpose(1, 2).reshape(b, n, h * d)


def block_forward(
    blk: BlockSpec,
    x: torch.Tensor,
    masked_keys: torch.Tensor | None,
    keep_cache: bool,
    rows: list[int] | None = None,
    fused_attention: Callable | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None, BlockCache | None]:
    """Returns ``(output, A, cache)``. ``masked_keys``: `[B, 1, 1, N]` bool, True where the key is padding.

    ``rows``: compute the output (and attention rows) of these token positions only: keys and values still come
    from every token. The last block needs only the tokens the head reads.
    ``fused_attention(q, k, v, scale) -> (O, lse)``: attention without ``A`` (then ``A`` is returned as None).
    """
    h1 = blk.norm1(x) if blk.pre_norm else x
    qkv_out = [lin(h1) for lin in blk.qkv]
    heads, hd = blk.num_heads, blk.head_dim
    if blk.fused_qkv:
        b, n, _ = h1.shape
        q, k, v = qkv_out[0].view(b, n, 3, heads, hd).permute(2, 0, 3, 1, 4).unbind(0)
    else:
        q, k, v = (_split_heads(t, heads, hd) for t in qkv_out)
    x_rows = x
    if rows is not None:
        q, x_rows = q[:, :, rows], x[:, rows]
    scores = attn = lse = None
    if fused_attention is not None:
        out, lse = fused_attention(q, k, v, blk.scale)
    else:
        # Scaling q (not the [B, H, N, N] product) saves a buffer; the rules recover the unscaled q kᵀ exactly.
        scores = (q * blk.scale) @ k.transpose(-1, -2)
        masked = scores if masked_keys is None else scores.masked_fill(masked_keys, torch.finfo(scores.dtype).min)
        # Half-precision models get an fp32 softmax (as transformers' eager attention does), cast back.
        attn = masked.softmax(dim=-1, dtype=torch.float32 if scores.dtype in _HALF else None).to(scores.dtype)
        out = attn @ v
    ctx = _merge_heads(out)
    proj_out = blk.proj(ctx)
    branch1 = proj_out * blk.ls1 if blk.ls1 is not None else proj_out
    mid = x_rows + branch1 if blk.pre_norm else blk.norm1(branch1 + x_rows)
    h2 = blk.norm2(mid) if blk.pre_norm else mid
    fc1_out = blk.fc1(h2)
    act_out = ACTIVATIONS[blk.act](fc1_out)
    fc2_out = blk.fc2(act_out)
    branch2 = fc2_out * blk.ls2 if blk.ls2 is not None else fc2_out
    y = mid + branch2 if blk.pre_norm else blk.norm2(branch2 + mid)
    cache = None
    if keep_cache:
        cache = BlockCache(x, h1, qkv_out, q, k, v, scores, attn, out, ctx, proj_out, branch1, mid, h2, fc1_out,
                           act_out, fc2_out, branch2, rows, lse)
    return y, attn, cache


def _fused_attention(q, k, v, scale, key_mask, backend):
    # O written head-interleaved ([B, N, H, d] memory): merging the heads is then a view, not a copy
    b, h, n, d = q.shape
    buffer = q.new_empty(b, n, h, d).transpose(1, 2)
    return attention_forward(q, k, v, scale, key_mask, out=buffer, backend=backend)


def head_forward(enc: EncoderSpec, tokens: torch.Tensor, trace: Trace) -> torch.Tensor:
    if enc.final_norm is not None:
        tokens = enc.final_norm(tokens)
    trace.pooled_inputs = tokens
    logits = None
    for branch in enc.head:
        h = tokens[:, trace.row_of(branch.token)]
        ins, outs = [], []
        for kind, layer in branch.layers:
            ins.append(h)
            if kind == "linear" or kind == "norm":
                h = layer(h)
            else:
                h = ACTIVATIONS[layer](h)
            outs.append(h)
        trace.head_inputs.append(ins)
        trace.head_outputs.append(outs)
        h = h * branch.weight if branch.weight != 1.0 else h
        trace.branch_logits.append(h)
        logits = h if logits is None else logits + h
    return logits


@dataclass(frozen=True)
class Plan:
    """What the forward must keep: gradients of ``A`` for blocks ≥ ``grad_from``, ``A`` for blocks ≥ ``attn_from``,
    relevance caches for blocks ≥ ``cache_from`` (``None``: nothing of that kind)."""

    grad_from: int | None = None
    attn_from: int | None = None
    cache_from: int | None = None
    # Compute the last block for the pooled tokens only (exact: the head reads nothing else). Off for methods that
    # read the last block's full attention matrix.
    pooled_top: bool = False


def pooled_rows(enc: EncoderSpec) -> list[int]:
    """The token positions the head reads (CLS; DeiT also its distillation token)."""
    return sorted({branch.token for branch in enc.head})


@profiled
def forward(enc: EncoderSpec, emb: Embedded, plan: Plan, backend: str = "torch") -> Trace:
    """``backend`` other than ``"torch"``: attention through the fused op (``O`` and ``lse`` kept, never ``A``);
    only for plans that need neither ``A`` nor its gradient."""
    fused = None
    if backend != "torch":
        assert plan.grad_from is None and plan.attn_from is None, "the fused attention keeps no A"
        fused = partial(_fused_attention, key_mask=emb.key_mask, backend=backend)
    masked = None if emb.key_mask is None else ~emb.key_mask[:, None, None, :]
    x = emb.tokens
    attn: dict[int, torch.Tensor] = {}
    caches: dict[int, BlockCache] = {}
    track = plan.grad_from is not None
    top_rows = pooled_rows(enc) if plan.pooled_top else None
    for i, blk in enumerate(enc.blocks):
        tracked = track and i >= plan.grad_from
        if tracked and i == plan.grad_from:
            x = x.detach().requires_grad_(True)
        with torch.set_grad_enabled(tracked):
            keep = plan.cache_from is not None and i >= plan.cache_from
            x, a, cache = block_forward(blk, x, masked, keep, top_rows if i == enc.depth - 1 else None, fused)
        if plan.attn_from is not None and i >= plan.attn_from:
            attn[i] = a
        if cache is not None:
            caches[i] = cache
    trace = Trace(logits=torch.empty(0), attn=attn, caches=caches, top_rows=top_rows, key_mask=emb.key_mask)
    with torch.set_grad_enabled(track):
        trace.logits = head_forward(enc, x, trace)
    return trace


@profiled
def attention_gradients(trace: Trace, target: torch.Tensor, blocks: list[int]) -> dict[int, torch.Tensor]:
    """``∂y_t/∂A`` of the logit of each sample's target (per-sample: ``Σ_b y_{b,t_b}``; samples are independent)."""
    y = trace.logits.gather(1, target[:, None]).sum()
    grads = torch.autograd.grad(y, [trace.attn[i] for i in blocks], allow_unused=True)
    return {i: (torch.zeros_like(trace.attn[i]) if g is None else g) for i, g in zip(blocks, grads)}


# ------------------------------------------------------------------------------------------------ reverse sweep


def head_relevance(enc: EncoderSpec, trace: Trace, onehot: torch.Tensor, rules: RuleSet) -> torch.Tensor:
    """One-hot at the logits → relevance of the encoder output tokens `[B, N, D]` (the final norm is an identity)."""
    tokens = trace.pooled_inputs
    if len(enc.head) == 1:
        branch_rel = [onehot]
    else:  # DeiT-distilled: logits = (head(cls) + head_dist(dist)) / 2, an add of the two branches
        assert len(enc.head) == 2, "heads with more than two branches are not described by any adapter"
        branch_rel = list(rules.add(onehot, trace.branch_logits[0], trace.branch_logits[1]))
    total = torch.zeros_like(tokens)
    for k, branch in enumerate(enc.head):
        r = branch_rel[k]  # the branch weight (1/2) is a scaling: relevance passes it unchanged
        for (kind, layer), x, y in zip(
            reversed(branch.layers), reversed(trace.head_inputs[k]), reversed(trace.head_outputs[k])
        ):
            if kind == "linear":
                r = rules.linear(x, layer, r, y)
        total = total + select_relevance(tokens, trace.row_of(branch.token), r)
    return total


def _scatter_rows(t: torch.Tensor, rows: list[int], n: int, dim: int) -> torch.Tensor:
    shape = list(t.shape)
    shape[dim] = n
    full = t.new_zeros(shape)
    full.index_copy_(dim, torch.tensor(rows, device=t.device), t)
    return full


def block_relevance(
    blk: BlockSpec, c: BlockCache, relevance: torch.Tensor, rules: RuleSet, through_attention: bool,
    key_mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Relevance of one block, top-down (SPEC §2.11). Returns ``(R_input or None, R_A)``.

    With ``through_attention=False`` the sweep stops at ``R_A`` (all that a method needs from the lowest block).
    A block from the fused forward (no ``A`` kept) gets its attention relevance from the fused kernel and returns
    ``R_A = None``; ``key_mask`` is then the padding mask.
    """
    add, linear = rules.add, rules.linear
    # MLP half: the residual add, then fc2, activation (identity), fc1, norm (identity), then the clone.
    if blk.pre_norm:
        r_mid_res, r_branch2 = add(relevance, c.mid, c.branch2)
    else:
        r_branch2, r_mid_res = add(relevance, c.branch2, c.mid)
    r_act = linear(c.act_out, blk.fc2, r_branch2, c.fc2_out)
    r_h2 = linear(c.h2, blk.fc1, r_act, c.fc1_out)
    r_mid = clone_relevance(c.mid, r_h2, r_mid_res)
    # Attention half: the residual add, the output projection, then A·V.
    x_rows = c.x if c.rows is None else c.x[:, c.rows]
    if blk.pre_norm:
        r_x_res, r_branch1 = add(r_mid, x_rows, c.branch1)
    else:
        r_branch1, r_x_res = add(r_mid, c.branch1, x_rows)
    r_ctx = linear(c.ctx, blk.proj, r_branch1, c.proj_out)
    r_out = _split_heads(r_ctx, blk.num_heads, blk.head_dim)
    if c.attn is None:  # fused forward: the kernel recomputes A tile by tile
        if not through_attention:
            return None, None
        res = attention_relevance(c.q, c.k, c.v, c.out, c.lse, blk.scale, rel_out=r_out, key_mask=key_mask,
                                  mask_add=blk.mask_add, mask_add_normalized=rules.normalized_add,
                                  backend=rules.backend)
        r_attn, r_q, r_k, r_v = None, res["rel_query"], res["rel_key"], res["rel_value"]
    else:
        r_attn, r_v = attention_av_relevance(c.attn, c.v, c.out, r_out)
        if not through_attention:
            return None, r_attn
        r_scores = r_attn  # softmax: identity
        if blk.mask_add:
            # BERT adds its padding mask to the scores; the original propagates through that add. At real keys the
            # mask is 0 and at padded keys R = 0 (A = 0 there), so the mask side never takes relevance.
            r_scores = add(r_attn, c.scores, None)[0]
        r_q, r_k = attention_qk_relevance(c.q, c.k, c.scores, r_scores, blk.scale)
    if c.rows is not None:  # back to all tokens: the skipped rows carry no relevance
        r_q = _scatter_rows(r_q, c.rows, r_k.shape[2], dim=2)
        r_x_res = _scatter_rows(r_x_res, c.rows, c.x.shape[1], dim=1)
    if blk.fused_qkv:
        b, n, _ = c.h1.shape
        r_qkv = torch.stack([t.transpose(1, 2) for t in (r_q, r_k, r_v)], dim=2).reshape(b, n, -1)
        r_h1 = linear(c.h1, blk.qkv[0], r_qkv, c.qkv_out[0])
    else:
        parts = [linear(c.h1, lin, _merge_heads(r), y) for lin, r, y in zip(blk.qkv, (r_q, r_k, r_v), c.qkv_out)]
        r_h1 = clone_relevance(c.h1, *parts)  # q, k, v read copies of the same input
    return clone_relevance(c.x, r_h1, r_x_res), r_attn


def relevance_sweep(
    enc: EncoderSpec,
    trace: Trace,
    onehot: torch.Tensor,
    rules: Rules,
    stop_block: int,
    on_block: Callable[[int, torch.Tensor], None] | None = None,
    on_total: Callable[[str, torch.Tensor], None] | None = None,
    backend: str = "torch",
) -> torch.Tensor | None:
    """Top-down over blocks ``L-1 … stop_block``; ``stop_block=-1`` continues to the encoder input.

    ``on_block(b, R_A)`` receives each block's attention relevance; ``on_total(where, R)`` (tests, debugging)
    receives the relevance after the head and after each block. Returns the encoder-input relevance `[B, N, D]`
    when ``stop_block == -1``.
    """
    rs = RuleSet.of(rules, backend)
    with torch.no_grad():
        r = head_relevance(enc, trace, onehot, rs)
        if on_total is not None:
            on_total("head", r)
        lowest = max(stop_block, 0)
        for i in range(enc.depth - 1, lowest - 1, -1):
            through = i > lowest or stop_block == -1
            r_in, r_attn = block_relevance(enc.blocks[i], trace.caches[i], r, rs, through, trace.key_mask)
            if on_block is not None:
                on_block(i, r_attn)
            if r_in is None:
                return None
            r = r_in
            if on_total is not None:
                on_total(f"block{i}", r)
    return r if stop_block == -1 else None
