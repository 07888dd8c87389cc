"""Adapters for transformers' ``BertForSequenceClassification``, ``RobertaForSequenceClassification``,
``DistilBertForSequenceClassification`` (post-norm text encoders) and ``ViTForImageClassification``.

Module names differ across transformers releases (4.x ``encoder.layer[i].attention.attention.query`` versus 5.x
``layers[i].attention.q_proj`` for ViT); both layouts are read. The model's ``attn_implementation`` does not matter:
the sweep computes attention itself.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from transformer_lrp.adapters import _checks as chk
from transformer_lrp.adapters._vision import check_images, gradient_to_pixels, patches_to_pixels
from transformer_lrp.adapters.spec import (
    BlockSpec,
    Embedded,
    EncoderSpec,
    HeadBranch,
    LinearSpec,
    NormSpec,
    constant_scale_norm_grad,
)
from transformer_lrp.errors import InputError, UnsupportedModelError

TEXT_FAMILIES = ("BertForSequenceClassification", "RobertaForSequenceClassification",
                 "DistilBertForSequenceClassification")
# Tokenizer outputs that do not reach the model.
_IGNORED_KEYS = {"special_tokens_mask", "offset_mapping", "length", "overflow_to_sample_mapping"}


def _class(name: str) -> type | None:
    import transformers

    return getattr(transformers, name, None)


def matches(model: nn.Module) -> bool:
    try:
        import transformers  # noqa: F401
    except ImportError:
        return False
    return any(type(model) is _class(n) for n in TEXT_FAMILIES + ("ViTForImageClassification",))


def build(model: nn.Module) -> EncoderSpec:
    name = type(model).__name__
    if name == "ViTForImageClassification":
        return _build_vit(model)
    cfg = model.config
    if getattr(cfg, "is_decoder", False) or getattr(cfg, "add_cross_attention", False):
        raise UnsupportedModelError(f"unsupported {name} configured as a decoder / with cross-attention")
    pos_type = getattr(cfg, "position_embedding_type", "absolute")
    if pos_type not in (None, "absolute"):
        raise UnsupportedModelError(f"unsupported {name} setting position_embedding_type={pos_type!r}")
    if name == "DistilBertForSequenceClassification":
        return _build_distilbert(model)
    return _build_bert_like(model, roberta=name == "RobertaForSequenceClassification")


# ----------------------------------------------------------------------------------------------------------- text


def _bert_block(layer: nn.Module, path: str, num_heads: int) -> BlockSpec:
    att = layer.attention
    self_att = att.self
    for n in ("query", "key", "value"):
        chk.expect_linear(getattr(self_att, n), f"{path}.attention.self.{n}")
    head_dim = self_att.query.out_features // num_heads
    return BlockSpec(
        pre_norm=False,
        norm1=NormSpec.of(chk.expect_layernorm(att.output.LayerNorm, f"{path}.attention.output.LayerNorm")),
        norm2=NormSpec.of(chk.expect_layernorm(layer.output.LayerNorm, f"{path}.output.LayerNorm")),
        qkv=tuple(LinearSpec.of(getattr(self_att, n)) for n in ("query", "key", "value")),
        num_heads=num_heads,
        head_dim=head_dim,
        scale=head_dim**-0.5,
        proj=LinearSpec.of(chk.expect_linear(att.output.dense, f"{path}.attention.output.dense")),
        fc1=LinearSpec.of(chk.expect_linear(layer.intermediate.dense, f"{path}.intermediate.dense")),
        act=chk.activation_name(layer.intermediate.intermediate_act_fn, f"{path}.intermediate.intermediate_act_fn"),
        fc2=LinearSpec.of(chk.expect_linear(layer.output.dense, f"{path}.output.dense")),
        mask_add=True,
    )


def _build_bert_like(model: nn.Module, roberta: bool) -> EncoderSpec:
    base = model.roberta if roberta else model.bert
    cfg = model.config
    if getattr(base.encoder, "layer", None) is None:
        raise UnsupportedModelError(f"unsupported {type(model).__name__}: no encoder.layer list")
    blocks = [
        _bert_block(layer, f"encoder.layer.{i}", int(cfg.num_attention_heads))
        for i, layer in enumerate(base.encoder.layer)
    ]
    if roberta:
        head_mod = model.classifier
        head = (
            ("linear", LinearSpec.of(chk.expect_linear(head_mod.dense, "classifier.dense"))),
            ("act", "tanh"),
            ("linear", LinearSpec.of(chk.expect_linear(head_mod.out_proj, "classifier.out_proj"))),
        )
        num_classes = head_mod.out_proj.out_features
    else:
        if base.pooler is None:
            raise UnsupportedModelError("unsupported BertForSequenceClassification without a pooler")
        act = chk.activation_name(base.pooler.activation, "bert.pooler.activation")
        classifier = chk.expect_linear(model.classifier, "classifier")
        head = (
            ("linear", LinearSpec.of(chk.expect_linear(base.pooler.dense, "bert.pooler.dense"))),
            ("act", act),
            ("linear", LinearSpec.of(classifier)),
        )
        num_classes = classifier.out_features
    emb = base.embeddings
    word = emb.word_embeddings.weight.detach()
    position = emb.position_embeddings.weight.detach()
    token_type = emb.token_type_embeddings.weight.detach()
    norm = NormSpec.of(chk.expect_layernorm(emb.LayerNorm, "embeddings.LayerNorm"))
    padding_idx = int(emb.padding_idx) if roberta else None

    def positions(ids: torch.Tensor) -> torch.Tensor:
        if padding_idx is None:
            return torch.arange(ids.shape[1], device=ids.device).expand_as(ids)
        # RoBERTa numbers the non-padding tokens from padding_idx + 1 (fairseq's make_positions).
        real = ids.ne(padding_idx).long()
        return torch.cumsum(real, dim=1) * real + padding_idx

    max_len = position.shape[0] - (padding_idx + 1 if padding_idx is not None else 0)

    def embed(inputs: object) -> Embedded:
        ids, mask, types = _check_text(inputs, word, max_len, token_types=token_type.shape[0])
        x = word[ids] + token_type[types] + position[positions(ids)]
        return Embedded(tokens=norm(x), key_mask=mask, to_input=_text_to_input,
                        from_gradient=_word_relevance(word[ids], norm, x))

    return EncoderSpec(
        family=f"transformers.{type(model).__name__}",
        modality="text",
        blocks=blocks,
        final_norm=None,
        head=(HeadBranch(0, head),),
        num_classes=int(num_classes),
        num_prefix_tokens=0,
        embed=embed,
        max_tokens=max_len,
    )


def _build_distilbert(model: nn.Module) -> EncoderSpec:
    base = model.distilbert
    cfg = model.config
    blocks = []
    for i, layer in enumerate(base.transformer.layer):
        path = f"distilbert.transformer.layer.{i}"
        att = layer.attention
        for n in ("q_lin", "k_lin", "v_lin", "out_lin"):
            chk.expect_linear(getattr(att, n), f"{path}.attention.{n}")
        head_dim = att.q_lin.out_features // int(cfg.n_heads)
        blocks.append(
            BlockSpec(
                pre_norm=False,
                norm1=NormSpec.of(chk.expect_layernorm(layer.sa_layer_norm, f"{path}.sa_layer_norm")),
                norm2=NormSpec.of(chk.expect_layernorm(layer.output_layer_norm, f"{path}.output_layer_norm")),
                qkv=tuple(LinearSpec.of(getattr(att, n)) for n in ("q_lin", "k_lin", "v_lin")),
                num_heads=int(cfg.n_heads),
                head_dim=head_dim,
                scale=head_dim**-0.5,
                proj=LinearSpec.of(att.out_lin),
                fc1=LinearSpec.of(chk.expect_linear(layer.ffn.lin1, f"{path}.ffn.lin1")),
                act=chk.activation_name(layer.ffn.activation, f"{path}.ffn.activation"),
                fc2=LinearSpec.of(chk.expect_linear(layer.ffn.lin2, f"{path}.ffn.lin2")),
                mask_add=False,
            )
        )
    head = (
        ("linear", LinearSpec.of(chk.expect_linear(model.pre_classifier, "pre_classifier"))),
        ("act", "relu"),
        ("linear", LinearSpec.of(chk.expect_linear(model.classifier, "classifier"))),
    )
    emb = base.embeddings
    word = emb.word_embeddings.weight.detach()
    position = emb.position_embeddings.weight.detach()
    norm = NormSpec.of(chk.expect_layernorm(emb.LayerNorm, "distilbert.embeddings.LayerNorm"))

    def embed(inputs: object) -> Embedded:
        ids, mask, _ = _check_text(inputs, word, position.shape[0], token_types=0)
        x = word[ids] + position[torch.arange(ids.shape[1], device=ids.device)]
        return Embedded(tokens=norm(x), key_mask=mask, to_input=_text_to_input,
                        from_gradient=_word_relevance(word[ids], norm, x))

    return EncoderSpec(
        family="transformers.DistilBertForSequenceClassification",
        modality="text",
        blocks=blocks,
        final_norm=None,
        head=(HeadBranch(0, head),),
        num_classes=int(model.classifier.out_features),
        num_prefix_tokens=0,
        embed=embed,
        max_tokens=int(position.shape[0]),
    )


def _word_relevance(words: torch.Tensor, norm: NormSpec, summed: torch.Tensor):
    """A modified gradient at the encoder input → back through the embedding LayerNorm (scale held constant) → the
    word embeddings' relevance ``words ⊙ gradient`` summed over the width (position and token-type embeddings keep
    their share)."""
    def from_gradient(grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return (words * constant_scale_norm_grad(norm, summed, grad)).sum(dim=-1), None

    return from_gradient


def _text_to_input(relevance: torch.Tensor, add_rule) -> tuple[torch.Tensor, None]:
    # The original stops at the encoder input (the embedding LayerNorm is an identity): sum over the width.
    return relevance.sum(dim=-1), None


def _check_text(
    inputs: object, word: torch.Tensor, max_len: int, token_types: int
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    if isinstance(inputs, torch.Tensor):
        inputs = {"input_ids": inputs}
    if not isinstance(inputs, Mapping) or "input_ids" not in inputs:
        raise InputError("text models take the tokenizer's output: a mapping with 'input_ids' "
                         "(and optionally 'attention_mask', 'token_type_ids')")
    unknown = set(inputs) - {"input_ids", "attention_mask", "token_type_ids"} - _IGNORED_KEYS
    if unknown:
        raise InputError(f"unsupported text input keys: {sorted(unknown)}")
    ids = inputs["input_ids"]
    if not isinstance(ids, torch.Tensor) or ids.dim() != 2 or ids.dtype not in (torch.int32, torch.int64):
        shape = tuple(ids.shape) if isinstance(ids, torch.Tensor) else type(ids).__name__
        raise InputError(f"input_ids must be an integer tensor [B, T], got {shape}")
    if ids.device != word.device:
        raise InputError(f"input_ids are on {ids.device} but the model is on {word.device}")
    b, t = ids.shape
    if b == 0 or t == 0:
        raise InputError(f"input_ids is empty: shape {(b, t)}")
    if t > max_len:
        raise InputError(f"sequence length {t} exceeds the model's maximum of {max_len} positions")
    if bool((ids < 0).any()) or bool((ids >= word.shape[0]).any()):
        raise InputError(f"input_ids out of the vocabulary range [0, {word.shape[0]})")
    ids = ids.long()
    mask = inputs.get("attention_mask")
    if mask is not None:
        if not isinstance(mask, torch.Tensor) or tuple(mask.shape) != (b, t):
            raise InputError(f"attention_mask must have the shape of input_ids {(b, t)}")
        if bool(((mask != 0) & (mask != 1)).any()):
            raise InputError("attention_mask must hold only 0 and 1")
        mask = mask.to(device=ids.device).bool()
        if not bool(mask[:, 0].all()):
            raise InputError("attention_mask is 0 at position 0: the first token ([CLS]) is the one explained, "
                             "so left padding is not supported; pad on the right")
        if bool(mask.all()):
            mask = None
    types = inputs.get("token_type_ids")
    if types is None:
        types = torch.zeros_like(ids)
    else:
        if not isinstance(types, torch.Tensor) or tuple(types.shape) != (b, t):
            raise InputError(f"token_type_ids must have the shape of input_ids {(b, t)}")
        types = types.to(ids.device).long()
        if not token_types and bool(types.any()):
            raise InputError("token_type_ids given, but this model has no token type embeddings")
        if token_types and (bool((types < 0).any()) or bool((types >= token_types).any())):
            raise InputError(f"token_type_ids out of range [0, {token_types})")
    return ids, mask, types


# --------------------------------------------------------------------------------------------------------- vision


def _vit_block(layer: nn.Module, path: str, cfg) -> BlockSpec:
    att = layer.attention
    if hasattr(att, "q_proj"):  # transformers >= 5
        q, k, v, o = att.q_proj, att.k_proj, att.v_proj, att.o_proj
        names = ("attention.q_proj", "attention.k_proj", "attention.v_proj", "attention.o_proj")
        fc1, fc2, act = layer.mlp.fc1, layer.mlp.fc2, layer.mlp.activation_fn
        mlp_names = ("mlp.fc1", "mlp.fc2", "mlp.activation_fn")
    else:  # transformers 4.x
        q, k, v = att.attention.query, att.attention.key, att.attention.value
        o = att.output.dense
        names = ("attention.attention.query", "attention.attention.key", "attention.attention.value",
                 "attention.output.dense")
        fc1, fc2, act = layer.intermediate.dense, layer.output.dense, layer.intermediate.intermediate_act_fn
        mlp_names = ("intermediate.dense", "output.dense", "intermediate.intermediate_act_fn")
    for mod, n in zip((q, k, v, o, fc1, fc2), names + mlp_names[:2]):
        chk.expect_linear(mod, f"{path}.{n}")
    heads = int(cfg.num_attention_heads)
    head_dim = q.out_features // heads
    return BlockSpec(
        pre_norm=True,
        norm1=NormSpec.of(chk.expect_layernorm(layer.layernorm_before, f"{path}.layernorm_before")),
        norm2=NormSpec.of(chk.expect_layernorm(layer.layernorm_after, f"{path}.layernorm_after")),
        qkv=(LinearSpec.of(q), LinearSpec.of(k), LinearSpec.of(v)),
        num_heads=heads,
        head_dim=head_dim,
        scale=head_dim**-0.5,
        proj=LinearSpec.of(o),
        fc1=LinearSpec.of(fc1),
        act=chk.activation_name(act, f"{path}.{mlp_names[2]}"),
        fc2=LinearSpec.of(fc2),
    )


def _build_vit(model: nn.Module) -> EncoderSpec:
    cfg = model.config
    vit = model.vit
    layers = vit.layers if hasattr(vit, "layers") else vit.encoder.layer
    prefix_path = "vit.layers" if hasattr(vit, "layers") else "vit.encoder.layer"
    blocks = [_vit_block(layer, f"{prefix_path}.{i}", cfg) for i, layer in enumerate(layers)]
    if not isinstance(model.classifier, nn.Linear):
        raise UnsupportedModelError(
            f"unsupported module 'classifier' ({type(model.classifier).__name__}): a Linear head is needed "
            "(num_labels > 0)"
        )
    emb = vit.embeddings
    conv = emb.patch_embeddings.projection
    chk.expect_type(conv, "vit.embeddings.patch_embeddings.projection", (nn.Conv2d,))
    weight = conv.weight.detach()
    bias = None if conv.bias is None else conv.bias.detach()
    cls = emb.cls_token.detach()
    pos = emb.position_embeddings.detach()
    img_size = tuple(int(s) for s in emb.patch_embeddings.image_size)
    patch = tuple(int(p) for p in emb.patch_embeddings.patch_size)
    grid = (img_size[0] // patch[0], img_size[1] // patch[1])

    def embed(images: object) -> Embedded:
        x = check_images(images, weight, img_size)
        patches = torch.nn.functional.conv2d(x, weight, bias, conv.stride, conv.padding).flatten(2).transpose(1, 2)
        b = patches.shape[0]
        u = torch.cat([cls.expand(b, -1, -1), patches], dim=1)

        def to_input(relevance: torch.Tensor, add_rule) -> tuple[torch.Tensor, torch.Tensor]:
            return patches_to_pixels(add_rule(relevance, u, pos)[0][:, 1:], x, conv, grid)

        def from_gradient(grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            return gradient_to_pixels(grad[:, 1:], patches, x, conv, grid)

        return Embedded(tokens=u + pos, key_mask=None, to_input=to_input, from_gradient=from_gradient)

    return EncoderSpec(
        family="transformers.ViTForImageClassification",
        modality="vision",
        blocks=blocks,
        final_norm=NormSpec.of(chk.expect_layernorm(vit.layernorm, "vit.layernorm")),
        head=(HeadBranch(0, (("linear", LinearSpec.of(model.classifier)),)),),
        num_classes=int(model.classifier.out_features),
        num_prefix_tokens=1,
        embed=embed,
        grid_size=grid,
        image_size=img_size,  # type: ignore[arg-type]
    )
