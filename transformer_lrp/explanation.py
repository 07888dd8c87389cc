"""The result of ``explain``: relevance over input tokens, with helpers to turn it into image maps."""

from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from transformer_lrp.conservation import Conservation


@dataclass
class Explanation:
    r"""Explanations of a batch.

    Attributes:
        relevance: `[B, T]`. The CLS row over input tokens. Vision: the patch tokens only (prefix tokens such as
            CLS, distillation and register tokens dropped), in grid (row-major) order, ``T = h·w``. Text: every
            token position, padded positions 0, the CLS position per ``cls_relevance``.
        target: `[B]`, the explained class of each sample.
        logits: `[B, C]`, the model's logits (computed by the sweep from the model's own weights).
        method: the method's name.
        modality: ``"vision"`` or ``"text"``.
        grid_size: `(h, w)` of the patch grid (vision).
        image_size: `(H, W)` of the input images (vision).
        attention_mask: `[B, T]` bool (text; ``None`` when no position is padding).
        pixel_relevance: `[B, H, W]`, ``full_lrp``, ``attnlrp`` and ``cp_lrp`` on vision only: relevance on
            pixels, summed over channels.
        conservation: ``full_lrp``, ``attnlrp`` and ``cp_lrp`` (the methods that carry relevance to the input): the
            relevance put in at the explained logit against the total that reached the input
            (:class:`~transformer_lrp.Conservation`); ``None`` for the methods whose output is a map.
        input_ids: decoder LLMs: `[B, T]`, the tokens the relevance is over (with a
            :class:`~transformer_lrp.targets.Continuation`, the prompt followed by the continuation, left-padded).
        position: decoder LLMs: `[B]` (or `[B, C]`), the position whose next-token logit is explained.
        versus: a :class:`~transformer_lrp.targets.Contrast`'s other token `[B]`.
        first_token_share: decoder LLMs: `[B]` (or `[B, C]`), the first real token's share of the total absolute
            relevance: language models put much attention on it (an attention sink, docs/method.md §2.14), so a map
            may be dominated by it; ``top_tokens(k, exclude_first=True)`` and the pictures can leave it out.

    With a :class:`~transformer_lrp.targets.Continuation`, ``relevance`` is `[B, C, T]` (one row per continuation
    token), ``target`` and ``position`` `[B, C]` (−1 where a ragged continuation has no token) and ``logits``
    `[B, C, V]`.
    """

    relevance: torch.Tensor
    target: torch.Tensor
    logits: torch.Tensor
    method: str
    modality: str
    grid_size: tuple[int, int] | None = None
    image_size: tuple[int, int] | None = None
    attention_mask: torch.Tensor | None = None
    pixel_relevance: torch.Tensor | None = None
    conservation: Conservation | None = None
    input_ids: torch.Tensor | None = None
    position: torch.Tensor | None = None
    versus: torch.Tensor | None = None
    first_token_share: torch.Tensor | None = None

    def top_tokens(self, k: int = 5, exclude_first: bool = False) -> torch.Tensor:
        """Text: the positions of the ``k`` most relevant real tokens per row, `[..., k]` (``exclude_first``: the
        first real token, a decoder's attention sink, is never picked)."""
        if self.modality != "text":
            raise ValueError("top_tokens() needs a text explanation")
        r = self.relevance.clone()
        mask = self.attention_mask
        if mask is not None:
            while mask.dim() < r.dim():
                mask = mask.unsqueeze(-2)
            r = r.masked_fill(~mask.expand_as(r), float("-inf"))
        if exclude_first:
            first = (torch.zeros(r.shape[0], dtype=torch.long, device=r.device) if self.attention_mask is None
                     else self.attention_mask.long().argmax(dim=1))
            index = first.view(-1, *([1] * (r.dim() - 1))).expand(*r.shape[:-1], 1)
            r = r.scatter(-1, index, float("-inf"))
        return r.topk(min(k, r.shape[-1]), dim=-1).indices

    def __len__(self) -> int:
        return self.relevance.shape[0]

    def maps(self) -> torch.Tensor:
        """Vision: relevance as `[B, h, w]` patch maps."""
        if self.modality != "vision" or self.grid_size is None:
            raise ValueError("maps() needs a vision explanation (text relevance has no grid)")
        return self.relevance.reshape(-1, *self.grid_size)

    def image_maps(self, size: int | tuple[int, int] | None = None, normalize: bool = True,
                   pixels: bool | None = None) -> torch.Tensor:
        r"""Vision: `[B, H, W]` maps at image resolution (default: the input size; an int is a square size).

        Patch maps are upsampled bilinearly (``align_corners=False``, as the paper's evaluation does). ``pixels``:
        ``None`` (default) takes ``pixel_relevance`` where the method has it (``full_lrp``, ``attnlrp``,
        ``cp_lrp``) and the patch map otherwise; ``False`` always the patch map; ``True`` requires pixel relevance.
        A signed pixel map of the rule sets alternates in sign from pixel to pixel, so a ranking of its pixels (a
        perturbation test) is better served by their patch map (docs/method.md §12). With ``normalize`` each map is
        min–max scaled to [0, 1] (a constant map becomes 0).
        """
        if pixels and self.pixel_relevance is None:
            raise ValueError(f"{self.method} has no pixel relevance (full_lrp, attnlrp and cp_lrp on images do)")
        size = image_size_of(size, self.image_size)
        if self.pixel_relevance is not None and pixels is not False:
            out = self.pixel_relevance
            if tuple(out.shape[-2:]) != size:
                out = F.interpolate(out[:, None], size=size, mode="bilinear", align_corners=False)[:, 0]
        else:
            out = F.interpolate(self.maps()[:, None], size=size, mode="bilinear", align_corners=False)[:, 0]
        return min_max(out) if normalize else out


