"""``explain --image``: image files explained by a vision classifier (the demo's, a timm ViT with a local checkpoint,
or a local transformers image-classification folder). Writes a picture per image and the raw relevance.

Every file is opened and converted before a model is loaded: 16-bit and other high-bit-depth images are scaled by
their bit depth (not clipped), transparency is composited on white, the EXIF orientation is applied, and a file that
is not an image, a folder, a decompression bomb or an image too small to explain is one line and exit status 2.
"""

from __future__ import annotations

import re
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from transformer_lrp.cli.common import (
    MY_INPUTS,
    NOT_MINE,
    CliError,
    batches,
    conservation_note,
    conservation_suffix,
    explain_options,
    hf_kind,
    load_pretrained,
    note,
    positive_int,
    quiet_transformers,
    read_hf_config,
    save_raw,
    supported_encoder,
    wrong_kind,
)

NAME = "images"
INPUTS = "--image files"
MIN_SIDE = 16  # pixels: below this an image has no patch structure left to explain
TRANSPARENT_BECOMES = (255, 255, 255)  # transparent pixels are composited on white, as a page shows them


@dataclass(frozen=True)
class ImageFile:
    """An image to explain: its path as given (its name in the outputs) and its pixels as an RGB PIL image."""

    label: str
    image: object


def add_arguments(groups: dict) -> None:
    groups["inputs"].add_argument(
        "--image", nargs="+", action="extend", metavar="FILE",
        help="image files (PNG, JPEG, TIFF, ...; repeat --image or list several; 16-bit images are scaled, "
             "transparency composited on white)")
    groups["model"].add_argument("--checkpoint", help="timm: a local state dict (.pth, .pt, .safetensors) for "
                                                      "--model timm:NAME")
    groups["model"].add_argument("--num-classes", type=positive_int,
                                 help="timm: the head's classes, if not the model's default")


def claims(args) -> int:
    return MY_INPUTS if args.image else NOT_MINE


def read(args) -> list[ImageFile]:
    return [ImageFile(p, open_image(p)) for p in args.image]


# ---------------------------------------------------------------------------------------------- image files


