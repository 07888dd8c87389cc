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
    gate_grad,
    gate_relevance,
    identity_rule_grad,
    layernorm_relevance,
    linear_alpha1beta0,
    linear_alpha1beta0_separate,
    linear_alpha1beta0_with_grad,
    linear_rows_relevance,
    normalized_add,
    rotary_apply,
    rotary_grad,
    rotary_relevance,
    select_relevance,
    z_add,
)
from transformer_lrp.ops.activation import IDENTITY_RULE_EPS
from transformer_lrp.ops.layernorm import norm_with_constant_scale

# ---------------------------------------------------------------------------------------------------- rules


@dataclass(frozen=True)
class Rules:
    """The relevance rules of the method (docs/method.md §2.4, §2.8: α1β0 Linear, normalized add; the original's
    ``layers_ours``) or of the baselines (separate-normalizer Linear, plain z-rule add; ``layers_lrp``), and the
    backend of the ops that have kernels. Every rule returns ``None`` for what is not carried."""

    method: bool
    backend: str = "torch"
    # "attnlrp" | "cp_lrp": the rule set is a modified gradient (docs/method.md §12): the sweep carries that gradient
    # alone, and the relevance is read at the input as input ⊙ gradient
    modified: str | None = None

    @property
    def attention_grad_scale(self) -> tuple[float, float, float] | None:
        """AttnLRP: the uniform rule on A·V (½ to A and to V) and on Q·Kᵀ (½ of A's to each): q, k ¼, v ½.
        CP-LRP: the attention held constant: q, k nothing, v the whole gradient."""
        return {"attnlrp": (0.25, 0.25, 0.5), "cp_lrp": (0.0, 0.0, 1.0)}.get(self.modified)

    def activation_grad(self, name: str, x: torch.Tensor, grad):
        """``grad ⊙ act'(x)``, or under a modified gradient the identity rule's ``grad ⊙ act(x) / (x + 1e-10)``."""
        if grad is None or self.modified is None:
            return _activation_grad(name, x, grad)
        return identity_rule_grad(x, ACTIVATIONS[name](x), grad)

    def gate_grads(self, name: str, gate: torch.Tensor, up: torch.Tensor, grad):
        """``(dL/dgate, dL/dup)`` of ``a = act(gate) ⊙ up``: the true gradient; AttnLRP's (the product's gradient
        halved, the identity rule through the activation); CP-LRP's (the gate constant: nothing to it, the whole
        gradient to ``up``)."""
        if grad is None:
            return None, None
        act = ACTIVATIONS[name](gate)
        if self.modified == "cp_lrp":
            return None, grad * act
        d_s, d_up = gate_grad(grad, act, up)
        if self.modified == "attnlrp":
            return identity_rule_grad(gate, act, d_s * 0.5), d_up * 0.5
        return _activation_grad(name, gate, d_s), d_up

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
            if backend == "cuda" and (v is None or rel is None or self.modified):  # the CUDA C++ kernel covers the
                # split case of the true gradient only
                backend = route("layernorm_relevance_unsplit", backend, (u,))
            return layernorm_relevance(u, v, norm.weight, norm.bias, norm.eps, grad, rel, grad_res, rel_res,
                                       backend=backend, rms=norm.rms, weight_offset=norm.weight_offset,
                                       detach_scale=self.modified is not None)
        if rel is None:
            return None, None, None
        z = u if v is None else u + v
        r = rel if rel_res is None else clone_relevance(z, rel, rel_res)
        return (None, r, None) if v is None else (None, *self.add(r, u, v))

    def gate(self, rel):
        """``(R_gate, R_value)`` of the gated MLP's product (docs/method.md §2.13): halves, for the method and the
        baselines alike (the G rule of a bilinear op, halved, as for the attention products)."""
        return gate_relevance(rel)

    def rotary(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, rel, out: torch.Tensor):
        """Relevance of q or k before the rotary embedding (docs/method.md §2.12: its z-rule)."""
        return None if rel is None else rotary_relevance(x, cos, sin, rel, out)

    def lm_rows(self, x: torch.Tensor, weight_rows: torch.Tensor, rel: torch.Tensor) -> torch.Tensor:
        """The LM head's rule on the rows that carry relevance (the explained token, and a contrast's other)."""
        return linear_rows_relevance(x, weight_rows, rel, "alpha1beta0" if self.method else "separate")


