"""Adapter for timm ``VisionTransformer`` (and DeiT's ``VisionTransformerDistilled``).

Covers any depth/width/heads/patch/image size, class token, distillation token, register tokens, LayerScale
(DINOv2), ``no_embed_class`` position embeddings, pre-norm, fc-norm, and fused or unfused attention (the engine
computes attention itself, so the model's ``fused_attn`` setting cannot change the result).
"""

from __future__ import annotations

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
from transformer_lrp.errors import UnsupportedModelError


def _timm_classes() -> dict[str, type]:
    from timm.layers import Attention, DropPath, LayerScale, Mlp, PatchDropout, PatchEmbed
    from timm.models import vision_transformer as vt

    classes = {
        "VisionTransformer": vt.VisionTransformer,
        "Block": vt.Block,
        "Attention": Attention,
        "Mlp": Mlp,
        "PatchEmbed": PatchEmbed,
        "DropPath": DropPath,
        "PatchDropout": PatchDropout,
        "LayerScale": LayerScale,
    }
    classes["LayerScaleVT"] = getattr(vt, "LayerScale", LayerScale)
    try:
        from timm.models.deit import VisionTransformerDistilled

        classes["VisionTransformerDistilled"] = VisionTransformerDistilled
    except ImportError:  # pragma: no cover - old timm
        pass
    return classes


def matches(model: nn.Module) -> bool:
    try:
        c = _timm_classes()
    except ImportError:
        return False
    return type(model) in (c["VisionTransformer"], c.get("VisionTransformerDistilled"))


def _layer_scale(module: nn.Module, path: str, c: dict[str, type]) -> torch.Tensor | None:
    if isinstance(module, nn.Identity):
        return None
    chk.expect_type(module, path, (c["LayerScale"], c["LayerScaleVT"]))
    return module.gamma.detach()


def _block(blk: nn.Module, path: str, c: dict[str, type]) -> BlockSpec:
    chk.expect_type(blk, path, (c["Block"],), "only timm's standard pre-norm Block is supported")
    attn, mlp = blk.attn, blk.mlp
    chk.expect_type(attn, f"{path}.attn", (c["Attention"],))
    for name in ("q_norm", "k_norm", "norm"):
        sub = getattr(attn, name, None)
        if sub is not None and not isinstance(sub, nn.Identity):
            chk.fail(f"{path}.attn.{name}", sub, "qk-norm / scale-norm attention has no relevance rule here")
    if getattr(attn, "gate", None) is not None:
        chk.fail(f"{path}.attn.gate", attn.gate, "gated attention has no relevance rule here")
    chk.expect_type(mlp, f"{path}.mlp", (c["Mlp"],), "only timm's Mlp (fc1, act, fc2) is supported")
    if not isinstance(mlp.norm, nn.Identity):
        chk.fail(f"{path}.mlp.norm", mlp.norm, "an MLP-internal norm is not supported")
    for name in ("drop_path1", "drop_path2"):
        chk.expect_identity_or(getattr(blk, name), f"{path}.{name}", (c["DropPath"],))
    return BlockSpec(
        pre_norm=True,
        norm1=NormSpec.of(chk.expect_layernorm(blk.norm1, f"{path}.norm1")),
        norm2=NormSpec.of(chk.expect_layernorm(blk.norm2, f"{path}.norm2")),
        qkv=(LinearSpec.of(chk.expect_linear(attn.qkv, f"{path}.attn.qkv")),),
        num_heads=int(attn.num_heads),
        head_dim=int(attn.head_dim),
        scale=float(attn.scale),
        proj=LinearSpec.of(chk.expect_linear(attn.proj, f"{path}.attn.proj")),
        fc1=LinearSpec.of(chk.expect_linear(mlp.fc1, f"{path}.mlp.fc1")),
        act=chk.activation_name(mlp.act, f"{path}.mlp.act"),
        fc2=LinearSpec.of(chk.expect_linear(mlp.fc2, f"{path}.mlp.fc2")),
        ls1=_layer_scale(blk.ls1, f"{path}.ls1", c),
        ls2=_layer_scale(blk.ls2, f"{path}.ls2", c),
    )


