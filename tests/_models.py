"""Small stock models with random (but non-degenerate) weights, built from configs: no hub access."""

from __future__ import annotations

import torch
from torch import nn


def randomize(model: nn.Module, seed: int = 0, std: float = 0.25) -> nn.Module:
    """Every parameter random: weights N(0, std), norm gains around 1, so no rule sees trivial zeros."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g, dtype=torch.float64).to(p.dtype)
            if "norm" in name.lower() and name.endswith("weight"):
                p.copy_(1 + 0.2 * noise)
            elif "gamma" in name or "lambda1" in name:
                p.copy_(0.5 + 0.2 * noise)
            else:
                p.copy_(std * noise)
    return model.eval()


def timm_vit(dtype=torch.float64, seed=0, **kw) -> nn.Module:
    from timm.models.vision_transformer import VisionTransformer

    cfg = dict(img_size=32, patch_size=8, embed_dim=48, depth=3, num_heads=4, mlp_ratio=2, qkv_bias=True,
               num_classes=7)
    cfg.update(kw)
    return randomize(VisionTransformer(**cfg), seed).to(dtype)


def timm_deit_distilled(dtype=torch.float64, seed=0) -> nn.Module:
    from timm.models.deit import VisionTransformerDistilled

    m = VisionTransformerDistilled(img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=4, mlp_ratio=2,
                                   qkv_bias=True, num_classes=5)
    return randomize(m, seed).to(dtype)


def timm_dinov2_like(dtype=torch.float64, seed=0) -> nn.Module:
    """LayerScale + register tokens + patch 7 + non-square-free sizes, like DINOv2 with registers."""
    return timm_vit(dtype, seed, img_size=28, patch_size=7, embed_dim=36, depth=2, num_heads=3, init_values=1e-5,
                    reg_tokens=2, num_classes=4)


def bert_config(**kw):
    from transformers import BertConfig

    cfg = dict(vocab_size=60, hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=48,
               max_position_embeddings=40, num_labels=3, hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1,
               type_vocab_size=2)
    cfg.update(kw)
    return BertConfig(**cfg)


def hf_bert(dtype=torch.float64, seed=0, attn_implementation="eager", **kw) -> nn.Module:
    from transformers import BertForSequenceClassification

    m = BertForSequenceClassification(bert_config(**kw))
    m.config._attn_implementation = attn_implementation
    return randomize(m, seed).to(dtype)


def hf_roberta(dtype=torch.float64, seed=0) -> nn.Module:
    from transformers import RobertaConfig, RobertaForSequenceClassification

    cfg = RobertaConfig(vocab_size=60, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=48, max_position_embeddings=44, num_labels=3, pad_token_id=1,
                        type_vocab_size=1)
    m = RobertaForSequenceClassification(cfg)
    m.config._attn_implementation = "eager"
    return randomize(m, seed).to(dtype)


def hf_distilbert(dtype=torch.float64, seed=0) -> nn.Module:
    from transformers import DistilBertConfig, DistilBertForSequenceClassification

    cfg = DistilBertConfig(vocab_size=60, dim=32, n_layers=2, n_heads=4, hidden_dim=48, max_position_embeddings=40,
                           num_labels=3)
    m = DistilBertForSequenceClassification(cfg)
    m.config._attn_implementation = "eager"
    return randomize(m, seed).to(dtype)


def hf_vit(dtype=torch.float64, seed=0) -> nn.Module:
    from transformers import ViTConfig, ViTForImageClassification

    cfg = ViTConfig(image_size=32, patch_size=8, hidden_size=48, num_hidden_layers=2, num_attention_heads=4,
                    intermediate_size=96, num_labels=6)
    m = ViTForImageClassification(cfg)
    m.config._attn_implementation = "eager"
    return randomize(m, seed).to(dtype)


def text_batch(lengths=(12, 7, 10), vocab=60, seed=0, with_types=False) -> dict:
    """Right-padded batch; token 2 plays [CLS] (the first token), 3 plays [SEP], 0 is padding."""
    g = torch.Generator().manual_seed(seed)
    t = max(lengths)
    ids = torch.zeros(len(lengths), t, dtype=torch.long)
    mask = torch.zeros(len(lengths), t, dtype=torch.long)
    for i, n in enumerate(lengths):
        ids[i, :n] = torch.randint(4, vocab, (n,), generator=g)
        ids[i, 0], ids[i, n - 1] = 2, 3
        mask[i, :n] = 1
    out = {"input_ids": ids, "attention_mask": mask}
    if with_types:
        types = torch.zeros_like(ids)
        for i, n in enumerate(lengths):
            types[i, n // 2 : n] = 1
        out["token_type_ids"] = types
    return out


def images(batch=3, size=32, dtype=torch.float64, seed=0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, size, size, generator=g, dtype=torch.float64).to(dtype)


def model_logits(model: nn.Module, inputs) -> torch.Tensor:
    with torch.no_grad():
        out = model(**inputs) if isinstance(inputs, dict) else model(inputs)
    return out.logits if hasattr(out, "logits") else out