# -------------------------------------------------------------------------------------------------- forward


@dataclass
class BlockCache:
    """What the reverse pass reads of one block. From ``out`` on, tensors hold only ``rows`` (the top block
    computes the pooled tokens only); ``x``, ``qkv_out``, ``k`` and ``v`` hold every token. The MLP activation, the
    pre-norm LayerNorms' outputs, q and k before their rotary embedding and the branches' post-norms are recomputed
    in the reverse pass (one elementwise op each) instead of kept."""

    x: torch.Tensor  # block input [B, N, D]
    qkv_out: list[torch.Tensor]  # outputs of the q/k/v projection(s), bias included
    q: torch.Tensor  # [B, H, rows, d] (unscaled; after q-norm and the rotary embedding)
    k: torch.Tensor  # [B, H_kv, N, d]
    v: torch.Tensor
    out: torch.Tensor  # softmax(scale q kᵀ) v [B, H, rows, d]
    lse: torch.Tensor  # the rows' log-sum-exp [B, H, rows]
    proj_out: torch.Tensor
    mid: torch.Tensor  # pre-norm: x + branch1; post-norm: LN1(branch1 + x)
    fc1_out: torch.Tensor  # gated MLP: the up projection's (fused: [gate; up])
    fc2_out: torch.Tensor
    rows: list[int] | None = None  # None: every token
    gate_out: torch.Tensor | None = None  # gated MLP with a separate gate projection
    cos_sin: tuple[torch.Tensor, torch.Tensor] | None = None  # the rotary embedding's, shared by the blocks

    def for_rows(self, index: torch.Tensor) -> BlockCache:
        """This cache for explained rows that share a sample's forward (``Embedded.row_sample``)."""
        def pick(t):
            return t if t is None else t.index_select(0, index)

        cos_sin = None if self.cos_sin is None else tuple(pick(t) for t in self.cos_sin)
        return BlockCache(pick(self.x), [pick(t) for t in self.qkv_out], pick(self.q), pick(self.k), pick(self.v),
                          pick(self.out), pick(self.lse), pick(self.proj_out), pick(self.mid), pick(self.fc1_out),
                          pick(self.fc2_out), self.rows, pick(self.gate_out), cos_sin)


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


def _normed(t: torch.Tensor, norm: NormSpec | None) -> torch.Tensor:
    return t if norm is None else norm(t)


