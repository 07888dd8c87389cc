"""The Captum attribution class: the numbers of explain() for every method, Captum's target and shape conventions,
the convergence delta, and Captum's own utilities taking its output."""

import _models as M
import pytest
import torch

import transformer_lrp as tl

captum = pytest.importorskip("captum")
from captum.attr import Attribution  # noqa: E402

from transformer_lrp.captum import TransformerAttribution  # noqa: E402


@pytest.fixture(scope="module")
def vit():
    return M.timm_vit()


@pytest.fixture(scope="module")
def bert():
    return M.hf_bert()


@pytest.mark.parametrize("method", tl.METHODS)
def test_vision_equals_explain(vit, method):
    x = M.images(3)
    attr = TransformerAttribution(vit, method=method)
    assert isinstance(attr, Attribution) and attr.has_convergence_delta()
    exp = tl.explain(vit, x, [1, 2, 0], method=method)
    out = attr.attribute(x, target=[1, 2, 0])
    torch.testing.assert_close(out, exp.maps(), rtol=0, atol=0)
    pixels = attr.attribute(x, target=torch.tensor([1, 2, 0]), pixels=True)
    assert pixels.shape == x.shape  # Captum's convention: the inputs' shape
    torch.testing.assert_close(pixels[:, 1], exp.image_maps(normalize=False), rtol=0, atol=0)


@pytest.mark.parametrize("method", tl.METHODS)
def test_text_equals_explain(bert, method):
    batch = M.text_batch((9, 5))
    exp = tl.explain(bert, batch, 1, method=method)
    attr = TransformerAttribution(bert)
    out = attr.attribute(batch["input_ids"], target=1, additional_forward_args=(batch["attention_mask"],),
                         method=method)
    torch.testing.assert_close(out, exp.relevance, rtol=0, atol=0)
    assert out.shape == batch["input_ids"].shape
    torch.testing.assert_close(attr.attribute(batch, target=1, method=method), exp.relevance, rtol=0, atol=0)


def test_targets_follow_captum_conventions(vit):
    x = M.images(2)
    attr = TransformerAttribution(vit, method="gae")
    ref = tl.explain(vit, x, [3, 3], method="gae").maps()
    import numpy as np

    for target in (3, [3, 3], torch.tensor([3, 3]), torch.tensor(3), np.int64(3), np.array([3, 3])):
        torch.testing.assert_close(attr.attribute(x, target=target), ref, rtol=0, atol=0)
    argmax = tl.explain(vit, x, method="gae")
    torch.testing.assert_close(attr.attribute(x), argmax.maps(), rtol=0, atol=0)
    kwargs = TransformerAttribution(vit, start_layer=1).attribute(x, target=3)
    torch.testing.assert_close(kwargs, tl.explain(vit, x, 3, start_layer=1).maps(), rtol=0, atol=0)


def test_convergence_delta(vit):
    x = M.images(2)
    attr = TransformerAttribution(vit, method="full_lrp")
    out, delta = attr.attribute(x, target=1, pixels=True, return_convergence_delta=True)
    exp = tl.explain(vit, x, 1, method="full_lrp")
    torch.testing.assert_close(delta, 1 - exp.pixel_relevance.sum((1, 2)))
    patches, delta_tokens = attr.attribute(x, target=1, return_convergence_delta=True)
    torch.testing.assert_close(delta_tokens, 1 - exp.relevance.sum(1))
    with pytest.raises(tl.InputError, match="defined for full_lrp"):
        TransformerAttribution(vit).attribute(x, return_convergence_delta=True)


@pytest.mark.parametrize("method", ["attnlrp", "cp_lrp"])
def test_convergence_delta_of_the_modified_gradients(vit, bert, method):
    """AttnLRP and CP-LRP put in the logit itself: delta = logit − Σ attributions (pixels and tokens)."""
    x = M.images(2)
    attr = TransformerAttribution(vit, method=method)
    exp = tl.explain(vit, x, 1, method=method)
    _, delta = attr.attribute(x, target=1, pixels=True, return_convergence_delta=True)
    torch.testing.assert_close(delta, exp.logits[:, 1] - exp.pixel_relevance.sum((1, 2)))
    batch = M.text_batch((9, 5))
    _, delta = TransformerAttribution(bert, method=method).attribute(batch, target=1, return_convergence_delta=True)
    text = tl.explain(bert, batch, 1, method=method)
    torch.testing.assert_close(delta, text.logits[:, 1] - text.relevance.sum(1))
    with pytest.raises(tl.InputError, match="give initial_relevance"):
        attr.compute_convergence_delta(exp.pixel_relevance, method=method)


def test_captum_utilities_take_the_output(vit):
    import matplotlib

    matplotlib.use("Agg")
    from captum.attr import visualization
    from captum.metrics import infidelity

    x = M.images(2)
    attr = TransformerAttribution(vit)
    pixels = attr.attribute(x, target=0, pixels=True)
    fig, _ = visualization.visualize_image_attr(pixels[0].permute(1, 2, 0).numpy(), method="heat_map",
                                               sign="absolute_value", use_pyplot=False)
    assert fig is not None

    def perturb(inputs):
        noise = torch.randn(inputs.shape, generator=torch.Generator().manual_seed(0), dtype=inputs.dtype) * 0.01
        return noise, inputs - noise

    score = infidelity(vit, perturb, x, pixels, target=0, n_perturb_samples=2)
    assert score.shape == (2,) and torch.isfinite(score).all()


