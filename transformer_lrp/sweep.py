"""The sweep every explanation runs, on every backend (docs/design.md §3–6).

Forward: each block's attention is one op that keeps ``O`` and the row log-sum-exp, never ``A``
(``ops.attention_forward``), and no autograd graph is built. Reverse: one top-down pass carries the gradient of the
target logit, the relevance, or both, block by block, reading each saved tensor once and dropping a block's
tensors once it is passed:

* Linear layers: the method's α1β0 relevance and the input gradient share the ``[S; dY] W`` GEMM
  (``ops.linear_alpha1beta0_with_grad``); the baselines' separate-normalizer rule carries relevance alone;
* LayerNorm and the residual add beside it: the gradient backward fused with the clone and the normalized add
  (``ops.layernorm_relevance``); the baselines' plain z-rule;
* attention: gradient, relevance and the block's head-mean map ``Ē`` in one backward, which applies the
  streaming-rollout update ``v ← v + v·Ē`` itself (``ops.attention_relevance``), so no method keeps a map.

Only the head's gradient (a few small layers) comes from autograd, inside ``torch.enable_grad()``. ``backend``
chooses the ops' implementation: the references (``"torch"``: each attention op materializes its own block's
``A`` and drops it on return), the Triton kernels (``"triton"``) or the CUDA C++ ops (``"cuda"``, with the α1β0
passes on the Triton kernels). Dropout and drop-path are identities: an
explanation is of the model's inference function.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch.profiler import record_function

from transformer_lrp._backend import route
from transformer_lrp._numerics import accumulation_dtype
from transformer_lrp.adapters.spec import ACTIVATIONS, BlockSpec, Embedded, EncoderSpec, LinearSpec, NormSpec
from transformer_lrp.ops import (
    attention_forward,
    attention_relevance,
    clone_relevance,
    layernorm_relevance,
    linear_alpha1beta0,
    linear_alpha1beta0_separate,
    linear_alpha1beta0_with_grad,
    normalized_add,
    select_relevance,
    z_add,
)

# ---------------------------------------------------------------------------------------------------- rules


@dataclass(frozen=True)
class Rules:
    """The relevance rules of the method (docs/method.md §2.4, §2.8: α1β0 Linear, normalized add; the original's
    ``layers_ours``) or of the baselines (separate-normalizer Linear, plain z-rule add; ``layers_lrp``), and the
    backend of the ops that have kernels. Every rule returns ``None`` for what is not carried."""

    method: bool
    backend: str = "torch"

    def linear(self, x: torch.Tensor, spec: LinearSpec, rel, grad, out: torch.Tensor):
        """``(R_x, dL/dx)`` of ``out = x Wᵀ + b``."""
        if rel is None:
            return None, (None if grad is None else grad @ spec.weight)
        if not self.method:
            return linear_alpha1beta0_separate(x, spec.weight, rel), (None if grad is None else grad @ spec.weight)
        kw = dict(output=out, bias=spec.bias, abs_weight=spec.abs_weight,
                  backend=route("linear_alpha1beta0", self.backend, (x,)))
        if grad is None:
            return linear_alpha1beta0(x, spec.weight, rel, **kw), None
        return linear_alpha1beta0_with_grad(x, spec.weight, rel, grad, **kw)

    def add(self, rel, u: torch.Tensor, v: torch.Tensor | None):
        """``(R_u, R_v)`` of ``u + v``."""
        if not self.method:
            return z_add(rel, u, v)
        # the kernels take two summands of one shape; a broadcast position embedding (or v = 0) runs the reference
        same = v is not None and u.shape == v.shape == rel.shape
        return normalized_add(rel, u, v, backend=self.backend if same else "torch")

    def norm_add(self, u: torch.Tensor, v: torch.Tensor | None, norm: NormSpec, grad, rel, grad_res=None,
                 rel_res=None):
        """``LN(z)`` with ``z = u + v`` (or ``u``), ``z`` also feeding a residual path (``grad_res``, ``rel_res``):
        ``(dL/dz, R_u, R_v)``. LayerNorm is an identity for relevance (docs/method.md §2.7), then clone (§2.9), then
        the add."""
        if grad is not None:
            backend = self.backend
            if backend == "cuda" and (v is None or rel is None):  # the CUDA C++ kernel covers the split case only
                backend = route("layernorm_relevance_unsplit", backend, (u,))
            return layernorm_relevance(u, v, norm.weight, norm.bias, norm.eps, grad, rel, grad_res, rel_res,
                                       backend=backend)
        if rel is None:
            return None, None, None
        z = u if v is None else u + v
        r = rel if rel_res is None else clone_relevance(z, rel, rel_res)
        return (None, r, None) if v is None else (None, *self.add(r, u, v))


# -------------------------------------------------------------------------------------------------- forward


@dataclass
class BlockCache:
    """What the reverse pass reads of one block. From ``out`` on, tensors hold only ``rows`` (the top block
    computes the pooled tokens only); ``x``, ``qkv_out``, ``k`` and ``v`` hold every token. The MLP activation and
    the pre-norm LayerNorms' outputs are recomputed in the reverse pass (one elementwise op each) instead of kept."""

    x: torch.Tensor  # block input [B, N, D]
    qkv_out: list[torch.Tensor]  # outputs of the q/k/v projection(s), bias included
    q: torch.Tensor  # [B, H, rows, d] (unscaled)
    k: torch.Tensor  # [B, H, N, d]
    v: torch.Tensor
    out: torch.Tensor  # softmax(scale q kᵀ) v [B, H, rows, d]
    lse: torch.Tensor  # the rows' log-sum-exp [B, H, rows]
    proj_out: torch.Tensor
    mid: torch.Tensor  # pre-norm: x + branch1; post-norm: LN1(branch1 + x)
    fc1_out: torch.Tensor
    fc2_out: torch.Tensor
    rows: list[int] | None = None  # None: every token


