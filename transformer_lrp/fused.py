"""The fused path of transformer attribution and GAE (DESIGN.md, ideas 1–3).

Forward: every block's attention runs as one op that keeps ``O`` and the row log-sum-exp, never ``A``
(``ops.attention_forward``); no autograd graph is built for the blocks. Reverse: one top-down sweep carries the
gradient of the target logit and the relevance together, block by block, reading each saved tensor once and
dropping a block's tensors as soon as it is passed:

* Linear layers: α1β0 relevance and the input gradient share the ``[S; dY] W`` GEMM
  (``ops.linear_alpha1beta0_with_grad``);
* LayerNorms: the gradient backward fused with the clone and the normalized add next to them
  (``ops.layernorm_relevance``);
* attention: gradient, relevance and the block's head-mean map ``Ē`` in a flash-style backward that applies the
  streaming-rollout update ``v ← v + v·Ē`` in the kernel (``ops.attention_relevance``).

Only the gradient of the head (a few small layers) comes from autograd. The same sweep runs on the reference ops
(``backend="torch"``, each materializing its block's attention) and on the kernels (``backend="triton"``).
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch
from torch.profiler import record_function

from transformer_lrp import engine
from transformer_lrp.adapters.spec import ACTIVATIONS, BlockSpec, Embedded, EncoderSpec
from transformer_lrp.engine import BlockCache, _merge_heads, _scatter_rows, _split_heads
from transformer_lrp.explanation import scale_to_unit
from transformer_lrp.ops import clone_relevance, normalized_add
from transformer_lrp.ops.attention import attention_relevance, attention_weighted_map
from transformer_lrp.ops.common import accumulation_dtype
from transformer_lrp.ops.layernorm import layernorm_relevance
from transformer_lrp.ops.linear import linear_alpha1beta0_with_grad

FUSED_METHODS = ("transformer_attribution", "gae", "rollout")  # the first two name their attention map mode too


def run(enc: EncoderSpec, emb: Embedded, method: str, target, start_layer: int, normalize_rows: bool,
        check_target, backend: str):
    """``method`` in ``FUSED_METHODS``; returns ``methods.MethodOutput``."""
    from transformer_lrp.methods import MethodOutput, _onehot

    if method == "rollout":
        return _rollout(enc, emb, target, start_layer, check_target, backend)

    top_rows = engine.pooled_rows(enc)
    x, caches = _forward(enc, emb, start_layer, top_rows, backend)
    trace, logits, t, grad = _head_gradient(enc, x, top_rows, target, check_target)
    with_relevance = method == "transformer_attribution"
    agg = _rollout_vector(emb, normalize_rows)
    with torch.no_grad():
        rel = None
        if with_relevance:
            rules = engine.RuleSet.of("method", backend)
            rel = engine.head_relevance(enc, trace, _onehot(logits, t), rules)
        del trace
        for i in range(enc.depth - 1, start_layer - 1, -1):
            grad, rel = block_backward(enc.blocks[i], caches.pop(i), grad, rel, emb.key_mask, method, agg,
                                       normalize_rows, through=i > start_layer, backend=backend)
    return MethodOutput(agg.v.to(emb.tokens.dtype), logits, t)


def _forward(enc: EncoderSpec, emb: Embedded, keep_from: int, top_rows: list[int] | None, backend: str,
             keep: Callable[[BlockCache, BlockSpec], object] | None = None) -> tuple[torch.Tensor, dict]:
    """The forward with the fused attention (no ``A``, no autograd graph): the encoder output and, per block from
    ``keep_from`` on, its cache (or ``keep(cache, block)``, what of it a method needs). ``top_rows``: the last
    block computes these rows only."""
    attend = partial(engine._fused_attention, key_mask=emb.key_mask, backend=backend)
    kept = {}
    with torch.no_grad(), record_function("tlrp::forward"):
        x = emb.tokens
        for i, blk in enumerate(enc.blocks):
            rows = top_rows if i == enc.depth - 1 else None
            x, _, cache = engine.block_forward(blk, x, None, i >= keep_from, rows, fused_attention=attend)
            if cache is not None:
                kept[i] = cache if keep is None else keep(cache, blk)
    return x, kept


def _head_gradient(enc: EncoderSpec, x: torch.Tensor, top_rows: list[int] | None, target, check_target):
    """The head (a few small layers) on the encoder output, differentiated by autograd: ``(trace, logits, target,
    ∂y_t/∂x)``."""
    trace = engine.Trace(logits=torch.empty(0), top_rows=top_rows)
    top = x.detach().requires_grad_(True)
    with torch.enable_grad(), record_function("tlrp::head_gradient"):
        logits = engine.head_forward(enc, top, trace)
        t = check_target(logits, target)
        grad = torch.autograd.grad(logits.gather(1, t[:, None]).sum(), top)[0]
    return trace, logits.detach(), t, grad


def _rollout_vector(emb: Embedded, normalize_rows: bool):
    """The streaming-rollout vector, accumulated in float32 (float64 for float64 models), as the kernels do."""
    from transformer_lrp.methods import StreamingRollout

    acc = accumulation_dtype(emb.tokens.dtype)
    return StreamingRollout(emb.tokens.shape[0], emb.tokens.shape[1], normalize_rows,
                            emb.tokens.new_empty(0, dtype=acc))


def _linear(x, spec, rel, grad, out, backend):
    """``(R_x, dL/dx)`` of a Linear layer; ``R_x`` is None in a gradient-only sweep."""
    if rel is None:
        return None, grad @ spec.weight
    return linear_alpha1beta0_with_grad(x, spec.weight, rel, grad, output=out, bias=spec.bias,
                                        abs_weight=spec.abs_weight, backend=backend)


_GELU_APPROXIMATE = {"gelu": "none", "gelu_tanh": "tanh"}


def _activation_grad(name: str, x: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """``grad ⊙ act'(x)`` (activations are identities for relevance, SPEC §2.7)."""
    if name in _GELU_APPROXIMATE:  # the common case, without re-running the activation
        return torch.ops.aten.gelu_backward(grad, x, approximate=_GELU_APPROXIMATE[name])
    with torch.enable_grad():
        leaf = x.detach().requires_grad_(True)
        return torch.autograd.grad(ACTIVATIONS[name](leaf), leaf, grad)[0]


