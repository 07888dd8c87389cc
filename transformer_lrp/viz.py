"""Pictures of explanations: heatmap overlays for images, highlighted tokens for text. Batches or single samples;
numpy/PIL only (no plotting library), usable from a notebook or a script.

    from transformer_lrp import viz
    panels = viz.overlay(images, exp.maps())          # [B, 3, H, W] in [0, 1]: the map over each image
    viz.save_panel("cat.png", images[0], exp.maps()[0], title="tabby cat (p=0.91)")
    html = viz.text_html(tokens, exp.relevance[0])    # one sentence, tokens tinted by relevance
"""

from __future__ import annotations

import html as _html
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from transformer_lrp.explanation import image_size_of

# A perceptual dark-to-bright colormap (anchors of matplotlib's "inferno", linearly interpolated).
_INFERNO = np.array([[0.001, 0.000, 0.014], [0.258, 0.039, 0.406], [0.578, 0.148, 0.404], [0.865, 0.317, 0.226],
                     [0.988, 0.645, 0.040], [0.988, 0.998, 0.645]])


def colormap(values: torch.Tensor) -> torch.Tensor:
    """``values`` in [0, 1] (any shape) → RGB in [0, 1], shape ``[..., 3]`` (the inferno colormap)."""
    v = values.detach().float().clamp(0, 1).cpu().numpy()
    pos = v * (len(_INFERNO) - 1)
    lo = np.floor(pos).astype(int).clip(0, len(_INFERNO) - 2)
    frac = (pos - lo)[..., None]
    rgb = _INFERNO[lo] * (1 - frac) + _INFERNO[lo + 1] * frac
    return torch.from_numpy(rgb.astype(np.float32))


def _unit(maps: torch.Tensor) -> torch.Tensor:
    """Per-map min–max to [0, 1] over the last two dimensions (a constant map becomes 0)."""
    lo = maps.amin(dim=(-2, -1), keepdim=True)
    span = maps.amax(dim=(-2, -1), keepdim=True) - lo
    return torch.where(span > 0, (maps - lo) / torch.where(span > 0, span, 1), torch.zeros_like(maps))


def heatmap(maps: torch.Tensor, size: int | tuple[int, int] | None = None) -> torch.Tensor:
    """Relevance maps ``[h, w]`` or ``[B, h, w]`` (a patch grid or pixels) → colored ``[.., 3, H, W]`` in [0, 1]:
    bilinear upsampling to ``size`` (default: as given; an int is a square), per-map min–max, the inferno
    colormap."""
    single = maps.dim() == 2
    m = maps.detach().float().cpu()[None] if single else maps.detach().float().cpu()
    if m.dim() != 3:
        raise ValueError(f"maps must be [h, w] or [B, h, w], got shape {tuple(maps.shape)}")
    size = image_size_of(size, tuple(m.shape[-2:]))
    if tuple(m.shape[-2:]) != size:
        m = F.interpolate(m[:, None], size=size, mode="bilinear", align_corners=False)[:, 0]
    out = colormap(_unit(m)).permute(0, 3, 1, 2)
    return out[0] if single else out


def overlay(images: torch.Tensor, maps: torch.Tensor, alpha: float = 0.55) -> torch.Tensor:
    """The map blended over the image: ``images`` ``[3, H, W]`` or ``[B, 3, H, W]`` in [0, 1] (displayable, not
    normalized), ``maps`` ``[h, w]`` or ``[B, h, w]``; returns the same shape as ``images``, in [0, 1]."""
    single = images.dim() == 3
    img = images.detach().float().cpu()[None] if single else images.detach().float().cpu()
    m = maps[None] if maps.dim() == 2 else maps
    if img.dim() != 4 or img.shape[1] != 3:
        raise ValueError(f"images must be [3, H, W] or [B, 3, H, W] in [0, 1], got shape {tuple(images.shape)}")
    if m.shape[0] != img.shape[0]:
        raise ValueError(f"{img.shape[0]} images but {m.shape[0]} maps")
    out = ((1 - alpha) * img.clamp(0, 1) + alpha * heatmap(m, tuple(img.shape[-2:]))).clamp(0, 1)
    return out[0] if single else out