def split_heads(t: torch.Tensor, heads: int, head_dim: int) -> torch.Tensor:
    b, n, _ = t.shape
    return t.view(b, n, heads, head_dim).transpose(1, 2)


def merge_heads(t: torch.Tensor) -> torch.Tensor:
    b, h, n, d = t.shape
    return t.transpose(1, 2).reshape(b, n, h * d)


_ROW_INDEX: dict[tuple, torch.Tensor] = {}


def _row_index(rows: list[int], device: torch.device) -> slice | torch.Tensor:
    """``rows`` as an index along a token dimension: a slice for a run of consecutive tokens (the pooled CLS, or CLS
    and distillation token), else an index tensor made once per device. A fresh ``torch.tensor(rows, device=…)``
    per block would be a host-to-device copy, which synchronizes the stream inside the block loop."""
    if rows == list(range(rows[0], rows[0] + len(rows))):
        return slice(rows[0], rows[0] + len(rows))
    key = (tuple(rows), str(device))
    if key not in _ROW_INDEX:
        _ROW_INDEX[key] = torch.tensor(rows, device=device)
    return _ROW_INDEX[key]


def take_rows(t: torch.Tensor, rows: list[int], dim: int) -> torch.Tensor:
    """The ``rows`` of ``t`` along ``dim``."""
    index = _row_index(rows, t.device)
    if isinstance(index, slice):
        return t[(slice(None),) * dim + (index,)]
    return t.index_select(dim, index)


def scatter_rows(t: torch.Tensor, rows: list[int], n: int, dim: int, into: torch.Tensor | None = None) -> torch.Tensor:
    """``t`` (holding ``rows`` along ``dim``) in a zero tensor with ``n`` entries along ``dim`` (or written into the
    given ``into``, in place)."""
    if into is None:
        shape = list(t.shape)
        shape[dim] = n
        into = t.new_zeros(shape)
    index = _row_index(rows, t.device)
    if isinstance(index, slice):
        into[(slice(None),) * dim + (index,)] = t
        return into
    return into.index_copy_(dim, index, t)


def _scaled(t: torch.Tensor | None, gamma: torch.Tensor | None) -> torch.Tensor | None:
    return t if gamma is None or t is None else t * gamma


