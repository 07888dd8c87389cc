"""Decoder LLMs (Llama with GQA and Llama-3 rotary scaling, Mistral with a sliding window, Qwen2, Qwen3 with q/k-norm,
Gemma 3 with its sandwich norms and local/global layers, Phi-3 with fused projections and partial rotary, GPT-2):
the sweep's logits against the stock model's, every method against the autograd engine and against formulas on the
stock model's own attention maps and gradients, left-padding and batch invariance, conservation, contrasts and
continuations, the model untouched, and clear errors for what is not supported. float64 throughout."""

import _autograd_engine as engine
import _decoders as D
import pytest
import torch

import transformer_lrp as tl
from transformer_lrp import methods
from transformer_lrp.adapters import build_encoder
from transformer_lrp.errors import InputError, UnsupportedModelError

FAMILIES = D.FAMILIES


def _relative(a, b):
    return float((a.double() - b.double()).abs().max() / b.double().abs().max().clamp(min=1e-300))


@pytest.mark.parametrize("padding", ["left", "right"])
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("kind", FAMILIES)
def test_logits_equal_the_models(kind, attn, padding):
    """At each prompt's last real token, with positions numbered from the first real token (as generation does):
    equal to the stock model made purely float64 (its RMSNorm, rotary angles and eager softmax round to float32 even
    in float64), and within those roundings of the stock model as it is."""
    model, inputs = D.causal_lm(kind, attn=attn), D.batch(padding=padding)
    e = tl.explain(model, inputs, method="rollout")
    last = inputs["attention_mask"].shape[1] - 1 - inputs["attention_mask"].flip(1).argmax(1)
    with torch.no_grad(), D.pure_float64(model):
        ref = model(**inputs, position_ids=D.positions(inputs)).logits[torch.arange(3), last]
    assert _relative(e.logits, ref) < 1e-12
    assert torch.equal(e.position, last)
    # the stock eager float64 softmax (in float32) turns a row without any key into NaN, which spreads: left padding,
    # or right padding as long as a sliding window; compared as it is under SDPA only
    if attn == "sdpa":
        with torch.no_grad():
            stock = model(**inputs, position_ids=D.positions(inputs)).logits[torch.arange(3), last]
        assert _relative(e.logits, stock) < 1e-5


@pytest.mark.parametrize("method", [m for m in tl.METHODS if m not in methods.MODIFIED_GRADIENT])
@pytest.mark.parametrize("kind", FAMILIES)
def test_methods_equal_the_autograd_engine(kind, method):
    """The sweep against the engine (materialized attention, its gradients by autograd, relevance by hand with the
    rotary embedding's z-rule through autograd and the LM head's rule on the whole vocabulary), left-padded batch.
    AttnLRP and CP-LRP are held to the stock model's modified gradient instead (tests/test_modified_gradient.py)."""
    model, inputs = D.causal_lm(kind), D.batch()
    enc = build_encoder(model)
    emb = enc.embed(inputs)
    start = 1 if method in methods.LAYERED else 0

    def check_target(logits, t):
        return logits.argmax(-1) if t is None else t

    ref = engine.run(enc, emb, method, None, start, method == "gae", check_target)
    out = methods.run(enc, emb, method, None, start, method == "gae", check_target, "torch")
    assert torch.equal(out.target, ref.target)
    torch.testing.assert_close(out.logits, ref.logits)
    real = emb.key_mask if emb.key_mask is not None else torch.ones_like(out.row, dtype=torch.bool)
    assert _relative(out.row.masked_fill(~real, 0), ref.row.masked_fill(~real, 0)) < 1e-10


