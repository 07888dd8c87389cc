"""The attention kernels and references with what decoder LLMs add: key/value heads shared by groups of query heads
(GQA/MQA, never repeated in memory by the kernels), a causal mask over left-padded batches (whole tiles of padding or
of the future skipped), a sliding window, and head dims up to 256. Kernels against the reference (TRITON_INTERPRET=1
on a CPU), the reference against an independent dense formulation and autograd."""

import pytest
import torch
from _device import DEVICE, skip_fp64_attention_on_gpu
from _poison import nan_buffers

from transformer_lrp.ops.attention import (
    attention_forward,
    attention_relevance,
    attention_weighted_map,
    repeat_kv,
    sum_groups,
)

# (B, H, H_kv, N, d, left padding per sample, window)
CASES = [
    (2, 6, 2, 70, 16, (0, 37), None),  # GQA 3:1, the second sample's first 37 keys padding (two whole 16-key tiles)
    (2, 4, 1, 45, 8, (5, 0), 9),  # MQA, a window of 9 (shorter than a tile)
    (1, 3, 3, 33, 64, (0,), 16),  # plain heads, a window of a tile
    (2, 2, 1, 21, 256, (3, 11), None),  # Gemma's head dim
]
IDS = [f"h{h}kv{hk}-n{n}-d{d}-pad{'_'.join(map(str, pad))}-w{w}" for _, h, hk, n, d, pad, w in CASES]


def _inputs(case, dtype=torch.float64, seed=0):
    b, h, hk, n, d, pad, _ = case
    g = torch.Generator().manual_seed(seed)

    def rnd(*s):
        return torch.randn(*s, generator=g, dtype=torch.float64).to(DEVICE, dtype)

    key_mask = torch.ones(b, n, dtype=torch.bool, device=DEVICE)
    for i, p in enumerate(pad):
        key_mask[i, :p] = False  # left padding
    mask = key_mask if any(pad) else None
    return rnd(b, h, n, d), rnd(b, hk, n, d), rnd(b, hk, n, d), mask, rnd(b, h, n, d), rnd(b, h, n, d), \
        torch.rand(b, n, generator=g).to(DEVICE, dtype)


def _attend(case, key_mask):
    b, h, hk, n, d, pad, window = case
    pos = torch.arange(n, device=DEVICE)
    attend = pos[None, :] <= pos[:, None]
    if window:
        attend = attend & (pos[:, None] - pos[None, :] < window)
    attend = attend[None, None].expand(b, 1, n, n)
    if key_mask is not None:
        attend = attend & key_mask[:, None, None, :]
    return attend