def block_forward(blk: BlockSpec, x: torch.Tensor, key_mask: torch.Tensor | None, backend: str,
                  rows: list[int] | None = None) -> tuple[torch.Tensor, BlockCache]:
    """One block; ``rows``: compute these token positions' outputs only (keys and values still span every token)."""
    h1 = blk.norm1(x) if blk.pre_norm else x
    qkv_out = [lin(h1) for lin in blk.qkv]
    heads, hd = blk.num_heads, blk.head_dim
    if blk.fused_qkv:
        b, n, _ = h1.shape
        q, k, v = qkv_out[0].view(b, n, 3, heads, hd).permute(2, 0, 3, 1, 4).unbind(0)
    else:
        q, k, v = (split_heads(t, heads, hd) for t in qkv_out)
    x_rows = x
    if rows is not None:
        q, x_rows = take_rows(q, rows, 2), take_rows(x, rows, 1)
    # O written head-interleaved ([B, N, H, d] memory): merging the heads is then a view, not a copy
    b, _, n_rows, _ = q.shape
    buffer = q.new_empty(b, n_rows, heads, hd).transpose(1, 2)
    out, lse = attention_forward(q, k, v, blk.scale, key_mask, out=buffer, causal=blk.causal,
                                 backend=route("attention_forward", backend, (q,)))
    proj_out = blk.proj(merge_heads(out))
    branch1 = _scaled(proj_out, blk.ls1)
    mid = x_rows + branch1 if blk.pre_norm else blk.norm1(branch1 + x_rows)
    h2 = blk.norm2(mid) if blk.pre_norm else mid
    fc1_out = blk.fc1(h2)
    fc2_out = blk.fc2(ACTIVATIONS[blk.act](fc1_out))
    branch2 = _scaled(fc2_out, blk.ls2)
    y = mid + branch2 if blk.pre_norm else blk.norm2(branch2 + mid)
    return y, BlockCache(x, qkv_out, q, k, v, out, lse, proj_out, mid, fc1_out, fc2_out, rows)


def pooled_rows(enc: EncoderSpec) -> list[int]:
    """The token positions the head reads (CLS; DeiT also its distillation token)."""
    return sorted({branch.token for branch in enc.head})


def forward(enc: EncoderSpec, emb: Embedded, keep_from: int, pooled: bool, backend: str,
            keep: Callable[[BlockCache, BlockSpec], object] | None = None) -> tuple[torch.Tensor, dict, list | None]:
    """The forward without autograd: the encoder output, per block from ``keep_from`` on its cache (or
    ``keep(cache, block)``, what of it a method needs), and the rows the top block computed (``pooled``: only the
    tokens the head reads, exact since the head reads nothing else; else ``None``, every token)."""
    top_rows = pooled_rows(enc) if pooled and emb.pool_index is None else None
    kept = {}
    with torch.no_grad(), record_function("tlrp::forward"):
        x = emb.tokens
        for i, blk in enumerate(enc.blocks):
            x, cache = block_forward(blk, x, emb.key_mask, backend, top_rows if i == enc.depth - 1 else None)
            if i >= keep_from:
                kept[i] = cache if keep is None else keep(cache, blk)
    return x, kept, top_rows


# ----------------------------------------------------------------------------------------------------- head


@dataclass
class Head:
    """The head's forward on the encoder output: what its relevance rules read."""

    rows: list[int] | None  # the token positions of the encoder output (None: every token)
    pooled: torch.Tensor  # the encoder output after the final norm [B, len(rows), D]
    pool: torch.Tensor | None = None  # [B] per-sample token read by the (single) branch, e.g. CLIP's EOS
    inputs: list[list[torch.Tensor]] = field(default_factory=list)  # per branch, each layer's input
    outputs: list[list[torch.Tensor]] = field(default_factory=list)
    branch_logits: list[torch.Tensor] = field(default_factory=list)

    def row_of(self, token: int) -> int | torch.Tensor:
        if self.pool is not None:
            return self.pool
        return token if self.rows is None else self.rows.index(token)


