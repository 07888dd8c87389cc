"""Relevance of the two attention matmuls (docs/method.md §2.6): the G rule, then halved.

``O = A V`` and ``dots = Q Kᵀ`` are bilinear, so each operand's G-rule relevance already sums to the full output
relevance; the reference divides both by 2. The softmax between them is an identity (docs/method.md §2.7), and so
are the ``d^{-1/2}`` scaling and (in the method's rules) the padding-mask add, which is handled by the caller.
Shapes: ``A [B, H, N, N]``, ``Q, K, V, O [B, H, N, d]``.

Below the two rules (the engine's materialized path): the whole softmax attention as fused ops, each with its
reference beside it: ``attention_forward`` (keeps ``O`` and the row log-sum-exp), ``attention_relevance``
(gradient, relevance and the block's head-reduced map in one backward), ``attention_weighted_map`` (GradCAM's
head-weighted map), and the ``AttentionLRPFunction`` / ``lrp_attention`` autograd form. Kernels:
``triton_kernels/attention_lrp.py`` (``backend="triton"``) and ``csrc/attention_relevance.cu``
(``backend="cuda"``, ``torch.ops.tlrp.attention_*``).
"""

from __future__ import annotations

import torch

from transformer_lrp._backend import op_backend
from transformer_lrp._numerics import EPS, accumulation_dtype, normalized_add_factors, safe_divide
from transformer_lrp.ops.common import profiled