def qkv_heads(blk: BlockSpec, qkv_out: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q, k, v as heads (views of the projections' outputs): ``[B, H, N, d]``, ``[B, H_kv, N, d]`` twice."""
    if blk.fused_qkv:
        parts = qkv_out[0].split(blk.qkv_sizes, dim=-1)
    else:
        parts = qkv_out
    heads = (blk.num_heads, blk.heads_kv, blk.heads_kv)
    return tuple(split_heads(t, h, blk.head_dim) for t, h in zip(parts, heads))


def normed_qk(blk: BlockSpec, qkv_out: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q and k after their per-head norms (before the rotary embedding), and v."""
    q, k, v = qkv_heads(blk, qkv_out)
    return _normed(q, blk.q_norm), _normed(k, blk.k_norm), v


def mlp_forward(blk: BlockSpec, h2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """``(fc1_out, the activation's output fed to fc2, gate_out)``: ``act(fc1(h))``, or for a gated MLP
    ``act(gate) ⊙ up`` (``fc1`` the up projection, or ``[gate; up]`` fused)."""
    fc1_out = blk.fc1(h2)
    if not blk.gated:
        return fc1_out, ACTIVATIONS[blk.act](fc1_out), None
    if blk.fused_gate_up:
        gate, up = fc1_out.chunk(2, dim=-1)
        return fc1_out, ACTIVATIONS[blk.act](gate) * up, None
    gate_out = blk.gate(h2)
    return fc1_out, ACTIVATIONS[blk.act](gate_out) * fc1_out, gate_out


def block_forward(blk: BlockSpec, x: torch.Tensor, key_mask: torch.Tensor | None, backend: str,
                  rows: list[int] | None = None,
                  cos_sin: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[torch.Tensor, BlockCache]:
    """One block; ``rows``: compute these token positions' outputs only (keys and values still span every token).
    ``cos_sin``: the rotary embedding's angles at every token (decoders)."""
    h1 = blk.norm1(x) if blk.pre_norm else x
    qkv_out = [lin(h1) for lin in blk.qkv]
    q, k, v = normed_qk(blk, qkv_out)
    if cos_sin is not None:
        q, k = rotary_apply(q, *cos_sin), rotary_apply(k, *cos_sin)
    x_rows = x
    if rows is not None:
        q, x_rows = take_rows(q, rows, 2), take_rows(x, rows, 1)
    # O written head-interleaved ([B, N, H, d] memory): merging the heads is then a view, not a copy
    heads, hd = blk.num_heads, blk.head_dim
    b, _, n_rows, _ = q.shape
    buffer = q.new_empty(b, n_rows, heads, hd).transpose(1, 2)
    out, lse = attention_forward(q, k, v, blk.scale, key_mask, out=buffer, causal=blk.causal, window=blk.window,
                                 backend=route("attention_forward", backend, (q, k)))
    proj_out = blk.proj(merge_heads(out))
    branch1 = _normed(_scaled(proj_out, blk.ls1), blk.post_attn_norm)
    mid = x_rows + branch1 if blk.pre_norm else blk.norm1(branch1 + x_rows)
    h2 = blk.norm2(mid) if blk.pre_norm else mid
    fc1_out, act_out, gate_out = mlp_forward(blk, h2)
    fc2_out = blk.fc2(act_out)
    branch2 = _normed(_scaled(fc2_out, blk.ls2), blk.post_mlp_norm)
    y = mid + branch2 if blk.pre_norm else blk.norm2(branch2 + mid)
    return y, BlockCache(x, qkv_out, q, k, v, out, lse, proj_out, mid, fc1_out, fc2_out, rows, gate_out, cos_sin)


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
    angles: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # per rotary spec (Gemma: local and global), once
    with torch.no_grad(), record_function("tlrp::forward"):
        x = emb.tokens
        for i, blk in enumerate(enc.blocks):
            cos_sin = None
            if blk.rope is not None:
                if id(blk.rope) not in angles:
                    angles[id(blk.rope)] = blk.rope.cos_sin(emb.positions, x.dtype)
                cos_sin = angles[id(blk.rope)]
            x, cache = block_forward(blk, x, emb.key_mask, backend, top_rows if i == enc.depth - 1 else None,
                                     cos_sin)
            if i >= keep_from:
                kept[i] = cache if keep is None else keep(cache, blk)
    return x, kept, top_rows


# ----------------------------------------------------------------------------------------------------- head


@dataclass
class Head:
    """The head's forward on the encoder output: what its relevance rules read."""

    rows: list[int] | None  # the token positions of the encoder output (None: every token)
    pooled: torch.Tensor  # the encoder output after the final norm [B, len(rows), D] (explained rows: [R, N, D])
    pool: torch.Tensor | None = None  # [B] per-sample token read by the (single) branch, e.g. CLIP's EOS
    inputs: list[list[torch.Tensor]] = field(default_factory=list)  # per branch, each layer's input
    outputs: list[list[torch.Tensor]] = field(default_factory=list)
    branch_logits: list[torch.Tensor] = field(default_factory=list)

    def row_of(self, token: int) -> int | torch.Tensor:
        if self.pool is not None:
            return self.pool
        return token if self.rows is None else self.rows.index(token)


def _softcap(x: torch.Tensor, cap: float) -> torch.Tensor:
    return torch.tanh(x / cap) * cap


def _head_layer(kind: str, layer, h: torch.Tensor, modified: bool = False) -> torch.Tensor:
    """One head layer; ``modified``: its value, with the modified gradient of AttnLRP/CP-LRP (the identity rule through
    activations and soft-capping, norms with their scale held constant)."""
    if kind == "act" and layer == "l2_normalize" and modified:  # a norm: its scale 1/‖h‖ held constant
        return _with_gradient_of(ACTIVATIONS[layer](h), h / h.norm(dim=-1, keepdim=True).detach())
    if kind == "act":
        y = ACTIVATIONS[layer](h)
    elif kind == "softcap":
        y = _softcap(h, layer)
    elif kind == "norm" and modified:
        return _with_gradient_of(layer(h), _constant_scale(layer, h))
    else:
        return layer(h)
    if modified:  # x · (act(x) / (x + 1e-10)) as the gradient's path, the true value forward
        return _with_gradient_of(y, h * (y / (h + IDENTITY_RULE_EPS)).detach())
    return y


def _with_gradient_of(value: torch.Tensor, surrogate: torch.Tensor) -> torch.Tensor:
    """``value`` forward, ``surrogate``'s gradient backward."""
    return value.detach() + (surrogate - surrogate.detach())


def _constant_scale(norm: NormSpec, x: torch.Tensor) -> torch.Tensor:
    return norm_with_constant_scale(x, norm.weight, norm.bias, norm.eps, norm.rms, norm.weight_offset)


def per_row(x: torch.Tensor, row_sample: torch.Tensor | None) -> torch.Tensor:
    """The encoder output for each explained row (rows sharing a sample's forward get a copy of it each)."""
    return x if row_sample is None else x.index_select(0, row_sample)


def head_forward(enc: EncoderSpec, x: torch.Tensor, rows: list[int] | None,
                 pool: torch.Tensor | None = None, modified: bool = False) -> tuple[torch.Tensor, Head]:
    """``pool``: the per-sample token the head reads (``Embedded.pool_index``), else each branch's own token. ``x``
    has one entry per explained row (``per_row``). ``modified``: with AttnLRP's modified gradient (``_head_layer``)."""
    tokens = x
    if enc.final_norm is not None:
        tokens = _head_layer("norm", enc.final_norm, x, modified)
    head = Head(rows, tokens, pool)
    logits = None
    for branch in enc.head:
        row = head.row_of(branch.token)
        h = tokens[:, row] if pool is None else tokens[torch.arange(tokens.shape[0], device=tokens.device), row]
        ins, outs = [], []
        for kind, layer in branch.layers:
            ins.append(h)
            h = _head_layer(kind, layer, h, modified)
            outs.append(h)
        head.inputs.append(ins)
        head.outputs.append(outs)
        h = h * branch.weight if branch.weight != 1.0 else h
        head.branch_logits.append(h)
        logits = h if logits is None else logits + h
    return logits, head


def explained_logit(logits: torch.Tensor, target: torch.Tensor, versus: torch.Tensor | None) -> torch.Tensor:
    """Per row, the logit explained: the target's, minus ``versus``'s for a contrast."""
    y = logits.gather(1, target[:, None])[:, 0]
    return y if versus is None else y - logits.gather(1, versus[:, None])[:, 0]


def head_gradient(enc: EncoderSpec, x: torch.Tensor, rows: list[int] | None, target, check_target,
                  pool: torch.Tensor | None = None, versus: torch.Tensor | None = None, modified: bool = False):
    """The head on the encoder output, differentiated by autograd: ``(logits, head, target, ∂y_t/∂x)`` (``modified``:
    AttnLRP's and CP-LRP's modified gradient)."""
    top = x.detach().requires_grad_(True)
    with torch.enable_grad(), record_function("tlrp::head_gradient"):
        logits, head = head_forward(enc, top, rows, pool, modified)
        t = check_target(logits, target)
        grad = torch.autograd.grad(explained_logit(logits, t, versus).sum(), top)[0]
    head.pooled = head.pooled.detach()
    return logits.detach(), head, t, grad


def onehot(logits: torch.Tensor, target: torch.Tensor, versus: torch.Tensor | None = None) -> torch.Tensor:
    """The relevance put into the logits: 1 at the target (−1 at a contrast's other token)."""
    out = torch.zeros(logits.shape, dtype=logits.dtype, device=logits.device)
    out.scatter_(1, target[:, None], 1.0)
    return out if versus is None else out.scatter_(1, versus[:, None], -1.0)


def head_relevance(enc: EncoderSpec, head: Head, logits: torch.Tensor, target: torch.Tensor,
                   rules: Rules, versus: torch.Tensor | None = None) -> torch.Tensor:
    """1 at the target's logit (−1 at a contrast's other) → relevance of the encoder output tokens (the final norm
    is an identity). An LM head's rule reads only the rows of those tokens (``Rules.lm_rows``)."""
    total = torch.zeros_like(head.pooled)
    if len(enc.head) == 1 and any(kind == "lm_head" for kind, _ in enc.head[0].layers):
        branch = enc.head[0]
        columns = target[:, None] if versus is None else torch.stack([target, versus], dim=1)  # [R, k]
        seed = torch.ones(columns.shape, dtype=logits.dtype, device=logits.device)
        if versus is not None:
            seed[:, 1] = -1
        r = None
        for (kind, layer), x in zip(reversed(branch.layers), reversed(head.inputs[0])):
            if kind == "lm_head":
                r = rules.lm_rows(x.detach(), layer.weight[columns], seed)
            elif kind in ("linear", "norm") and r is not None:
                r = rules.linear(x.detach(), layer, r, None, layer(x).detach())[0] if kind == "linear" else r
        return total + select_relevance(head.pooled, head.row_of(branch.token), r)
    start = onehot(logits, target, versus)
    if len(enc.head) == 1:
        branch_rel = [start]
    else:  # DeiT-distilled: logits = (head(cls) + head_dist(dist)) / 2, an add of the two branches
        assert len(enc.head) == 2, "heads with more than two branches are not described by any adapter"
        branch_rel = list(rules.add(start, head.branch_logits[0].detach(), head.branch_logits[1].detach()))
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
        """``like``: ``[B, N, …]`` of the dtype and device, one entry per explained row; ``seed``: the row per
        sample (``Embedded.pool_index``: CLIP text's EOS, a decoder's explained position), else the CLS row 0."""
        b, n = (like.shape[0] if seed is None else seed.shape[0]), like.shape[1]
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


def _through_norm(norm: NormSpec | None, t: torch.Tensor, grad, rel, rules: Rules):
    """Back through a norm with no residual beside it (a branch's post-norm, q/k-norm): its gradient backward; the
    relevance passes unchanged (docs/method.md §2.7)."""
    if norm is None or grad is None:
        return grad, rel
    d, r, _ = rules.norm_add(t, None, norm, grad, rel)
    return d, r


def _cat(a: torch.Tensor | None, b: torch.Tensor | None) -> torch.Tensor | None:
    if a is None and b is None:
        return None
    a = torch.zeros_like(b) if a is None else a
    return torch.cat([a, torch.zeros_like(a) if b is None else b], dim=-1)


def mlp_input_backward(blk: BlockSpec, c: BlockCache, h2: torch.Tensor | None, r_act, d_act, rules: Rules):
    """From the activation's output (fc2's input) to the MLP's input ``h2``: ``(R_h2, dL/dh2)``. A gated MLP splits
    the product ``act(gate) ⊙ up`` between its factors (``Rules.gate``); the activation is an identity for relevance
    and the two projections read copies of ``h2`` (clone)."""
    if not blk.gated:
        return rules.linear(h2, blk.fc1, r_act, rules.activation_grad(blk.act, c.fc1_out, d_act), c.fc1_out)
    gate, up = c.fc1_out.chunk(2, dim=-1) if blk.fused_gate_up else (c.gate_out, c.fc1_out)
    r_gate, r_up = rules.gate(r_act) if r_act is not None else (None, None)
    d_gate, d_up = rules.gate_grads(blk.act, gate, up, d_act)
    if blk.fused_gate_up:  # fc1 gives [gate; up]
        return rules.linear(h2, blk.fc1, _cat(r_gate, r_up), _cat(d_gate, d_up), c.fc1_out)
    r_hg, d_hg = rules.linear(h2, blk.gate, r_gate, d_gate, c.gate_out)
    r_hu, d_hu = rules.linear(h2, blk.fc1, r_up, d_up, c.fc1_out)
    r_h2 = None if r_act is None else clone_relevance(h2, *(r for r in (r_hg, r_hu) if r is not None))
    return r_h2, (None if d_act is None else _plus(d_hu, d_hg) if d_hg is not None else d_hu)


def to_attention_output(blk: BlockSpec, c: BlockCache, grad, rel, rules: Rules):
    """The top of a block's reverse pass, down to the attention output: gradient and relevance (either may be
    ``None``) of the block output → ``(dL/dctx, R_ctx, dL/dx_res, R_x_res)`` of the heads-merged attention output and
    of the residual branch, at the rows the block computed."""
    norm1, norm2 = blk.norm1, blk.norm2
    x_rows = c.x if c.rows is None else take_rows(c.x, c.rows, 1)
    # the Linear rules read their inputs: the MLP's (pre-norm: LN2's output) and fc2's, recomputed
    h2 = (blk.norm2(c.mid) if blk.pre_norm else c.mid) if rel is not None else None
    act_out = mlp_forward(blk, h2)[1] if rel is not None else None
    scaled1, scaled2 = _scaled(c.proj_out, blk.ls1), _scaled(c.fc2_out, blk.ls2)
    branch1, branch2 = _normed(scaled1, blk.post_attn_norm), _normed(scaled2, blk.post_mlp_norm)
    # MLP half: the residual add (post-norm: with LN2's backward), the branch's post-norm, fc2, the MLP's input.
    if blk.pre_norm:
        r_mid_res, r_branch2 = rules.add(rel, c.mid, branch2) if rel is not None else (None, None)
        d_branch2 = d_mid_res = grad
    else:
        d_z, r_branch2, r_mid_res = rules.norm_add(branch2, c.mid, norm2, grad, rel)
        d_branch2 = d_mid_res = d_z
    d_branch2, r_branch2 = _through_norm(blk.post_mlp_norm, scaled2, d_branch2, r_branch2, rules)
    r_act, d_act = rules.linear(act_out, blk.fc2, r_branch2, _scaled(d_branch2, blk.ls2), c.fc2_out)
    r_h2, d_h2 = mlp_input_backward(blk, c, h2, r_act, d_act, rules)
    # Attention half: the residual add with the LayerNorm next to it, the branch's post-norm, the output projection.
    if blk.pre_norm:  # mid = x + branch1 feeds LN2 and the residual
        d_mid, r_x_res, r_branch1 = rules.norm_add(x_rows, branch1, norm2, d_h2, r_h2, d_mid_res, r_mid_res)
        d_branch1 = d_x_res = d_mid
    else:  # mid = LN1(branch1 + x) feeds the MLP and the residual
        r_mid = clone_relevance(c.mid, r_h2, r_mid_res) if rel is not None else None
        d_z1, r_branch1, r_x_res = rules.norm_add(branch1, x_rows, norm1, _plus(d_h2, d_mid_res), r_mid)
        d_branch1 = d_x_res = d_z1
    d_branch1, r_branch1 = _through_norm(blk.post_attn_norm, scaled1, d_branch1, r_branch1, rules)
    ctx = merge_heads(c.out)
    r_ctx, d_ctx = rules.linear(ctx, blk.proj, r_branch1, _scaled(d_branch1, blk.ls1), c.proj_out)
    return d_ctx, r_ctx, d_x_res, r_x_res


def qk_backward(blk: BlockSpec, c: BlockCache, dq, dk, rq, rk, rules: Rules):
    """From the attention's q and k back to the projections' outputs: through the rotary embedding (its transpose;
    its z-rule, docs/method.md §2.12) and the per-head q/k-norms (their backward; identities for relevance)."""
    if c.cos_sin is None and blk.q_norm is None and blk.k_norm is None:
        return dq, dk, rq, rk
    q_raw, k_raw, _ = qkv_heads(blk, c.qkv_out)
    q_n, k_n = _normed(q_raw, blk.q_norm), _normed(k_raw, blk.k_norm)
    if c.cos_sin is not None:
        cos, sin = c.cos_sin
        rq, rk = rules.rotary(q_n, cos, sin, rq, c.q), rules.rotary(k_n, cos, sin, rk, c.k)
        dq = None if dq is None else rotary_grad(dq, cos, sin)
        dk = None if dk is None else rotary_grad(dk, cos, sin)
    dq, rq = _through_norm(blk.q_norm, q_raw, dq, rq, rules)
    dk, rk = _through_norm(blk.k_norm, k_raw, dk, rk, rules)
    return dq, dk, rq, rk


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
        window=blk.window, rollout=None if rollout is None else rollout.rows(c.rows), normalize_rows=normalize_rows,
        inputs=through, grad_scale=rules.attention_grad_scale,
        backend=route("attention_relevance", rules.backend, (c.q, c.k)))
    if rollout is not None:
        rollout.apply(res["rollout_rows"], res["rollout_product"], c.rows)
    if not (through and carried):
        return None, None
    dq, dk, dv = (res.get(f"grad_{n}") for n in ("query", "key", "value"))
    if rules.modified == "cp_lrp":  # the attention held constant: no gradient to q and k (their projections skipped)
        dq = dk = None
    rq, rk, rv = (res.get(f"rel_{n}") for n in ("query", "key", "value"))
    if c.rows is not None:  # back to every token: the rows not computed get nothing
        n = c.x.shape[1]
        dq, d_x_res = (None if t is None else scatter_rows(t, c.rows, n, d) for t, d in ((dq, 2), (d_x_res, 1)))
        rq, r_x_res = (None if t is None else scatter_rows(t, c.rows, n, d) for t, d in ((rq, 2), (r_x_res, 1)))
    dq, dk, rq, rk = qk_backward(blk, c, dq, dk, rq, rk, rules)
    # the q/k/v projections' input (pre-norm: LN1's output), recomputed for their relevance rule
    h1 = (blk.norm1(c.x) if blk.pre_norm else c.x) if rq is not None else None
    if blk.fused_qkv:  # one projection gives [q | k | v]

        def joined(a, b_, c_):
            if c_ is None:
                return None
            v = merge_heads(c_)
            if a is None:  # CP-LRP: zeros for q and k, the width of the projection's q and k rows
                return torch.cat([v.new_zeros(*v.shape[:-1], blk.qkv[0].weight.shape[0] - v.shape[-1]), v], dim=-1)
            return torch.cat([merge_heads(a), merge_heads(b_), v], dim=-1)

        r_h1, d_h1 = rules.linear(h1, blk.qkv[0], joined(rq, rk, rv), joined(dq, dk, dv), c.qkv_out[0])
    else:
        parts = [rules.linear(h1, lin, None if r is None else merge_heads(r), None if d is None else merge_heads(d), y)
                 if r is not None or d is not None else (None, None)
                 for lin, r, d, y in zip(blk.qkv, (rq, rk, rv), (dq, dk, dv), c.qkv_out)]
        d_h1 = None
        for _, d in parts:
            d_h1 = d if d_h1 is None else (d_h1 if d is None else d_h1 + d)
        r_h1 = None if rq is None else clone_relevance(h1, *(p[0] for p in parts))  # q, k, v read copies of h1
    if blk.pre_norm:  # x feeds LN1 and the residual
        d_x, r_x, _ = rules.norm_add(c.x, None, blk.norm1, d_h1, r_h1, d_x_res, r_x_res)
        return d_x, r_x
    return _plus(d_h1, d_x_res), (None if r_h1 is None else clone_relevance(c.x, r_h1, r_x_res))


def reverse(enc: EncoderSpec, caches: dict, grad, rel, key_mask: torch.Tensor | None, rules: Rules,
            map_mode: str | None, rollout: StreamingRollout | None, normalize_rows: bool, stop: int,
            observe: Callable[[str, torch.Tensor], None] | None = None, row_sample: torch.Tensor | None = None):
    """Blocks ``L-1 … stop`` top-down; ``stop = -1`` continues to the encoder input and returns its gradient and
    relevance. ``observe(where, R)`` (tests, debugging) receives the relevance after each block. ``row_sample``:
    the sample of each explained row (``Embedded.row_sample``): each block's cache is taken per row as the sweep
    reaches it (one block's copy alive at a time), so the rows share the samples' forward."""
    lowest = max(stop, 0)
    key_mask = per_row(key_mask, row_sample) if key_mask is not None else None
    with torch.no_grad():
        for i in range(enc.depth - 1, lowest - 1, -1):
            through = i > lowest or stop == -1
            cache = caches.pop(i)
            if row_sample is not None:
                cache = cache.for_rows(row_sample)
            with record_function(f"tlrp::block{i}"):
                grad, rel = block_backward(enc.blocks[i], cache, grad, rel, key_mask, rules, map_mode,
                                           rollout, normalize_rows, through)
            if observe is not None and rel is not None:
                observe(f"block{i}", rel)
            elif observe is not None and rules.modified is not None and grad is not None:
                observe(f"block{i}", cache.x * grad)  # a modified gradient's relevance: input ⊙ gradient
    return grad, rel