def head_forward(enc: EncoderSpec, x: torch.Tensor, rows: list[int] | None,
                 pool: torch.Tensor | None = None) -> tuple[torch.Tensor, Head]:
    """``pool``: the per-sample token the head reads (``Embedded.pool_index``), else each branch's own token."""
    tokens = enc.final_norm(x) if enc.final_norm is not None else x
    head = Head(rows, tokens, pool)
    logits = None
    for branch in enc.head:
        row = head.row_of(branch.token)
        h = tokens[:, row] if pool is None else tokens[torch.arange(tokens.shape[0], device=tokens.device), row]
        ins, outs = [], []
        for kind, layer in branch.layers:
            ins.append(h)
            h = ACTIVATIONS[layer](h) if kind == "act" else layer(h)
            outs.append(h)
        head.inputs.append(ins)
        head.outputs.append(outs)
        h = h * branch.weight if branch.weight != 1.0 else h
        head.branch_logits.append(h)
        logits = h if logits is None else logits + h
    return logits, head


def head_gradient(enc: EncoderSpec, x: torch.Tensor, rows: list[int] | None, target, check_target,
                  pool: torch.Tensor | None = None):
    """The head on the encoder output, differentiated by autograd: ``(logits, head, target, ∂y_t/∂x)``."""
    top = x.detach().requires_grad_(True)
    with torch.enable_grad(), record_function("tlrp::head_gradient"):
        logits, head = head_forward(enc, top, rows, pool)
        t = check_target(logits, target)
        grad = torch.autograd.grad(logits.gather(1, t[:, None]).sum(), top)[0]
    head.pooled = head.pooled.detach()
    return logits.detach(), head, t, grad