@profiled
def attention_av_relevance(
    attn: torch.Tensor, value: torch.Tensor, out: torch.Tensor, relevance: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    r"""``O = A V``: returns ``(R_A, R_V)``, each half of the G rule.

    ``S = safe_divide(R_O, O)``, ``R_A = A ⊙ (S Vᵀ) / 2``, ``R_V = V ⊙ (Aᵀ S) / 2``.
    ``R_A`` is the block's attention relevance of the method (``attn_cam`` in the original).
    """
    half_s = safe_divide(relevance, out).mul_(0.5)  # halving folded into the [B, H, N, d] factor
    r_attn = (half_s @ value.transpose(-1, -2)).mul_(attn)
    r_value = (attn.transpose(-1, -2) @ half_s).mul_(value)
    return r_attn, r_value


@profiled
def attention_qk_relevance(
    query: torch.Tensor, key: torch.Tensor, scores: torch.Tensor, relevance: torch.Tensor, scale: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    r"""``Q Kᵀ``: returns ``(R_Q, R_K)``, each half of the G rule.

    The reference's ``matmul1`` outputs the unscaled ``dots = Q Kᵀ``; the forward keeps ``scores = scale · dots``
    instead (no extra ``[B, H, N, N]`` buffer), and ``safe_divide(R, dots) = scale · safe_divide(R, scores,
    scale · eps)`` recovers the reference exactly.
    """
    s = safe_divide(relevance, scores, EPS * scale)
    factor = 0.5 * scale
    r_query = (s @ key).mul_(query).mul_(factor)
    r_key = (s.transpose(-1, -2) @ query).mul_(key).mul_(factor)
    return r_query, r_key


# ----------------------------------------------------------------------------------- fused softmax attention
# The whole attention (softmax included) as one op, for the fused sweep: the forward keeps O and the row
# log-sum-exp instead of A; the backward gives gradient, relevance and the per-block map without ``[B, H, N, N]``.

_HALF = (torch.float16, torch.bfloat16)
KERNELS = {"attention_forward": ("triton", "cuda"), "attention_relevance": ("triton", "cuda"),
           "attention_weighted_map": ("triton", "cuda")}
MAP_MODES = (None, "transformer_attribution", "gae", "rollout", "partial_lrp")


def repeat_kv(t: torch.Tensor, heads: int) -> torch.Tensor:
    """Keys or values of ``H_kv`` heads as ``heads`` query heads (GQA/MQA: each key head serves ``heads / H_kv``
    consecutive query heads). The references materialize this; the kernels index the shared head instead."""
    hk = t.shape[1]
    if hk == heads:
        return t
    if hk == 0 or heads % hk:
        raise ValueError(f"query heads ({heads}) must be a multiple of key/value heads ({hk})")
    return t.repeat_interleave(heads // hk, dim=1)


def sum_groups(t: torch.Tensor, heads_kv: int) -> torch.Tensor:
    """The inverse bookkeeping of ``repeat_kv`` for gradients and relevance: a key head gets the sum over the query
    heads that read it."""
    b, h, n, d = t.shape
    if h == heads_kv:
        return t
    return t.view(b, heads_kv, h // heads_kv, n, d).sum(dim=2)


def _masked_scores(query, key, scale, key_mask, causal=False, window=None, q_offset=0, k_offset=0):
    key = repeat_kv(key, query.shape[1])
    scores = (query * scale) @ key.transpose(-1, -2)
    attend = _attended(key_mask, causal, query.shape[2], key.shape[2], scores.device, window, q_offset, k_offset)
    if attend is None:
        return scores, scores, None
    return scores, scores.masked_fill(~attend, torch.finfo(scores.dtype).min), attend


def _attended(key_mask, causal, nq, nk, device, window=None, q_offset=0, k_offset=0):
    """Which (query, key) pairs attend, broadcastable to ``[B, H, NQ, NK]`` (``None``: all): real keys, and with
    ``causal`` keys at or before the query, with ``window`` also less than ``window`` positions behind it (a sliding
    window). ``q_offset``, ``k_offset``: the positions of the first query row and key (a chunk of a longer
    sequence); ``key_mask`` covers the chunk's keys."""
    attend = None if key_mask is None else key_mask[:, None, None, :]
    if window and not causal:
        raise ValueError("a sliding window is only defined with the causal mask here")
    if causal:
        q_pos = torch.arange(q_offset, q_offset + nq, device=device)[:, None]
        k_pos = torch.arange(k_offset, k_offset + nk, device=device)[None, :]
        tri = k_pos <= q_pos
        if window:
            tri = tri & (q_pos - k_pos < int(window))
        attend = tri if attend is None else attend & tri
    return attend


# Query rows are processed in chunks so that each [B, H, rows, NK] intermediate stays below this many elements: the
# reference's memory then grows as O(N) per block, not O(N²) (a decoder at 8k tokens would need gigabytes per map).
CHUNK_ELEMENTS = 1 << 23
# With the causal mask a chunk reads only the keys up to its last row, so smaller chunks skip more of the masked upper
# triangle: c equal chunks touch (c + 1) / 2c of the square (8 chunks: 56 %; one or two large ones: 75–100 %). Rows
# stay at least CAUSAL_MIN_ROWS so each product is still a sizeable GEMM.
CAUSAL_CHUNKS = 8
CAUSAL_MIN_ROWS = 64


def query_chunks(b: int, h: int, nq: int, nk: int, causal: bool, window: int | None):
    """``(q0, q1, k0, k1)`` per chunk of query rows: the rows and the keys they can attend (causal: none after the
    chunk's last row; a window: none before its first row's window)."""
    rows = max(16, CHUNK_ELEMENTS // max(1, b * h * nk))
    if causal:
        rows = min(rows, max(CAUSAL_MIN_ROWS, -(-nq // CAUSAL_CHUNKS)))
    for q0 in range(0, nq, rows):
        q1 = min(nq, q0 + rows)
        k0, k1 = 0, nk
        if causal:
            k1 = min(nk, q1)
            if window:
                k0 = max(0, q0 - int(window) + 1)
        yield q0, q1, k0, k1


EMPTY_ROW_LSE = 1.0e30  # the log-sum-exp of a query row without any key (the kernels write the same)


def _softmax(masked: torch.Tensor, attend: torch.Tensor | None, dtype=None) -> torch.Tensor:
    """Softmax over keys; a query with no attended key attends to nothing (a zero row, as the kernels), not
    uniformly to the masked keys."""
    probs = masked.softmax(dim=-1, dtype=dtype)
    return probs if attend is None else probs.masked_fill(~attend, 0)


def attention_forward_ref(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scale: float, key_mask: torch.Tensor | None = None,
    causal: bool = False, window: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(O, lse)``: ``O = softmax(scale·Q Kᵀ, padded keys masked) V``; ``lse`` the rows' log-sum-exp (float32 for
    half inputs; a row with no attended key has ``O = 0``). Reference of ``attention_forward``: materializes
    ``[B, H, rows, NK]`` for one chunk of query rows at a time (``query_chunks``)."""
    b, h, nq, _ = query.shape
    nk = key.shape[2]
    _check_causal(causal, nq, nk)
    outs, lses = [], []
    for q0, q1, k0, k1 in query_chunks(b, h, nq, nk, causal, window):
        km = None if key_mask is None else key_mask[:, k0:k1]
        _, masked, attend = _masked_scores(query[:, :, q0:q1], key[:, :, k0:k1], scale, km, causal, window, q0, k0)
        acc = accumulation_dtype(masked.dtype)
        lse = masked.to(acc).logsumexp(dim=-1)
        if attend is not None:  # no key at all: a finite "plus infinity", so exp(score − lse) = 0 (as the kernels)
            lse = lse.masked_fill(~attend.any(dim=-1), EMPTY_ROW_LSE)
        attn = _softmax(masked, attend, acc).to(query.dtype)
        outs.append(attn @ repeat_kv(value[:, :, k0:k1], h))
        lses.append(lse)
    return torch.cat(outs, dim=2), torch.cat(lses, dim=2)


def _check_causal(causal: bool, nq: int, nk: int) -> None:
    if causal and nq != nk:
        raise ValueError(f"causal attention needs as many query rows as keys, got {nq} and {nk}")


@profiled
def attention_forward(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scale: float, key_mask: torch.Tensor | None = None,
    out: torch.Tensor | None = None, backend: str | None = "torch", causal: bool = False, window: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention keeping what the fused backward needs.

    Args:
        query: `[B, H, NQ, d]` (unscaled); key, value: `[B, H_kv, NK, d]` with ``H_kv`` dividing ``H`` (GQA/MQA:
            query head ``h`` reads key head ``h // (H / H_kv)``); any strides.
        scale: applied to the scores.
        key_mask: `[B, NK]` bool, True for real keys (padded keys get probability 0).
        out: optional `[B, H, NQ, d]` view to write ``O`` into, e.g. of the heads-merged buffer.
        backend: ``"torch"`` (reference), ``"triton"`` (``triton_kernels/attention_lrp.py``), ``"cuda"``
            (``csrc/attention_relevance.cu``), ``None`` (automatic).
        causal: keys after the query get probability 0 (a causal mask; ``NQ == NK``).
        window: with ``causal``, also keys ``window`` or more positions behind the query (a sliding window).

    Returns:
        ``(O, lse)``: `[B, H, NQ, d]` and the row log-sum-exp `[B, H, NQ]` (float32, float64 for float64 inputs).
    """
    chosen = "torch" if backend == "torch" else op_backend("attention_forward", KERNELS, (query, key, value), backend)
    if chosen == "triton":
        from transformer_lrp.triton_kernels.attention_lrp import attention_fwd

        return attention_fwd(query, key, value, scale, key_mask, out, causal, window)
    if chosen == "cuda":
        o, lse = torch.ops.tlrp.attention_forward(query, key, value, float(scale), key_mask, causal, int(window or 0))
        if out is None:
            return o, lse
        return out.copy_(o), lse
    o_lse = _attention_forward_sdpa(query, key, value, scale, key_mask, causal, window)
    o, lse = o_lse if o_lse is not None else attention_forward_ref(query, key, value, scale, key_mask, causal, window)
    return (o, lse) if out is None else (out.copy_(o), lse)


# torch's own CPU flash attention (an online softmax over key blocks: no [N, N] scores, one exp per score) returns the
# rows' log-sum-exp with O, which is all the backward needs; the reference recomputes a softmax and a logsumexp per
# chunk, about 3x its time. float32 and float64 only (what the reference accumulates in).
_SDPA_DTYPES = (torch.float32, torch.float64)
_sdpa_usable = [hasattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu")]


def _attention_forward_sdpa(query, key, value, scale, key_mask, causal, window):
    """``attention_forward_ref``'s result by torch's CPU flash-attention kernel, or ``None`` where that does not apply
    (not the CPU, half or float64-mixed inputs, a sliding window, or a torch without the op). Padded keys enter as a
    per-key additive ``-inf`` (``[B, 1, 1, NK]``, no ``[NQ, NK]`` mask); rows without any key get the reference's
    ``O = 0``, ``lse = EMPTY_ROW_LSE``."""
    if (not _sdpa_usable[0] or window or query.device.type != "cpu" or query.dtype not in _SDPA_DTYPES
            or not (query.dtype == key.dtype == value.dtype) or query.shape[-1] != value.shape[-1]):
        return None
    _check_causal(causal, query.shape[2], key.shape[2])
    heads = query.shape[1]
    mask = None
    if key_mask is not None:
        mask = torch.zeros(key_mask.shape, dtype=query.dtype, device=query.device)
        mask = mask.masked_fill_(~key_mask, float("-inf"))[:, None, None, :]
    try:
        o, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            query, repeat_kv(key, heads), repeat_kv(value, heads), 0.0, causal, attn_mask=mask, scale=float(scale))
    except (RuntimeError, TypeError):  # an older torch without the mask argument, or a layout it rejects
        _sdpa_usable[0] = False
        return None
    if key_mask is not None:
        # a query row attends a key iff a real key is at or before it (causal), or anywhere (not causal)
        has_key = key_mask.cumsum(dim=1) > 0 if causal else key_mask.any(dim=1, keepdim=True).expand(-1, query.shape[2])
        empty = ~has_key[:, None, :]
        if empty.any():
            o = o.masked_fill(empty[..., None], 0)
            lse = lse.masked_fill(empty, EMPTY_ROW_LSE)
    return o, lse.to(accumulation_dtype(query.dtype)).contiguous()  # the kernel stores it [B, NQ, H]


def attention_relevance_ref(
    query, key, value, out, lse, scale, grad_out=None, rel_out=None, key_mask=None, mask_add=False, map_mode=None,
    rollout=None, normalize_rows=False, want_map=False, inputs=True, mask_add_normalized=True, causal=False,
    window=None,
) -> dict[str, torch.Tensor]:
    """Reference of ``attention_relevance``: materializes this block's ``A`` one chunk of query rows at a time
    (``query_chunks``: memory O(N) per block) as ``exp(S − lse)`` from the forward's ``lse``, and drops it on return.
    The gradient of softmax attention written out (``∇A = dO Vᵀ``, ``dS = A ⊙ (∇A − δ)`` with ``δ = rowsum(∇A ⊙ A) =
    rowsum(dO ⊙ O)``: tests/test_attention_triton.py checks it against autograd; a float64 reference needs the float64
    forward's ``O`` and ``lse``), the relevance by the rules above; each intermediate
    is freed once used. Shared key/value heads (GQA) are repeated for the products and their gradients and relevance
    summed back per head. Row outputs are stacked over the chunks, key outputs summed; BERT's mask add scales
    ``R_Q``, ``R_K`` by its per-sample factor once every chunk's sums are in (the factor is linear in them)."""
    b, h, nq, d = query.shape
    hk, nk = key.shape[1], key.shape[2]
    _check_causal(causal, nq, nk)
    rows_of: dict[str, list] = {}
    keys_of: dict[str, torch.Tensor] = {}
    totals = None
    for q0, q1, k0, k1 in query_chunks(b, h, nq, nk, causal, window):
        part = _relevance_rows(
            query[:, :, q0:q1], key[:, :, k0:k1], value[:, :, k0:k1], out[:, :, q0:q1], lse[:, :, q0:q1], scale,
            None if grad_out is None else grad_out[:, :, q0:q1], None if rel_out is None else rel_out[:, :, q0:q1],
            None if key_mask is None else key_mask[:, k0:k1], mask_add, map_mode,
            None if rollout is None else rollout[:, q0:q1], normalize_rows, inputs, mask_add_normalized, causal,
            window, q0, k0, hk)
        for name in ("grad_query", "rel_query", "rollout_rows"):
            if name in part:
                rows_of.setdefault(name, []).append(part[name])
        for name, dim in (("grad_key", 2), ("grad_value", 2), ("rel_key", 2), ("rel_value", 2),
                          ("rollout_product", 1)):
            if name in part:
                if name not in keys_of:
                    shape = list(part[name].shape)
                    shape[dim] = nk
                    keys_of[name] = part[name].new_zeros(shape)
                keys_of[name].narrow(dim, k0, k1 - k0).add_(part[name])
        if want_map and "map" in part:
            if "map" not in keys_of:
                keys_of["map"] = part["map"].new_zeros(b, nq, nk)
            keys_of["map"][:, q0:q1, k0:k1] = part["map"]
        if "mask_sums" in part:
            totals = part["mask_sums"] if totals is None else totals + part["mask_sums"]
    result = {name: torch.cat(parts, dim=2 if name != "rollout_rows" else 1) for name, parts in rows_of.items()}
    result.update(keys_of)
    if totals is not None:  # the padding-mask add's normalized split (docs/method.md §2.8 with v = 0), per sample
        factor = normalized_add_factors(totals[:, 0], torch.zeros_like(totals[:, 0]), totals[:, 1])[0]
        factor = factor.to(query.dtype)[:, None, None, None]
        result["rel_query"] = result["rel_query"] * factor
        result["rel_key"] = result["rel_key"] * factor
    return result


def _relevance_rows(query, key, value, out, lse, scale, grad_out, rel_out, key_mask, mask_add, map_mode, rollout,
                    normalize_rows, inputs, mask_add_normalized, causal, window, q_offset, k_offset, heads_kv):
    """``attention_relevance_ref`` on a chunk of query rows and the keys they can attend."""
    from transformer_lrp.ops.residual import z_add

    key, value = repeat_kv(key, query.shape[1]), repeat_kv(value, query.shape[1])
    scores = (query * scale) @ key.transpose(-1, -2)
    attend = _attended(key_mask, causal, query.shape[2], key.shape[2], scores.device, window, q_offset, k_offset)
    # A = exp(S − lse) from the forward's row log-sum-exp, as the kernels: no second softmax (a row without keys has
    # lse = EMPTY_ROW_LSE, so exp gives 0; masked entries, whatever their score, are zeroed)
    probs = (scores.to(accumulation_dtype(scores.dtype)) if scores.dtype in _HALF else scores) - lse[..., None]
    probs = probs.exp_() if attend is None else probs.exp_().masked_fill_(~attend, 0)
    attn = probs.to(query.dtype)  # half inputs: the products read A in their own dtype, as the model's forward
    result: dict[str, torch.Tensor] = {}
    grad_attn = None
    if grad_out is not None:
        grad_attn = grad_out @ value.transpose(-1, -2)
        if inputs:
            # dS = A ⊙ (∇A − δ) with δ = rowsum(∇A ⊙ A) = rowsum(dO ⊙ O) (O = A V): a [rows, d] product, not [rows, NK]
            delta = (grad_out.to(probs.dtype) * out.to(probs.dtype)).sum(dim=-1, keepdim=True)
            d_scores = torch.sub(grad_attn.to(probs.dtype), delta).mul_(probs).to(query.dtype)
            result.update(grad_query=(d_scores @ key).mul_(scale),
                          grad_key=sum_groups((d_scores.transpose(-1, -2) @ query).mul_(scale), heads_kv),
                          grad_value=sum_groups(attn.transpose(-1, -2) @ grad_out, heads_kv))
            del d_scores
    del probs
    r_attn = r_value = None
    if rel_out is not None or map_mode in ("transformer_attribution", "partial_lrp"):
        r_attn, r_value = attention_av_relevance(attn, value, out, rel_out)
    if map_mode is not None:
        acc = accumulation_dtype(query.dtype)
        if map_mode == "rollout":
            e = attn.to(acc).mean(dim=1)
        elif map_mode == "partial_lrp":
            e = r_attn.to(acc).clamp(min=0).mean(dim=1)
        else:  # (∇A ⊙ R_A)⁺ or (∇A ⊙ A)⁺, in ∇A's own memory (not needed after the map)
            other = r_attn if map_mode == "transformer_attribution" else attn
            e = grad_attn.to(acc).mul_(other.to(acc)).clamp_(min=0).mean(dim=1)
        del grad_attn
        if rollout is not None:
            rollout = rollout.to(acc)
            w = rollout / (1 + e.sum(dim=-1)) if normalize_rows else rollout
            result["rollout_rows"] = w
            result["rollout_product"] = (w.unsqueeze(1) @ e).squeeze(1)
        result["map"] = e
    del attn
    if rel_out is not None and inputs:
        r_scores = r_attn
        if mask_add:  # the z-rule share of the scores; the method's normalization is applied once per sample
            r_scores = z_add(r_attn, scores, None)[0]
            if mask_add_normalized:
                result["mask_sums"] = torch.stack([r_scores.sum(dim=(1, 2, 3)), r_attn.sum(dim=(1, 2, 3))], dim=1)
        del r_attn
        r_query, r_key = attention_qk_relevance(query, key, scores, r_scores, scale)
        result.update(rel_query=r_query, rel_key=sum_groups(r_key, heads_kv), rel_value=sum_groups(r_value, heads_kv))
    return result


@profiled
def attention_relevance(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    scale: float,
    *,
    grad_out: torch.Tensor | None = None,
    rel_out: torch.Tensor | None = None,
    key_mask: torch.Tensor | None = None,
    mask_add: bool = False,
    map_mode: str | None = None,
    rollout: torch.Tensor | None = None,
    normalize_rows: bool = False,
    want_map: bool = False,
    inputs: bool = True,
    mask_add_normalized: bool = True,
    causal: bool = False,
    window: int | None = None,
    grad_scale: tuple[float, float, float] | None = None,
    backend: str | None = "torch",
) -> dict[str, torch.Tensor]:
    r"""Backward of softmax attention carrying gradient and relevance, with the block's map reduced over heads.

    Args:
        query, key, value, out, lse: the forward's ``Q [B,H,NQ,d]`` (unscaled), ``K, V [B,H,NK,d]``, ``O`` and
            ``lse`` (``attention_forward``).
        scale: the scores' scale.
        grad_out: ``∂y/∂O``: gives ``grad_query/key/value`` (and ``∇A = dO Vᵀ`` for the map).
        rel_out: relevance of ``O``: gives ``rel_query/key/value`` (docs/method.md §2.6: G rules halved, softmax
            identity).
        key_mask: `[B, NK]` bool, True for real keys.
        mask_add: the model adds its padding mask to the scores (BERT): relevance passes that add by the
            method's normalized add (its per-sample factor scales ``rel_query`` and ``rel_key``), or by the plain
            z-rule with ``mask_add_normalized=False`` (the baselines' rules).
        map_mode: ``"transformer_attribution"``: ``E = (∇A ⊙ R_A)⁺``; ``"gae"``: ``E = (∇A ⊙ A)⁺``; ``"rollout"``:
            ``E = A`` (attention rollout, no gradient needed); ``"partial_lrp"``: ``E = (R_A)⁺`` (no gradient
            needed); ``None``: no map.
        rollout: `[B, NQ]` row vector ``v`` of the streaming rollout at this block's query rows: returns
            ``rollout_rows`` (``v``, divided by the row sums of ``I + Ē`` when ``normalize_rows``) and
            ``rollout_product`` `[B, NK]` = ``rollout_rows · Ē`` with ``Ē`` the head mean of ``E``.
        want_map: also return ``map``, the head mean ``Ē`` `[B, NQ, NK]` (never the per-head maps).
        inputs: ``False``: skip the gradients and relevance of Q, K, V (the lowest block needs only the map).
        causal, window: the forward's causal mask and sliding window (``attention_forward``).
        grad_scale: factors on ``(grad_query, grad_key, grad_value)``: a modified gradient (AttnLRP's uniform rule
            on the two products: ``(1/4, 1/4, 1/2)``; CP-LRP's attention held constant: ``(0, 0, 1)``, which leaves
            out ``grad_query``/``grad_key`` and the work only they need). Default: the true gradient.
        backend: ``"torch"`` (reference, materializes ``A``), ``"triton"``, ``"cuda"`` or ``None`` (automatic).

    Returns:
        A dict with the keys asked for above.
    """
    if map_mode not in MAP_MODES:
        raise ValueError(f"map_mode must be one of {MAP_MODES}, got {map_mode!r}")
    if map_mode in ("transformer_attribution", "gae") and grad_out is None:
        raise ValueError(f"map_mode={map_mode!r} needs grad_out (∇A = dO Vᵀ)")
    if map_mode in ("transformer_attribution", "partial_lrp") and rel_out is None:
        raise ValueError(f"map_mode={map_mode!r} needs rel_out (R_A)")
    if (rollout is not None or want_map) and map_mode is None:
        raise ValueError("rollout and want_map need a map_mode")
    kwargs = dict(grad_out=grad_out, rel_out=rel_out, key_mask=key_mask, mask_add=mask_add, map_mode=map_mode,
                  rollout=rollout, normalize_rows=normalize_rows, want_map=want_map, inputs=inputs,
                  mask_add_normalized=mask_add_normalized, causal=causal, window=window)
    chosen = "torch" if backend == "torch" else op_backend("attention_relevance", KERNELS, (query, key, value),
                                                            backend)
    lse = lse.contiguous()  # the kernels index it as [B, H, NQ]
    if chosen == "triton":
        from transformer_lrp.triton_kernels.attention_lrp import attention_bwd

        result = attention_bwd(query, key, value, out, lse, scale, **kwargs,
                               skip_query_grad=grad_scale is not None and grad_scale[0] == 0)
    elif chosen == "cuda":
        result = _relevance_cuda(query, key, value, out, lse, scale, **kwargs)
    else:
        result = attention_relevance_ref(query, key, value, out, lse, scale, **kwargs)
    return _scaled_gradients(result, grad_scale)


def _scaled_gradients(result: dict[str, torch.Tensor], grad_scale) -> dict[str, torch.Tensor]:
    """A modified gradient's factors on the three gradients; a factor 0 leaves the gradient out."""
    if grad_scale is None or "grad_value" not in result:
        return result
    for name, factor in zip(("grad_query", "grad_key", "grad_value"), grad_scale):
        if factor == 0:
            result.pop(name, None)
        elif factor != 1 and name in result:
            result[name] = result[name] * factor
    return result


_CUDA_OUTPUTS = ("grad_query", "grad_key", "grad_value", "rel_query", "rel_key", "rel_value", "rollout_rows",
                 "rollout_product", "map")


def _relevance_cuda(query, key, value, out, lse, scale, *, grad_out, rel_out, key_mask, mask_add, map_mode, rollout,
                    normalize_rows, want_map, inputs, mask_add_normalized, causal=False, window=None):
    """``torch.ops.tlrp.attention_relevance``, whose outputs are a fixed tuple (an empty tensor where not asked
    for), as the dict of the other backends."""
    outputs = torch.ops.tlrp.attention_relevance(
        query, key, value, out, lse, float(scale), grad_out, rel_out, key_mask, mask_add, MAP_MODES.index(map_mode),
        rollout, normalize_rows, want_map, inputs, mask_add_normalized, causal, int(window or 0))
    need_grad, need_rel = inputs and grad_out is not None, inputs and rel_out is not None
    rolling, mapping = rollout is not None and map_mode is not None, want_map and map_mode is not None
    asked = (need_grad,) * 3 + (need_rel,) * 3 + (rolling, rolling, mapping)
    return {name: t for name, t, wanted in zip(_CUDA_OUTPUTS, outputs, asked) if wanted}


class AttentionLRPFunction(torch.autograd.Function):
    """Softmax attention whose backward returns relevance ``(R_Q, R_K, R_V)`` for an incoming relevance of ``O``
    (LRP as a modified gradient). The forward keeps ``O`` and the row log-sum-exp, never ``A``."""

    @staticmethod
    def forward(ctx, query, key, value, scale, key_mask=None, backend=None):
        out, lse = attention_forward(query, key, value, scale, key_mask, backend=backend)
        ctx.save_for_backward(query, key, value, out, lse)
        ctx.scale, ctx.key_mask, ctx.backend = scale, key_mask, backend
        return out

    @staticmethod
    def backward(ctx, relevance):
        query, key, value, out, lse = ctx.saved_tensors
        r = attention_relevance(query, key, value, out, lse, ctx.scale, rel_out=relevance, key_mask=ctx.key_mask,
                                backend=ctx.backend)
        return r["rel_query"], r["rel_key"], r["rel_value"], None, None, None


def lrp_attention(query, key, value, scale: float, key_mask=None, backend: str | None = None) -> torch.Tensor:
    """Functional form of ``AttentionLRPFunction``: attention forward, relevance backward."""
    return AttentionLRPFunction.apply(query, key, value, scale, key_mask, backend)


def attention_weighted_map_ref(query, key, lse, scale, weights, key_mask=None, row=0, causal=False, window=None):
    """Reference of ``attention_weighted_map`` (materializes ``A`` a chunk of query rows at a time; ``lse`` is not
    read). Every key is visited: the masked zeros count in the minimum."""
    b, h, nq, _ = query.shape
    nk = key.shape[2]
    _check_causal(causal, nq, nk)
    acc = accumulation_dtype(query.dtype)
    rows = torch.as_tensor(row, device=query.device).expand(b)
    at_row = torch.zeros(b, nk, dtype=acc, device=query.device)
    lo = torch.full((b,), float("inf"), dtype=acc, device=query.device)
    hi = torch.full((b,), float("-inf"), dtype=acc, device=query.device)
    for q0, q1, _, _ in query_chunks(b, h, nq, nk, False, None):
        _, masked, attend = _masked_scores(query[:, :, q0:q1], key, scale, key_mask, causal, window, q0, 0)
        attn = _softmax(masked, attend, acc)
        e = (weights.to(acc)[:, :, None, None] * attn).mean(dim=1).clamp(min=0)
        inside = (rows >= q0) & (rows < q1)
        picked = e[torch.arange(b, device=e.device), (rows - q0).clamp(0, q1 - q0 - 1)]
        at_row = torch.where(inside[:, None], picked, at_row)
        if key_mask is None:
            lo, hi = torch.minimum(lo, e.amin(dim=(1, 2))), torch.maximum(hi, e.amax(dim=(1, 2)))
        else:
            valid = key_mask[:, q0:q1, None] & key_mask[:, None, :]
            lo = torch.minimum(lo, torch.where(valid, e, float("inf")).amin(dim=(1, 2)))
            hi = torch.maximum(hi, torch.where(valid, e, float("-inf")).amax(dim=(1, 2)))
    return at_row, lo, hi


@profiled
def attention_weighted_map(
    query: torch.Tensor,
    key: torch.Tensor,
    lse: torch.Tensor,
    scale: float,
    weights: torch.Tensor,
    key_mask: torch.Tensor | None = None,
    row: int | torch.Tensor = 0,
    backend: str | None = "torch",
    causal: bool = False,
    window: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    r"""The head-weighted attention map of attention GradCAM, ``E = (mean_h w_h A_h)⁺`` (docs/method.md §4), reduced
    without forming ``[B, H, N, N]``: one row of it and its per-sample min and max over real (query, key) pairs.

    Args:
        query, key, lse: the fused forward's ``Q [B,H,NQ,d]`` (unscaled), ``K [B,H,NK,d]`` and row log-sum-exp.
        scale: the scores' scale.
        weights: `[B, H]` per-head weights ``w_h``.
        key_mask: `[B, NK]` bool, True for real tokens (rows and columns; NQ == NK then).
        row: the query row to return (the CLS row: 0), or a `[B]` tensor of rows per sample (CLIP text: EOS).
        causal, window: the forward's causal mask and sliding window; their zeros are part of the map (only
            padding is excluded).
        backend: ``"torch"`` (reference), ``"triton"``, ``"cuda"`` or ``None``.

    Returns:
        ``(E[:, row] [B, NK], min [B], max [B])`` in float32 (float64 for float64 inputs).
    """
    chosen = "torch" if backend == "torch" else op_backend("attention_weighted_map", KERNELS, (query, key), backend)
    lse = lse.contiguous()  # the kernels index it as [B, H, NQ]
    if chosen == "triton":
        from transformer_lrp.triton_kernels.attention_lrp import attention_weighted_map as launch

        return launch(query, key, lse, scale, weights, key_mask, row, causal, window)
    if chosen == "cuda":
        rows = torch.as_tensor(row, device=query.device).to(torch.int64).expand(query.shape[0]).contiguous()
        return tuple(torch.ops.tlrp.attention_weighted_map(query, key, lse, float(scale), weights, key_mask, rows,
                                                           causal, int(window or 0)))
    return attention_weighted_map_ref(query, key, lse, scale, weights, key_mask, row, causal, window)
