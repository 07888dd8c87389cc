"""Conservation (SPEC §11): with the method's rules and a one-hot start, total relevance is 1 after the head and
after every block, per sample."""

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
    # The baselines' separate-normalizer Linear doubles relevance (SPEC §2.4): a sanity check that the two rule
    # sets really differ in the sweep.
    totals = relevance_totals(M.timm_vit(), M.images(2), sweep.Rules(method=False), True)
    assert (totals["head"].sum(dim=(1, 2)) - 2).abs().max() < 1e-6  # the head Linear alone doubles
