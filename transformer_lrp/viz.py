"""Pictures of explanations: heatmap overlays for images, highlighted tokens for text, and a decoder LLM's answer
token by token. Batches or single samples; numpy/PIL only (no plotting library), usable from a notebook or a script.

    from transformer_lrp import viz
    panels = viz.overlay(images, exp.maps())          # [B, 3, H, W] in [0, 1]: the map over each image
    viz.save_panel("cat.png", images[0], exp.maps()[0], title="tabby cat (p=0.91)")
    html = viz.text_html(tokens, exp.relevance[0])    # one sentence, tokens tinted by relevance
    html = viz.generation_html(gen, tokenizer)        # explain_generation: hover an answer token to see its row
    viz.save_generation_matrix("m.png", gen, tokenizer)   # answer tokens × input tokens, per prompt
"""

from __future__ import annotations

import html as _html
import json
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


# Signed relevance in two colours, on pages and pictures alike: orange for positive, blue for negative.
POSITIVE_RGB, NEGATIVE_RGB = (234, 88, 12), (37, 99, 235)


def _tint(score: float, scale: float, signed: bool = True) -> str:
    """The CSS colour of a token: its hue by sign, its opacity ``|score| / scale`` (at most 1)."""
    a = 0.0 if scale <= 0 else min(1.0, abs(score) / scale)
    r, g, b = NEGATIVE_RGB if signed and score < 0 else POSITIVE_RGB
    return f"rgba({r}, {g}, {b}, {a:.3f})"


def _token_style(score: float, scale: float, signed: bool) -> str:
    return f"background: {_tint(score, scale, signed)}"


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


# --------------------------------------------------------------------------- decoder LLMs: answers token by token


def token_texts(tokenizer, ids) -> list[str]:
    """Each token id decoded on its own (``" Paris"``, ``"\\n"``, ``"<|im_end|>"``): what the model read."""
    return [tokenizer.decode([int(i)]) for i in ids]


def _answer_view(gen, sample: int, tokenizer) -> tuple[list[str], int, torch.Tensor]:
    """Sample ``sample`` of a :class:`~transformer_lrp.GenerationExplanation`: the texts of its real tokens (the
    prompt, then the answer), how many belong to the prompt, and its ``[n_answer, n_real]`` relevance."""
    ids = gen.input_ids[sample][gen.attention_mask[sample]].tolist()
    rows = gen.matrix(sample).detach().cpu()
    if rows.dtype in (torch.float16, torch.bfloat16):  # numpy has no bfloat16: shown in float32, exact for both
        rows = rows.float()
    n_prompt = int(gen.prompt_mask[sample].sum())
    if rows.shape[0] != len(ids) - n_prompt:
        raise ValueError(f"sample {sample}: {rows.shape[0]} answer rows but {len(ids) - n_prompt} answer tokens")
    if not bool(torch.isfinite(rows).all()):
        raise ValueError(f"sample {sample}: the relevance holds NaN or infinite values")
    return token_texts(tokenizer, ids), n_prompt, rows


def _numbers(values: torch.Tensor) -> str:
    """A JSON array of ``values`` (nested for 2-D), each number the shortest text that reads back to the same value
    in the tensor's own precision (so the page holds the explanation's numbers, not roundings of them)."""
    arr = values.numpy()
    if arr.ndim == 2:
        return "[" + ",".join(_numbers(torch.from_numpy(row)) for row in arr) + "]"
    return "[" + ",".join(str(v) for v in arr) + "]"


def _safe_json(text: str) -> str:
    """JSON inside a ``<script>`` element: ``<``, ``>`` and ``&`` escaped, so no token can close the element."""
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def _left_out(n_prompt: int, j: int, exclude_first: bool, exclude_self: bool) -> set[int]:
    """The columns of answer token ``j``'s row left out of its colour scale: the first token (an attention sink) and
    the token the answer token is predicted from (position ``n_prompt + j − 1``), each when asked."""
    return ({0} if exclude_first else set()) | ({n_prompt + j - 1} if exclude_self else set())


