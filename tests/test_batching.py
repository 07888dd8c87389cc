"""Batches: per-sample targets, padding, batch invariance, and float32 against float64."""

import _models as M
import pytest
import torch

import transformer_lrp as tl

ALL = tl.METHODS
TOL = dict(rtol=1e-9, atol=1e-12)


def assert_same_map(a, b, rel=1e-9):
    """Equal up to ``rel`` times the map's largest entry (full LRP's baseline rules amplify rounding)."""
    err = (a - b).abs().max() / b.abs().max().clamp(min=1e-300)
    assert err <= rel, f"relative error {err:.3e}"


@pytest.mark.parametrize("method", ALL)
def test_vision_sample_in_batch_equals_sample_alone(method):
    model, x = M.timm_vit(), M.images(4)
    target = torch.tensor([1, 5, 0, 3])
    batch = tl.explain(model, x, target, method=method)
    for i in range(4):
        alone = tl.explain(model, x[i : i + 1], int(target[i]), method=method)
        assert_same_map(batch.relevance[i], alone.relevance[0])
        if batch.pixel_relevance is not None:
            assert_same_map(batch.pixel_relevance[i], alone.pixel_relevance[0])


@pytest.mark.parametrize("method", ALL)
@pytest.mark.parametrize("family", ["bert", "distilbert", "roberta"])
def test_padded_sample_equals_sample_alone(method, family):
    model = {"bert": M.hf_bert, "distilbert": M.hf_distilbert, "roberta": M.hf_roberta}[family]()
    lengths = (12, 7, 10)
    inputs = M.text_batch(lengths, with_types=family == "bert")
    if family == "roberta":  # RoBERTa pads with id 1
        inputs["input_ids"] = inputs["input_ids"].masked_fill(inputs["attention_mask"] == 0, 1)
    target = torch.tensor([2, 0, 1])
    kwargs = dict(cls_relevance="min", normalize_rows=True) if method == "transformer_attribution" else {}
    batch = tl.explain(model, inputs, target, method=method, **kwargs)
    for i, n in enumerate(lengths):
        single = {k: v[i : i + 1, :n] for k, v in inputs.items()}
        alone = tl.explain(model, single, int(target[i]), method=method, **kwargs)
        torch.testing.assert_close(batch.logits[i], alone.logits[0], **TOL)
        assert_same_map(batch.relevance[i, :n], alone.relevance[0])
        assert torch.equal(batch.relevance[i, n:], torch.zeros(len(inputs["input_ids"][0]) - n, dtype=torch.float64))


@pytest.mark.parametrize("method", ["transformer_attribution", "gae", "full_lrp", "attention_gradcam"])
def test_float32_agrees_with_float64(method):
    m64, x64 = M.timm_vit(), M.images(3)
    m32, x32 = M.timm_vit(torch.float32), x64.float()
    target = torch.tensor([0, 1, 2])
    r64 = tl.explain(m64, x64, target, method=method)
    r32 = tl.explain(m32, x32, target, method=method)
    a64 = (r64.pixel_relevance if method == "full_lrp" else r64.relevance).flatten(1)
    a32 = (r32.pixel_relevance if method == "full_lrp" else r32.relevance).double().flatten(1)
    assert r32.relevance.dtype == torch.float32
    # The baselines' rules (full LRP) do not conserve and amplify rounding: a looser bound there.
    rel = 5e-3 if method == "full_lrp" else 1e-3
    assert ((a32 - a64).abs().amax(dim=-1) <= rel * a64.abs().amax(dim=-1)).all()


def test_text_float32_agrees_with_float64():
    inputs = M.text_batch(with_types=True)
    r64 = tl.explain(M.hf_bert(), inputs, 1)
    r32 = tl.explain(M.hf_bert(torch.float32), inputs, 1)
    err = (r32.relevance.double() - r64.relevance).abs().amax(-1) / r64.relevance.abs().amax(-1)
    assert (err < 1e-3).all()
