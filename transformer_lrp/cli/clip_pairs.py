"""``explain --image ... --text ... --model CLIP_DIR``: every image with every caption, explained on both towers of a
local transformers CLIP checkpoint. Writes a picture per (image, caption) pair, ``text.html`` with the captions'
tokens tinted by relevance, and the raw relevance.

A CLIP folder as ``--model`` takes the command line over (``claims`` answers ``MY_MODEL``): images and captions are
read with the image and text kinds' own checks, and both are required.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from transformer_lrp.cli import images as image_kind
from transformer_lrp.cli import texts as text_kind
from transformer_lrp.cli.common import (
    MY_MODEL,
    NOT_MINE,
    CliError,
    conservation_note,
    encode,
    explain_options,
    hf_kind,
    load_pretrained,
    load_tokenizer,
    note_unknown,
    read_hf_config,
    save_raw,
    token_limit,
    unknown_tokens,
)

NAME = "CLIP image-caption pairs"
INPUTS = "--image with --text for a CLIP checkpoint directory"
TAKES = (image_kind.NAME, text_kind.NAME)  # the kinds whose inputs a CLIP model takes over
# OpenAI CLIP's preprocessing, for a checkpoint without preprocessor_config.json
CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)


def add_arguments(groups: dict) -> None:
    """Nothing of its own: --image from the image kind, --text and --text-file from the text kind."""


def claims(args) -> int:
    config = read_hf_config(args.model)
    return MY_MODEL if config is not None and hf_kind(config) == "clip" else NOT_MINE


def read(args):
    if not args.image or not (args.text or args.text_file):
        raise CliError(f"--model {args.model} is a CLIP model: give both --image files and captions "
                       "(--text or --text-file); each image is explained with each caption")
    return image_kind.read(args), text_kind.read(args)


def explain(args, inputs, folder: Path) -> list[Path]:
    from transformers import CLIPModel

    import transformer_lrp as tl
    from transformer_lrp import viz
    from transformer_lrp.adapters import clip

    image_files, captions = inputs
    path = Path(args.model)
    model = load_pretrained(CLIPModel, args.model)
    clip.build(model)  # unsupported towers (e.g. attention pooling) raise here, before any input is processed
    model = model.to(args.device)
    text_config = model.config.text_config
    tokenizer = load_tokenizer(path, int(text_config.vocab_size), args.model)
    pre = path / "preprocessor_config.json"
    stats = json.loads(pre.read_text(encoding="utf-8")) if pre.is_file() else {}
    mean = torch.tensor(stats.get("image_mean", CLIP_MEAN)).view(3, 1, 1)
    std = torch.tensor(stats.get("image_std", CLIP_STD)).view(3, 1, 1)
    size = int(model.config.vision_config.image_size)
    shown, pixels = image_kind.preprocessed(image_files, image_kind.resize_crop(size, lambda x: (x - mean) / std))
    limit = token_limit(tokenizer, captions, int(text_config.max_position_embeddings), args.model)
    text = encode(tokenizer, captions, limit, args.device)
    text = {k: text[k] for k in ("input_ids", "attention_mask")}
    note_unknown(tokenizer, unknown_tokens(tokenizer, text["input_ids"], captions))
    n_img, n_txt = len(image_files), len(captions)
    pairs = (torch.arange(n_img).repeat_interleave(n_txt), torch.arange(n_txt).repeat(n_img))
    options = {k: v for k, v in explain_options(args).items() if k != "target"}
    dtype = next(model.parameters()).dtype
    exp = tl.explain(model, {"pixel_values": pixels.to(args.device, dtype), **text}, target=pairs, **options)
    probs = exp.logits_per_image.softmax(-1).cpu()
    maps = exp.image.maps().cpu()
    written, token_rows, score_rows, titles = [], [], [], []
    for p, (i, k) in enumerate(zip(*(t.tolist() for t in pairs))):
        name, caption = Path(image_files[i].label).name, captions[k]
        title = f"{name} · \"{caption.text[:40]}\" (p={float(probs[i, k]):.2f})  [{exp.image.method}]"
        dest = folder / f"{Path(image_files[i].label).stem}_{i}_caption_{k}.png"
        written.append(viz.save_panel(dest, shown[i], maps[p], title))
        n = int(text["attention_mask"][k].sum())
        # CLIP's BPE marks word ends with "</w>": shown without it
        ids = text["input_ids"][k, :n].tolist()
        token_rows.append([t.replace("</w>", "") for t in tokenizer.convert_ids_to_tokens(ids)])
        score_rows.append(exp.text.relevance[p, :n].cpu())
        titles.append(f"{name} · {caption.label}: p={float(probs[i, k]):.2f}")
        print(f"{image_files[i].label} · {caption.label} {caption.text[:60]!r}: p={float(probs[i, k]):.3f} → "
              f"{dest.name}")
    sys.stdout.flush()
    conservation_note([exp.image, exp.text], "image-caption pairs (per tower)")
    page = viz.html_page(viz.text_html(token_rows, score_rows, titles=titles, unknown_token=tokenizer.unk_token),
                         title=f"{args.method}: {args.model}")
    (folder / "text.html").write_text(page, encoding="utf-8")
    raw = {"image_relevance": exp.image.relevance.cpu(), "text_relevance": exp.text.relevance.cpu(),
           "image_index": pairs[0], "text_index": pairs[1], "logits_per_image": exp.logits_per_image.cpu()}
    if args.raw == "npy":
        written += [save_raw(folder, name, t, "npy") for name, t in raw.items()]
    else:
        torch.save(raw, folder / "relevance.pt")
        written.append(folder / "relevance.pt")
    return [*written, folder / "text.html"]
