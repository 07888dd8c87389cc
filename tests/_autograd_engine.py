"""The test oracle: the autograd engine that ran every explanation before the sweep (``transformer_lrp.sweep``).

It is independent of the sweep where it matters: the forward materializes every block's ``A``, attention gradients
``∂y_t/∂A`` come from autograd on that forward, relevance is propagated by hand with the reference rules, and each
method aggregates its maps here (``run``). It was the path matched to the original code (tests/fixtures). It
stays a test module: ``explain`` runs the sweep only.

The engine: one forward that saves what the reverse sweep needs, then one reverse sweep over the blocks.

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
from typing import Literal

import torch

from transformer_lrp.adapters.spec import ACTIVATIONS, BlockSpec, Embedded, EncoderSpec
from transformer_lrp.explanation import min_max
from transformer_lrp.ops import (
    attention_av_relevance,
    attention_qk_relevance,
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
    """Which file's rules (docs/method.md §2.4, §2.8): the method's (``layers_ours``) or the baselines'
    (``layers_lrp``)."""

    linear: Callable
    add: Callable
    normalized_add: bool  # the add rule is the normalized add (else the plain z-rule)

    @staticmethod
    def of(rules: Rules) -> RuleSet:
        if rules == "method":
            return RuleSet(linear=_linear_method, add=normalized_add, normalized_add=True)
        return RuleSet(linear=_linear_baseline, add=z_add, normalized_add=False)


def _linear_method(x, spec, relevance, y):
    return linear_alpha1beta0(x, spec.weight, relevance, output=y, bias=spec.bias, abs_weight=spec.abs_weight)


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
    gate_out: torch.Tensor | None = None  # decoders: a separate gate projection's output
    q_pre: torch.Tensor | None = None  # q, k before the rotary embedding (after their norms)
    k_pre: torch.Tensor | None = None
    angles: tuple | None = None


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

    pool: torch.Tensor | None = None  # per-sample positions the head reads (CLIP text, decoders)

    def row_of(self, token: int) -> int | torch.Tensor:
        """Index of ``token`` in the last block's rows (attention rows, output tokens)."""
        if self.pool is not None:
            return self.pool
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
    angles: tuple | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None, BlockCache | None]:
    """Returns ``(output, A, cache)``. ``masked_keys``: `[B, 1, 1, N]` bool, True where the key is padding.

    ``rows``: compute the output (and attention rows) of these token positions only: keys and values still come
    from every token. The last block needs only the tokens the head reads.
    """
    h1 = blk.norm1(x) if blk.pre_norm else x
    qkv_out = [lin(h1) for lin in blk.qkv]
    heads, hd, kv_heads = blk.num_heads, blk.head_dim, blk.heads_kv
    if blk.fused_qkv:
        q, k, v = qkv_out[0].split([heads * hd, kv_heads * hd, kv_heads * hd], dim=-1)
        q, k, v = _split_heads(q, heads, hd), _split_heads(k, kv_heads, hd), _split_heads(v, kv_heads, hd)
    else:
        q, k, v = _split_heads(qkv_out[0], heads, hd), _split_heads(qkv_out[1], kv_heads, hd), \
            _split_heads(qkv_out[2], kv_heads, hd)
    q_pre = k_pre = None
    if blk.q_norm is not None:
        q = blk.q_norm(q)
    if blk.k_norm is not None:
        k = blk.k_norm(k)
    if angles is not None:  # the rotary embedding (decoders), written out here
        q_pre, k_pre = q, k
        q, k = _rope(q, *angles), _rope(k, *angles)
    # shared key/value heads (GQA) repeated for the materialized attention
    k = k.repeat_interleave(heads // kv_heads, dim=1)
    v = v.repeat_interleave(heads // kv_heads, dim=1)
    x_rows = x
    if rows is not None:
        q, x_rows = q[:, :, rows], x[:, rows]
    # Scaling q (not the [B, H, N, N] product) saves a buffer; the rules recover the unscaled q kᵀ exactly.
    scores = (q * blk.scale) @ k.transpose(-1, -2)
    attend = _attend_mask(masked_keys, blk, scores.shape[-2], scores.shape[-1], scores.device)
    masked = scores if attend is None else scores.masked_fill(~attend, torch.finfo(scores.dtype).min)
    # Half-precision models get an fp32 softmax (as transformers' eager attention does), cast back.
    attn = masked.softmax(dim=-1, dtype=torch.float32 if scores.dtype in _HALF else None).to(scores.dtype)
    if attend is not None and blk.causal:  # a left-padded query sees no key: it attends to nothing
        attn = attn * attend.any(-1, keepdim=True)
    out = attn @ v
    ctx = _merge_heads(out)
    proj_out = blk.proj(ctx)
    branch1 = proj_out * blk.ls1 if blk.ls1 is not None else proj_out
    if blk.post_attn_norm is not None:
        branch1 = blk.post_attn_norm(branch1)
    mid = x_rows + branch1 if blk.pre_norm else blk.norm1(branch1 + x_rows)
    h2 = blk.norm2(mid) if blk.pre_norm else mid
    fc1_out = blk.fc1(h2)
    gate_out = None
    if blk.fused_gate_up:
        g, up = fc1_out.chunk(2, dim=-1)
        act_out = ACTIVATIONS[blk.act](g) * up
    elif blk.gate is not None:
        gate_out = blk.gate(h2)
        act_out = ACTIVATIONS[blk.act](gate_out) * fc1_out
    else:
        act_out = ACTIVATIONS[blk.act](fc1_out)
    fc2_out = blk.fc2(act_out)
    branch2 = fc2_out * blk.ls2 if blk.ls2 is not None else fc2_out
    if blk.post_mlp_norm is not None:
        branch2 = blk.post_mlp_norm(branch2)
    y = mid + branch2 if blk.pre_norm else blk.norm2(branch2 + mid)
    cache = None
    if keep_cache:
        cache = BlockCache(x, h1, qkv_out, q, k, v, scores, attn, out, ctx, proj_out, branch1, mid, h2, fc1_out,
                           act_out, fc2_out, branch2, rows, gate_out, q_pre, k_pre, angles)
    return y, attn, cache


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """The half-split rotary embedding: pairs (x_i, x_{i+r/2}) of the first r features turn by the angle."""
    r = cos.shape[-1]
    a, b, rest = x[..., : r // 2], x[..., r // 2 : r], x[..., r:]
    c, s = cos[..., : r // 2], sin[..., : r // 2]
    return torch.cat([a * c - b * s, b * c + a * s, rest], dim=-1)


def _angles(blk: BlockSpec, positions: torch.Tensor, dtype: torch.dtype):
    freqs = positions.to(torch.float64)[..., None] * blk.rope.inv_freq.to(positions.device, torch.float64)
    angles = torch.cat([freqs, freqs], dim=-1)[:, None]
    return (angles.cos() * blk.rope.scaling).to(dtype), (angles.sin() * blk.rope.scaling).to(dtype)


def _attend_mask(masked_keys, blk: BlockSpec, nq: int, nk: int, device):
    """True where a (query, key) pair attends: real keys; causal: keys up to the query; window: fewer than w back."""
    attend = None if masked_keys is None else ~masked_keys
    if blk.causal:
        pos = torch.arange(nk, device=device)
        tri = pos[None, :] <= pos[:, None]
        if blk.window:
            tri = tri & (pos[:, None] - pos[None, :] < blk.window)
        attend = tri if attend is None else attend & tri
    return attend


def head_forward(enc: EncoderSpec, tokens: torch.Tensor, trace: Trace) -> torch.Tensor:
    if enc.final_norm is not None:
        tokens = enc.final_norm(tokens)
    trace.pooled_inputs = tokens
    logits = None
    for branch in enc.head:
        row = trace.row_of(branch.token)
        h = tokens[:, row] if isinstance(row, int) else tokens[torch.arange(tokens.shape[0]), row]
        ins, outs = [], []
        for kind, layer in branch.layers:
            ins.append(h)
            if kind in ("linear", "norm", "lm_head"):
                h = layer(h)
            elif kind == "softcap":
                h = torch.tanh(h / layer) * layer
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
def forward(enc: EncoderSpec, emb: Embedded, plan: Plan) -> Trace:
    masked = None if emb.key_mask is None else ~emb.key_mask[:, None, None, :]
    x = emb.tokens
    attn: dict[int, torch.Tensor] = {}
    caches: dict[int, BlockCache] = {}
    track = plan.grad_from is not None
    top_rows = pooled_rows(enc) if plan.pooled_top and emb.pool_index is None else None
    for i, blk in enumerate(enc.blocks):
        tracked = track and i >= plan.grad_from
        if tracked and i == plan.grad_from:
            x = x.detach().requires_grad_(True)
        with torch.set_grad_enabled(tracked):
            keep = plan.cache_from is not None and i >= plan.cache_from
            angles = None if blk.rope is None else _angles(blk, emb.positions, x.dtype)
            x, a, cache = block_forward(blk, x, masked, keep, top_rows if i == enc.depth - 1 else None, angles)
        if plan.attn_from is not None and i >= plan.attn_from:
            attn[i] = a
        if cache is not None:
            caches[i] = cache
    trace = Trace(logits=torch.empty(0), attn=attn, caches=caches, top_rows=top_rows, pool=emb.pool_index)
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
            if kind in ("linear", "lm_head"):  # the LM head: the whole vocabulary, its one-hot seed included
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
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Relevance of one block, top-down (docs/method.md §2.11). Returns ``(R_input or None, R_A)``.

    With ``through_attention=False`` the sweep stops at ``R_A`` (all that a method needs from the lowest block).
    """
    add, linear = rules.add, rules.linear
    # MLP half: the residual add, (a post-norm: identity), fc2, activation (identity; a gate product: halves),
    # fc1, norm (identity), then the clone.
    if blk.pre_norm:
        r_mid_res, r_branch2 = add(relevance, c.mid, c.branch2)
    else:
        r_branch2, r_mid_res = add(relevance, c.branch2, c.mid)
    r_act = linear(c.act_out, blk.fc2, r_branch2, c.fc2_out)
    if blk.fused_gate_up:
        r_h2 = linear(c.h2, blk.fc1, torch.cat([r_act / 2, r_act / 2], dim=-1), c.fc1_out)
    elif blk.gate is not None:
        r_h2 = clone_relevance(c.h2, linear(c.h2, blk.gate, r_act / 2, c.gate_out),
                               linear(c.h2, blk.fc1, r_act / 2, c.fc1_out))
    else:
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
    r_attn, r_v = attention_av_relevance(c.attn, c.v, c.out, r_out)
    r_v = _sum_groups(r_v, blk.heads_kv)
    if not through_attention:
        return None, r_attn
    r_scores = r_attn  # softmax: identity
    if blk.mask_add:
        # BERT adds its padding mask to the scores; the original propagates through that add. At real keys the
        # mask is 0 and at padded keys R = 0 (A = 0 there), so the mask side never takes relevance.
        r_scores = add(r_attn, c.scores, None)[0]
    r_q, r_k = attention_qk_relevance(c.q, c.k, c.scores, r_scores, blk.scale)
    r_k = _sum_groups(r_k, blk.heads_kv)
    if c.rows is not None:  # back to all tokens: the skipped rows carry no relevance
        r_q = _scatter_rows(r_q, c.rows, r_k.shape[2], dim=2)
        r_x_res = _scatter_rows(r_x_res, c.rows, c.x.shape[1], dim=1)
    if c.angles is not None:  # the rotary embedding's z-rule: gradient × input, with the map's own autograd
        r_q, r_k = _rope_z_rule(c.q_pre, r_q, c.angles), _rope_z_rule(c.k_pre, r_k, c.angles)
    if blk.fused_qkv:
        r_qkv = torch.cat([_merge_heads(t) for t in (r_q, r_k, r_v)], dim=-1)
        r_h1 = linear(c.h1, blk.qkv[0], r_qkv, c.qkv_out[0])
    else:
        parts = [linear(c.h1, lin, _merge_heads(r), y) for lin, r, y in zip(blk.qkv, (r_q, r_k, r_v), c.qkv_out)]
        r_h1 = clone_relevance(c.h1, *parts)  # q, k, v read copies of the same input
    return clone_relevance(c.x, r_h1, r_x_res), r_attn


def _sum_groups(t: torch.Tensor, heads_kv: int) -> torch.Tensor:
    """Relevance of the query heads' copies of a shared key/value head, summed back onto it."""
    b, h, n, d = t.shape
    return t.reshape(b, heads_kv, h // heads_kv, n, d).sum(dim=2)


def _rope_z_rule(x: torch.Tensor, relevance: torch.Tensor, angles: tuple) -> torch.Tensor:
    """``R_x = x ⊙ Jᵀ(R ⊘ rope(x))``, ``Jᵀ`` by autograd through the rotary embedding (a linear map)."""
    from transformer_lrp.ops import safe_divide

    with torch.enable_grad():
        leaf = x.detach().requires_grad_(True)
        out = _rope(leaf, *angles)
        s = safe_divide(relevance, out.detach())
        r = x * torch.autograd.grad((out * s).sum(), leaf)[0]
    rotated = angles[0].shape[-1]  # partial rotary: the features that do not rotate keep their relevance
    return torch.cat([r[..., :rotated], relevance[..., rotated:]], dim=-1)


def relevance_sweep(
    enc: EncoderSpec,
    trace: Trace,
    onehot: torch.Tensor,
    rules: Rules,
    stop_block: int,
    on_block: Callable[[int, torch.Tensor], None] | None = None,
    on_total: Callable[[str, torch.Tensor], None] | None = None,
) -> torch.Tensor | None:
    """Top-down over blocks ``L-1 … stop_block``; ``stop_block=-1`` continues to the encoder input.

    ``on_block(b, R_A)`` receives each block's attention relevance; ``on_total(where, R)`` (tests, debugging)
    receives the relevance after the head and after each block. Returns the encoder-input relevance `[B, N, D]`
    when ``stop_block == -1``.
    """
    rs = RuleSet.of(rules)
    with torch.no_grad():
        r = head_relevance(enc, trace, onehot, rs)
        if on_total is not None:
            on_total("head", r)
        lowest = max(stop_block, 0)
        for i in range(enc.depth - 1, lowest - 1, -1):
            through = i > lowest or stop_block == -1
            r_in, r_attn = block_relevance(enc.blocks[i], trace.caches[i], r, rs, through)
            if on_block is not None:
                on_block(i, r_attn)
            if r_in is None:
                return None
            r = r_in
            if on_total is not None:
                on_total(f"block{i}", r)
    return r if stop_block == -1 else None


# ------------------------------------------------------------------------------------------- the methods on it


@dataclass
class MethodOutput:
    row: torch.Tensor
    logits: torch.Tensor
    target: torch.Tensor
    pixels: torch.Tensor | None = None
    patch_tokens: torch.Tensor | None = None


class StreamingRollout:
    """``v ← v · M`` with ``M = I + E`` (or ``(I + E) / rowsum`` when normalizing), starting at ``e_CLS``."""

    def __init__(self, batch: int, tokens: int, normalize: bool, like: torch.Tensor, seed=None):
        self.v = torch.zeros(batch, tokens, dtype=like.dtype, device=like.device)
        if seed is None:
            self.v[:, 0] = 1
        else:  # the row the head reads per sample (CLIP text's EOS, a decoder's explained position)
            self.v[torch.arange(batch), seed] = 1
        self.normalize = normalize

    def update(self, e: torch.Tensor, rows: list[int] | None = None) -> None:
        """``e``: `[B, N, N]`, or `[B, len(rows), N]` when only ``rows`` of it are known (the pooled top block:
        valid there because ``v`` is still ``e_CLS``, zero outside those rows)."""
        v_rows = self.v if rows is None else self.v[:, rows]
        if self.normalize:
            v_rows = v_rows / (1 + e.sum(dim=-1))
        product = (v_rows.unsqueeze(1) @ e).squeeze(1)
        v = v_rows if rows is None else self.v.clone().index_copy_(1, torch.tensor(rows, device=self.v.device), v_rows)
        self.v = v + product


def run(
    enc: EncoderSpec,
    emb: Embedded,
    method: str,
    target: torch.Tensor | None,
    start_layer: int,
    normalize_rows: bool,
    check_target,
) -> MethodOutput:
    """The method on the engine; ``check_target(logits, target)`` resolves the target once logits exist."""
    L = enc.depth
    last = L - 1
    b, n = emb.tokens.shape[:2]

    if method == "transformer_attribution":
        trace = forward(enc, emb, Plan(grad_from=start_layer, attn_from=start_layer,
                                                     cache_from=start_layer, pooled_top=True))
        t = check_target(trace.logits, target)
        grads = attention_gradients(trace, t, list(range(start_layer, L)))
        agg = StreamingRollout(b, n, normalize_rows, emb.tokens, emb.pool_index)

        def on_block(i: int, r_attn: torch.Tensor) -> None:
            # in place: the gradient is used once and dropped
            agg.update(grads.pop(i).mul_(r_attn).clamp_(min=0).mean(dim=1), _rows(trace, i, L))

        relevance_sweep(enc, trace, _onehot(trace.logits, t), "method", start_layer, on_block)
        return MethodOutput(agg.v, trace.logits.detach(), t)

    if method == "gae":
        trace = forward(enc, emb, Plan(grad_from=start_layer, attn_from=start_layer, pooled_top=True))
        t = check_target(trace.logits, target)
        grads = attention_gradients(trace, t, list(range(start_layer, L)))
        agg = StreamingRollout(b, n, normalize_rows, emb.tokens, emb.pool_index)
        with torch.no_grad():
            for i in range(last, start_layer - 1, -1):
                agg.update(grads.pop(i).mul_(trace.attn.pop(i)).clamp_(min=0).mean(dim=1), _rows(trace, i, L))
        return MethodOutput(agg.v, trace.logits.detach(), t)

    if method == "rollout":
        with torch.no_grad():
            trace = forward(enc, emb, Plan(attn_from=start_layer, pooled_top=True))
            t = check_target(trace.logits, target)
            agg = StreamingRollout(b, n, True, emb.tokens, emb.pool_index)
            for i in range(last, start_layer - 1, -1):
                agg.update(trace.attn.pop(i).mean(dim=1), _rows(trace, i, L))
        return MethodOutput(agg.v, trace.logits, t)

    if method == "raw_attention":
        with torch.no_grad():
            trace = forward(enc, emb, Plan(attn_from=last, pooled_top=True))
            t = check_target(trace.logits, target)
            row = _at_row(trace.attn[last].mean(dim=1), trace.row_of(0))
        return MethodOutput(row, trace.logits, t)

    if method == "attention_gradcam":
        # Text GradCAM normalizes over the whole last attention matrix: it needs every row.
        pooled = enc.modality == "vision"
        trace = forward(enc, emb, Plan(grad_from=last, attn_from=last, pooled_top=pooled))
        t = check_target(trace.logits, target)
        grad = attention_gradients(trace, t, [last])[last]
        with torch.no_grad():
            row = _gradcam_row(enc, emb, trace.attn[last].detach(), grad, trace.row_of(0))
        return MethodOutput(row, trace.logits.detach(), t)

    if method == "partial_lrp":
        with torch.no_grad():
            trace = forward(enc, emb, Plan(cache_from=last, pooled_top=True))
        t = check_target(trace.logits, target)
        maps: dict[int, torch.Tensor] = {}
        relevance_sweep(enc, trace, _onehot(trace.logits, t), "baseline", last,
                               lambda i, r: maps.__setitem__(i, r))
        return MethodOutput(_at_row(maps[last].clamp(min=0).mean(dim=1), trace.row_of(0)), trace.logits, t)

    if method == "full_lrp":
        with torch.no_grad():
            trace = forward(enc, emb, Plan(cache_from=0, pooled_top=True))
        t = check_target(trace.logits, target)
        r_in = relevance_sweep(enc, trace, _onehot(trace.logits, t), "baseline", -1)
        with torch.no_grad():
            tokens, patches = emb.to_input(r_in, z_add)
        if enc.modality == "vision":
            return MethodOutput(torch.empty(0), trace.logits, t, pixels=tokens, patch_tokens=patches)
        return MethodOutput(tokens, trace.logits, t)

    raise AssertionError(method)  # validated by the API


def _at_row(maps: torch.Tensor, row) -> torch.Tensor:
    """``maps [B, N, N]`` at a row: one for all samples, or one per sample."""
    return maps[:, row] if isinstance(row, int) else maps[torch.arange(maps.shape[0]), row]


def _rows(trace: Trace, block: int, depth: int) -> list[int] | None:
    """The rows the block's maps hold: the pooled tokens for the last block when it was computed for them only."""
    return trace.top_rows if block == depth - 1 else None


def _onehot(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    onehot = torch.zeros(logits.shape, dtype=logits.dtype, device=logits.device)
    onehot.scatter_(1, target[:, None], 1.0)
    return onehot


def _gradcam_row(enc: EncoderSpec, emb: Embedded, attn: torch.Tensor, grad: torch.Tensor, cls_row: int) -> torch.Tensor:
    """Attention GradCAM (docs/method.md §4): per-head weights from the gradient, weighted head mean, ReLU, min–max.

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
    if enc.blocks[-1].causal and emb.pool_index is not None:  # nothing after the explained row can matter
        upto = torch.arange(attn.shape[-1])[None, :] <= emb.pool_index[:, None]
        mask = upto if mask is None else mask & upto
    if mask is None:
        w = grad.mean(dim=(-1, -2))
        valid = None
    else:
        valid = (mask[:, :, None] & mask[:, None, :])  # [B, N, N]
        count = valid.sum(dim=(-1, -2)).to(grad.dtype)[:, None]
        w = (grad * valid[:, None]).sum(dim=(-1, -2)) / count
    cam = (w[:, :, None, None] * attn).mean(dim=1).clamp(min=0)  # [B, N, N]
    return _at_row(min_max(cam, valid), cls_row)
