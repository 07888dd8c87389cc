"""The package's methods registered with inseq (transformer_lrp.inseq_attribution): inseq lists them, its generation
loop returns explain_generation's numbers step by step, explain's options reach the method, and a step function other
than the logit is refused."""

import pytest
import torch

import transformer_lrp as tl

inseq = pytest.importorskip("inseq")
import transformer_lrp.inseq_attribution as tlrp_inseq  # noqa: E402


def test_every_method_is_registered():
    names = set(inseq.list_feature_attribution_methods())
    assert {"tlrp_" + m for m in tl.METHODS} <= names
    assert set(tlrp_inseq.REGISTERED) == {"tlrp_" + m for m in tl.METHODS}
    assert "saliency" in names  # inseq's own methods are still there


@pytest.mark.parametrize("method", ["transformer_attribution", "gae", "rollout"])
def test_inseq_steps_equal_explain_generation(llm_and_tokenizer, method):
    """inseq's target attributions of a greedy generation: column j over the prompt and the j tokens generated before
    it equals explain_generation's row j for the same answer."""
    model, tok = llm_and_tokenizer
    prompt = "The capital of France is"
    wrapped = inseq.load_model(model, "tlrp_" + method, tokenizer=tok)
    out = wrapped.attribute(prompt, generation_args={"max_new_tokens": 3, "do_sample": False}, show_progress=False)
    seq = out.sequence_attributions[0]
    ids = tok(prompt, return_tensors="pt")
    n = ids["input_ids"].shape[1]
    answer = [t.id for t in seq.target][n:]
    assert [t.id for t in seq.target][:n] == ids["input_ids"][0].tolist() and len(answer) == 3
    gen = tl.explain_generation(model, ids, answer=[answer], method=method)
    for j in range(3):
        torch.testing.assert_close(seq.target_attributions[: n + j, j].double(), gen.matrix(0)[j, : n + j],
                                   rtol=1e-5, atol=1e-7)  # inseq stores float32


def test_options_reach_explain_and_other_step_functions_are_refused(llm_and_tokenizer):
    model, tok = llm_and_tokenizer
    prompt = "Once upon a time"
    wrapped = inseq.load_model(model, "tlrp_gae", tokenizer=tok, start_layer=-1)
    out = wrapped.attribute(prompt, generation_args={"max_new_tokens": 1, "do_sample": False}, show_progress=False)
    seq = out.sequence_attributions[0]
    ids = tok(prompt, return_tensors="pt")
    n = ids["input_ids"].shape[1]
    exp = tl.explain(model, ids, seq.target[n].id, method="gae", start_layer=-1)
    torch.testing.assert_close(seq.target_attributions[:n, 0].double(), exp.relevance[0], rtol=1e-5, atol=1e-7)
    with pytest.raises(tl.InputError, match="logit"):
        wrapped.attribute(prompt, generation_args={"max_new_tokens": 1}, attributed_fn="probability",
                          show_progress=False)
    with pytest.raises(tl.InputError, match="unknown options"):
        inseq.load_model(model, "tlrp_gae", tokenizer=tok, cls_relevance="zero")