@pytest.mark.parametrize("padding", ["left", "right"])
@pytest.mark.parametrize("method", tl.METHODS)
@pytest.mark.parametrize("kind", ["llama", "gemma3", "phi3", "gpt2"])
def test_a_padded_prompt_is_explained_as_alone(kind, method, padding):
    """Positions from the attention mask: a prompt inside a left- (or right-) padded batch gets the explanation it
    gets alone; padded positions get exactly 0."""
    model, inputs = D.causal_lm(kind), D.batch(padding=padding)
    batched = tl.explain(model, inputs, method=method)
    for i in range(3):
        alone = tl.explain(model, D.sample(inputs, i), method=method)
        keep = inputs["attention_mask"][i].bool()
        assert torch.equal(batched.target[i : i + 1], alone.target)
        assert _relative(batched.relevance[i][keep], alone.relevance[0]) < 1e-10
        assert torch.all(batched.relevance[i][~keep] == 0)


@pytest.mark.parametrize("kind", FAMILIES)
def test_relevance_is_conserved(kind):
    """Transformer attribution's rules on a decoder: the total relevance is 1 after the LM head and after every block
    (α1β0 Linear, the normalized add, RMSNorm as an identity, the rotary embedding's z-rule, the gate product's
    halves)."""
    model, inputs = D.causal_lm(kind), D.batch()
    enc = build_encoder(model)
    emb = enc.embed(inputs)
    totals = {}

    def observe(where, r):
        totals[where] = r.sum(dim=(1, 2))

    methods.run(enc, emb, "transformer_attribution", None, 0, False, lambda lg, t: lg.argmax(-1), "torch", observe)
    assert set(totals) == {"head"} | {f"block{i}" for i in range(1, enc.depth)}  # the lowest block stops at its map
    for where, total in totals.items():
        torch.testing.assert_close(total, torch.ones_like(total), rtol=1e-6, atol=1e-6, msg=where)


def _stock_maps(model, inputs, target):
    """The stock model's own eager attention maps (pure float64) and the gradient of the target logit at the last
    real token with respect to each of them."""
    model.config._attn_implementation = "eager"
    with D.pure_float64(model), torch.enable_grad():
        out = model(**inputs, position_ids=D.positions(inputs), output_attentions=True)
        last = inputs["attention_mask"].shape[1] - 1 - inputs["attention_mask"].flip(1).argmax(1)
        y = out.logits[torch.arange(len(last)), last].gather(1, target[:, None]).sum()
        grads = torch.autograd.grad(y, out.attentions)
    return [a.detach() for a in out.attentions], grads, last


@pytest.mark.parametrize("kind", ["llama", "mistral", "gemma3", "gpt2"])
def test_maps_equal_formulas_on_the_stock_attention(kind):
    """GAE, rollout, raw attention and attention GradCAM against their definitions written on the stock model's own
    attention maps and gradients (causal rows, the last real token's row, padded positions 0)."""
    model, inputs = D.causal_lm(kind, attn="eager"), D.batch(padding="right")
    e = tl.explain(model, inputs, method="gae")
    attns, grads, last = _stock_maps(model, inputs, e.target)
    b, n = inputs["input_ids"].shape
    rows = torch.arange(b)

    def rollout(mats, normalize):
        v = torch.zeros(b, n, dtype=torch.float64)
        v[rows, last] = 1
        for m in reversed(mats):
            m = torch.eye(n, dtype=torch.float64) + m
            if normalize:
                m = m / m.sum(-1, keepdim=True)
            v = (v[:, None] @ m)[:, 0]
        return v

    mask = inputs["attention_mask"].bool()
    gae = rollout([(g * a).clamp(min=0).mean(1) for a, g in zip(attns, grads)], False)
    assert _relative(e.relevance, gae.masked_fill(~mask, 0)) < 1e-9
    roll = rollout([a.mean(1) for a in attns], True)
    assert _relative(tl.explain(model, inputs, method="rollout").relevance, roll.masked_fill(~mask, 0)) < 1e-9
    raw = attns[-1].mean(1)[rows, last]
    assert _relative(tl.explain(model, inputs, method="raw_attention").relevance, raw.masked_fill(~mask, 0)) < 1e-9
    valid = mask[:, :, None] & mask[:, None, :]
    w = (grads[-1] * valid[:, None]).sum((-1, -2)) / valid.sum((-1, -2))[:, None]
    cam = (w[:, :, None, None] * attns[-1]).mean(1).clamp(min=0)
    big = torch.where(valid, cam, -torch.inf).amax((-1, -2))[:, None, None]
    small = torch.where(valid, cam, torch.inf).amin((-1, -2))[:, None, None]
    cam = torch.where(big > small, (cam - small) / (big - small), 0.0)[rows, last]  # a constant map is 0
    got = tl.explain(model, inputs, method="attention_gradcam").relevance
    assert _relative(got, cam.masked_fill(~mask, 0)) < 1e-9