def _row_scale(row: torch.Tensor, left_out: set[int]) -> float:
    """The largest absolute relevance of a row, the columns ``left_out`` not counted."""
    keep = [c for c in range(row.shape[-1]) if c not in left_out]
    return float(row[keep].abs().max()) if keep else 0.0


def _shown(token: str) -> str:
    """A token on the page: escaped, its line breaks visible (↵) and kept."""
    return _html.escape(token).replace("\n", "↵\n")


_GENERATION_STYLE = """<style>
.generations .tok{white-space:pre-wrap;padding:0.1em 0.05em;border-radius:0.2em}
.generations .ans{cursor:pointer;border-bottom:2px solid #bbb}
.generations .ans:focus{outline:none}
.generations .explained{outline:2px solid #111}
.generations .self{outline:1px dashed #555}
.generations .later{opacity:0.35}
.generations .left-out{color:#888}
.generations .generation{margin:1.4em 0;padding:0.6em;border:1px solid #ddd;border-radius:0.4em}
.generations .status{font-size:0.85em;color:#333;margin-top:0.4em}
.generations .legend{font-size:0.85em;color:#555;display:block}
</style>"""

# Re-tints a sample's tokens with the row of the answer token under the pointer (or last clicked, or focused), with
# the colours of the page's first tint (viz._tint): hue by sign, opacity |r| over the row's largest |r|, the tokens
# left out (the checkboxes) uncoloured and not counted.
_GENERATION_SCRIPT = """<script>
(function () {
  var POS = [234, 88, 12], NEG = [37, 99, 235];
  function tint(v, scale) {
    var a = scale > 0 ? Math.min(1, Math.abs(v) / scale) : 0, c = v < 0 ? NEG : POS;
    return 'rgba(' + c[0] + ', ' + c[1] + ', ' + c[2] + ', ' + a.toFixed(3) + ')';
  }
  function pct(x) { return (100 * x).toFixed(1) + ' %'; }
  document.querySelectorAll('.generations').forEach(function (box) {
    if (box.dataset.ready) return;
    box.dataset.ready = '1';
    var hideFirst = box.querySelector('input.hide-first'), hideSelf = box.querySelector('input.hide-self');
    box.querySelectorAll('.generation').forEach(function (g) {
      var data = JSON.parse(g.querySelector('script.generation-data').textContent);
      var spans = g.querySelectorAll('.tok'), status = g.querySelector('.status'), chosen = 0;
      function show(j) {
        var row = data.rows[j], here = data.prompt + j, self = here - 1, scale = 0;
        function leftOut(c) { return (hideFirst.checked && c === 0) || (hideSelf.checked && c === self); }
        for (var c = 0; c < row.length; c++) if (!leftOut(c)) scale = Math.max(scale, Math.abs(row[c]));
        spans.forEach(function (s, c) {
          s.style.background = leftOut(c) ? 'transparent' : tint(row[c], scale);
          s.title = String(row[c]);
          s.classList.toggle('left-out', leftOut(c));
          s.classList.toggle('self', c === self);
          s.classList.toggle('explained', c === here);
          s.classList.toggle('later', c > here);
        });
        status.textContent = 'answer token ' + (j + 1) + ' of ' + data.rows.length + ': ' +
          JSON.stringify(data.tokens[here]) + ' · logit ' + data.logit[j].toPrecision(4) + ' · predicted from ' +
          JSON.stringify(data.tokens[self]) + ' (relevance ' + row[self].toPrecision(3) + ')' +
          ' · first token\\u2019s share of |relevance| ' + pct(data.share[j]);
      }
      spans.forEach(function (s, c) {
        var j = c - data.prompt;
        if (j < 0) return;
        s.addEventListener('mouseenter', function () { show(j); });
        s.addEventListener('mouseleave', function () { show(chosen); });
        s.addEventListener('click', function () { chosen = j; show(j); });
        s.addEventListener('focus', function () { chosen = j; show(j); });
      });
      hideFirst.addEventListener('change', function () { show(chosen); });
      hideSelf.addEventListener('change', function () { show(chosen); });
      show(chosen);
    });
  });
})();
</script>"""


