"""Adapters: the engine reproduces each stock model's logits, whatever its attention implementation, and reads
prefix tokens, LayerScale and position-embedding variants correctly."""

import _models as M
import pytest
import torch

import transformer_lrp as tl

TOL = dict(rtol=1e-10, atol=1e-10)

VISION = {
    "timm_vit": lambda: M.timm_vit(),
    "timm_no_embed_class": lambda: M.timm_vit(no_embed_class=True),
    "timm_norm_pre_fc_norm": lambda: M.timm_vit(pre_norm=True, fc_norm=True),
    "timm_deit_distilled": lambda: M.timm_deit_distilled(),
    "timm_layerscale_registers": lambda: M.timm_dinov2_like(),
    "timm_quick_gelu_non_square": lambda: M.timm_vit(img_size=(24, 40), act_layer="quick_gelu"),
}


def _images_for(model):
    size = tuple(model.patch_embed.img_size) if hasattr(model, "patch_embed") else (32, 32)
    g = torch.Generator().manual_seed(0)
    return torch.randn(2, 3, *size, generator=g, dtype=torch.float64)


@pytest.mark.parametrize("name", list(VISION))
def test_timm_logits_and_shapes(name):
    model = VISION[name]()
    x = _images_for(model)
    grid = model.patch_embed.grid_size
    for fused in (True, False):
        for blk in model.blocks:
            blk.attn.fused_attn = fused
        torch.testing.assert_close(tl.explain(model, x, method="raw_attention").logits, M.model_logits(model, x), **TOL)
    for method in tl.METHODS:
        out = tl.explain(model, x, method=method)
        assert out.relevance.shape == (2, grid[0] * grid[1])
        assert out.maps().shape == (2, *grid)
        assert out.image_maps().shape == (2, *model.patch_embed.img_size)
        assert torch.isfinite(out.relevance).all()


def test_result_does_not_depend_on_attention_implementation():
    model, x = M.timm_vit(), M.images(2)
    results = []
    for fused in (True, False):
        for blk in model.blocks:
            blk.attn.fused_attn = fused
        results.append(tl.explain(model, x).relevance)
    assert torch.equal(results[0], results[1])
    bert_out = [tl.explain(M.hf_bert(attn_implementation=impl), M.text_batch()).relevance for impl in ("eager", "sdpa")]
    assert torch.equal(bert_out[0], bert_out[1])


@pytest.mark.parametrize("family", ["bert", "roberta", "distilbert", "hf_vit"])
def test_transformers_logits(family):
    model = {"bert": M.hf_bert, "roberta": M.hf_roberta, "distilbert": M.hf_distilbert, "hf_vit": M.hf_vit}[family]()
    if family == "hf_vit":
        inputs = M.images(2)
        model.config._attn_implementation = "sdpa"  # eager runs its softmax in float32 even for float64 models
    else:
        inputs = M.text_batch(with_types=family == "bert")
        if family == "roberta":
            inputs["input_ids"] = inputs["input_ids"].masked_fill(inputs["attention_mask"] == 0, 1)
    out = tl.explain(model, inputs, method="raw_attention")
    torch.testing.assert_close(out.logits, M.model_logits(model, inputs), **TOL)


def test_deit_prefix_tokens_are_dropped():
    model, x = M.timm_deit_distilled(), M.images(2)
    out = tl.explain(model, x, method="raw_attention")
    from _oracle import model_attention_and_grads

    attn, _, _, _ = model_attention_and_grads(model, x, torch.tensor([0, 1]))
    torch.testing.assert_close(out.relevance, attn[-1].mean(1)[:, 0, 2:], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(
    "build,what",
    [
        (lambda: M.timm_vit(global_pool="avg"), "global_pool"),
        (lambda: M.timm_vit(qk_norm=True), "q_norm"),
        (lambda: M.timm_vit(class_token=False, global_pool="avg"), "global_pool"),
        (lambda: M.timm_vit(num_classes=0), "head"),
        (lambda: torch.nn.Linear(3, 4), "torch.nn.modules.linear.Linear"),
        (lambda: M.hf_bert(is_decoder=True), "decoder"),
    ],
    ids=["avg_pool", "qk_norm", "no_class_token", "no_head", "plain_module", "bert_decoder"],
)
def test_unsupported_models_are_named(build, what):
    with pytest.raises(tl.UnsupportedModelError, match=what):
        tl.explain(build(), M.images(1))


def test_unsupported_transformers_family_is_named():
    from transformers import ElectraConfig, ElectraForSequenceClassification

    config = ElectraConfig(num_hidden_layers=1, hidden_size=16, embedding_size=16, num_attention_heads=2,
                           intermediate_size=32, vocab_size=30, num_labels=2)
    model = ElectraForSequenceClassification(config)
    with pytest.raises(tl.UnsupportedModelError, match="ElectraForSequenceClassification"):
        tl.explain(model, {"input_ids": torch.tensor([[1, 2, 3]])})


def test_subclass_with_custom_block_is_rejected():
    from timm.models.vision_transformer import ResPostBlock

    model = M.timm_vit(block_fn=ResPostBlock)
    with pytest.raises(tl.UnsupportedModelError, match=r"'blocks\.0' \(ResPostBlock\)"):
        tl.explain(model, M.images(1))