def image_size_of(size: object, default: tuple[int, int] | None) -> tuple[int, int]:
    """``size`` as ``(H, W)``: an int (Python or numpy) is a square, ``None`` the default."""
    if size is None:
        if default is None:
            raise ValueError("no size given and the explanation has no image size")
        return tuple(default)
    sides = (size, size) if not isinstance(size, (tuple, list, torch.Size)) else tuple(size)
    try:
        if len(sides) != 2 or any(isinstance(s, bool) for s in sides):
            raise TypeError
        height, width = (operator.index(s) for s in sides)
    except TypeError:
        raise ValueError(f"size must be an int or (H, W) of ints, got {size!r}") from None
    if height <= 0 or width <= 0:
        raise ValueError(f"size must be positive, got {size!r}")
    return height, width


def min_max(x: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
    """Per-sample min–max scaling to [0, 1] over the non-batch entries where ``valid`` (default: all).

    A constant map becomes 0 (instead of the 0/0 of a plain min–max).
    """
    dims = tuple(range(1, x.dim()))
    if valid is None:
        lo, hi = x.amin(dim=dims, keepdim=True), x.amax(dim=dims, keepdim=True)
    else:
        big = torch.finfo(x.dtype).max
        lo = torch.where(valid, x, big).amin(dim=dims, keepdim=True)
        hi = torch.where(valid, x, -big).amax(dim=dims, keepdim=True)
    return scale_to_unit(x, lo, hi)


def scale_to_unit(x: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """``(x − lo) / (hi − lo)`` with the extremes given (broadcasting); 0 where ``hi == lo`` (a constant map)."""
    span = hi - lo
    safe_span = torch.where(span > 0, span, torch.ones_like(span))
    return torch.where(span > 0, (x - lo) / safe_span, torch.zeros_like(x))


@dataclass
class ClipExplanation:
    r"""Explanations of image–text pairs of a CLIP model: pair ``p`` is image ``image_index[p]`` with text
    ``text_index[p]``, and both towers explain its similarity logit ``logits_per_image[image_index[p],
    text_index[p]]`` with the other tower's embedding held fixed.

    Attributes:
        image: the image tower's :class:`Explanation` over patches, one row per pair (``image.maps()``,
            ``image.image_maps()``; ``image.logits`` is ``logits_per_image`` at the pairs' images).
        text: the text tower's :class:`Explanation` over the text tokens, one row per pair: the end-of-text row of
            the rollout, positions after the end of text (padding) exactly 0.
        image_index, text_index: `[P]`.
        logits_per_image: `[B_img, B_txt]`, as the model computes it.
    """

    image: Explanation
    text: Explanation
    image_index: torch.Tensor
    text_index: torch.Tensor
    logits_per_image: torch.Tensor

    def __len__(self) -> int:
        return self.image_index.shape[0]

    def image_maps(self, size: int | tuple[int, int] | None = None, normalize: bool = True,
                   pixels: bool | None = None) -> torch.Tensor:
        return self.image.image_maps(size, normalize, pixels)


@dataclass
class GenerationExplanation:
    r"""What a decoder LLM's answer was made of, token by token (``explain_generation``).

    Attributes:
        relevance: `[B, n_out, N]`: for each answer token, the relevance of every input position (the prompt and the
            answer's earlier tokens; later positions and padding are 0).
        input_ids: `[B, N]`: the prompt followed by the answer, left-padded.
        attention_mask: `[B, N]` bool, the real tokens.
        prompt_mask: `[B, N]` bool, the prompt's tokens (the rest of the real tokens are the answer's).
        answer_ids: `[B, n_out]` token ids, −1 after a sample's answer ended (its end-of-sequence token included).
        answer_mask: `[B, n_out]` bool.
        explained_logit: `[B, n_out]`, each answer token's logit at the position before it.
        position: `[B, n_out]`, that position.
        first_token_share: `[B, n_out]`, the first real token's share of the absolute relevance (attention sink).
        method: the method's name.
    """

    relevance: torch.Tensor
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    prompt_mask: torch.Tensor
    answer_ids: torch.Tensor
    answer_mask: torch.Tensor
    explained_logit: torch.Tensor
    position: torch.Tensor
    first_token_share: torch.Tensor
    method: str

    def __len__(self) -> int:
        return self.relevance.shape[0]

    def matrix(self, sample: int = 0, exclude_first: bool = False) -> torch.Tensor:
        """`[n_answer, n_real]`: sample ``sample``'s answer tokens × its real input tokens (prompt, then answer),
        the padding dropped (``exclude_first``: the first real token's column, the attention sink, set to 0)."""
        rows = self.relevance[sample][self.answer_mask[sample]]
        out = rows[:, self.attention_mask[sample]]
        if exclude_first:
            out = out.clone()
            out[:, 0] = 0
        return out