def _status(tokens: list[str], n_prompt: int, row: torch.Tensor, n_answer: int, logit: float, share: float) -> str:
    """The line under a sample, for its first answer token (the script rewrites it for the others)."""
    self = n_prompt - 1
    return (f"answer token 1 of {n_answer}: {json.dumps(tokens[n_prompt])} · logit {logit:.4g} · predicted from "
            f"{json.dumps(tokens[self])} (relevance {float(row[self]):.3g}) · first token’s share of |relevance| "
            f"{100 * share:.1f} %")


def generation_html(gen, tokenizer, exclude_first: bool = False, exclude_self: bool = True,
                    titles: list[str] | None = None) -> str:
    """A decoder LLM's answers, explained token by token (:func:`~transformer_lrp.explain_generation`), as an HTML
    fragment: per prompt, its tokens and the answer's, tinted by the relevance of each for the answer's **first**
    token; hovering, clicking or focusing (Tab) an answer token re-tints them with that token's row (the tokens after
    it, not yet generated then, are faded). Orange for positive relevance, blue for negative, opacity by ``|r|`` over
    the row's largest; each token's value is in its tooltip.

    Two checkboxes leave a token out of the tint and the scale: the first token (``exclude_first``), the attention
    sink language models park attention on; and the token each answer token is predicted from (``exclude_self``,
    checked by default; outlined either way), whose own residual stream carries most of the relevance (under
    transformer attribution, the rollout's identity term, close to all of it), so that the others show.

    Each sample's rows (``gen.matrix(i)``, exact), tokens, explained logits and first-token shares are embedded as
    JSON (``<script type="application/json" class="generation-data">``); a few lines of plain JavaScript, no
    external file. Put it in a page with :func:`html_page`."""
    parts = []
    for i in range(len(gen)):
        tokens, n_prompt, rows = _answer_view(gen, i, tokenizer)
        answered = gen.answer_mask[i]
        share = gen.first_token_share[i][answered].detach().cpu()
        logit = gen.explained_logit[i][answered].detach().cpu()
        data = (f'{{"prompt":{n_prompt},"tokens":{json.dumps(tokens)},"rows":{_numbers(rows)},'
                f'"logit":{_numbers(logit)},"share":{_numbers(share)}}}')
        first = rows[0]
        left_out = _left_out(n_prompt, 0, exclude_first, exclude_self)
        scale = _row_scale(first, left_out)
        spans = []
        for c, token in enumerate(tokens):
            classes = ["tok"] + (["ans"] if c >= n_prompt else []) + (["left-out"] if c in left_out else []) + (
                ["self"] if c == n_prompt - 1 else []) + (
                ["explained"] if c == n_prompt else ["later"] if c > n_prompt else [])
            background = "transparent" if c in left_out else _tint(float(first[c]), scale)
            focus = ' tabindex="0"' if c >= n_prompt else ""
            spans.append(f'<span class="{" ".join(classes)}"{focus} style="background: {background}" '
                         f'title="{str(first.numpy()[c])}">{_shown(token)}</span>')
        title = titles[i] if titles else f"prompt {i + 1}"
        mean_share = float(share.mean()) if share.numel() else 0.0
        status = _status(tokens, n_prompt, first, rows.shape[0], float(logit[0]), float(share[0]))
        parts.append(
            f'<div class="generation"><div class="title">{_html.escape(title)} · first token’s share of |relevance|: '
            f'{100 * mean_share:.1f} % on average over the answer</div>\n<div class="tokens">{"".join(spans)}</div>\n'
            f'<div class="status">{_html.escape(status)}</div>\n'
            f'<script type="application/json" class="generation-data">{_safe_json(data)}</script></div>')
    first_box, self_box = (" checked" if exclude_first else ""), (" checked" if exclude_self else "")
    head = (f'<div class="generations">{_GENERATION_STYLE}\n<p class="legend">Each prompt\'s tokens tinted by their '
            "relevance for the answer's first token (outlined; orange positive, blue negative). Hover, click or Tab "
            "to an answer token (underlined) to see what it was made of; the tokens after it are faded, the token "
            "it is predicted from has a dashed outline.</p>\n"
            f'<label class="legend"><input type="checkbox" class="hide-first"{first_box}> leave out the first token '
            "(an attention sink: language models park attention on it)</label>\n"
            f'<label class="legend"><input type="checkbox" class="hide-self"{self_box}> leave out the token each '
            "answer token is predicted from (its own residual stream carries most of the relevance)</label>")
    return "\n".join([head, *parts, _GENERATION_SCRIPT, "</div>"])