def _close(out, ref, tol, name):
    assert out.shape == ref.shape and out.dtype == ref.dtype, name
    assert torch.isfinite(out).all(), f"{name}: non-finite (unwritten) entries"
    err = (out.double() - ref.double()).abs().max() / ref.double().abs().max().clamp(min=1e-30)
    assert err <= tol, f"{name}: relative error {err:.2e}"


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_reference_is_dense_attention_with_shared_heads(case):
    """The reference against a dense formulation written here: each query head reads key head h // G, the future,
    padded keys and keys beyond the window get probability 0, and a query with no key at all (a left-padded position)
    attends to nothing. Gradients by autograd through that formulation, summed over each group by autograd itself."""
    q, k, v, key_mask, d_o, _, _ = _inputs(case)
    b, h, hk, n, d, pad, window = case
    qq, kk, vv = (x.clone().requires_grad_(True) for x in (q, k, v))
    group = h // hk
    scores = (qq * 0.3) @ kk[:, torch.arange(h, device=DEVICE) // group].transpose(-1, -2)
    attend = _attend(case, key_mask)
    probs = torch.where(attend, scores, float("-inf")).softmax(-1).nan_to_num(0.0)  # no key: a zero row
    dense = probs @ vv[:, torch.arange(h, device=DEVICE) // group]
    (dense * d_o).sum().backward()
    o, lse = attention_forward(q, k, v, 0.3, key_mask, causal=True, window=window)
    torch.testing.assert_close(o, dense.detach())
    res = attention_relevance(q, k, v, o, lse, 0.3, grad_out=d_o, key_mask=key_mask, causal=True, window=window)
    for name, leaf in (("grad_query", qq), ("grad_key", kk), ("grad_value", vv)):
        torch.testing.assert_close(res[name], leaf.grad)
    if any(pad):  # the left-padded rows: no key, O = 0
        assert torch.equal(o[1, :, : pad[1]], torch.zeros_like(o[1, :, : pad[1]]))


def test_repeat_and_sum_groups_are_adjoint():
    """⟨repeat_kv(x), y⟩ = ⟨x, sum_groups(y)⟩: the relevance and gradients of a shared head are the sums over its
    query heads."""
    x, y = torch.randn(2, 3, 5, 4, dtype=torch.float64), torch.randn(2, 6, 5, 4, dtype=torch.float64)
    torch.testing.assert_close((repeat_kv(x, 6) * y).sum(), (x * sum_groups(y, 3)).sum())
    assert repeat_kv(x, 6)[:, 2].equal(x[:, 1]) and repeat_kv(x, 6)[:, 3].equal(x[:, 1])


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_forward_kernel_matches_reference(case, monkeypatch):
    skip_fp64_attention_on_gpu(torch.float64)
    q, k, v, key_mask = _inputs(case)[:4]
    window = case[-1]
    ref_o, ref_lse = attention_forward(q, k, v, 0.3, key_mask, causal=True, window=window)
    with nan_buffers(monkeypatch):
        o, lse = attention_forward(q, k, v, 0.3, key_mask, backend="triton", causal=True, window=window)
    _close(o, ref_o, 1e-12, "O")
    real = _attend(case, key_mask).any(-1).expand_as(lse)  # rows with at least one key: their lse is defined
    _close(lse[real], ref_lse[real], 1e-12, "lse")


SETTINGS = [
    dict(map_mode="transformer_attribution", normalize_rows=False, want_map=True),
    dict(map_mode="gae", normalize_rows=True, rel_out=None),
    dict(map_mode="rollout", grad_out=None, rel_out=None, normalize_rows=True),
    dict(map_mode=None, grad_out=None, rollout=None, mask_add_normalized=False),
    dict(map_mode="partial_lrp", grad_out=None, want_map=True),
]
SETTING_IDS = ["ta", "gae_norm", "rollout", "relevance_only", "partial_lrp"]


@pytest.mark.parametrize("setting", SETTINGS, ids=SETTING_IDS)
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_backward_kernels_match_reference(case, setting, monkeypatch):
    """dQ, dK, dV (K/V summed over their group in the kernel), R_Q, R_K, R_V, the rollout update and the head-mean
    map, with whole tiles skipped, against the reference in float64."""
    skip_fp64_attention_on_gpu(torch.float64)
    q, k, v, key_mask, d_o, r_o, roll = _inputs(case)
    window = case[-1]
    o, lse = attention_forward(q, k, v, 0.3, key_mask, causal=True, window=window)
    kw = dict(grad_out=d_o, rel_out=r_o, rollout=roll, key_mask=key_mask, causal=True, window=window)
    kw.update(setting)
    ref = attention_relevance(q, k, v, o, lse, 0.3, backend="torch", **kw)
    with nan_buffers(monkeypatch):
        out = attention_relevance(q, k, v, o, lse, 0.3, backend="triton", **kw)
    assert set(out) == set(ref) and ref
    for name in ref:
        _close(out[name], ref[name], 1e-11, name)
    if "grad_key" in ref:
        assert out["grad_key"].shape == k.shape  # one gradient per shared head, not per query head


def test_wide_heads_split_the_key_tile_pass(monkeypatch):
    """Heads wider than 128 carrying gradient and relevance run the key tiles twice (gradient with the map and the
    rollout, then relevance with the mask add's sums): the same outputs as the reference, every one written."""
    from transformer_lrp._target import record_launches

    skip_fp64_attention_on_gpu(torch.float64)
    case = CASES[-1]
    q, k, v, key_mask, d_o, r_o, roll = _inputs(case)
    o, lse = attention_forward(q, k, v, 0.3, key_mask, causal=True)
    kw = dict(grad_out=d_o, rel_out=r_o, rollout=roll, key_mask=key_mask, causal=True, mask_add=True,
              map_mode="transformer_attribution", want_map=True, normalize_rows=True)
    ref = attention_relevance(q, k, v, o, lse, 0.3, backend="torch", **kw)
    with nan_buffers(monkeypatch), record_launches(execute=True) as rec:
        out = attention_relevance(q, k, v, o, lse, 0.3, backend="triton", **kw)
    kv = [ln.constexprs for ln in rec.launches if ln.name == "_attn_bwd_kv_kernel"]
    assert [(c["NEED_GRAD"], c["NEED_REL"], c["MAP"] != 0) for c in kv] == [(True, False, True), (False, True, False)]
    assert set(out) == set(ref)
    for name in ref:
        _close(out[name], ref[name], 1e-11, name)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_weighted_map_kernel_matches_reference(case, monkeypatch):
    """GradCAM's head-weighted map with shared heads, the causal mask, left padding and the window: the requested
    row (the last position, what a decoder's head reads) and the min and max over real pairs, the masked zeros
    included."""
    skip_fp64_attention_on_gpu(torch.float64)
    q, k, v, key_mask = _inputs(case)[:4]
    window = case[-1]
    _, lse = attention_forward(q, k, v, 0.3, key_mask, causal=True, window=window)
    weights = torch.randn(q.shape[0], q.shape[1], dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    rows = torch.full((q.shape[0],), q.shape[2] - 1, device=DEVICE)
    ref = attention_weighted_map(q, k, lse, 0.3, weights.to(DEVICE), key_mask, rows, causal=True, window=window)
    with nan_buffers(monkeypatch):
        out = attention_weighted_map(q, k, lse, 0.3, weights.to(DEVICE), key_mask, rows, backend="triton",
                                     causal=True, window=window)
    for a, b, name in zip(out, ref, ("row", "min", "max")):
        _close(a, b, 1e-11, name)


def test_window_needs_the_causal_mask_and_heads_must_divide():
    q, k, v = _inputs(CASES[0])[:3]
    with pytest.raises(ValueError, match="sliding window"):
        attention_forward(q, k, v, 0.3, window=4)
    with pytest.raises(ValueError, match="multiple of key/value heads"):
        attention_forward(q[:, :5], k, v, 0.3, causal=True)


@pytest.mark.parametrize("setting", SETTINGS + [dict(map_mode="transformer_attribution", mask_add=True,
                                                      causal=False, window=None)],
                         ids=SETTING_IDS + ["bert_mask_add"])
@pytest.mark.parametrize("case", CASES[:2], ids=IDS[:2])
def test_the_reference_in_chunks_equals_the_whole(case, setting, monkeypatch):
    """The reference processes query rows in chunks (memory O(N) per block): with chunks of 16 rows, and the causal
    key ranges they imply, every output equals the one-chunk computation (the BERT mask add's per-sample factor
    applied once all chunks' sums are in)."""
    from transformer_lrp.ops import attention as ops_attention

    q, k, v, key_mask, d_o, r_o, roll = _inputs(case)
    if key_mask is not None:
        key_mask[:, -1] = True  # BERT-style cases need a real key in every row
    kw = dict(grad_out=d_o, rel_out=r_o, rollout=roll, key_mask=key_mask, causal=True, window=case[-1],
              want_map=True)
    kw.update(setting)
    if kw["map_mode"] is None:
        kw["want_map"] = False
    # O as the reference forms it (A V): the mask add's factor is a ratio of sums that magnifies O's rounding where
    # O crosses zero, and this test is about the chunks, not the forward
    o, lse = ops_attention.attention_forward_ref(q, k, v, 0.3, key_mask, causal=kw["causal"], window=kw["window"])
    whole = attention_relevance(q, k, v, o, lse, 0.3, **kw)
    weights = torch.randn(q.shape[0], q.shape[1], dtype=torch.float64).to(DEVICE)
    rows = torch.full((q.shape[0],), q.shape[2] - 1, device=DEVICE)
    whole_map = attention_weighted_map(q, k, lse, 0.3, weights, key_mask, rows, causal=kw["causal"],
                                       window=kw["window"])
    monkeypatch.setattr(ops_attention, "CHUNK_ELEMENTS", 1)  # 16 query rows per chunk
    assert len(list(ops_attention.query_chunks(*q.shape[:3], k.shape[2], kw["causal"], kw["window"]))) > 1
    o2, lse2 = ops_attention.attention_forward_ref(q, k, v, 0.3, key_mask, causal=kw["causal"], window=kw["window"])
    _close(o2, o, 1e-13, "O")
    chunked = attention_relevance(q, k, v, o, lse, 0.3, **kw)
    assert set(chunked) == set(whole)
    for name in whole:
        # the mask add scales R_Q, R_K by a ratio of signed sums over each sample, summed chunk by chunk here: on
        # these random inputs those sums cancel to 1/3000–1/24000 of their terms' magnitude, which that many times
        # magnifies the summation order's rounding
        tol = 1e-11 if kw.get("mask_add") and name in ("rel_query", "rel_key") else 1e-12
        _close(chunked[name], whole[name], tol, name)
    for a, b, name in zip(attention_weighted_map(q, k, lse, 0.3, weights, key_mask, rows, causal=kw["causal"],
                                                 window=kw["window"]), whole_map, ("row", "min", "max")):
        _close(a, b, 1e-13, name)


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])
@pytest.mark.parametrize("padding", ["none", "left", "right", "one_sample_all_padding"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
def test_cpu_forward_by_torch_flash_kernel_equals_the_reference(causal, padding, dtype):
    """On the CPU the torch backend's forward runs torch's flash-attention kernel (padded keys as a per-key -inf):
    O and the rows' log-sum-exp equal the chunked reference's, rows without a key included (O = 0, lse =
    EMPTY_ROW_LSE), with GQA (9 query heads on 3 key heads) and chunks of the reference shorter than the sequence."""
    from transformer_lrp.ops import attention as A

    g = torch.Generator().manual_seed(3)
    b, h, hk, n, d = 3, 9, 3, 40, 16
    q, k, v = (torch.randn(b, heads, n, d, generator=g, dtype=torch.float64).to(dtype) for heads in (h, hk, hk))
    key_mask = torch.ones(b, n, dtype=torch.bool)
    if padding == "left":
        key_mask[1, :13], key_mask[2, :39] = False, False
    elif padding == "right":
        key_mask[0, 30:], key_mask[2, 1:] = False, False
    elif padding == "one_sample_all_padding":
        key_mask[1] = False
    key_mask = None if padding == "none" else key_mask
    assert A._attention_forward_sdpa(q, k, v, 0.3, key_mask, causal, None) is not None  # the path under test runs
    o, lse = attention_forward(q, k, v, 0.3, key_mask, causal=causal)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(A, "CHUNK_ELEMENTS", b * h * n * 7)  # 7 query rows per chunk
        ref_o, ref_lse = A.attention_forward_ref(q, k, v, 0.3, key_mask, causal)
    tol = 1e-13 if dtype == torch.float64 else 2e-6
    assert lse.dtype == ref_lse.dtype
    torch.testing.assert_close(o, ref_o, rtol=tol, atol=tol)
    torch.testing.assert_close(lse, ref_lse, rtol=tol, atol=tol)
    # rows without a key: left padding's first rows (causal), and every row of an all-padding sample
    has_empty_rows = padding == "one_sample_all_padding" or (causal and padding == "left")
    assert bool((ref_lse == A.EMPTY_ROW_LSE).any()) == has_empty_rows
    # a sliding window and half inputs stay on the reference
    assert A._attention_forward_sdpa(q, k, v, 0.3, key_mask, True, 4) is None
    assert A._attention_forward_sdpa(q.half(), k.half(), v.half(), 0.3, key_mask, causal, None) is None