def test_bad_inputs(vit, bert):
    attr = TransformerAttribution(vit)
    with pytest.raises(tl.InputError, match="additional_forward_args go with input_ids"):
        attr.attribute(M.images(1), additional_forward_args=(torch.ones(1),))
    with pytest.raises(tl.InputError, match="one tensor"):
        attr.attribute((M.images(1), M.images(1)))
    ids = M.text_batch((5,))["input_ids"]
    with pytest.raises(tl.InputError, match="at most"):
        TransformerAttribution(bert).attribute(ids, additional_forward_args=(None, None, None))


# ---------------------------------------------------------------------------------------------- language models


@pytest.mark.parametrize("method", ["transformer_attribution", "gae", "full_lrp"])
def test_llm_result_equals_explain_generation(llm_and_tokenizer, method):
    """Captum's LLMAttributionResult: token_attr is explain_generation's matrix over the prompt's tokens, seq_attr
    its column sums, the tokens decoded one by one, and output_probs each answer token's probability by the stock
    model run on prompt + the answer before it."""
    from transformer_lrp.captum import LLMTransformerAttribution

    model, tok = llm_and_tokenizer
    prompt = "The capital of France is"
    result = LLMTransformerAttribution(model, tok).attribute(prompt, max_new_tokens=4, method=method)
    assert isinstance(result, captum.attr.LLMAttributionResult)
    ids = tok(prompt, return_tensors="pt")
    gen = tl.explain_generation(model, ids, max_new_tokens=4, method=method)
    n = ids["input_ids"].shape[1]
    torch.testing.assert_close(result.token_attr, gen.matrix(0)[:, :n], rtol=0, atol=0)
    torch.testing.assert_close(result.seq_attr, gen.matrix(0)[:, :n].sum(0), rtol=0, atol=0)
    answer = gen.answer_ids[0][gen.answer_mask[0]].tolist()
    assert result.input_tokens == [tok.decode([t]) for t in ids["input_ids"][0].tolist()]
    assert result.output_tokens == [tok.decode([t]) for t in answer]
    with torch.no_grad():
        for j, token in enumerate(answer):
            context = torch.tensor([ids["input_ids"][0].tolist() + answer[:j]])
            p = model(input_ids=context).logits[0, -1].softmax(-1)[token]
            assert result.output_probs[j].item() == pytest.approx(p.item(), rel=1e-5)


def test_llm_result_for_a_given_answer_and_with_the_answer_as_input(llm_and_tokenizer):
    """A string target is tokenized without special tokens and explained as given; include_answer adds the answer's
    tokens as inputs, row j attributing nothing to answer tokens j and later (they come after it)."""
    from transformer_lrp.captum import LLMTransformerAttribution

    model, tok = llm_and_tokenizer
    attr = LLMTransformerAttribution(model, tok, method="gae")
    prompt, answer = "Name a primary colour:", " Red, or blue."
    answer_ids = tok(answer, add_special_tokens=False)["input_ids"]
    result = attr.attribute(prompt, target=answer)
    gen = tl.explain_generation(model, tok(prompt, return_tensors="pt"), answer=[answer_ids], method="gae")
    n = len(tok(prompt)["input_ids"])
    assert result.token_attr.shape == (len(answer_ids), n)
    torch.testing.assert_close(result.token_attr, gen.matrix(0)[:, :n], rtol=0, atol=0)
    torch.testing.assert_close(attr.attribute(prompt, target=answer_ids).token_attr, result.token_attr)
    full = attr.attribute(prompt, target=torch.tensor(answer_ids), include_answer=True)
    assert full.token_attr.shape == (len(answer_ids), n + len(answer_ids))
    assert len(full.input_tokens) == n + len(answer_ids)
    for j in range(len(answer_ids)):
        assert bool((full.token_attr[j, n + j:] == 0).all())
    with pytest.raises(tl.InputError, match="empty answer"):
        attr.attribute(prompt, target="")


def test_llm_result_plots(llm_and_tokenizer):
    """Captum's own plots of the result run (Agg backend); the heat map shows token_attr."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from transformer_lrp.captum import LLMTransformerAttribution

    model, tok = llm_and_tokenizer
    result = LLMTransformerAttribution(model, tok).attribute("Once upon a time", max_new_tokens=3)
    fig, ax = result.plot_token_attr()
    assert ax.images[0].get_array().shape == tuple(result.token_attr.shape)
    torch.testing.assert_close(torch.as_tensor(ax.images[0].get_array().data), result.token_attr.cpu())
    fig2, ax2 = result.plot_seq_attr()
    assert len(ax2.patches) == 2 * len(result.input_tokens)  # a positive and a negative bar per input token
    plt.close(fig)
    plt.close(fig2)
