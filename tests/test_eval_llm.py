"""Next-token faithfulness on decoder LLMs (transformer_lrp.evaluation.llm): the metric on hand-built additive models
whose best and worst rankings are known, the token removal on hand-built sequences, input × gradient against finite
differences of the stock model, and the whole run on a tiny decoder."""

import itertools

import _decoders as D
import pytest
import torch

from transformer_lrp.evaluation import llm

START = 1  # the special token in front of every hand-built prompt


def _additive(weights: torch.Tensor, bias: float = 0.0, calls: list | None = None):
    """A model whose target logit is ``bias + Σ weights[id]`` over the tokens present (its probability a sigmoid of
    it): removing a token takes exactly its weight away, so the best MoRF order is by weight, descending."""

    def score(ids: torch.Tensor, mask: torch.Tensor):
        if calls is not None:
            calls.append((ids.clone(), mask.clone()))
        logit = bias + (weights[ids] * mask).sum(-1)
        return logit, torch.sigmoid(logit - 10)

    return score


def _prompt(token_ids: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded prompts, each after the START token."""
    width = 1 + max(len(t) for t in token_ids)
    ids = torch.zeros(len(token_ids), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, t in enumerate(token_ids):
        ids[i, width - len(t) - 1:] = torch.tensor([START, *t])
        mask[i, width - len(t) - 1:] = 1
    return ids, mask


def _area(curves: llm.Curves, reference: torch.Tensor) -> torch.Tensor:
    return llm.curve_area(curves.lerf_logit, reference) - llm.curve_area(curves.morf_logit, reference)


def test_area_of_a_hand_computed_case():
    """Weights 4, 3, 2, 1 (bias 0), one token per step: MoRF logits 10, 6, 3, 1, 0 and LeRF 10, 9, 7, 4, 0; divided
    by 10 and integrated by trapezoids of width 1/4: MoRF 0.375, LeRF 0.625, area 0.25."""
    weights = torch.zeros(20, dtype=torch.float64)
    weights[[5, 6, 7, 8]] = torch.tensor([4.0, 3.0, 2.0, 1.0], dtype=torch.float64)
    ids, mask = _prompt([[7, 5, 8, 6]])
    removable = llm.removable_tokens(ids, mask, [START])
    curves = llm.perturbation_curves(_additive(weights), ids, mask, weights[ids], removable, steps=4)
    assert curves.morf_logit.tolist() == [[10.0, 6.0, 3.0, 1.0, 0.0]]
    assert curves.lerf_logit.tolist() == [[10.0, 9.0, 7.0, 4.0, 0.0]]
    reference = curves.morf_logit[:, 0]
    assert llm.curve_area(curves.morf_logit, reference).item() == pytest.approx(0.375)
    assert llm.curve_area(curves.lerf_logit, reference).item() == pytest.approx(0.625)
    assert _area(curves, reference).item() == pytest.approx(0.25)


def test_perfect_ranking_is_the_maximum_reversed_the_minimum_and_rankings_average_to_zero():
    """Over every ordering of 5 tokens of an additive model: the ranking by true contribution has the largest area,
    its reverse the smallest (the negative of it), and the mean over all orderings is 0 (each ordering's reverse
    swaps MoRF and LeRF). Both curves of the perfect ranking fall monotonically (positive weights), LeRF above MoRF."""
    weights = torch.zeros(20, dtype=torch.float64)
    contributions = torch.tensor([0.5, 3.0, 1.0, 7.0, 2.0], dtype=torch.float64)
    tokens = [11, 12, 13, 14, 15]
    weights[tokens] = contributions
    ids, mask = _prompt([tokens])
    removable = llm.removable_tokens(ids, mask, [START])
    score = _additive(weights, bias=1.0)
    reference = score(ids, mask)[0]
    areas = {}
    for perm in itertools.permutations(range(5)):
        relevance = torch.zeros(ids.shape, dtype=torch.float64)
        relevance[0, 1:] = torch.tensor(perm, dtype=torch.float64)
        areas[perm] = _area(llm.perturbation_curves(score, ids, mask, relevance, removable, steps=5), reference).item()
    perfect = llm.perturbation_curves(score, ids, mask, weights[ids], removable, steps=5)
    reverse = llm.perturbation_curves(score, ids, mask, -weights[ids], removable, steps=5)
    best = _area(perfect, reference).item()
    assert best == pytest.approx(max(areas.values())) and best > 0.3
    assert _area(reverse, reference).item() == pytest.approx(min(areas.values())) == pytest.approx(-best)
    assert sum(areas.values()) / len(areas) == pytest.approx(0.0, abs=1e-12)
    for curve in (perfect.morf_logit, perfect.lerf_logit, perfect.morf_prob, perfect.lerf_prob):
        assert bool((curve[:, 1:] <= curve[:, :-1]).all())
    assert bool((perfect.lerf_logit >= perfect.morf_logit).all())


def test_random_rankings_score_near_zero():
    """Random scores (what the evaluation's random baseline draws), averaged over 200 seeds, on 4 prompts: the mean
    area is within 3 standard errors of 0, far below the perfect ranking's."""
    weights = torch.zeros(40, dtype=torch.float64)
    weights[3:33] = torch.linspace(0.1, 3.0, 30, dtype=torch.float64)
    g = torch.Generator().manual_seed(0)
    ids, mask = _prompt([torch.randint(3, 33, (n,), generator=g).tolist() for n in (12, 7, 10, 9)])
    removable = llm.removable_tokens(ids, mask, [START])
    score = _additive(weights, bias=2.0)
    reference = score(ids, mask)[0]
    rankings = torch.rand(200, *ids.shape, generator=g, dtype=torch.float64)
    areas = _area(llm.perturbation_curves(score, ids, mask, rankings, removable), reference)  # [200, 4]
    per_seed = areas.mean(dim=1)
    assert abs(per_seed.mean().item()) < 3 * per_seed.std().item() / 200**0.5
    perfect = _area(llm.perturbation_curves(score, ids, mask, weights[ids], removable), reference).mean().item()
    assert perfect > 10 * abs(per_seed.mean().item())


def test_steps_remove_the_right_counts_and_never_special_tokens():
    """Prompts of 7 and 3 removable tokens with a special token (id 2) inside too: step k of 10 hands the model
    ⌊n·k/10⌋ fewer tokens, both special tokens always there; the same with replacement (lengths unchanged)."""
    weights = torch.ones(20, dtype=torch.float64)
    ids, mask = _prompt([[5, 6, 2, 7, 8, 9, 10, 11], [12, 13, 14]])
    removable = llm.removable_tokens(ids, mask, [START, 2])
    assert removable.sum(-1).tolist() == [7, 3]
    relevance = torch.randn(ids.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    calls = []
    llm.perturbation_curves(_additive(weights, calls=calls), ids, mask, relevance, removable, steps=10)
    unperturbed, emptied, *middle = calls  # step 0, step 10, then steps 1..9 (MoRF copies, then LeRF)
    assert unperturbed[1].sum(-1).tolist() == [9, 4] and emptied[1].sum(-1).tolist() == [2, 1]
    for step, (seq, m) in enumerate(middle, start=1):
        kept = m.sum(-1).view(2, 2)
        for n, total, col in ((7, 9, 0), (3, 4, 1)):
            assert kept[:, col].tolist() == [total - n * step // 10] * 2
        real = seq[m.bool()]
        assert int((real == START).sum()) == 4 and int((real == 2).sum()) == 2
    calls.clear()
    llm.perturbation_curves(_additive(weights, calls=calls), ids, mask, relevance, removable, steps=10,
                            removal="replace", replacement_id=19)
    for step, (seq, m) in enumerate(calls[2:], start=1):
        assert seq.shape == (4, ids.shape[1]) and torch.equal(m, mask.repeat(2, 1))
        assert (seq == 19).sum(-1).tolist() == [7 * step // 10, 3 * step // 10] * 2
        assert bool((seq[:, :][ids.repeat(2, 1) == START] == START).all())


def test_delete_and_replace_on_hand_built_sequences():
    ids = torch.tensor([[0, 0, 1, 5, 6, 7], [1, 8, 9, 10, 11, 12]])
    mask = (torch.arange(6) >= torch.tensor([[2], [0]])).long()
    removed = torch.tensor([[0, 0, 0, 1, 0, 1], [0, 0, 1, 1, 0, 0]], dtype=torch.bool)
    new_ids, new_mask = llm.delete_tokens(ids, mask, removed)
    assert new_mask.tolist() == [[0, 0, 1, 1], [1, 1, 1, 1]]
    assert new_ids[new_mask.bool()].tolist() == [1, 6, 1, 8, 11, 12]
    rep_ids, rep_mask = llm.replace_tokens(ids, mask, removed, 3)
    assert rep_ids.tolist() == [[0, 0, 1, 3, 6, 3], [1, 8, 3, 3, 11, 12]] and torch.equal(rep_mask, mask)
    with pytest.raises(ValueError, match="no token left"):
        llm.delete_tokens(ids, mask, mask.bool())


def test_ties_are_broken_at_random_not_by_position():
    """A constant map gives every removable token the same chance to go first."""
    removable = torch.tensor([[False, True, True, True, True]])
    firsts = set()
    for seed in range(60):
        rank = llm.removal_rank(torch.zeros(1, 5), removable, True, torch.Generator().manual_seed(seed))
        assert sorted(rank[0, 1:].tolist()) == [0, 1, 2, 3] and rank[0, 0] == 4  # the special token last
        firsts.add(int(rank[0].argmin()))
    assert firsts == {1, 2, 3, 4}
    # distinct scores: the order is exactly theirs, either way
    scores = torch.tensor([[9.0, 0.3, 0.1, 0.4, 0.2]])
    assert llm.removal_rank(scores, removable, True)[0, 1:].tolist() == [1, 3, 0, 2]
    assert llm.removal_rank(scores, removable, False)[0, 1:].tolist() == [2, 0, 3, 1]


def test_curve_area_and_its_guards():
    assert llm.curve_area(torch.full((2, 11), 3.0), torch.tensor([3.0, 3.0])).tolist() == pytest.approx([1.0, 1.0])
    assert llm.curve_area(torch.linspace(1, 0, 11)[None]).item() == pytest.approx(0.5)
    with pytest.raises(ValueError, match="positive"):
        llm.curve_area(torch.ones(1, 11), torch.tensor([0.0]))
    with pytest.raises(ValueError, match="replacement_id"):
        llm.perturbation_curves(_additive(torch.ones(20)), *_prompt([[5]]), torch.ones(1, 2),
                                torch.tensor([[False, True]]), removal="replace")


# ------------------------------------------------------------------------------------------------ real decoders


def _alone_logits(model, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids])).logits[0, -1]


def test_stock_model_scores_equal_each_prompt_alone():
    """Left-padded prompts, deleted tokens included: the target's logit equals the stock model's on the prompt alone
    with those tokens taken out by hand."""
    model = D.causal_lm("llama")
    ids, mask = _prompt([[5, 6, 7, 8, 9, 10], [11, 12, 13]])
    target = torch.tensor([4, 9])
    logit, prob = llm.target_score(model, target)(ids, mask)
    alone = [_alone_logits(model, [START, 5, 6, 7, 8, 9, 10]), _alone_logits(model, [START, 11, 12, 13])]
    for b in range(2):
        assert logit[b].item() == pytest.approx(alone[b][target[b]].item(), rel=1e-10)
        assert prob[b].item() == pytest.approx(alone[b].softmax(-1)[target[b]].item(), rel=1e-10)
    removed = torch.zeros_like(mask, dtype=torch.bool)
    removed[0, [1, 4]] = True  # tokens 5 and 8
    removed[1, 5] = True  # token 12
    logit, _ = llm.target_score(model, target)(*llm.delete_tokens(ids, mask, removed))
    assert logit[0].item() == pytest.approx(_alone_logits(model, [START, 6, 7, 9, 10])[4].item(), rel=1e-10)
    assert logit[1].item() == pytest.approx(_alone_logits(model, [START, 11, 13])[9].item(), rel=1e-10)


@pytest.mark.parametrize("family", ["llama", "gemma3", "gpt2"])
@pytest.mark.parametrize("padding", ["left", "right"])
def test_input_x_gradient_equals_finite_differences(family, padding):
    """relevance[i] = d/dh f(e with e_i scaled by 1 + h) at h = 0, by central differences of the stock model run on
    each prompt alone (no autograd), all in float64 (the stock model's float32 steps removed); padding is 0; the
    model's parameters keep no gradient."""
    with D.pure_float64(D.causal_lm(family)) as model:
        _check_input_x_gradient(model, D.batch((7, 4, 6), padding=padding, seed=2))


def _check_input_x_gradient(model, batch):
    relevance, target = llm.input_x_gradient(model, batch)
    assert relevance.shape == batch["input_ids"].shape
    assert bool((relevance[~batch["attention_mask"].bool()] == 0).all())
    assert all(p.grad is None for p in model.parameters())
    embed = model.get_input_embeddings()
    h = 1e-5
    for b in range(3):
        alone = D.sample(batch, b)["input_ids"]
        with torch.no_grad():
            e = embed(alone)
            assert torch.allclose(model(inputs_embeds=e).logits, model(input_ids=alone).logits, atol=1e-12)
            assert int(model(inputs_embeds=e).logits[0, -1].argmax()) == int(target[b])
            oracle = []
            for i in range(alone.shape[1]):
                up, down = e.clone(), e.clone()
                up[0, i] *= 1 + h
                down[0, i] *= 1 - h
                f = [model(inputs_embeds=x).logits[0, -1, target[b]] for x in (up, down)]
                oracle.append((f[0] - f[1]) / (2 * h))
        got = relevance[b][batch["attention_mask"][b].bool()]
        torch.testing.assert_close(got, torch.stack(oracle), rtol=1e-6, atol=1e-8)


def test_document_start_token():
    assert llm.document_start_token(D.WordTokenizer(add_bos=True)) is None  # the tokenizer's own BOS is there
    assert llm.document_start_token(D.WordTokenizer(add_bos=False)) == 2  # else the end-of-text token


PROMPTS = ["the film is a gorgeous and witty thing to", "bland wooden acting in a story that goes",
           "an old tale told with new", "it never quite finds its own voice but", "a moving essay about the",
           "so funny that you forget the"]


def test_the_run_on_a_tiny_decoder():
    """Every method and both baselines on a tiny Llama: step 0 is the unperturbed logit (1 after normalization) and
    the last step the same for all rankings; the area is LeRF − MoRF; the scores do not depend on the batching
    (deterministic methods: padding is invisible) and the random baseline averages its seeds."""
    model = D.causal_lm("llama")
    tok = D.WordTokenizer(add_bos=False)
    methods = ("transformer_attribution", "gae", "attention_gradcam")
    run = lambda bs: llm.evaluate_llm_faithfulness(model, tok, PROMPTS, methods, batch_size=bs,  # noqa: E731
                                                   random_seeds=(0, 1), progress=False)
    res = run(4)
    assert set(res) == {"model", *methods, "input_x_gradient", "random"}
    assert res["model"]["prompts"] == len(PROMPTS) and res["model"]["min_target_logit"] > 0
    last = {name: row["morf_step10"] for name, row in res.items() if name != "model"}
    for name, row in res.items():
        if name == "model":
            continue
        assert row["morf_step0"] == pytest.approx(1.0) and row["lerf_step0"] == pytest.approx(1.0)
        assert row["lerf_step10"] == pytest.approx(row["morf_step10"]) == pytest.approx(last["gae"])
        assert row["area"] == pytest.approx(row["lerf_auc"] - row["morf_auc"])
        assert row["prob_area"] == pytest.approx(row["lerf_prob_auc"] - row["morf_prob_auc"])
    other = run(6)
    for name in ("transformer_attribution", "gae", "input_x_gradient"):
        for key in ("morf_auc", "lerf_auc", "morf_prob_auc", "lerf_prob_auc"):
            assert other[name][key] == pytest.approx(res[name][key], rel=1e-9), (name, key)