def _scaled(t: torch.Tensor, gamma: torch.Tensor | None) -> torch.Tensor:
    return t if gamma is None else t * gamma


def to_attention_output(
    blk: BlockSpec, c: BlockCache, grad: torch.Tensor, rel: torch.Tensor | None, backend: str
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor | None]:
    """The top of a block's backward, down to the attention output: gradient and relevance (``None`` in a
    gradient-only sweep) of the block output → ``(dL/dctx, R_ctx, dL/dx_res, R_x_res)``, the heads-merged
    attention output's and the residual branch's (at the rows the block computed)."""
    norm1, norm2 = blk.norm1, blk.norm2
    has_rel = rel is not None
    x_rows = c.x if c.rows is None else c.x[:, c.rows]
    # MLP half: the residual add (post-LN: with LN2's backward), fc2, activation, fc1.
    if blk.pre_norm:
        r_mid_res, r_branch2 = normalized_add(rel, c.mid, c.branch2, backend) if has_rel else (None, None)
        d_branch2 = d_mid_res = grad
    else:
        d_z, r_branch2, r_mid_res = layernorm_relevance(c.branch2, c.mid, norm2.weight, norm2.bias, norm2.eps, grad,
                                                        rel, backend=backend)
        d_branch2 = d_mid_res = d_z
    r_act, d_act = _linear(c.act_out, blk.fc2, r_branch2, _scaled(d_branch2, blk.ls2), c.fc2_out, backend)
    r_h2, d_h2 = _linear(c.h2, blk.fc1, r_act, _activation_grad(blk.act, c.fc1_out, d_act), c.fc1_out, backend)
    # Attention half: the residual add with the LayerNorm next to it, the output projection.
    if blk.pre_norm:  # mid = x + branch1 feeds LN2 and the residual
        d_mid, r_x_res, r_branch1 = layernorm_relevance(x_rows, c.branch1, norm2.weight, norm2.bias, norm2.eps, d_h2,
                                                        r_h2, d_mid_res, r_mid_res, backend=backend)
        d_branch1 = d_x_res = d_mid
    else:  # mid = LN1(branch1 + x) feeds the MLP and the residual
        r_mid = clone_relevance(c.mid, r_h2, r_mid_res) if has_rel else None
        d_z1, r_branch1, r_x_res = layernorm_relevance(c.branch1, x_rows, norm1.weight, norm1.bias, norm1.eps,
                                                       d_h2 + d_mid_res, r_mid, backend=backend)
        d_branch1 = d_x_res = d_z1
    r_ctx, d_ctx = _linear(c.ctx, blk.proj, r_branch1, _scaled(d_branch1, blk.ls1), c.proj_out, backend)
    return d_ctx, r_ctx, d_x_res, r_x_res


