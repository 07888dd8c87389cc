"""Acceptance test: parity with the original code (hila-chefer/Transformer-Explainability, c3e578f).

``fixtures/original_outputs.pt`` holds the original's outputs (float64, one sample at a time, as it requires) on
small random models, with the models' weights and inputs; it was produced by running the original beside this
repository (its code is not part of it). Here the same samples are explained in one batch, with per-sample targets
and, for text, right padding, using the arguments that reproduce the original settings.
"""

from pathlib import Path

import pytest
import torch

import transformer_lrp as tl

FIXTURE = torch.load(Path(__file__).parent / "fixtures" / "original_outputs.pt", weights_only=False)
RTOL = 1e-9  # relative to each map's largest entry


def assert_matches(ours: torch.Tensor, theirs: torch.Tensor):
    scale = theirs.abs().max().clamp(min=1e-300)
    err = ((ours - theirs).abs().max() / scale).item()
    assert err <= RTOL, f"max relative error {err:.3e}"


@pytest.fixture(scope="module")
def vit():
    from timm.models.vision_transformer import VisionTransformer

    f = FIXTURE["vit"]
    model = VisionTransformer(**f["config"]).double().eval()
    model.load_state_dict(f["state_dict"])
    return model, f


@pytest.fixture(scope="module")
def bert():
    from transformers import BertConfig, BertForSequenceClassification

    f = FIXTURE["bert"]
    kwargs = dict(f["config"])
    kwargs.pop("attn_implementation", None)
    model = BertForSequenceClassification(BertConfig(**kwargs)).double().eval()
    missing, unexpected = model.load_state_dict(f["state_dict"], strict=False)
    assert not [k for k in missing if not k.endswith("position_ids")] and not unexpected
    ids = f["input_ids"]
    batch = torch.zeros(len(ids), max(len(i) for i in ids), dtype=torch.long)
    mask = torch.zeros_like(batch)
    for row, i in enumerate(ids):
        batch[row, : len(i)] = i
        mask[row, : len(i)] = 1
    return model, f, {"input_ids": batch, "attention_mask": mask}


VIT_CASES = [
    ("transformer_attribution", dict(start_layer=0), "transformer_attribution/start0"),
    ("transformer_attribution", dict(start_layer=1), "transformer_attribution/start1"),
    ("partial_lrp", {}, "partial_lrp"),
    ("attention_gradcam", {}, "attention_gradcam"),
    ("full_lrp", {}, "full_lrp"),
]


@pytest.mark.parametrize("which", ["pred", "other"])
@pytest.mark.parametrize("method,kwargs,key", VIT_CASES, ids=[c[2] for c in VIT_CASES])
def test_vit_class_specific(vit, method, kwargs, key, which):
    model, f = vit
    out = tl.explain(model, f["images"], f["targets"][which], method=method, **kwargs)
    ours = out.pixel_relevance if method == "full_lrp" else out.relevance
    assert_matches(ours, f["outputs"][f"{key}/{which}"])


@pytest.mark.parametrize("method,kwargs,key", [
    ("raw_attention", {}, "raw_attention"),
    ("rollout", dict(start_layer=0), "rollout/start0"),
    ("rollout", dict(start_layer=1), "rollout/start1"),
])
def test_vit_class_agnostic(vit, method, kwargs, key):
    model, f = vit
    assert_matches(tl.explain(model, f["images"], method=method, **kwargs).relevance, f["outputs"][key])


BERT_CASES = [
    ("transformer_attribution", dict(start_layer=0, normalize_rows=True, cls_relevance="min"),
     "transformer_attribution/start0"),
    ("transformer_attribution", dict(start_layer=-1, normalize_rows=True, cls_relevance="min"),
     "transformer_attribution/start2"),
    ("partial_lrp", dict(cls_relevance="zero"), "partial_lrp"),
    ("attention_gradcam", dict(cls_relevance="zero"), "attention_gradcam"),
    ("full_lrp", dict(cls_relevance="zero"), "full_lrp"),
]


@pytest.mark.parametrize("which", ["pred", "other"])
@pytest.mark.parametrize("method,kwargs,key", BERT_CASES, ids=[c[2] for c in BERT_CASES])
def test_bert_class_specific(bert, method, kwargs, key, which):
    model, f, inputs = bert
    out = tl.explain(model, inputs, f["targets"][which], method=method, **kwargs)
    for row, theirs in enumerate(f["outputs"][f"{key}/{which}"]):
        n = len(theirs)
        assert_matches(out.relevance[row, :n], theirs)
        assert torch.equal(out.relevance[row, n:], torch.zeros_like(out.relevance[row, n:]))


@pytest.mark.parametrize("method,kwargs,key", [
    ("raw_attention", dict(cls_relevance="zero"), "raw_attention"),
    ("rollout", dict(cls_relevance="zero"), "rollout/start0"),
])
def test_bert_class_agnostic(bert, method, kwargs, key):
    model, f, inputs = bert
    out = tl.explain(model, inputs, method=method, **kwargs)
    for row, theirs in enumerate(f["outputs"][key]):
        assert_matches(out.relevance[row, : len(theirs)], theirs)
