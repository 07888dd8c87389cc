"""Adapters for CLIP: transformers' ``CLIPModel`` and open_clip's ``CLIP`` (``open_clip.create_model``).

Each tower is described by the same block description the encoders use (pre-norm blocks, quick-GELU or GELU;
the text tower with a causal mask), and the explained score is the similarity logit
``logit_scale · ⟨normalize(P_img · LN_post(cls_i)), normalize(P_txt · LN_final(eos_j))⟩`` of one image–text pair.
A tower's "head" is its projection, the L2 normalization and a Linear whose rows are the other tower's normalized
embeddings times ``logit_scale``: the other tower is held fixed, so the score is linear in this tower's normalized
embedding. For relevance the normalization is an identity (as a LayerNorm, docs/method.md §2.7) and the last Linear
runs the method's α1β0 rule, so relevance is conserved; gradients see the true normalization.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

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


@dataclass
class Tower:
    """One tower without its head: blocks, the embedding, the final norm and the projection into the joint space."""

    modality: str
    blocks: list[BlockSpec]
    embed: Callable[[object], Embedded]
    final_norm: NormSpec
    projection: LinearSpec
    grid_size: tuple[int, int] | None = None
    image_size: tuple[int, int] | None = None


@dataclass
class ClipSpec:
    family: str
    vision: Tower
    text: Tower
    logit_scale: torch.Tensor  # exp of the model's learned log-scale (0-dim)

    def encoder(self, which: str, other: torch.Tensor | None = None) -> EncoderSpec:
        """``which`` tower's EncoderSpec whose logits are the similarities to ``other``, the other tower's
        normalized embeddings `[M, E]`: ``logits[b, m] = logit_scale · ⟨ê_b, other_m⟩`` (``logits_per_image`` for
        the vision tower, ``logits_per_text`` for the text tower). Without ``other``: the tower up to its normalized
        embedding ``ê`` (the head without the similarity Linear)."""
        tower = self.vision if which == "vision" else self.text
        head = (("linear", tower.projection), ("act", "l2_normalize"))
        if other is not None:
            head += (("linear", LinearSpec(other.detach() * self.logit_scale, None)),)
        return EncoderSpec(family=f"{self.family}.{which}", modality=tower.modality, blocks=tower.blocks,
                           final_norm=tower.final_norm, head=(HeadBranch(0, head),),
                           num_classes=0 if other is None else int(other.shape[0]),
                           num_prefix_tokens=1 if which == "vision" else 0, embed=tower.embed,
                           grid_size=tower.grid_size, image_size=tower.image_size)


def _class(module: str, name: str):
    try:
        mod = __import__(module, fromlist=[name])
    except ImportError:
        return None
    return getattr(mod, name, None)


def matches(model: nn.Module) -> bool:
    return type(model) in tuple(c for c in (_class("transformers", "CLIPModel"), _class("open_clip.model", "CLIP"))
                                if c is not None)


def is_clip_like(model: nn.Module) -> bool:
    """Image–text models this package does not explain (a clear error instead of 'unsupported class')."""
    return any(n in type(model).__name__ for n in ("SigLIP", "Siglip", "CustomTextCLIP", "CoCa", "CLIP"))


def build(model: nn.Module) -> ClipSpec:
    if _class("transformers", "CLIPModel") is type(model):
        return _build_hf(model)
    return _build_open_clip(model)


def _block(pre: str, *, ln1, ln2, qkv: tuple[LinearSpec, ...], proj, fc1, fc2, act: str, heads: int, width: int,
           causal: bool) -> BlockSpec:
    head_dim = width // heads
    return BlockSpec(pre_norm=True, norm1=NormSpec.of(chk.expect_layernorm(ln1, f"{pre}.ln1")),
                     norm2=NormSpec.of(chk.expect_layernorm(ln2, f"{pre}.ln2")), qkv=qkv, num_heads=heads,
                     head_dim=head_dim, scale=head_dim**-0.5,
                     proj=LinearSpec.of(_out_proj(proj, f"{pre}.out_proj")),
                     fc1=LinearSpec.of(chk.expect_linear(fc1, f"{pre}.fc1")), act=act,
                     fc2=LinearSpec.of(chk.expect_linear(fc2, f"{pre}.fc2")), causal=causal)


def _out_proj(module: object, path: str) -> nn.Linear:
    # nn.MultiheadAttention's out_proj is a NonDynamicallyQuantizableLinear: an nn.Linear with the same math
    chk.expect_type(module, path, (nn.Linear, nn.modules.linear.NonDynamicallyQuantizableLinear))
    return module  # type: ignore[return-value]


def _matrix_projection(weight: torch.Tensor) -> LinearSpec:
    """open_clip keeps projections as ``x @ P`` parameters `[width, embed]`: the Linear ``x Pᵀᵀ``."""
    return LinearSpec(weight.detach().t(), None)


# ------------------------------------------------------------------------------------------------- embeddings


def _vision_embed(conv: nn.Conv2d, cls: torch.Tensor, pos: torch.Tensor, ln_pre: NormSpec, img_size, grid):
    weight = conv.weight.detach()
    bias = None if conv.bias is None else conv.bias.detach()

    def embed(inputs: object) -> Embedded:
        x = check_images(inputs, weight, img_size)
        patches = torch.nn.functional.conv2d(x, weight, bias, conv.stride, conv.padding).flatten(2).transpose(1, 2)
        u = torch.cat([cls.reshape(1, 1, -1).expand(patches.shape[0], -1, -1), patches], dim=1)

        def to_input(relevance: torch.Tensor, add_rule) -> tuple[torch.Tensor, torch.Tensor]:
            # ln_pre is an identity for relevance; then the position add and the patch embedding's z^B rule
            return patches_to_pixels(add_rule(relevance, u, pos.expand_as(u))[0][:, 1:], x, conv, grid)

        def from_gradient(grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            g = constant_scale_norm_grad(ln_pre, u + pos, grad)  # ln_pre's scale held constant
            return gradient_to_pixels(g[:, 1:], u[:, 1:], x, conv, grid)

        return Embedded(tokens=ln_pre(u + pos), key_mask=None, to_input=to_input, from_gradient=from_gradient)

    return embed


def _text_embed(word: torch.Tensor, pos: torch.Tensor, eos_of: Callable[[torch.Tensor], torch.Tensor]):
    def embed(inputs: object) -> Embedded:
        ids, mask = _check_text(inputs, word, pos.shape[0])
        eos = eos_of(ids)
        # what the EOS token reads under the causal mask: every position up to it (later ones carry exactly 0)
        upto = torch.arange(ids.shape[1], device=ids.device)[None, :] <= eos[:, None]
        if mask is not None and bool((upto & ~mask).any()):
            raise InputError("attention_mask is 0 before the end-of-text token: only right padding is supported")
        x = word[ids] + pos[: ids.shape[1]]
        words = word[ids]

        def from_gradient(grad: torch.Tensor) -> tuple[torch.Tensor, None]:
            return (words * grad).sum(dim=-1), None  # the position embeddings keep their share

        return Embedded(tokens=x, key_mask=None if bool(upto.all()) else upto, to_input=_text_to_input,
                        pool_index=eos, from_gradient=from_gradient)

    return embed


def _text_to_input(relevance: torch.Tensor, add_rule) -> tuple[torch.Tensor, None]:
    return relevance.sum(dim=-1), None


def _check_text(inputs: object, word: torch.Tensor, max_len: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    ids = inputs.get("input_ids") if isinstance(inputs, Mapping) else inputs
    mask = inputs.get("attention_mask") if isinstance(inputs, Mapping) else None
    if not isinstance(ids, torch.Tensor) or ids.dim() != 2 or ids.dtype not in (torch.int32, torch.int64):
        raise InputError("CLIP text input must be token ids, an integer tensor [B, T]")
    if ids.device != word.device:
        raise InputError(f"input_ids are on {ids.device} but the model is on {word.device}")
    if ids.shape[0] == 0 or ids.shape[1] == 0:
        raise InputError(f"input_ids is empty: shape {tuple(ids.shape)}")
    if ids.shape[1] > max_len:
        raise InputError(f"sequence length {ids.shape[1]} exceeds the model's maximum of {max_len} positions")
    if bool((ids < 0).any()) or bool((ids >= word.shape[0]).any()):
        raise InputError(f"input_ids out of the vocabulary range [0, {word.shape[0]})")
    if mask is not None:
        if not isinstance(mask, torch.Tensor) or mask.shape != ids.shape:
            raise InputError(f"attention_mask must have the shape of input_ids {tuple(ids.shape)}")
        mask = mask.to(ids.device).bool()
    return ids.long(), mask


# ------------------------------------------------------------------------------------------------ transformers


def _hf_blocks(encoder: nn.Module, path: str, cfg, causal: bool) -> list[BlockSpec]:
    blocks = []
    for i, layer in enumerate(encoder.layers):
        pre, att = f"{path}.layers.{i}", layer.self_attn
        qkv = tuple(LinearSpec.of(chk.expect_linear(getattr(att, n), f"{pre}.self_attn.{n}"))
                    for n in ("q_proj", "k_proj", "v_proj"))
        blocks.append(_block(pre, ln1=layer.layer_norm1, ln2=layer.layer_norm2, qkv=qkv, proj=att.out_proj,
                             fc1=layer.mlp.fc1, fc2=layer.mlp.fc2,
                             act=chk.activation_name(layer.mlp.activation_fn, f"{pre}.mlp.activation_fn"),
                             heads=int(cfg.num_attention_heads), width=int(cfg.hidden_size), causal=causal))
    return blocks


def _build_hf(model: nn.Module) -> ClipSpec:
    vm, tm = model.vision_model, model.text_model
    vcfg, tcfg = model.config.vision_config, model.config.text_config
    emb = vm.embeddings
    conv = emb.patch_embedding
    chk.expect_type(conv, "vision_model.embeddings.patch_embedding", (nn.Conv2d,))
    img = (int(vcfg.image_size),) * 2
    grid = (img[0] // int(vcfg.patch_size), img[1] // int(vcfg.patch_size))
    vision = Tower("vision", _hf_blocks(vm.encoder, "vision_model.encoder", vcfg, False),
                   _vision_embed(conv, emb.class_embedding.detach(), emb.position_embedding.weight.detach(),
                                 NormSpec.of(chk.expect_layernorm(vm.pre_layrnorm, "vision_model.pre_layrnorm")),
                                 img, grid),
                   NormSpec.of(chk.expect_layernorm(vm.post_layernorm, "vision_model.post_layernorm")),
                   LinearSpec.of(chk.expect_linear(model.visual_projection, "visual_projection")), grid, img)
    eos_id = int(tcfg.eos_token_id)

    def eos_of(ids: torch.Tensor) -> torch.Tensor:  # as CLIPTextModel pools
        if eos_id == 2:  # the legacy configuration: the highest id is the end of text
            return ids.argmax(dim=-1)
        hit = ids == eos_id
        if not bool(hit.any(dim=-1).all()):
            raise InputError(f"every text must contain the end-of-text token {eos_id} (the pooled position)")
        return hit.int().argmax(dim=-1)

    temb = tm.embeddings
    text = Tower("text", _hf_blocks(tm.encoder, "text_model.encoder", tcfg, True),
                 _text_embed(temb.token_embedding.weight.detach(), temb.position_embedding.weight.detach(), eos_of),
                 NormSpec.of(chk.expect_layernorm(tm.final_layer_norm, "text_model.final_layer_norm")),
                 LinearSpec.of(chk.expect_linear(model.text_projection, "text_projection")))
    return ClipSpec("transformers.CLIPModel", vision, text, model.logit_scale.detach().exp())


# ---------------------------------------------------------------------------------------------------- open_clip


def _open_clip_blocks(transformer: nn.Module, path: str, causal: bool) -> list[BlockSpec]:
    blocks = []
    for i, blk in enumerate(transformer.resblocks):
        pre = f"{path}.resblocks.{i}"
        att = blk.attn
        chk.expect_type(att, f"{pre}.attn", (nn.MultiheadAttention,))
        if att.in_proj_weight is None or att.bias_k is not None:
            chk.fail(f"{pre}.attn", att, "separate q/k/v weights or key biases are not supported")
        for name in ("ls_1", "ls_2", "ln_attn"):
            if hasattr(blk, name):
                chk.expect_identity_or(getattr(blk, name), f"{pre}.{name}")
        if hasattr(blk.mlp, "ln"):
            chk.expect_identity_or(blk.mlp.ln, f"{pre}.mlp.ln")
        qkv = (LinearSpec(att.in_proj_weight.detach(), _detach(att.in_proj_bias), att.in_proj_weight),)
        blocks.append(_block(pre, ln1=blk.ln_1, ln2=blk.ln_2, qkv=qkv, proj=att.out_proj, fc1=blk.mlp.c_fc,
                             fc2=blk.mlp.c_proj, act=chk.activation_name(blk.mlp.gelu, f"{pre}.mlp.gelu"),
                             heads=int(att.num_heads), width=int(att.embed_dim), causal=causal))
    return blocks


def _detach(t):
    return None if t is None else t.detach()


def _build_open_clip(model: nn.Module) -> ClipSpec:
    v = model.visual
    if type(v).__name__ != "VisionTransformer":
        raise UnsupportedModelError(f"unsupported open_clip vision tower {type(v).__name__}: a ViT is needed")
    if getattr(v, "attn_pool", None) is not None or getattr(v, "pool_type", "tok") != "tok":
        raise UnsupportedModelError("unsupported open_clip vision tower: attention or average pooling (only the "
                                    "class token, pool_type='tok', is supported)")
    if getattr(model, "text_pool_type", "argmax") != "argmax":
        raise UnsupportedModelError(f"unsupported open_clip text pooling {model.text_pool_type!r} (argmax only)")
    img = tuple(int(s) for s in v.image_size) if isinstance(v.image_size, (tuple, list)) else (int(v.image_size),) * 2
    grid = tuple(int(g) for g in v.grid_size)
    vision = Tower("vision", _open_clip_blocks(v.transformer, "visual.transformer", False),
                   _vision_embed(v.conv1, v.class_embedding.detach(), v.positional_embedding.detach(),
                                 NormSpec.of(chk.expect_layernorm(v.ln_pre, "visual.ln_pre")), img, grid),
                   NormSpec.of(chk.expect_layernorm(v.ln_post, "visual.ln_post")), _matrix_projection(v.proj),
                   grid, img)
    proj = model.text_projection
    text_proj = LinearSpec.of(proj) if isinstance(proj, nn.Linear) else _matrix_projection(proj)
    text = Tower("text", _open_clip_blocks(model.transformer, "transformer", True),
                 _text_embed(model.token_embedding.weight.detach(), model.positional_embedding.detach(),
                             lambda ids: ids.argmax(dim=-1)),
                 NormSpec.of(chk.expect_layernorm(model.ln_final, "ln_final")), text_proj)
    return ClipSpec("open_clip.CLIP", vision, text, model.logit_scale.detach().exp())