def build(model: nn.Module) -> EncoderSpec:
    c = _timm_classes()
    distilled = type(model) is c.get("VisionTransformerDistilled")
    if getattr(model, "attn_pool", None) is not None or model.global_pool != "token":
        raise UnsupportedModelError(
            f"unsupported timm VisionTransformer setting global_pool={model.global_pool!r}: the method explains the "
            "class token's logits; only global_pool='token' is supported"
        )
    if getattr(model, "cls_token", None) is None:
        raise UnsupportedModelError("unsupported timm VisionTransformer without a class token (class_token=False)")
    if getattr(model, "dynamic_img_size", False):
        raise UnsupportedModelError("unsupported timm VisionTransformer setting dynamic_img_size=True")
    head = model.head
    if not isinstance(head, nn.Linear):
        raise UnsupportedModelError(
            f"unsupported module 'head' ({type(head).__name__}): the model needs a Linear classification head "
            "(num_classes > 0)"
        )
    pe = model.patch_embed
    chk.expect_type(pe, "patch_embed", (c["PatchEmbed"],))
    chk.expect_type(pe.proj, "patch_embed.proj", (nn.Conv2d,))
    if not isinstance(pe.norm, nn.Identity):
        chk.fail("patch_embed.norm", pe.norm, "a patch-embedding norm is not supported")
    if getattr(pe, "dynamic_img_pad", False):
        chk.fail("patch_embed", pe, "dynamic_img_pad is not supported")
    chk.expect_identity_or(model.patch_drop, "patch_drop", (c["PatchDropout"],))
    norm_pre = None if isinstance(model.norm_pre, nn.Identity) else NormSpec.of(
        chk.expect_layernorm(model.norm_pre, "norm_pre")
    )
    final_norm = None if isinstance(model.norm, nn.Identity) else NormSpec.of(chk.expect_layernorm(model.norm, "norm"))
    fc_norm = None if isinstance(model.fc_norm, nn.Identity) else NormSpec.of(
        chk.expect_layernorm(model.fc_norm, "fc_norm")
    )
    blocks = [_block(blk, f"blocks.{i}", c) for i, blk in enumerate(model.blocks)]

    pre = (("norm", fc_norm),) if fc_norm is not None else ()
    if distilled:
        dist_head = model.head_dist
        if not isinstance(dist_head, nn.Linear):
            chk.fail("head_dist", dist_head, "expected a Linear distillation head")
        heads = (
            HeadBranch(0, pre + (("linear", LinearSpec.of(head)),), 0.5),
            HeadBranch(1, pre + (("linear", LinearSpec.of(dist_head)),), 0.5),
        )
    else:
        heads = (HeadBranch(0, pre + (("linear", LinearSpec.of(head)),)),)

    grid = tuple(int(g) for g in pe.grid_size)
    img_size = tuple(int(s) for s in pe.img_size)
    conv = pe.proj
    weight = conv.weight.detach()
    bias = None if conv.bias is None else conv.bias.detach()
    prefix = [model.cls_token.detach()]
    if distilled:
        prefix.append(model.dist_token.detach())
    if getattr(model, "reg_token", None) is not None:
        prefix.append(model.reg_token.detach())
    pos = None if model.pos_embed is None else model.pos_embed.detach()
    no_embed_class = bool(getattr(model, "no_embed_class", False))
    num_prefix = int(model.num_prefix_tokens)

    def embed(images: object) -> Embedded:
        x = check_images(images, weight, img_size)
        patches = torch.nn.functional.conv2d(x, weight, bias, conv.stride, conv.padding)
        patches = patches.flatten(2).transpose(1, 2)  # [B, P, D]
        b = patches.shape[0]
        prefix_tokens = [p.expand(b, -1, -1) for p in prefix]
        if pos is None:
            tokens = torch.cat(prefix_tokens + [patches], dim=1)
            u, v = None, None
        elif no_embed_class:
            u, v = patches, pos
            tokens = torch.cat(prefix_tokens + [patches + pos], dim=1)
        else:
            u, v = torch.cat(prefix_tokens + [patches], dim=1), pos
            tokens = u + v
        before_norm = tokens
        if norm_pre is not None:
            tokens = norm_pre(tokens)

        def from_gradient(grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            # through norm_pre (scale held constant), the position add (the gradient passes), the prefix dropped
            g = grad if norm_pre is None else constant_scale_norm_grad(norm_pre, before_norm, grad)
            return gradient_to_pixels(g[:, num_prefix:], patches, x, conv, grid)

        def to_input(relevance: torch.Tensor, add_rule) -> tuple[torch.Tensor, torch.Tensor]:
            # Encoder input → patch tokens (through the position-embedding add) → pixels (z^B conv rule).
            if pos is None:
                r_patches = relevance[:, num_prefix:]
            elif no_embed_class:
                r_patches = add_rule(relevance[:, num_prefix:], u, v)[0]
            else:
                r_patches = add_rule(relevance, u, v)[0][:, num_prefix:]
            return patches_to_pixels(r_patches, x, conv, grid)

        return Embedded(tokens=tokens, key_mask=None, to_input=to_input, from_gradient=from_gradient)

    return EncoderSpec(
        family=f"timm.{type(model).__name__}",
        modality="vision",
        blocks=blocks,
        final_norm=final_norm,
        head=heads,
        num_classes=int(head.out_features),
        num_prefix_tokens=num_prefix,
        embed=embed,
        grid_size=grid,  # type: ignore[arg-type]
        image_size=img_size,  # type: ignore[arg-type]
    )