def test_a_continuation_is_explained_token_by_token():
    """One forward over prompt + continuation, one reverse sweep over its tokens' rows: each row equals explaining
    that token alone after the prompt and the continuation's earlier tokens."""
    model = D.causal_lm("llama")
    inputs = D.batch((6, 4), padding="left")
    cont = torch.tensor([[5, 9, 14], [7, 3, 0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    for method in ("transformer_attribution", "gae", "full_lrp", "attention_gradcam"):
        e = tl.explain(model, inputs, tl.Continuation(cont, mask), method=method)
        assert e.relevance.shape[:2] == (2, 3) and e.target[1, 2] == -1
        for i in range(2):
            prompt = D.sample(inputs, i)["input_ids"][0]
            for j in range(int(mask[i].sum())):
                ids = torch.cat([prompt, cont[i, :j]])[None]
                alone = tl.explain(model, {"input_ids": ids}, int(cont[i, j]), method=method)
                got = e.relevance[i, j][e.attention_mask[i]] if e.attention_mask is not None else e.relevance[i, j]
                assert _relative(got[: ids.shape[1]], alone.relevance[0]) < 1e-10, (method, i, j)
                assert torch.all(got[ids.shape[1]:] == 0)  # later tokens cannot matter


def test_a_contrast_is_the_difference_for_a_linear_rule_set():
    """full LRP's rules are linear in the relevance put in, so explaining token a against token b equals the
    difference of the two explanations; the gradient methods differentiate the logit difference."""
    model, inputs = D.causal_lm("qwen3"), D.batch()
    a, b = 5, 17
    both = tl.explain(model, inputs, tl.Contrast(a, b), method="full_lrp")
    one, two = (tl.explain(model, inputs, t, method="full_lrp") for t in (a, b))
    assert _relative(both.relevance, one.relevance - two.relevance) < 1e-10
    assert both.conservation is None and torch.equal(both.versus, torch.full((3,), b))
    with pytest.raises(InputError, match="must differ"):
        tl.explain(model, inputs, tl.Contrast(a, a))


@pytest.mark.parametrize("padding", ["left", "right"])
@pytest.mark.parametrize("kind", ["llama", "gemma3", "gpt2"])
def test_sequence_classifiers(kind, padding):
    """*ForSequenceClassification: the logits of the rightmost non-pad token, as the model pools, and every method."""
    model, inputs = D.classifier(kind), D.batch(padding=padding)
    with torch.no_grad():
        ref = model(**inputs, position_ids=D.positions(inputs)).logits
    for method in tl.METHODS:
        e = tl.explain(model, inputs, method=method)
        assert _relative(e.logits, ref) < 1e-5 and e.relevance.shape == inputs["input_ids"].shape


def test_the_model_is_left_untouched():
    model, inputs = D.causal_lm("gemma3"), D.batch()
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    grads = [p.requires_grad for p in model.parameters()]
    attn = model.config._attn_implementation
    for method in tl.METHODS:
        tl.explain(model, inputs, method=method)
    assert model.training and model.config._attn_implementation == attn
    assert [p.requires_grad for p in model.parameters()] == grads and all(p.grad is None for p in model.parameters())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_unsupported_variants_are_refused_with_the_reason():
    import transformers

    moe = transformers.MixtralForCausalLM(transformers.MixtralConfig(
        vocab_size=30, hidden_size=16, intermediate_size=24, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, num_local_experts=2, num_experts_per_tok=1))
    with pytest.raises(UnsupportedModelError, match="mixture of experts"):
        tl.explain(moe, {"input_ids": torch.tensor([[1, 2, 3]])})
    dynamic = D.causal_lm("llama")
    dynamic.config.rope_parameters = {"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0}
    with pytest.raises(UnsupportedModelError, match="changes its frequencies"):
        tl.explain(dynamic, D.batch())


def test_input_errors():
    model, inputs = D.causal_lm("llama"), D.batch()
    holes = {**inputs, "attention_mask": torch.tensor([[1, 0, 1] + [1] * 8] * 3)}
    cases = [
        (holes, None, "one run of real tokens"),
        ({**inputs, "position_ids": D.positions(inputs)}, None, "position_ids are derived"),
        (inputs, 10_000, "out of range"),
        (inputs, tl.Contrast(1, [1, 2]), "Contrast.versus must be an int or have shape"),
        (inputs, tl.Continuation(torch.tensor([[1, 2]])), "Continuation.tokens must be"),
        ({"input_ids": torch.zeros(1, 65, dtype=torch.long)}, None, "exceeds the model's maximum"),
    ]
    for x, target, message in cases:
        with pytest.raises(InputError, match=message):
            tl.explain(model, x, target)
    with pytest.raises(InputError, match="language models"):
        tl.explain(D.classifier("llama"), inputs, tl.Contrast(1, 2))
    nopad = D.classifier("llama")
    nopad.config.pad_token_id = None
    with pytest.raises(InputError, match="no pad_token_id"):
        tl.explain(nopad, inputs)


def test_explain_generation_matrix():
    """An answer generated greedily (equal to model.generate's) and explained token by token in one sweep: each row
    equals explaining that token after the prompt and the answer's earlier tokens, and a prompt inside a
    right-padded batch gets the matrix it gets alone."""
    model, inputs = D.causal_lm("gemma3"), D.batch((7, 4), padding="right")
    g = tl.explain_generation(model, inputs, max_new_tokens=3, method="gae", eos_token_id=2)
    assert g.relevance.shape[:2] == (2, 3) and bool(g.answer_mask.all())
    for i in range(2):
        prompt = D.sample(inputs, i)["input_ids"]
        with torch.no_grad():
            greedy = model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=3,
                                    do_sample=False, eos_token_id=2, pad_token_id=0)[0, prompt.shape[1]:]
        assert torch.equal(g.answer_ids[i], greedy)
        alone = tl.explain_generation(model, D.sample(inputs, i), answer=greedy[None], method="gae")
        assert _relative(g.matrix(i), alone.matrix(0)) < 1e-10
        for j in range(3):
            ids = torch.cat([prompt[0], greedy[:j]])[None]
            single = tl.explain(model, {"input_ids": ids}, int(greedy[j]), method="gae")
            assert _relative(g.matrix(i)[j, : ids.shape[1]], single.relevance[0]) < 1e-10
        assert int(g.prompt_mask[i].sum()) == prompt.shape[1]


def test_explain_generation_errors():
    model, inputs = D.causal_lm("llama"), D.batch()
    with pytest.raises(InputError, match="max_new_tokens must be a positive int"):
        tl.explain_generation(model, inputs, max_new_tokens=0)
    with pytest.raises(InputError, match="decoder language model"):
        tl.explain_generation(D.classifier("llama"), inputs)
    with pytest.raises(InputError, match="a prompt has no token"):
        tl.explain_generation(model, {"input_ids": torch.zeros(1, 0, dtype=torch.long)}, answer=[[1]])