def open_image(path: str, option: str = "--image"):
    """The file as an RGB PIL image, or a one-line error naming what is wrong with it."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    p = Path(path)
    if p.is_dir():
        raise CliError(f"{option} {path}: is a directory, not an image file")
    if not p.is_file():
        raise CliError(f"{option} {path}: no such file")
    try:
        with warnings.catch_warnings():
            # between PIL's two limits it only warns; the image is downscaled to the model's size at once
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(p) as im:
                frames = getattr(im, "n_frames", 1)
                im.load()
                image = ImageOps.exif_transpose(im)
    except Image.DecompressionBombError as exc:
        size = re.search(r"\((\d+) pixels\)", str(exc))
        pixels = f"{int(size.group(1)):,} pixels" if size else "too many pixels"
        raise CliError(f"{option} {path}: {pixels}, more than the {2 * Image.MAX_IMAGE_PIXELS:,} that PIL decodes "
                       "(its guard against decompression bombs); downscale the image first") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise CliError(f"{option} {path}: not a readable image ({exc})") from None
    if frames > 1:
        note(f"{path}: {frames} frames; the first is explained")
    image = to_rgb(image, path, option)
    if min(image.size) < MIN_SIDE:
        raise CliError(f"{option} {path}: {image.size[0]}×{image.size[1]} px is too small to explain "
                       f"(at least {MIN_SIDE} px a side)")
    return image


def to_rgb(image, name: str, option: str = "--image"):
    """Any PIL mode as 8-bit RGB. High-bit-depth grey (``I;16*``, ``I``, ``F``) is scaled by its bit depth (not
    clipped at 255, which turns a 16-bit image near-binary); alpha is composited on :data:`TRANSPARENT_BECOMES`."""
    from PIL import Image

    mode = image.mode
    if mode.startswith("I") or mode == "F":
        grey = _scaled_to_unit(np.asarray(image), mode, name, option)
        return Image.fromarray(np.round(grey * 255).astype(np.uint8), "L").convert("RGB")
    has_alpha = mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info
    if has_alpha:
        rgba = image.convert("RGBA")
        if rgba.getextrema()[3][0] < 255:
            note(f"{name}: transparent pixels composited on white")
        background = Image.new("RGBA", rgba.size, (*TRANSPARENT_BECOMES, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    try:
        return image.convert("RGB")
    except ValueError as exc:
        raise CliError(f"{option} {name}: PIL mode {mode} has no conversion to RGB ({exc})") from None


def _scaled_to_unit(values: np.ndarray, mode: str, name: str, option: str) -> np.ndarray:
    """Grey values of a high-bit-depth mode in [0, 1]: 16-bit modes by 2¹⁶ − 1; 32-bit integers by the smallest of 8,
    16 or 32 bits that holds their maximum; floats as they are in [0, 1], by 255 in [0, 255]; anything else
    (negative values, floats beyond 255) stretched from its minimum to its maximum, with a note."""
    v = values.astype(np.float64)
    if not np.isfinite(v).all():
        raise CliError(f"{option} {name}: has NaN or infinite pixel values")
    lo, hi = float(v.min()), float(v.max())
    if mode.startswith("I;16"):
        return v / 65535.0
    if lo >= 0 and mode == "I":
        bits = next(b for b in (8, 16, 32) if hi <= 2**b - 1)
        return v / (2**bits - 1)
    if lo >= 0 and hi <= 1:
        return v
    if lo >= 0 and hi <= 255:
        return v / 255.0
    note(f"{name}: {mode} pixel values from {lo:.4g} to {hi:.4g}, stretched to the full grey range")
    return (v - lo) / (hi - lo) if hi > lo else np.zeros_like(v)


# -------------------------------------------------------------------------------------------------- models


def load_model(spec: str, checkpoint: str | None, num_classes: int | None):
    """``demo``, ``timm:NAME`` (+ a local checkpoint) or a local transformers image-classification folder →
    ``(model, preprocess, class names or None)``; ``preprocess(PIL image) -> ([3, H, W] shown image, model input)``."""
    if not spec.startswith("timm:") and (checkpoint or num_classes):
        raise CliError(f"--checkpoint and --num-classes apply to --model timm:NAME, not --model {spec}")
    if spec == "demo":
        from transformer_lrp.demo import assets
        from transformer_lrp.evaluation.real_models import DINOV2_IMG_SIZE, normalize

        model = assets.vision_classifier()
        return model, resize_crop(DINOV2_IMG_SIZE, normalize), assets.metadata()["vision"]["classes"]
    if spec.startswith("timm:"):
        return _timm_model(spec, checkpoint, num_classes)
    config = read_hf_config(spec)
    if config is None:
        raise CliError(f"--model {spec}: not 'demo', 'timm:NAME' or a transformers checkpoint directory "
                       "(no config.json there)")
    kind = hf_kind(config)
    if kind != "image":
        raise wrong_kind(spec, kind, "images")
    from transformers import AutoImageProcessor, AutoModelForImageClassification

    model = load_pretrained(AutoModelForImageClassification, spec)
    supported_encoder(model)
    try:
        with quiet_transformers():
            processor = AutoImageProcessor.from_pretrained(spec, local_files_only=True)
    except (OSError, ValueError) as exc:
        raise CliError(f"--model {spec}: no image processor there ({str(exc)[:200]}); save it beside the model: "
                       "processor.save_pretrained(DIR)") from None
    size = int(model.config.image_size)
    mean = torch.tensor(processor.image_mean).view(3, 1, 1)
    std = torch.tensor(processor.image_std).view(3, 1, 1)
    names = [model.config.id2label[i] for i in range(model.config.num_labels)]
    return model, resize_crop(size, lambda x: (x - mean) / std), names


def _timm_model(spec: str, checkpoint: str | None, num_classes: int | None):
    import timm

    name = spec[len("timm:"):]
    kwargs = {} if num_classes is None else {"num_classes": num_classes}
    try:
        model = timm.create_model(name, pretrained=False, **kwargs)
    except RuntimeError as exc:  # timm: unknown model
        raise CliError(f"--model {spec}: {exc}") from None
    supported_encoder(model)
    if checkpoint is None:
        note(f"no --checkpoint: {name} has random weights (fine for trying the pipeline, not for meaning)")
    else:
        _load_checkpoint(model, checkpoint, spec)
    cfg = timm.data.resolve_data_config({}, model=model)
    mean, std = torch.tensor(cfg["mean"]).view(3, 1, 1), torch.tensor(cfg["std"]).view(3, 1, 1)
    return model.eval(), resize_crop(cfg["input_size"][-1], lambda x: (x - mean) / std), None


def _load_checkpoint(model, checkpoint: str, spec: str) -> None:
    path = Path(checkpoint)
    if path.is_dir():
        raise CliError(f"--checkpoint {checkpoint}: is a directory, not a state dict file")
    if not path.is_file():
        raise CliError(f"--checkpoint {checkpoint}: no such file")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch.load and safetensors raise many types for a file that is not theirs
        raise CliError(f"--checkpoint {checkpoint}: not a torch or safetensors state dict "
                       f"({str(exc).splitlines()[0][:200]})") from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise CliError(f"--checkpoint {checkpoint}: holds a {type(state).__name__}, not a state dict")
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
        raise CliError(f"--checkpoint {checkpoint} does not match {spec}: " + " ".join(lines[1:4])[:600]) from None


def resize_crop(size: int, normalize):
    """Shorter side to ``size``, centre crop (the usual evaluation transform): ``(shown image [3, size, size] in
    [0, 1], model input)``."""

    def preprocess(image):
        from PIL import Image

        w, h = image.size
        scale = size / min(w, h)
        image = image.resize((max(size, round(w * scale)), max(size, round(h * scale))), Image.BICUBIC)
        w, h = image.size
        left, top = (w - size) // 2, (h - size) // 2
        image = image.crop((left, top, left + size, top + size))
        shown = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1).contiguous()
        return shown, normalize(shown)

    return preprocess


def preprocessed(images: list[ImageFile], preprocess) -> tuple[torch.Tensor, torch.Tensor]:
    """``(shown images [N, 3, H, W] in [0, 1], model inputs)``."""
    shown, inputs = zip(*(preprocess(f.image) for f in images))
    return torch.stack(shown), torch.stack(inputs)


# ------------------------------------------------------------------------------------------------- explain


def explain(args, images: list[ImageFile], folder: Path) -> list[Path]:
    import transformer_lrp as tl
    from transformer_lrp import viz

    model, preprocess, names = load_model(args.model, args.checkpoint, args.num_classes)
    model = model.to(args.device)
    dtype = next(model.parameters()).dtype
    shown, inputs = preprocessed(images, preprocess)
    relevance, written, explanations = [], [], []
    for s in batches(len(inputs), args.batch_size, "images"):
        exp = tl.explain(model, inputs[s : s + args.batch_size].to(args.device, dtype), **explain_options(args))
        explanations.append(exp)
        probs = exp.logits.softmax(-1).cpu()
        maps = exp.maps().cpu()
        for j in range(len(exp)):
            i, t = s + j, int(exp.target[j])
            name = names[t] if names else f"class {t}"
            label = images[i].label
            title = f"{Path(label).name}: {name} (p={float(probs[j, t]):.2f})  [{exp.method}]"
            path = folder / f"{Path(label).stem}_{i}.png"
            written.append(viz.save_panel(path, shown[i], maps[j], title))
            print(f"{label}: {name} (p={float(probs[j, t]):.3f}) → {path.name}{conservation_suffix(exp, j)}")
        relevance.append(exp.relevance.cpu())
    sys.stdout.flush()
    conservation_note(explanations, "images")
    written.append(save_raw(folder, "relevance", torch.cat(relevance), args.raw))
    return written
