"""AttnLRP and CP-LRP (docs/method.md §12) on every family, against an oracle that shares nothing with the sweep: the
stock model's own forward and autograd, with hooks that change its backward into the rule set's modified gradient
(``tests/_modified_gradient.py``). Each sample of a padded batch is checked against the oracle on that sample alone,
float64, ≤ 1e-10 relative. Also: the conservation report, the soft-capping rule, and the Triton kernels (under the
interpreter) against the reference ops."""

from __future__ import annotations

import _decoders as D
import _models as M
import _modified_gradient as O
import pytest
import torch

import transformer_lrp as tl

RULES = ("attnlrp", "cp_lrp")
VISION = {"timm_vit": M.timm_vit, "timm_deit_distilled": M.timm_deit_distilled, "timm_dinov2_like": M.timm_dinov2_like,
          "hf_vit": M.hf_vit}
TEXT = {"hf_bert": M.hf_bert, "hf_roberta": M.hf_roberta, "hf_distilbert": M.hf_distilbert}


def _relative(a, b):
    a, b = a.detach(), b.detach()
    return float((a - b).abs().max() / b.abs().max())


@pytest.mark.parametrize("rules", RULES)
@pytest.mark.parametrize("name", sorted(VISION))
def test_vision_models_equal_the_oracle(name, rules):
    model = VISION[name]()
    size = 28 if name == "timm_dinov2_like" else 32
    images = M.images(3, size)
    e = tl.explain(model, images, method=rules)
    for i in range(3):
        pixels, tokens, logit = O.vision(model, images[i : i + 1], rules, e.target[i : i + 1])
        assert _relative(e.pixel_relevance[i], pixels[0]) <= 1e-10
        assert _relative(e.relevance[i], tokens[0]) <= 1e-10
        assert abs(float(e.conservation.explained_logit[i]) - float(logit)) <= 1e-10 * abs(float(logit))


@pytest.mark.parametrize("rules", RULES)
@pytest.mark.parametrize("name", sorted(TEXT))
def test_encoder_text_models_equal_the_oracle(name, rules):
    model = TEXT[name]()
    inputs = M.text_batch(with_types=name == "hf_bert")
    e = tl.explain(model, inputs, method=rules)
    for i, n in enumerate(inputs["attention_mask"].sum(1).tolist()):
        alone = {k: v[i : i + 1, :n] for k, v in inputs.items()}
        want, _ = O.text(model, alone, rules, e.target[i : i + 1])
        assert _relative(e.relevance[i, :n], want[0]) <= 1e-10
        assert bool((e.relevance[i, n:] == 0).all())


def _decoder(kind, classifier=False):
    if classifier:
        return D.classifier(kind)
    # soft-capping is applied inline by Gemma (no module to hook): tested on its own below
    return D.causal_lm(kind, **({"final_logit_softcapping": None} if kind == "gemma3" else {}))


@pytest.mark.parametrize("rules", RULES)
@pytest.mark.parametrize("kind", D.FAMILIES)
def test_decoders_equal_the_oracle(kind, rules):
    """A left-padded batch, each prompt against the stock model on it alone (made purely float64)."""
    model = _decoder(kind)
    inputs = D.batch(padding="left")
    e = tl.explain(model, inputs, method=rules)
    n = inputs["input_ids"].shape[1]
    with D.pure_float64(model):
        for i in range(inputs["input_ids"].shape[0]):
            alone = D.sample(inputs, i)
            m = alone["input_ids"].shape[1]
            want, logit = O.text(model, alone, rules, e.target[i : i + 1], position=torch.tensor([m - 1]))
            assert _relative(e.relevance[i, n - m :], want[0]) <= 1e-10
            assert bool((e.relevance[i, : n - m] == 0).all())
            assert abs(float(e.conservation.explained_logit[i]) - float(logit)) <= 1e-10 * abs(float(logit))


@pytest.mark.parametrize("rules", RULES)
@pytest.mark.parametrize("kind", ["llama", "qwen3", "gpt2"])
def test_decoder_classifiers_equal_the_oracle(kind, rules):
    model = _decoder(kind, classifier=True)
    inputs = D.batch(padding="right")
    e = tl.explain(model, inputs, method=rules)
    with D.pure_float64(model):
        for i in range(inputs["input_ids"].shape[0]):
            alone = D.sample(inputs, i)
            m = alone["input_ids"].shape[1]
            want, _ = O.text(model, alone, rules, e.target[i : i + 1])
            assert _relative(e.relevance[i, :m], want[0]) <= 1e-10