# The answer × input matrix: pixels per cell, the colour of cells a token could not see (after it), and of the
# cells left out of the scale (the first token's column, the tokens the answer's tokens are predicted from).
CELL = 14
SPLIT = 3  # px between the prompt's columns and the answer's, a dark line in the middle
LATER_GREY, HIDDEN_GREY = 232, 200
MIN_BAR_HEIGHT = 5 * CELL  # room for the colour bar's three labels under a short answer
LABEL_CHARS = 14  # longer token labels are cut


def _cell_colours(values: np.ndarray, scale: float) -> np.ndarray:
    """``values`` → RGB in [0, 255] (``[..., 3]``): white at 0, orange for positive, blue for negative, full colour
    at ``|v| = scale``; the pictures' version of the page's tint."""
    a = np.clip(np.abs(values) / scale, 0, 1)[..., None] if scale > 0 else np.zeros((*values.shape, 1))
    hue = np.where(values[..., None] < 0, np.array(NEGATIVE_RGB, float), np.array(POSITIVE_RGB, float))
    return 255 * (1 - a) + hue * a


def _label_text(token: str) -> str:
    """A token as an axis label: stripped, a blank one quoted ('\\n', ' '), a long one cut."""
    text = token.strip() or repr(token)
    return text if len(text) <= LABEL_CHARS else text[: LABEL_CHARS - 1] + "…"


