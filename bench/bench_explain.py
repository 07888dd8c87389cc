"""Cost of an explanation relative to a plain input gradient of the same model and batch, measured side by side.

    python bench/bench_explain.py                          # ViT-B/16 @224 and BERT-base @128 tokens, batch 8
    python bench/bench_explain.py --quick                  # small models, seconds (smoke run)
    python bench/bench_explain.py --backend torch,triton,cuda   # the backends side by side (triton, cuda: a GPU)
    python bench/bench_explain.py --device cuda --dtype bfloat16 --vit-batch 64 --bert-batch 32 --seq 512
    python bench/bench_explain.py --profile                # per-op breakdown (torch.profiler) of one call per backend

"Input gradient" = one forward + one backward to the input (images, or BERT's input embeddings) with every
parameter frozen, through the model's own forward (timm's fused attention, transformers' default attention).
Each case runs interleaved with its baseline (warm-up, then ``--repeats`` alternations); the median time is used.
On CUDA the peak memory above the resident model and inputs is measured for each, and their ratio reported.
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


def vit_case(quick: bool, batch: int, device: str, dtype: torch.dtype):
    import timm

    name = "vit_tiny_patch16_224" if quick else "vit_base_patch16_224"
    model = timm.create_model(name, pretrained=False, num_classes=1000).eval().to(device, dtype)
    for p in model.parameters():
        p.requires_grad_(False)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 3, 224, 224, generator=g).to(device, dtype)
    target = torch.arange(batch, device=device) % 1000

    def input_gradient():
        xi = x.clone().requires_grad_(True)
        logits = model(xi)
        logits.gather(1, target[:, None]).sum().backward()
        return xi.grad

    return name, model, x, target, input_gradient


def bert_case(quick: bool, batch: int, device: str, seq: int, dtype: torch.dtype):
    from transformers import BertConfig, BertForSequenceClassification

    cfg = BertConfig(num_labels=2) if not quick else BertConfig(hidden_size=128, num_hidden_layers=4,
                                                                 num_attention_heads=4, intermediate_size=512,
                                                                 num_labels=2)
    torch.manual_seed(0)
    model = BertForSequenceClassification(cfg).eval().to(device, dtype)
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


def measure(fns: list, repeats: int, device: str) -> list[float]:
    """Median time of each function, run interleaved after one warm-up call each."""
    for fn in fns:
        fn()
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(repeats):
        for fn, ts in zip(fns, times):
            ts.append(timed(fn, device))
    return [statistics.median(ts) for ts in times]


def peak_memory(fn, device: str) -> float | None:
    """Peak CUDA memory (bytes) that ``fn`` allocates above what is resident before it; None on the CPU."""
    if device != "cuda":
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    out = fn()
    torch.cuda.synchronize()
    del out
    return float(torch.cuda.max_memory_allocated() - base)


def profile_breakdown(run, device: str, rows: int = 20) -> str:
    """torch.profiler table of one call: the package's ops (``tlrp::*`` ranges) first, then the busiest kernels."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    run()  # compiled and warm
    with profile(activities=acts) as prof:
        run()
        if device == "cuda":
            torch.cuda.synchronize()
    events = prof.key_averages()
    key = "device_time_total" if device == "cuda" else "cpu_time_total"
    if device == "cuda" and not hasattr(events[0], key):
        key = "cuda_time_total"
    ours = sorted((e for e in events if e.key.startswith("tlrp::")), key=lambda e: getattr(e, key), reverse=True)
    lines = [f"{'op (tlrp:: ranges, inclusive)':<44} {'calls':>6} {key + ' ms':>22}"]
    for e in ours:
        lines.append(f"{e.key:<44} {e.count:>6} {getattr(e, key) / 1e3:>22.3f}")
    self_key = "self_device_time_total" if device == "cuda" else "self_cpu_time_total"
    if device == "cuda" and not hasattr(events[0], self_key):
        self_key = "self_cuda_time_total"
    lines.append("")
    lines.append(events.table(sort_by=self_key, row_limit=rows))
    return "\n".join(lines)


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


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="small models (a smoke run)")
    ap.add_argument("--batch", type=int, default=8, help="batch of both models unless overridden")
    ap.add_argument("--vit-batch", type=int, default=None)
    ap.add_argument("--bert-batch", type=int, default=None)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", choices=list(DTYPES), default="float32")
    ap.add_argument("--tf32", action="store_true", help="allow TF32 matmuls (CUDA float32)")
    ap.add_argument("--backend", default=None,
                    help="comma-separated backends to time side by side (default: torch on CPU, torch,triton,cuda "
                    "on CUDA, cuda where the extension is built)")
    ap.add_argument("--profile", action="store_true", help="print a per-op breakdown of one call per backend")
    ap.add_argument("--only", default="", help="run only cases whose 'model method' contains this text")
    ap.add_argument("--no-save", action="store_true")
    ap.add_argument("--csv", default=str(RESULTS), help="where the rows are appended (default: %(default)s)")
    ap.add_argument("--label", default="", help="a note stored with each row (e.g. autotune=1)")
    args = ap.parse_args()
    backends = (args.backend or ("torch,triton" if args.device == "cuda" else "torch")).split(",")
    if args.backend is None and args.device == "cuda":
        from transformer_lrp._backend import not_supported_reasons

        if not not_supported_reasons("cuda", (torch.zeros(1, device="cuda"),)):
            backends.append("cuda")
    dtype = DTYPES[args.dtype]
    if args.device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = args.tf32
        torch.backends.cudnn.allow_tf32 = args.tf32
    precision = args.dtype + ("+tf32" if args.tf32 and dtype == torch.float32 else "")

    rows = 0
    vit = vit_case(args.quick, args.vit_batch or args.batch, args.device, dtype)
    bert = bert_case(args.quick, args.bert_batch or args.batch, args.device, args.seq, dtype)
    L_bert = bert[1].config.num_hidden_layers
    cases = [
        (vit, "transformer_attribution", dict(start_layer=0), 2.8),
        (vit, "gae", dict(start_layer=0), 1.2),
        (bert, "transformer_attribution", dict(start_layer=0), 2.8),
        (bert, "transformer_attribution", dict(start_layer=L_bert - 1, normalize_rows=True, cls_relevance="min"), 1.3),
        (bert, "gae", dict(start_layer=0), 1.2),
        (vit, "attnlrp", {}, 1.3),
        (vit, "cp_lrp", {}, 1.3),
        (bert, "attnlrp", {}, 1.3),
        (bert, "cp_lrp", {}, 1.3),
    ]
    print(f"machine: {machine()}; torch {torch.__version__}; {precision}; median of {args.repeats}", flush=True)
    print(f"{'model':<22} {'method':<24} {'settings':<40} {'backend':<7} {'batch':>5} {'explain s':>9} "
          f"{'grad s':>8} {'ratio':>6} {'goal':>5} {'mem ratio':>9} {'samples/s':>10}")
    profiled = set()
    for (name, model, inputs, target, input_gradient), method, kwargs, goal in cases:
        if args.only not in f"{name} {method}":
            continue
        batch = target.shape[0]
        runs = [partial(tl.explain, model, inputs, target, method=method, backend=b, **kwargs) for b in backends]
        times = measure([*runs, input_gradient], args.repeats, args.device)
        t_grad = times[-1]
        grad_mem = peak_memory(input_gradient, args.device)
        settings = ",".join(f"{k}={v}" for k, v in kwargs.items())
        for backend, run, t_explain in zip(backends, runs, times):
            ratio = t_explain / t_grad
            mem = peak_memory(run, args.device)
            mem_ratio = f"{mem / grad_mem:9.2f}" if mem is not None and grad_mem else f"{'-':>9}"
            print(f"{name:<22} {method:<24} {settings:<40} {backend:<7} {batch:>5} {t_explain:9.4f} {t_grad:8.4f} "
                  f"{ratio:6.2f} {goal:5.1f} {mem_ratio} {batch / t_explain:10.1f}", flush=True)
            row = dict(date=datetime.date.today().isoformat(), machine=machine(), torch=torch.__version__,
                       model=name, method=method, settings=settings, backend=backend, batch=batch,
                       dtype=precision, explain_s=f"{t_explain:.5f}", input_grad_s=f"{t_grad:.5f}",
                       ratio=f"{ratio:.3f}", goal=goal,
                       peak_mem_ratio="" if mem is None or not grad_mem else f"{mem / grad_mem:.3f}",
                       samples_per_s=f"{batch / t_explain:.2f}", quick=args.quick, label=args.label)
            rows += 1
            if not args.no_save:  # appended as measured: a run cut short keeps its rows
                save_rows(Path(args.csv), [row])
            if args.profile and (name, backend) not in profiled:
                profiled.add((name, backend))
                print(f"\n--- per-op breakdown: {name} {method} backend={backend} ---")
                print(profile_breakdown(run, args.device))


def save_rows(path: Path, rows: list[dict]) -> None:
    """Append ``rows`` to the CSV at ``path``. A file whose columns the rows extend is rewritten with the new columns
    (empty in its rows); one with other columns is moved aside (``.v1.csv``, ``.v2.csv``…)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fields = list(rows[0])
    if path.exists():
        with path.open() as f:
            header = f.readline().strip().split(",")
        if header != fields and set(header) <= set(fields):
            with path.open() as f:
                rows = [{k: r.get(k, "") for k in fields} for r in csv.DictReader(f)] + rows
            path.unlink()
        elif header != fields:
            version = 1
            while path.with_suffix(f".v{version}.csv").exists():
                version += 1
            path.rename(path.with_suffix(f".v{version}.csv"))
    new = not path.exists()
    with path.open("a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        if new:
            w.writeheader()
        w.writerows(rows)


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main()
