"""Adapters: a stock model → an ``EncoderSpec`` the sweep runs on. Adding a family means adding one adapter."""

from __future__ import annotations

from torch import nn

from transformer_lrp.adapters import hf, timm_vit
from transformer_lrp.adapters.spec import EncoderSpec
from transformer_lrp.errors import UnsupportedModelError

SUPPORTED = (
    "timm VisionTransformer (incl. DeiT VisionTransformerDistilled)",
    "transformers BertForSequenceClassification",
    "transformers RobertaForSequenceClassification",
    "transformers DistilBertForSequenceClassification",
    "transformers ViTForImageClassification",
)


def build_encoder(model: nn.Module) -> EncoderSpec:
    """Describe ``model`` for the sweep, or raise ``UnsupportedModelError`` naming what is not supported."""
    if not isinstance(model, nn.Module):
        raise UnsupportedModelError(f"expected a torch.nn.Module, got {type(model).__name__}")
    for adapter in (timm_vit, hf):
        if adapter.matches(model):
            return adapter.build(model)
    raise UnsupportedModelError(
        f"unsupported model class {type(model).__module__}.{type(model).__name__}; supported: " + "; ".join(SUPPORTED)
    )