def _matrix_panel(tokens: list[str], n_prompt: int, rows: torch.Tensor, title: str, exclude_first: bool,
                  exclude_self: bool):
    from PIL import Image, ImageDraw

    values = rows.double().numpy()
    n_rows, n_cols = values.shape
    font = _font()
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    width_of = lambda text: probe.textbbox((0, 0), text, font=font)[2]  # noqa: E731
    row_labels = [_label_text(t) for t in tokens[n_prompt:]]
    col_labels = [_label_text(t) for t in tokens]
    answer_row = np.arange(n_rows)[:, None]
    # answer token r is predicted from the tokens before it: from its own column on, nothing was read yet
    later = np.arange(n_cols)[None, :] >= n_prompt + answer_row
    left_out = np.zeros_like(later)
    if exclude_first:
        left_out[:, 0] = True
    if exclude_self:
        left_out[np.arange(n_rows), n_prompt - 1 + np.arange(n_rows)] = True
    considered = values[~left_out & ~later]
    scale = float(np.abs(considered).max()) if considered.size else 0.0
    signed = bool((considered < 0).any())
    bar_labels = [_value(scale), "0"] + ([_value(-scale)] if signed else [])
    left = GAP + max(width_of(t) for t in row_labels) + 6
    top = TITLE_BAND + max(width_of(t) for t in col_labels) + 6
    grid_w, grid_h = n_cols * CELL + SPLIT, n_rows * CELL
    column_x = [left + c * CELL + (SPLIT if c >= n_prompt else 0) for c in range(n_cols)]
    bar_h = max(grid_h, MIN_BAR_HEIGHT)
    bar_x = left + grid_w + 2 * GAP
    canvas = Image.new("RGB", (max(bar_x + BAR_WIDTH + 4 + max(width_of(t) for t in bar_labels) + GAP,
                                   GAP + width_of(title) + GAP), top + bar_h + GAP), "white")
    colours = _cell_colours(values, scale)
    colours[later] = LATER_GREY
    colours[left_out] = HIDDEN_GREY
    cells = np.repeat(np.repeat(colours.round().astype(np.uint8), CELL, axis=0), CELL, axis=1)
    split = np.full((grid_h, SPLIT, 3), 255, dtype=np.uint8)
    cells = np.concatenate([cells[:, : n_prompt * CELL], split, cells[:, n_prompt * CELL :]], axis=1)
    canvas.paste(Image.fromarray(cells, "RGB"), (left, top))
    draw = ImageDraw.Draw(canvas)
    draw.rectangle((left - 1, top - 1, left + grid_w, top + grid_h), outline=(120, 120, 120))
    boundary = left + n_prompt * CELL + SPLIT // 2  # prompt | answer, between the cells
    draw.line((boundary, top - 4, boundary, top + grid_h), fill=(0, 0, 0), width=1)
    for r, text in enumerate(row_labels):
        y = top + r * CELL + (CELL - 11) // 2
        draw.text((left - 4 - width_of(text), y), text, fill=(0, 0, 0), font=font)
    for c, text in enumerate(col_labels):  # written sideways, reading upwards, ending at the grid
        w = width_of(text)
        label = Image.new("RGB", (w + 2, CELL), "white")
        ImageDraw.Draw(label).text((1, (CELL - 11) // 2), text, fill=(0, 0, 0), font=font)
        canvas.paste(label.rotate(90, expand=True), (column_x[c], top - 4 - (w + 2)))
    # the colour bar: +scale at the top, 0 (unsigned) or −scale (signed) at the bottom
    ramp = np.linspace(scale, -scale if signed else 0.0, bar_h)[:, None].repeat(BAR_WIDTH, axis=1)
    canvas.paste(Image.fromarray(_cell_colours(ramp, scale).round().astype(np.uint8), "RGB"), (bar_x, top))
    draw.rectangle((bar_x - 1, top - 1, bar_x + BAR_WIDTH, top + bar_h), outline=(120, 120, 120))
    text_x = bar_x + BAR_WIDTH + 4
    draw.text((text_x, top), bar_labels[0], fill=(0, 0, 0), font=font)
    zero_y = top + (bar_h - 1) // 2 if signed else top + bar_h - 11
    draw.text((text_x, zero_y - (5 if signed else 0)), "0", fill=(0, 0, 0), font=font)
    if signed:
        draw.text((text_x, top + bar_h - 11), bar_labels[2], fill=(0, 0, 0), font=font)
    draw.text((GAP, 5), title, fill=(0, 0, 0), font=font)
    return canvas


def generation_matrix(gen, tokenizer, sample: int | None = None, exclude_first: bool = False,
                      exclude_self: bool = True, titles: list[str] | None = None):
    """The answer × input matrix of a :class:`~transformer_lrp.GenerationExplanation` as a PIL image: one row per
    answer token, one column per real input token (the prompt, a line, the answer), each cell that token's
    relevance for that answer token, white at 0, orange positive, blue negative, full colour at the largest
    ``|r|`` of the sample (its colour bar on the right). Cells from each row's own token on (not read yet when it
    was predicted) are light grey. Cells left out of the scale are mid grey: the first token's column
    (``exclude_first``: the attention sink) and the token each answer token is predicted from (``exclude_self``,
    the default: its own residual stream carries most of the relevance, so the other tokens would barely show).
    Token labels on both axes. ``sample=None``: every sample, one panel each, stacked."""
    from PIL import Image

    samples = range(len(gen)) if sample is None else [sample]
    panels = []
    for i in samples:
        tokens, n_prompt, rows = _answer_view(gen, i, tokenizer)
        title = titles[i] if titles else f"prompt {i + 1}: answer tokens (rows) x input tokens (columns)"
        panels.append(_matrix_panel(tokens, n_prompt, rows, title, exclude_first, exclude_self))
    canvas = Image.new("RGB", (max(p.width for p in panels), sum(p.height for p in panels)), "white")
    y = 0
    for p in panels:
        canvas.paste(p, (0, y))
        y += p.height
    return canvas


def save_generation_matrix(path: str | Path, gen, tokenizer, sample: int | None = None, exclude_first: bool = False,
                           exclude_self: bool = True, titles: list[str] | None = None) -> Path:
    """Write :func:`generation_matrix` as a PNG; returns the path."""
    path = Path(path)
    generation_matrix(gen, tokenizer, sample, exclude_first, exclude_self, titles).save(path, format="PNG")
    return path
