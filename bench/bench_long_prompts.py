"""Long prompts on a real LLM: peak memory and time of an explanation, of the input gradient, and of the way attention
explainers built on autograd do it, at 1k to 16k tokens, batch 1, on the CPU.

    python3 bench/bench_long_prompts.py                       # SmolLM2-135M-Instruct, 1k, 2k, 4k, 8k, 16k tokens
    python3 bench/bench_long_prompts.py --lengths 1024,2048 --works input_gradient,gae
    python3 bench/bench_long_prompts.py --quick               # a tiny random Llama (seconds)

Works, each measured once in its own process (a warm-up call at 64 tokens first, then the peak resident set above
what was resident before the work, ``VmHWM − VmRSS``, and its wall time):

* ``input_gradient``: the model's own forward (SDPA attention, logits at the last position) and the backward of the
  explained logit to the input embeddings, parameters frozen;
* ``transformer_attribution``, ``gae``, ``attnlrp``: ``explain`` (backend ``torch``: the attention forward by torch's
  CPU flash kernel, the reverse pass on the chunked reference ops);
* ``eager_attention_kept``: what explainers that read attention maps and their gradients from autograd do (Captum's
  and inseq's attention methods, the original code): the model with eager attention and ``output_attentions=True``,
  every layer's ``[H, N, N]`` map kept and its gradient retained. It is measured up to ``--peer-max`` tokens; beyond,
  it is extrapolated from the two longest measured lengths by ``a·N + c·N²`` (its memory and time are dominated by
  the ``L·H·N²`` maps, their gradients and the softmax's saved output). Extrapolated rows are marked so.

SmolLM2 was trained to 8,192 positions; for 16k the benchmark raises the config's limit (the rotary embedding extends
and the cost is what is measured, not the answer's quality). Rows go to ``bench/results/long_prompts.csv``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_decoder import load_model  # noqa: E402
from bench_explain import machine, save_rows  # noqa: E402

RESULTS = Path(__file__).parent / "results" / "long_prompts.csv"
EXPLAIN = ("transformer_attribution", "gae", "attnlrp")
PEER = "eager_attention_kept"


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def _prompt(model, tokens: int):
    import torch

    g = torch.Generator().manual_seed(0)
    vocab = model.config.vocab_size
    ids = torch.randint(min(100, vocab // 10), vocab, (1, tokens), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def _work(model, work: str, tokens: int):
    """The closure that runs ``work`` on a prompt of ``tokens`` tokens."""
    import torch

    import transformer_lrp as tl

    inputs = _prompt(model, tokens)
    with torch.no_grad():
        target = model(**inputs, logits_to_keep=1).logits[:, -1].argmax(-1)
    if work in EXPLAIN:
        return lambda: tl.explain(model, inputs, target, method=work, backend="torch")

    def gradient():
        emb = model.get_input_embeddings()(inputs["input_ids"]).detach().requires_grad_(True)
        out = model(inputs_embeds=emb, attention_mask=inputs["attention_mask"], logits_to_keep=1,
                    output_attentions=work == PEER)
        if work == PEER:  # every layer's map kept, its gradient retained
            for a in out.attentions:
                a.retain_grad()
        out.logits[:, -1].gather(1, target[:, None]).sum().backward()
        return emb.grad, (out.attentions if work == PEER else None)

    return gradient


def measure(quick: bool, tokens: int, work: str) -> dict:
    """In this process: wall time and peak resident memory (MB) above what was resident before the work."""
    import torch

    torch.manual_seed(0)
    model, name = load_model(quick)
    for p in model.parameters():
        p.requires_grad_(False)
    model.config.max_position_embeddings = max(model.config.max_position_embeddings, tokens)
    if work == PEER:
        model.config._attn_implementation = "eager"
    _work(model, work, 64)()  # warm-up: lazy initialization is not the work's cost
    run = _work(model, work, tokens)
    Path("/proc/self/clear_refs").write_text("5")
    before = _status_kb("VmRSS")
    t0 = time.perf_counter()
    out = run()
    seconds = time.perf_counter() - t0
    peak = _status_kb("VmHWM")
    del out
    return dict(model=name, seconds=seconds, peak_mb=(peak - before) / 1024)


def _quadratic(points: list[tuple[int, float]], n: int) -> float:
    """``a·N + c·N²`` through the two longest measured points, at ``n`` (if noise makes the fit's ``c`` or ``a``
    negative: the longest point scaled by ``(n / N)²``)."""
    (n1, y1), (n2, y2) = sorted(points)[-2:]
    c = (y2 / n2 - y1 / n1) / (n2 - n1)
    a = y1 / n1 - c * n1
    if c <= 0 or a < 0:
        return y2 * (n / n2) ** 2
    return a * n + c * n * n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="a tiny random Llama, 256 to 1024 tokens")
    ap.add_argument("--lengths", default="1024,2048,4096,8192,16384")
    ap.add_argument("--works", default=",".join(("input_gradient", *EXPLAIN, PEER)))
    ap.add_argument("--peer-max", type=int, default=2048, help="longest prompt the peers' way is measured at")
    ap.add_argument("--no-save", action="store_true")
    ap.add_argument("--label", default="", help="a note stored with each row")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(measure(**json.loads(args.child))))
        return
    lengths = [256, 512, 1024] if args.quick else [int(n) for n in args.lengths.split(",")]
    peer_max = 512 if args.quick else args.peer_max
    works = args.works.split(",")
    print(f"machine: {machine()}; float32 CPU; batch 1; one process per measurement", flush=True)
    print(f"{'tokens':>7} {'work':<26} {'seconds':>9} {'peak MB':>9} {'× grad mem':>10} {'× grad time':>11}")
    peer_points: dict[str, list] = {"seconds": [], "peak_mb": []}
    name = "tiny_llama" if args.quick else "smollm2_135m"
    for tokens in lengths:
        grad = None
        for work in works:
            extrapolated = work == PEER and tokens > peer_max
            if extrapolated:
                if len(peer_points["seconds"]) < 2:
                    continue
                res = dict(model=name, seconds=_quadratic(peer_points["seconds"], tokens),
                           peak_mb=_quadratic(peer_points["peak_mb"], tokens))
            else:
                spec = dict(quick=args.quick, tokens=tokens, work=work)
                out = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], capture_output=True,
                                     text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
                if out.returncode != 0:
                    tail = (out.stderr.strip().splitlines() or ["killed"])[-1]
                    print(f"{tokens:>7} {work:<26} failed: {tail}", flush=True)
                    continue
                res = json.loads(out.stdout.strip().splitlines()[-1])
                if work == PEER:
                    peer_points["seconds"].append((tokens, res["seconds"]))
                    peer_points["peak_mb"].append((tokens, res["peak_mb"]))
            if work == "input_gradient":
                grad = res
            mem_ratio = f"{res['peak_mb'] / grad['peak_mb']:10.2f}" if grad else f"{'-':>10}"
            time_ratio = f"{res['seconds'] / grad['seconds']:11.2f}" if grad else f"{'-':>11}"
            note = "  (extrapolated: a·N + c·N²)" if extrapolated else ""
            print(f"{tokens:>7} {work:<26} {res['seconds']:9.2f} {res['peak_mb']:9.0f} {mem_ratio} {time_ratio}{note}",
                  flush=True)
            if not args.no_save:
                save_rows(RESULTS, [dict(
                    date=datetime.date.today().isoformat(), machine=machine(), model=res["model"], tokens=tokens,
                    work=work, seconds=f"{res['seconds']:.3f}", peak_mb=f"{res['peak_mb']:.0f}",
                    input_grad_seconds="" if grad is None else f"{grad['seconds']:.3f}",
                    input_grad_peak_mb="" if grad is None else f"{grad['peak_mb']:.0f}",
                    extrapolated=extrapolated, quick=args.quick, label=args.label)])


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main()
