"""Adapters: a stock model → an ``EncoderSpec`` the sweep runs on. Adding a family means adding one adapter."""

from __future__ import annotations

from torch import nn

from transformer_lrp.adapters import clip, decoder, hf, timm_vit
from transformer_lrp.adapters.spec import EncoderSpec
from transformer_lrp.errors import UnsupportedModelError

SUPPORTED = (
    "timm VisionTransformer (incl. DeiT VisionTransformerDistilled)",
    "transformers BertForSequenceClassification",
    "transformers RobertaForSequenceClassification",
    "transformers DistilBertForSequenceClassification",
    "transformers ViTForImageClassification",
    "transformers CLIPModel and open_clip CLIP (image-text similarity: explain(model, images and texts))",
    "transformers decoder LLMs (*ForCausalLM, *ForSequenceClassification) of Llama, Mistral, Qwen2, Qwen3, "
    "Gemma 3 (text), Phi-3 and GPT-2",
)


def build_encoder(model: nn.Module) -> EncoderSpec:
    """Describe ``model`` for the sweep, or raise ``UnsupportedModelError`` naming what is not supported."""
    if not isinstance(model, nn.Module):
        raise UnsupportedModelError(f"expected a torch.nn.Module, got {type(model).__name__}")
    for adapter in (timm_vit, hf, decoder):
        if adapter.matches(model):
            return adapter.build(model)
    if clip.matches(model):
        raise UnsupportedModelError(f"{type(model).__name__} is an image-text model: it has two towers, built by "
                                    "adapters.clip.build (explain() takes it with images and texts)")
    if clip.is_clip_like(model):
        raise UnsupportedModelError(f"unsupported image-text model {type(model).__name__}: only whole CLIP models "
                                    "with class-token pooling (transformers CLIPModel, open_clip CLIP) are supported; "
                                    "attention pooling (SigLIP's MAP head, CoCa) has no relevance rule here, and a "
                                    "single tower (CLIPVisionModel, CLIPTextModel) has no similarity to explain")
    raise UnsupportedModelError(
        f"unsupported model class {type(model).__module__}.{type(model).__name__}; supported: " + "; ".join(SUPPORTED)
    )
