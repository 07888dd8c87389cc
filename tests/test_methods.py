"""Each method against oracles built from the stock model's own attention and gradients (docs/method.md §3–5)."""

import _autograd_engine as engine
import _models as M
import pytest
import torch
from _oracle import gae_row, model_attention_and_grads, product_row, rollout_row

import transformer_lrp as tl
from transformer_lrp import sweep
from transformer_lrp.ops import attention as attention_op

TOL = dict(rtol=1e-9, atol=1e-12)


@pytest.fixture(scope="module")
def vit_case():
    model = M.timm_vit()
    x = M.images(4)
    target = torch.tensor([0, 3, 6, 2])
    attn, grads, logits, _ = model_attention_and_grads(model, x, target)
    return model, x, target, attn, grads, logits


@pytest.fixture(scope="module")
def bert_case():
    model = M.hf_bert()
    inputs = M.text_batch((11,), with_types=True)  # unpadded: the oracle's own mask handling is not at issue
    target = torch.tensor([1])
    attn, grads, logits, _ = model_attention_and_grads(model, inputs, target)
    return model, inputs, target, attn, grads, logits


def test_attention_gradients_equal_the_models_own(vit_case):
    model, x, target, attn, grads, _ = vit_case
    enc = tl.build_encoder(model)
    trace = engine.forward(enc, enc.embed(x), engine.Plan(grad_from=0, attn_from=0))
    ours = engine.attention_gradients(trace, target, [0, 1, 2])
    for i in range(3):
        torch.testing.assert_close(trace.attn[i].detach(), attn[i], **TOL)
        torch.testing.assert_close(ours[i], grads[i], **TOL)


@pytest.mark.parametrize("start", [0, 1])
def test_gae_equals_spec_formula(vit_case, start):
    model, x, target, attn, grads, _ = vit_case
    out = tl.explain(model, x, target, method="gae", start_layer=start)
    torch.testing.assert_close(out.relevance, gae_row(attn[start:], grads[start:])[:, 1:], **TOL)


@pytest.mark.parametrize("start", [0, 1])
def test_rollout_equals_half_attention_plus_half_identity(vit_case, start):
    model, x, target, attn, _, _ = vit_case
    out = tl.explain(model, x, method="rollout", start_layer=start)
    # docs/method.md §11: (Ā + I)/rowsum == 0.5 Ā + 0.5 I for row-stochastic Ā
    eye = torch.eye(attn[0].shape[-1], dtype=torch.float64)
    expected = product_row([0.5 * a.mean(1) + 0.5 * eye for a in attn], start)
    torch.testing.assert_close(out.relevance, expected[:, 1:], **TOL)
    half = rollout_row([a.mean(1) for a in attn], start, normalize=True)
    torch.testing.assert_close(out.relevance, half[:, 1:], **TOL)


def test_raw_attention_is_last_block_head_mean(vit_case):
    model, x, _, attn, _, _ = vit_case
    out = tl.explain(model, x, method="raw_attention")
    torch.testing.assert_close(out.relevance, attn[-1].mean(1)[:, 0, 1:], **TOL)


def test_attention_gradcam_vision_definition(vit_case):
    model, x, target, attn, grads, _ = vit_case
    out = tl.explain(model, x, target, method="attention_gradcam")
    w = grads[-1][:, :, 0, 1:].mean(-1, keepdim=True)
    cam = (w * attn[-1][:, :, 0, 1:]).mean(1).clamp(min=0)
    lo, hi = cam.amin(1, keepdim=True), cam.amax(1, keepdim=True)
    informative = (hi > lo).squeeze(1)  # the original divides 0/0 on a constant map; we return zeros there
    assert informative.any()
    torch.testing.assert_close(out.relevance[informative], ((cam - lo) / (hi - lo))[informative], **TOL)
    assert torch.equal(out.relevance[~informative], torch.zeros_like(out.relevance[~informative]))


def _collect_attention_relevance(model, x, target, rules, stop):
    enc = tl.build_encoder(model)
    emb = enc.embed(x)
    trace = engine.forward(enc, emb, engine.Plan(cache_from=0))
    onehot = torch.nn.functional.one_hot(target, enc.num_classes).to(x.dtype if torch.is_tensor(x) else torch.float64)
    maps = {}
    engine.relevance_sweep(enc, trace, onehot, rules, stop, lambda i, r: maps.__setitem__(i, r))
    return maps


@pytest.mark.parametrize("start,normalize", [(0, False), (1, False), (2, False), (0, True)])
def test_transformer_attribution_equals_explicit_product(vit_case, start, normalize):
    model, x, target, _, grads, _ = vit_case
    r_attn = _collect_attention_relevance(model, x, target, "method", 0)
    maps = [(grads[i] * r_attn[i]).clamp(min=0).mean(1) for i in range(3)]
    out = tl.explain(model, x, target, start_layer=start, normalize_rows=normalize)
    torch.testing.assert_close(out.relevance, rollout_row(maps, start, normalize)[:, 1:], **TOL)


def test_transformer_attribution_with_attention_instead_of_relevance_is_gae(vit_case, monkeypatch):
    # Issue oracle: GAE ≡ transformer attribution with R_A replaced by A (docs/method.md §5).
    model, x, target, _, _, _ = vit_case
    gae = tl.explain(model, x, target, method="gae")

    def attention_itself(attn, value, out, relevance):
        return attn, torch.zeros_like(value)

    monkeypatch.setattr(attention_op, "attention_av_relevance", attention_itself)
    swapped = tl.explain(model, x, target, method="transformer_attribution")
    torch.testing.assert_close(swapped.relevance, gae.relevance, **TOL)