def to_pil(image: torch.Tensor):
    """``[3, H, W]`` in [0, 1] → a PIL image."""
    from PIL import Image

    arr = (image.detach().float().cpu().clamp(0, 1).permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    return Image.fromarray(arr)


# Panel layout, in pixels: gaps between tiles, the title band above them, the colour bar's width.
GAP, TITLE_BAND, BAR_WIDTH = 6, 22, 12


def _font(size: int = 11):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: the bitmap font, one size
        return ImageFont.load_default()


def _label(draw, xy: tuple[int, int], text: str, font, anchor_right: bool = False) -> None:
    """White text on a dark box: readable on white, black or busy images alike."""
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
    w, h = right - left, bottom - top
    x, y = (xy[0] - w - 6, xy[1]) if anchor_right else xy
    draw.rectangle((x, y, x + w + 5, y + h + 5), fill=(20, 20, 20))
    draw.text((x + 3 - left, y + 3 - top), text, fill=(255, 255, 255), font=font)


def _value(v: float) -> str:
    return f"{v:.3g}" if v != 0 else "0"


def panel(image: torch.Tensor, relevance_map: torch.Tensor, title: str = "", alpha: float = 0.55):
    """One picture of one explanation: the image, the map and the overlay side by side, the title above, and a
    colour bar from the map's smallest to its largest value (a tick at 0 for a signed map). A PIL image;
    ``image`` ``[3, H, W]`` in [0, 1], ``relevance_map`` ``[h, w]``."""
    from PIL import Image, ImageDraw

    h, w = image.shape[-2:]
    tiles = [image.clamp(0, 1), heatmap(relevance_map, (h, w)), overlay(image, relevance_map, alpha)]
    font = _font()
    values = relevance_map.detach().double()
    lo, hi = float(values.min()), float(values.max())
    labels = [_value(hi), _value(lo)] + (["0"] if lo < 0 < hi else [])
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    label_w = max(probe.textbbox((0, 0), t, font=font)[2] for t in labels) + 4
    bar_x = 3 * (w + GAP) + GAP
    canvas = Image.new("RGB", (bar_x + BAR_WIDTH + GAP + label_w + GAP, h + TITLE_BAND + GAP), "white")
    for i, tile in enumerate(tiles):
        canvas.paste(to_pil(tile), (GAP + i * (w + GAP), TITLE_BAND))
    # the colour bar: the map's largest value at the top, its smallest at the bottom
    ramp = torch.linspace(1, 0, h)[:, None].expand(h, BAR_WIDTH)
    canvas.paste(to_pil(colormap(ramp).permute(2, 0, 1)), (bar_x, TITLE_BAND))
    draw = ImageDraw.Draw(canvas)
    for x in [GAP + i * (w + GAP) for i in range(3)] + [bar_x]:  # a thin frame: white images stay visible
        right = x + (BAR_WIDTH if x == bar_x else w)
        draw.rectangle((x - 1, TITLE_BAND - 1, right, TITLE_BAND + h), outline=(170, 170, 170))
    draw.text((GAP, 5), title, fill=(0, 0, 0), font=font)
    text_x = bar_x + BAR_WIDTH + 3
    draw.text((text_x, TITLE_BAND), labels[0], fill=(0, 0, 0), font=font)
    bottom = probe.textbbox((0, 0), labels[1], font=font)[3]
    draw.text((text_x, TITLE_BAND + h - bottom), labels[1], fill=(0, 0, 0), font=font)
    if lo < 0 < hi:
        zero = TITLE_BAND + round((hi / (hi - lo)) * (h - 1))
        draw.line((bar_x - 2, zero, bar_x + BAR_WIDTH + 1, zero), fill=(0, 0, 0))
        if TITLE_BAND + 14 < zero < TITLE_BAND + h - 14:  # clear of the two end labels
            draw.text((text_x, zero - 6), "0", fill=(0, 0, 0), font=font)
    for i, label in enumerate(("image", "relevance", "overlay")):
        if draw.textbbox((0, 0), label, font=font)[2] + 10 <= w:  # a tile too small for its label goes without
            _label(draw, (GAP + i * (w + GAP) + w - 2, TITLE_BAND + 2), label, font, anchor_right=True)
    return canvas


def save_panel(path: str | Path, image: torch.Tensor, relevance_map: torch.Tensor, title: str = "",
               alpha: float = 0.55) -> Path:
    """Write :func:`panel` as a PNG; returns the path."""
    path = Path(path)
    panel(image, relevance_map, title, alpha).save(path, format="PNG")
    return path


def _token_style(score: float, scale: float, signed: bool) -> str:
    a = 0.0 if scale <= 0 else min(1.0, abs(score) / scale)
    if signed and score < 0:
        return f"background: rgba(37, 99, 235, {a:.3f})"  # blue for negative relevance
    return f"background: rgba(234, 88, 12, {a:.3f})"  # orange for positive relevance


def _token_span(token: str, score: float, scale: float, signed: bool, unknown: bool) -> str:
    tip = f"{score:.4g}" + (" (not in the tokenizer&#39;s vocabulary)" if unknown else "")
    return (f'<span class="{"tok unk" if unknown else "tok"}" style="{_token_style(score, scale, signed)}" '
            f'title="{tip}">{_html.escape(token)}</span>')


def text_html(tokens: list[str] | list[list[str]], scores, signed: bool | None = None,
              titles: list[str] | str | None = None, unknown_token: str | None = None) -> str:
    """Tokens tinted by their relevance, as an HTML fragment: one sentence (``tokens`` a list of strings,
    ``scores`` ``[T]``) or a batch (a list of token lists; ``scores`` ``[B, T]``, whose positions beyond a
    sentence's tokens are ignored, or a list of per-sentence ``[T_i]``). Orange for positive relevance, blue for
    negative when ``signed`` (default: when any score is negative); opacity by ``|score|`` over the sentence's
    largest. The score is in each token's tooltip. Tokens equal to ``unknown_token`` (the tokenizer's, e.g.
    ``"[UNK]"``: words it does not know) are shown with a dashed red outline. Put it in a page with
    :func:`html_page`."""
    batch = bool(tokens) and isinstance(tokens[0], list)
    token_rows = tokens if batch else [tokens]
    if isinstance(scores, (list, tuple)):
        rows = [torch.as_tensor(r).detach().float().cpu() for r in scores]
    else:
        s = scores.detach().float().cpu()
        rows = list(s if batch else s[None])
    if len(rows) != len(token_rows) or any(r.dim() != 1 for r in rows):
        raise ValueError(f"{len(token_rows)} token lists but {len(rows)} score rows (or rows not 1-D)")
    if titles is not None and isinstance(titles, str):
        titles = [titles]
    parts = []
    for i, (toks, row) in enumerate(zip(token_rows, rows)):
        if len(toks) > row.shape[0]:
            raise ValueError(f"sentence {i}: {len(toks)} tokens but {row.shape[0]} scores")
        vals = row[: len(toks)]
        is_signed = bool((vals < 0).any()) if signed is None else signed
        scale = float(vals.abs().max()) if len(toks) else 0.0
        spans = " ".join(_token_span(t, float(v), scale, is_signed, t == unknown_token) for t, v in zip(toks, vals))
        head = f'<div class="title">{_html.escape(titles[i])}</div>' if titles else ""
        parts.append(f'<div class="sentence">{head}{spans}</div>')
    return "\n".join(parts)


def html_page(body: str, title: str = "transformer-lrp") -> str:
    """A self-contained HTML page around fragments from :func:`text_html`."""
    style = ("body{font-family:sans-serif;max-width:60em;margin:2em auto;line-height:1.9}"
             ".tok{padding:0.1em 0.2em;border-radius:0.25em}.sentence{margin:1.2em 0}"
             ".title{font-size:0.85em;color:#555;margin-bottom:0.2em}.unk{outline:1px dashed #c00}")
    return (f"<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>{_html.escape(title)}</title>"
            f"<style>{style}</style></head>\n<body>\n<h1>{_html.escape(title)}</h1>\n{body}\n</body></html>\n")
