"""z^B (bounded-input) rule of the patch-embedding convolution (docs/method.md §2.5), used by the ``full_lrp`` baseline.

With per-sample bounds ``L = min(X)``, ``H = max(X)`` over all channels and pixels of the (normalized) image:
``Z = conv(X, W) − conv(L, W⁺) − conv(H, W⁻) + 1e-9`` (plain division, no bias), and
``R_X = X ⊙ convᵀ(S, W) − L ⊙ convᵀ(S, W⁺) − H ⊙ convᵀ(S, W⁻)`` with ``S = R / Z``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def patch_embed_zb_relevance(
    image: torch.Tensor,
    weight: torch.Tensor,
    stride: tuple[int, int],
    padding: tuple[int, int],
    relevance: torch.Tensor,
) -> torch.Tensor:
    r"""Relevance of the input image of a ``Conv2d`` patch embedding.

    Args:
        image: `[B, C, H, W]`.
        weight: `[D, C, kh, kw]`.
        stride, padding: the convolution's.
        relevance: `[B, D, h, w]`, relevance of the convolution output.

    Returns:
        `[B, C, H, W]`.
    """
    w_pos, w_neg = weight.clamp(min=0), weight.clamp(max=0)
    low = image.amin(dim=(1, 2, 3), keepdim=True).expand_as(image)
    high = image.amax(dim=(1, 2, 3), keepdim=True).expand_as(image)

    def conv(t: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return F.conv2d(t, w, None, stride, padding)

    z = conv(image, weight) - conv(low, w_pos) - conv(high, w_neg) + 1e-9
    s = relevance / z
    out_h = (s.shape[2] - 1) * stride[0] - 2 * padding[0] + weight.shape[2]
    out_w = (s.shape[3] - 1) * stride[1] - 2 * padding[1] + weight.shape[3]
    output_padding = (image.shape[2] - out_h, image.shape[3] - out_w)

    def conv_t(w: torch.Tensor) -> torch.Tensor:
        return F.conv_transpose2d(s, w, None, stride, padding, output_padding)

    return image * conv_t(weight) - low * conv_t(w_pos) - high * conv_t(w_neg)