def block_backward(
    blk: BlockSpec,
    c: BlockCache,
    grad: torch.Tensor,
    rel: torch.Tensor | None,
    key_mask: torch.Tensor | None,
    map_mode: str,
    agg,
    normalize_rows: bool,
    through: bool,
    backend: str,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """One block, top-down: gradient ``grad`` and relevance ``rel`` of its output (``None`` in a gradient-only
    sweep) → those of its input, updating the streaming rollout ``agg`` with the block's map on the way.
    With ``through=False`` (the lowest block) it stops after the attention map. Mirrors
    ``engine.block_relevance`` (SPEC §2.11) for the relevance."""
    norm1 = blk.norm1
    has_rel = rel is not None
    d_ctx, r_ctx, d_x_res, r_x_res = to_attention_output(blk, c, grad, rel, backend)
    heads, hd = blk.num_heads, blk.head_dim
    v_rows = agg.v if c.rows is None else agg.v[:, c.rows]
    res = attention_relevance(
        c.q, c.k, c.v, c.out, c.lse, blk.scale, grad_out=_split_heads(d_ctx, heads, hd),
        rel_out=_split_heads(r_ctx, heads, hd) if has_rel else None, key_mask=key_mask, mask_add=blk.mask_add,
        map_mode=map_mode, rollout=v_rows,
        normalize_rows=normalize_rows, inputs=through, backend=backend)
    agg.apply(res["rollout_rows"], res["rollout_product"], c.rows)
    if not through:
        return None, None
    dq, dk, dv = res["grad_query"], res["grad_key"], res["grad_value"]
    rq, rk, rv = (res["rel_query"], res["rel_key"], res["rel_value"]) if has_rel else (None, None, None)
    if c.rows is not None:  # back to all tokens: the rows not computed get nothing
        n = c.x.shape[1]
        dq, d_x_res = _scatter_rows(dq, c.rows, n, 2), _scatter_rows(d_x_res, c.rows, n, 1)
        if has_rel:
            rq, r_x_res = _scatter_rows(rq, c.rows, n, 2), _scatter_rows(r_x_res, c.rows, n, 1)
    # q, k, v projections
    if blk.fused_qkv:
        b, n, _ = c.h1.shape

        def stack(a, b_, c_):
            return torch.stack([t.transpose(1, 2) for t in (a, b_, c_)], dim=2).reshape(b, n, -1)

        r_h1, d_h1 = _linear(c.h1, blk.qkv[0], stack(rq, rk, rv) if has_rel else None, stack(dq, dk, dv),
                             c.qkv_out[0], backend)
    else:
        parts = [_linear(c.h1, lin, _merge_heads(r) if has_rel else None, _merge_heads(d), y, backend)
                 for lin, r, d, y in zip(blk.qkv, (rq, rk, rv), (dq, dk, dv), c.qkv_out)]
        d_h1 = parts[0][1] + parts[1][1] + parts[2][1]
        r_h1 = clone_relevance(c.h1, *(p[0] for p in parts)) if has_rel else None
    if blk.pre_norm:  # x feeds LN1 and the residual
        d_x, r_x, _ = layernorm_relevance(c.x, None, norm1.weight, norm1.bias, norm1.eps, d_h1, r_h1, d_x_res,
                                          r_x_res, backend=backend)
        return d_x, r_x
    return d_h1 + d_x_res, (clone_relevance(c.x, r_h1, r_x_res) if has_rel else None)


def _rollout(enc: EncoderSpec, emb: Embedded, target, start_layer: int, check_target, backend: str):
    """Attention rollout (always row-normalized): the fused forward keeps each block's Q, K, V, O and ``lse``,
    then each block's head-mean ``A`` is applied to the rollout vector inside the kernel, top-down."""
    from transformer_lrp.methods import MethodOutput

    top_rows = engine.pooled_rows(enc)
    x, kept = _forward(enc, emb, start_layer, top_rows, backend,  # only what the map needs
                       keep=lambda c, blk: (c.q, c.k, c.v, c.out, c.lse, c.rows, blk.scale))
    with torch.no_grad():
        logits = engine.head_forward(enc, x, engine.Trace(logits=torch.empty(0), top_rows=top_rows))
        t = check_target(logits, target)
        agg = _rollout_vector(emb, True)
        for i in range(enc.depth - 1, start_layer - 1, -1):
            q, k, v, out, lse, rows, scale = kept.pop(i)
            res = attention_relevance(q, k, v, out, lse, scale, key_mask=emb.key_mask, map_mode="rollout",
                                      rollout=agg.v if rows is None else agg.v[:, rows], normalize_rows=True,
                                      inputs=False, backend=backend)
            agg.apply(res["rollout_rows"], res["rollout_product"], rows)
    return MethodOutput(agg.v.to(emb.tokens.dtype), logits, t)


def gradcam_text(enc: EncoderSpec, emb: Embedded, target, check_target, backend: str):
    """Attention GradCAM for text (SPEC §4) without ``[B, H, N, N]``: per-head weights ``w_h`` = mean of ``∇A_h``
    over the real (query, key) pairs, in closed form ``(Σ_i dO_i)·(Σ_j V_j) / n²`` (``∇A = dO Vᵀ``), then the
    head-weighted map's CLS row and its min and max from the weighted-map kernel; min–max scaled."""
    from transformer_lrp.methods import MethodOutput

    last = enc.depth - 1
    x, caches = _forward(enc, emb, last, None, backend)  # the whole last block: the map spans every row
    _, logits, t, grad = _head_gradient(enc, x, None, target, check_target)
    cache = caches[last]
    blk = enc.blocks[last]
    with torch.no_grad():
        d_ctx = to_attention_output(blk, cache, grad, None, backend)[0]
        acc = accumulation_dtype(emb.tokens.dtype)
        d_out, value = _split_heads(d_ctx, blk.num_heads, blk.head_dim).to(acc), cache.v.to(acc)
        if emb.key_mask is None:
            count = torch.full((d_out.shape[0], 1), float(d_out.shape[2] * value.shape[2]), dtype=acc,
                               device=d_out.device)
            sum_do, sum_v = d_out.sum(2), value.sum(2)
        else:
            real = emb.key_mask[:, None, :, None].to(acc)
            count = emb.key_mask.sum(1, keepdim=True).to(acc) ** 2
            sum_do, sum_v = (d_out * real).sum(2), (value * real).sum(2)
        weights = (sum_do * sum_v).sum(-1) / count  # [B, H]
        row, lo, hi = attention_weighted_map(cache.q, cache.k, cache.lse, blk.scale, weights, emb.key_mask, 0,
                                             backend=backend)
        row = scale_to_unit(row, lo[:, None], hi[:, None])
    return MethodOutput(row.to(emb.tokens.dtype), logits, t)