@pytest.mark.parametrize("rules", RULES)
def test_gemma_soft_capping_takes_the_identity_rule(rules):
    """``y = c·tanh(z/c)``: its identity rule passes the gradient ``y / (z + 1e-10)``, and every rule below it is
    linear in the gradient, so the relevance with the cap is the one without it times ``y/z``, per prompt."""
    capped, plain = D.causal_lm("gemma3"), D.causal_lm("gemma3", final_logit_softcapping=None)
    inputs = D.batch(padding="left")
    a = tl.explain(capped, inputs, method=rules)
    b = tl.explain(plain, inputs, target=a.target, method=rules)
    y, z = a.conservation.explained_logit, b.conservation.explained_logit
    torch.testing.assert_close(y, 30.0 * torch.tanh(z / 30.0), rtol=1e-12, atol=0)
    torch.testing.assert_close(a.relevance, b.relevance * (y / (z + 1e-10))[:, None], rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("rules", RULES)
def test_clip_both_towers_equal_the_oracle(rules):
    import test_clip as C

    model, inputs = C.hf_clip(), C.batch()
    target = torch.tensor([2, 0, 1])
    e = tl.explain(model, inputs, target=target, method=rules)
    with torch.no_grad():
        img = model.visual_projection(model.vision_model(pixel_values=inputs["pixel_values"]).pooler_output)
        txt = model.text_projection(model.text_model(input_ids=inputs["input_ids"],
                                                     attention_mask=inputs["attention_mask"]).pooler_output)
        img, txt = img / img.norm(dim=-1, keepdim=True), txt / txt.norm(dim=-1, keepdim=True)
    for i, j in enumerate(target.tolist()):
        pixels, tokens, _ = O.vision(model, inputs["pixel_values"][i : i + 1], rules, torch.tensor([0]),
                                     explained=O.clip_pair_logits(model, "vision", txt[j : j + 1]))
        assert _relative(e.image.pixel_relevance[i], pixels[0]) <= 1e-10
        assert _relative(e.image.relevance[i], tokens[0]) <= 1e-10
        n = int(inputs["attention_mask"][j].sum())
        ids = inputs["input_ids"][j : j + 1, :n]
        emb = []
        handle = O._retained(model.text_model.embeddings.token_embedding, emb)
        try:
            with O.modified_gradient(model, rules), torch.enable_grad():
                O.clip_pair_logits(model, "text", img[i : i + 1])(model, ids).sum().backward()
        finally:
            handle.remove()
        assert _relative(e.text.relevance[i, :n], (emb[0] * emb[0].grad).sum(-1)[0]) <= 1e-10


def test_conservation_report():
    """The relevance put in is the explained logit; CP-LRP conserves it exactly on a model without biases (Mistral's
    tiny config), AttnLRP reports what its softmax rule and the biases keep."""
    model = D.causal_lm("mistral")
    inputs = D.batch(padding="left")
    for rules in RULES:
        e = tl.explain(model, inputs, method=rules)
        c = e.conservation
        torch.testing.assert_close(c.initial_relevance, c.explained_logit, rtol=0, atol=0)
        torch.testing.assert_close(c.token_total, e.relevance.double().sum(1), rtol=1e-12, atol=1e-12)
        if rules == "cp_lrp":
            torch.testing.assert_close(c.ratio, torch.ones_like(c.ratio), rtol=0, atol=1e-10)
    vit = tl.explain(M.timm_vit(), M.images(2), method="attnlrp").conservation
    assert vit.pixel_total is not None and vit.location == "the pixels"


def test_rules_change_the_explanation():
    """The rule sets are not the plain gradient × input (nor each other): the oracle's hooks matter."""
    model = D.causal_lm("llama")
    inputs = D.sample(D.batch(), 0)
    maps = {r: tl.explain(model, inputs, method=r).relevance[0] for r in RULES}
    emb = model.get_input_embeddings()(inputs["input_ids"]).detach().requires_grad_(True)
    with D.pure_float64(model):
        model(inputs_embeds=emb).logits[0, -1].max().backward()
    plain = (emb * emb.grad).sum(-1)[0].detach()
    assert _relative(maps["attnlrp"], plain) > 1e-2 and _relative(maps["cp_lrp"], plain) > 1e-2
    assert _relative(maps["attnlrp"], maps["cp_lrp"]) > 1e-2


@pytest.mark.parametrize("rules", RULES)
@pytest.mark.parametrize("case", ["timm_vit", "hf_bert", "mistral", "qwen3"])
def test_triton_kernels_equal_the_reference_ops(case, rules, monkeypatch):
    """The interpreter runs the Triton attention (scaled gradients, CP-LRP without the query-tile pass) and the
    norm-and-add kernel with the scale held constant."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    if case == "timm_vit":
        model, inputs = M.timm_vit(depth=2), M.images(2)
    elif case == "hf_bert":
        model, inputs = M.hf_bert(num_hidden_layers=2), M.text_batch((9, 5))
    else:
        model, inputs = D.causal_lm(case), D.batch((7, 4), padding="left")
    ref = tl.explain(model, inputs, method=rules, backend="torch")
    out = tl.explain(model, inputs, method=rules, backend="triton")
    torch.testing.assert_close(out.relevance, ref.relevance, rtol=1e-9, atol=1e-12)
    if ref.pixel_relevance is not None:
        torch.testing.assert_close(out.pixel_relevance, ref.pixel_relevance, rtol=1e-9, atol=1e-12)


def test_conservation_warning_for_absorbing_rules():
    """Under AttnLRP and CP-LRP the biases keep a share, so a total below the logit or of the other sign is by
    design (no warning); a total beyond the bound in magnitude is warned, pointing at §12.4."""
    import warnings

    from transformer_lrp.conservation import Conservation, ConservationWarning, warn_if_off

    model = D.causal_lm("llama")  # attention biases: the totals of some prompts come out negative
    inputs = D.batch((9, 6, 11, 5, 8), padding="left", seed=3)
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConservationWarning)
        e = tl.explain(model, inputs, method="cp_lrp")
    assert e.conservation.absorbing and bool((e.conservation.ratio < 1).any())
    one = torch.ones(2, dtype=torch.float64)
    big = Conservation(one, one, torch.tensor([0.5, -500.0], dtype=torch.float64), absorbing=True)
    assert big.off().tolist() == [False, True]
    with pytest.warns(ConservationWarning, match=r"§12\.4"):
        warn_if_off(big, "attnlrp")
    strict = Conservation(one, one, torch.tensor([0.5, -0.5], dtype=torch.float64))
    assert strict.off().tolist() == [False, True] and strict.reference.endswith("§10")
