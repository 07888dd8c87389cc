"""Cost of an explanation relative to a plain input gradient of the same model and batch, measured side by side.

    python bench/bench_explain.py                 # ViT-B/16 @224 and BERT-base @128 tokens, batch 8, float32
    python bench/bench_explain.py --quick         # small models, seconds (smoke run)
    python bench/bench_explain.py --profile       # plus a torch.profiler per-op breakdown of one explain call

"Input gradient" = one forward + one backward to the input (images, or BERT's input embeddings) with every
parameter frozen, through the model's own forward (timm's fused attention, transformers' default attention).
Each case runs interleaved with its baseline (warm-up, then ``--repeats`` alternations); the median time is used.
Results are printed as a table and appended to ``bench/results/explain_ratio.csv`` with the machine described.
Absolute times mean something only on a named device; the ratios are the goal metric.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import os
import platform
import statistics
import sys
import time
from functools import partial
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import transformer_lrp as tl  # noqa: E402

RESULTS = Path(__file__).parent / "results" / "explain_ratio.csv"


def vit_case(quick: bool, batch: int, device: str):
    import timm

    name = "vit_tiny_patch16_224" if quick else "vit_base_patch16_224"
    model = timm.create_model(name, pretrained=False, num_classes=1000).eval().to(device)
    for p in model.parameters():
        p.requires_grad_(False)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 3, 224, 224, generator=g).to(device)
    target = torch.arange(batch, device=device) % 1000

    def input_gradient():
        xi = x.clone().requires_grad_(True)
        logits = model(xi)
        logits.gather(1, target[:, None]).sum().backward()
        return xi.grad

    return name, model, x, target, input_gradient


def bert_case(quick: bool, batch: int, device: str, seq: int):
    from transformers import BertConfig, BertForSequenceClassification

    cfg = BertConfig(num_labels=2) if not quick else BertConfig(hidden_size=128, num_hidden_layers=4,
                                                                 num_attention_heads=4, intermediate_size=512,
                                                                 num_labels=2)
    torch.manual_seed(0)
    model = BertForSequenceClassification(cfg).eval().to(device)
    for p in model.parameters():
        p.requires_grad_(False)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1000, cfg.vocab_size, (batch, seq), generator=g)
    ids[:, 0], ids[:, -1] = 101, 102
    inputs = {"input_ids": ids.to(device), "attention_mask": torch.ones_like(ids).to(device)}
    target = (torch.arange(batch) % 2).to(device)

    def input_gradient():
        emb = model.bert.embeddings.word_embeddings(inputs["input_ids"]).clone().requires_grad_(True)
        logits = model(inputs_embeds=emb, attention_mask=inputs["attention_mask"]).logits
        logits.gather(1, target[:, None]).sum().backward()
        return emb.grad

    name = "bert_tiny" if quick else "bert_base"
    return f"{name}_seq{seq}", model, inputs, target, input_gradient


def timed(fn, device: str) -> float:
    if device == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def measure(fn_a, fn_b, repeats: int, device: str) -> tuple[float, float]:
    fn_a(), fn_b()  # warm-up
    a, b = [], []
    for _ in range(repeats):
        a.append(timed(fn_a, device))
        b.append(timed(fn_b, device))
    return statistics.median(a), statistics.median(b)


def machine() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    cpu = platform.processor() or platform.machine()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {torch.get_num_threads()} threads"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="small models (a smoke run)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--profile", action="store_true", help="print a per-op breakdown of one explain call")
    ap.add_argument("--only", default="", help="run only cases whose 'model method' contains this text")
    ap.add_argument("--no-save", action="store_true")
    args = ap.parse_args()

    rows = []
    vit = vit_case(args.quick, args.batch, args.device)
    bert = bert_case(args.quick, args.batch, args.device, args.seq)
    L_bert = bert[1].config.num_hidden_layers
    cases = [
        (vit, "transformer_attribution", dict(start_layer=0), 2.8),
        (vit, "gae", dict(start_layer=0), 1.2),
        (bert, "transformer_attribution", dict(start_layer=0), 2.8),
        (bert, "transformer_attribution", dict(start_layer=L_bert - 1, normalize_rows=True, cls_relevance="min"), 1.3),
        (bert, "gae", dict(start_layer=0), 1.2),
    ]
    print(f"machine: {machine()}; torch {torch.__version__}; batch {args.batch}; float32; median of {args.repeats}")
    print(f"{'model':<22} {'method':<24} {'settings':<44} {'explain s':>9} {'grad s':>8} {'ratio':>6} {'goal':>5}")
    for (name, model, inputs, target, input_gradient), method, kwargs, goal in cases:
        if args.only not in f"{name} {method}":
            continue
        run = partial(tl.explain, model, inputs, target, method=method, **kwargs)

        t_explain, t_grad = measure(run, input_gradient, args.repeats, args.device)
        ratio = t_explain / t_grad
        settings = ",".join(f"{k}={v}" for k, v in kwargs.items())
        print(f"{name:<22} {method:<24} {settings:<44} {t_explain:9.3f} {t_grad:8.3f} {ratio:6.2f} {goal:5.1f}")
        rows.append(dict(date=datetime.date.today().isoformat(), machine=machine(), torch=torch.__version__,
                         model=name, method=method, settings=settings, batch=args.batch, dtype="float32",
                         explain_s=f"{t_explain:.4f}", input_grad_s=f"{t_grad:.4f}", ratio=f"{ratio:.3f}",
                         goal=goal, quick=args.quick))
    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        name, model, inputs, target, _ = vit
        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if args.device == "cuda" else [])
        with profile(activities=acts) as prof:
            tl.explain(model, inputs, target)
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))
    if not args.no_save:
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        new = not RESULTS.exists()
        with RESULTS.open("a", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            if new:
                w.writeheader()
            w.writerows(rows)


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main()
