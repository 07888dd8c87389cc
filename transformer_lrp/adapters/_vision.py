"""Shared by the vision adapters: image checks and the relevance path from patch tokens back to pixels."""

from __future__ import annotations

import torch
from torch import nn

from transformer_lrp.adapters import _checks as chk
from transformer_lrp.errors import InputError
from transformer_lrp.ops import patch_embed_zb_relevance


def check_images(images: object, weight: torch.Tensor, img_size: tuple[int, ...]) -> torch.Tensor:
    if not isinstance(images, torch.Tensor):
        raise InputError(f"vision models take an image tensor [B, C, H, W], got {type(images).__name__}")
    if images.dim() != 4:
        raise InputError(f"expected images of shape [B, C, H, W], got shape {tuple(images.shape)}")
    _, ch, h, w = images.shape
    if ch != weight.shape[1]:
        raise InputError(f"expected {weight.shape[1]} image channels, got {ch} (shape {tuple(images.shape)})")
    if (h, w) != tuple(img_size):
        raise InputError(f"expected images of size {tuple(img_size)}, got {(h, w)}: the model's img_size is fixed")
    chk.check_float_input("images", images, weight)
    return images


def patches_to_pixels(
    r_patches: torch.Tensor, images: torch.Tensor, conv: nn.Conv2d, grid: tuple[int, int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Relevance of the patch tokens `[B, P, D]` → (pixels `[B, H, W]` summed over channels, tokens `[B, P]`)."""
    r_grid = r_patches.transpose(1, 2).reshape(r_patches.shape[0], -1, grid[0], grid[1])
    pixels = patch_embed_zb_relevance(images, conv.weight.detach(), conv.stride, conv.padding, r_grid)
    return pixels.sum(dim=1), r_patches.sum(dim=-1)


def gradient_to_pixels(
    grad_patches: torch.Tensor, patches: torch.Tensor, images: torch.Tensor, conv: nn.Conv2d, grid: tuple[int, int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """A modified gradient at the patch tokens `[B, P, D]` → (pixels `[B, H, W]`: images ⊙ the gradient through the
    patch embedding, summed over channels; tokens `[B, P]`: the patch embedding's output ⊙ its gradient)."""
    g_grid = grad_patches.transpose(1, 2).reshape(grad_patches.shape[0], -1, grid[0], grid[1])
    g_images = torch.nn.grad.conv2d_input(images.shape, conv.weight.detach(), g_grid, conv.stride, conv.padding)
    return (images * g_images).sum(dim=1), (patches * grad_patches).sum(dim=-1)