def onehot(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    out = torch.zeros(logits.shape, dtype=logits.dtype, device=logits.device)
    return out.scatter_(1, target[:, None], 1.0)


def head_relevance(enc: EncoderSpec, head: Head, logits: torch.Tensor, target: torch.Tensor,
                   rules: Rules) -> torch.Tensor:
    """One-hot at the target's logit → relevance of the encoder output tokens (the final norm is an identity)."""
    start = onehot(logits, target)
    if len(enc.head) == 1:
        branch_rel = [start]
    else:  # DeiT-distilled: logits = (head(cls) + head_dist(dist)) / 2, an add of the two branches
        assert len(enc.head) == 2, "heads with more than two branches are not described by any adapter"
        branch_rel = list(rules.add(start, head.branch_logits[0].detach(), head.branch_logits[1].detach()))
    total = torch.zeros_like(head.pooled)
    for k, branch in enumerate(enc.head):
        r = branch_rel[k]  # the branch weight (1/2) is a scaling: relevance passes it unchanged
        for (kind, layer), x, y in zip(reversed(branch.layers), reversed(head.inputs[k]), reversed(head.outputs[k])):
            if kind == "linear":
                r = rules.linear(x.detach(), layer, r, None, y.detach())[0]
        total = total + select_relevance(head.pooled, head.row_of(branch.token), r)
    return total


# ------------------------------------------------------------------------------------------ streaming rollout


class StreamingRollout:
    """The CLS row of ``M⁽ᴸ⁻¹⁾ ⋯ M⁽ˢ⁾``, ``M = I + Ē`` (or ``(I + Ē) / rowsum``), kept as the row vector ``v``
    (start ``e_CLS``) and updated ``v ← v·M`` top-down; the attention op computes both parts of each update.
    Accumulated in float32 (float64 for float64 models), as the kernels do."""

    def __init__(self, like: torch.Tensor, seed: torch.Tensor | None = None):
        """``seed``: the row per sample (``Embedded.pool_index``, CLIP text's EOS), else the CLS row 0."""
        b, n = like.shape[:2]
        self.v = torch.zeros(b, n, dtype=accumulation_dtype(like.dtype), device=like.device)
        if seed is None:
            self.v[:, 0] = 1
        else:
            self.v[torch.arange(b, device=like.device), seed] = 1

    def rows(self, rows: list[int] | None) -> torch.Tensor:
        return self.v if rows is None else take_rows(self.v, rows, 1)

    def apply(self, v_rows: torch.Tensor, product: torch.Tensor, rows: list[int] | None = None) -> None:
        """``v ← v_rows + v_rows·Ē``, from the op's ``rollout_rows`` (``v`` at the map's rows, divided by the row
        sums of ``I + Ē`` when normalizing) and ``rollout_product`` (``v_rows·Ē``, every token). A map of the
        pooled rows only is exact at the top block, where ``v`` is still ``e_CLS``."""
        v = v_rows.to(self.v.dtype)
        if rows is not None:
            v = scatter_rows(v, rows, self.v.shape[1], 1, into=self.v.clone())
        self.v = v + product.to(self.v.dtype)


# ---------------------------------------------------------------------------------------------------- reverse


_GELU_APPROXIMATE = {"gelu": "none", "gelu_tanh": "tanh"}


def _activation_grad(name: str, x: torch.Tensor, grad: torch.Tensor | None) -> torch.Tensor | None:
    """``grad ⊙ act'(x)`` (activations are identities for relevance, docs/method.md §2.7)."""
    if grad is None:
        return None
    if name in _GELU_APPROXIMATE:  # the common case, without re-running the activation
        return torch.ops.aten.gelu_backward(grad, x, approximate=_GELU_APPROXIMATE[name])
    with torch.enable_grad():
        leaf = x.detach().requires_grad_(True)
        return torch.autograd.grad(ACTIVATIONS[name](leaf), leaf, grad)[0]


def _plus(a: torch.Tensor | None, b: torch.Tensor | None) -> torch.Tensor | None:
    return None if a is None else a + b


def to_attention_output(blk: BlockSpec, c: BlockCache, grad, rel, rules: Rules):
    """The top of a block's reverse pass, down to the attention output: gradient and relevance (either may be
    ``None``) of the block output → ``(dL/dctx, R_ctx, dL/dx_res, R_x_res)`` of the heads-merged attention output and
    of the residual branch, at the rows the block computed."""
    norm1, norm2 = blk.norm1, blk.norm2
    x_rows = c.x if c.rows is None else take_rows(c.x, c.rows, 1)
    # the Linear rules read their inputs: the MLP's (pre-norm: LN2's output) and fc2's, recomputed
    h2 = (blk.norm2(c.mid) if blk.pre_norm else c.mid) if rel is not None else None
    act_out = ACTIVATIONS[blk.act](c.fc1_out) if rel is not None else None
    branch1, branch2 = _scaled(c.proj_out, blk.ls1), _scaled(c.fc2_out, blk.ls2)
    # MLP half: the residual add (post-norm: with LN2's backward), fc2, activation, fc1.
    if blk.pre_norm:
        r_mid_res, r_branch2 = rules.add(rel, c.mid, branch2) if rel is not None else (None, None)
        d_branch2 = d_mid_res = grad
    else:
        d_z, r_branch2, r_mid_res = rules.norm_add(branch2, c.mid, norm2, grad, rel)
        d_branch2 = d_mid_res = d_z
    r_act, d_act = rules.linear(act_out, blk.fc2, r_branch2, _scaled(d_branch2, blk.ls2), c.fc2_out)
    r_h2, d_h2 = rules.linear(h2, blk.fc1, r_act, _activation_grad(blk.act, c.fc1_out, d_act), c.fc1_out)
    # Attention half: the residual add with the LayerNorm next to it, the output projection.
    if blk.pre_norm:  # mid = x + branch1 feeds LN2 and the residual
        d_mid, r_x_res, r_branch1 = rules.norm_add(x_rows, branch1, norm2, d_h2, r_h2, d_mid_res, r_mid_res)
        d_branch1 = d_x_res = d_mid
    else:  # mid = LN1(branch1 + x) feeds the MLP and the residual
        r_mid = clone_relevance(c.mid, r_h2, r_mid_res) if rel is not None else None
        d_z1, r_branch1, r_x_res = rules.norm_add(branch1, x_rows, norm1, _plus(d_h2, d_mid_res), r_mid)
        d_branch1 = d_x_res = d_z1
    ctx = merge_heads(c.out)
    r_ctx, d_ctx = rules.linear(ctx, blk.proj, r_branch1, _scaled(d_branch1, blk.ls1), c.proj_out)
    return d_ctx, r_ctx, d_x_res, r_x_res


def block_backward(blk: BlockSpec, c: BlockCache, grad, rel, key_mask: torch.Tensor | None, rules: Rules,
                   map_mode: str | None, rollout: StreamingRollout | None, normalize_rows: bool, through: bool):
    """One block, top-down: the gradient and relevance of its output (either may be ``None``; both ``None`` for a
    map alone) → those of its input, applying the block's map (``map_mode``, an ``ops.attention_relevance`` mode)
    to ``rollout`` on the way. With ``through=False`` (the lowest block a method reads) it stops after the map."""
    carried = grad is not None or rel is not None  # else a map alone (rollout, raw attention)
    d_ctx = r_ctx = d_x_res = r_x_res = None
    if carried:
        d_ctx, r_ctx, d_x_res, r_x_res = to_attention_output(blk, c, grad, rel, rules)
    heads, hd = blk.num_heads, blk.head_dim
    res = attention_relevance(
        c.q, c.k, c.v, c.out, c.lse, blk.scale,
        grad_out=None if d_ctx is None else split_heads(d_ctx, heads, hd),
        rel_out=None if r_ctx is None else split_heads(r_ctx, heads, hd), key_mask=key_mask,
        mask_add=blk.mask_add, mask_add_normalized=rules.method, map_mode=map_mode, causal=blk.causal,
        rollout=None if rollout is None else rollout.rows(c.rows), normalize_rows=normalize_rows, inputs=through,
        backend=route("attention_relevance", rules.backend, (c.q,)))
    if rollout is not None:
        rollout.apply(res["rollout_rows"], res["rollout_product"], c.rows)
    if not (through and carried):
        return None, None
    dq, dk, dv = (res.get(f"grad_{n}") for n in ("query", "key", "value"))
    rq, rk, rv = (res.get(f"rel_{n}") for n in ("query", "key", "value"))
    if c.rows is not None:  # back to every token: the rows not computed get nothing
        n = c.x.shape[1]
        dq, d_x_res = (None if t is None else scatter_rows(t, c.rows, n, d) for t, d in ((dq, 2), (d_x_res, 1)))
        rq, r_x_res = (None if t is None else scatter_rows(t, c.rows, n, d) for t, d in ((rq, 2), (r_x_res, 1)))
    # the q/k/v projections' input (pre-norm: LN1's output), recomputed for their relevance rule
    h1 = (blk.norm1(c.x) if blk.pre_norm else c.x) if rq is not None else None
    if blk.fused_qkv:
        b, n, _ = c.x.shape

        def stack(a, b_, c_):
            if a is None:
                return None
            return torch.stack([t.transpose(1, 2) for t in (a, b_, c_)], dim=2).reshape(b, n, -1)

        r_h1, d_h1 = rules.linear(h1, blk.qkv[0], stack(rq, rk, rv), stack(dq, dk, dv), c.qkv_out[0])
    else:
        parts = [rules.linear(h1, lin, None if r is None else merge_heads(r), None if d is None else merge_heads(d), y)
                 for lin, r, d, y in zip(blk.qkv, (rq, rk, rv), (dq, dk, dv), c.qkv_out)]
        d_h1 = None if dq is None else parts[0][1] + parts[1][1] + parts[2][1]
        r_h1 = None if rq is None else clone_relevance(h1, *(p[0] for p in parts))  # q, k, v read copies of h1
    if blk.pre_norm:  # x feeds LN1 and the residual
        d_x, r_x, _ = rules.norm_add(c.x, None, blk.norm1, d_h1, r_h1, d_x_res, r_x_res)
        return d_x, r_x
    return _plus(d_h1, d_x_res), (None if r_h1 is None else clone_relevance(c.x, r_h1, r_x_res))


def reverse(enc: EncoderSpec, caches: dict, grad, rel, key_mask: torch.Tensor | None, rules: Rules,
            map_mode: str | None, rollout: StreamingRollout | None, normalize_rows: bool, stop: int,
            observe: Callable[[str, torch.Tensor], None] | None = None):
    """Blocks ``L-1 … stop`` top-down; ``stop = -1`` continues to the encoder input and returns its gradient and
    relevance. ``observe(where, R)`` (tests, debugging) receives the relevance after each block."""
    lowest = max(stop, 0)
    with torch.no_grad():
        for i in range(enc.depth - 1, lowest - 1, -1):
            through = i > lowest or stop == -1
            with record_function(f"tlrp::block{i}"):
                grad, rel = block_backward(enc.blocks[i], caches.pop(i), grad, rel, key_mask, rules, map_mode,
                                           rollout, normalize_rows, through)
            if observe is not None and rel is not None:
                observe(f"block{i}", rel)
    return grad, rel