def test_partial_lrp_is_last_block_baseline_relevance(vit_case):
    model, x, target, _, _, _ = vit_case
    r_attn = _collect_attention_relevance(model, x, target, "baseline", 2)
    out = tl.explain(model, x, target, method="partial_lrp")
    torch.testing.assert_close(out.relevance, r_attn[2].clamp(min=0).mean(1)[:, 0, 1:], **TOL)


def test_full_lrp_vision_reaches_pixels(vit_case):
    model, x, target, _, _, _ = vit_case
    out = tl.explain(model, x, target, method="full_lrp")
    assert out.pixel_relevance.shape == (4, 32, 32)
    assert out.relevance.shape == (4, 16)
    # the z^B rule conserves: each patch's pixels carry that patch token's relevance
    per_patch = out.pixel_relevance.reshape(4, 4, 8, 4, 8).sum((2, 4)).reshape(4, 16)
    torch.testing.assert_close(per_patch, out.relevance, rtol=1e-6, atol=1e-9)
    assert out.image_maps().shape == (4, 32, 32)


def test_bert_settings_of_the_original(bert_case):
    # docs/method.md §3.1: BERT generator row-normalizes, defaults to start_layer = L-1, and overwrites the CLS
    # self-entry with the row minimum.
    model, inputs, target, _, grads, _ = bert_case
    enc = tl.build_encoder(model)
    emb = enc.embed(inputs)
    trace = engine.forward(enc, emb, engine.Plan(cache_from=0))
    maps = {}
    onehot = torch.nn.functional.one_hot(target, 3).double()
    engine.relevance_sweep(enc, trace, onehot, "method", 0, lambda i, r: maps.__setitem__(i, r))
    ebar = [(grads[i] * maps[i]).clamp(min=0).mean(1) for i in range(3)]
    for start in (0, 2):
        row = rollout_row(ebar, start, normalize=True)
        row[:, 0] = row.min(dim=1).values
        out = tl.explain(model, inputs, target, start_layer=start, normalize_rows=True, cls_relevance="min")
        torch.testing.assert_close(out.relevance, row, **TOL)
    last = tl.explain(model, inputs, target, start_layer=-1, normalize_rows=True, cls_relevance="min")
    torch.testing.assert_close(last.relevance, out.relevance, **TOL)


def test_bert_baselines(bert_case):
    model, inputs, target, attn, grads, _ = bert_case
    raw = tl.explain(model, inputs, method="raw_attention", cls_relevance="zero").relevance
    expected = attn[-1].mean(1)[:, 0].clone()
    expected[:, 0] = 0
    torch.testing.assert_close(raw, expected, **TOL)
    roll = tl.explain(model, inputs, method="rollout", cls_relevance="zero").relevance
    expected = rollout_row([a.mean(1) for a in attn], 0, True)
    expected[:, 0] = 0
    torch.testing.assert_close(roll, expected, **TOL)
    cam = tl.explain(model, inputs, target, method="attention_gradcam", cls_relevance="zero").relevance
    w = grads[-1].mean((-1, -2), keepdim=True)
    full = (w * attn[-1]).mean(1).clamp(min=0)
    lo, hi = full.amin((1, 2), keepdim=True), full.amax((1, 2), keepdim=True)
    full = (full - lo) / (hi - lo)
    expected = full[:, 0].clone()
    expected[:, 0] = 0
    torch.testing.assert_close(cam, expected, **TOL)
    gae = tl.explain(model, inputs, target, method="gae").relevance
    torch.testing.assert_close(gae, gae_row(attn, grads), **TOL)


def test_target_none_explains_the_argmax(vit_case):
    model, x, _, _, _, logits = vit_case
    out = tl.explain(model, x)
    assert torch.equal(out.target, logits.argmax(-1))
    same = tl.explain(model, x, out.target)
    torch.testing.assert_close(same.relevance, out.relevance, rtol=0, atol=0)
    one = tl.explain(model, x, 2)
    assert torch.equal(one.target, torch.full((4,), 2))


@pytest.mark.parametrize("family", ["timm_vit", "deit_distilled", "bert_padded"])
@pytest.mark.parametrize("method", tl.METHODS)
def test_pooled_top_block_is_exact(family, method, monkeypatch):
    # The sweep computes the last block for the pooled tokens only; forcing every row must change nothing.
    model, inputs = {
        "timm_vit": lambda: (M.timm_vit(), M.images(2)),
        "deit_distilled": lambda: (M.timm_deit_distilled(), M.images(2)),
        "bert_padded": lambda: (M.hf_bert(), M.text_batch((9, 6))),
    }[family]()
    fast = tl.explain(model, inputs, method=method)
    real_forward = sweep.forward

    def all_rows(enc, emb, keep_from, pooled, backend, keep=None):
        return real_forward(enc, emb, keep_from, False, backend, keep)

    monkeypatch.setattr(sweep, "forward", all_rows)
    full = tl.explain(model, inputs, method=method)
    torch.testing.assert_close(fast.relevance, full.relevance, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(fast.logits, full.logits, rtol=1e-12, atol=1e-12)
