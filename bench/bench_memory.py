"""Peak host memory of an explanation against a plain input gradient of the same model and batch, on the CPU.

Each measurement runs in its own process (freed memory stays with the allocator, so a second run in the same
process would hide the first's peak): build the model and inputs, reset the kernel's resident-set high-water mark
(``/proc/self/clear_refs``), run the work once, and report the peak resident set above what was resident before it
(``VmHWM − VmRSS``: ``ru_maxrss`` counted from the reset). Whatever the work keeps for later calls (the explanation's
cached ``|W|``) is part of its peak. Appends to ``bench/results/memory_ratio.csv``.

    python3 bench/bench_memory.py                 # BERT-base at 512 tokens, batch 4; ViT-B/16, batch 8; float32
    python3 bench/bench_memory.py --quick         # small models (seconds)
    python3 bench/bench_memory.py --method attnlrp --bert-seq 128   # AttnLRP, BERT-base at 128 tokens
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_explain import bert_case, machine, save_rows, vit_case  # noqa: E402

RESULTS = Path(__file__).parent / "results" / "memory_ratio.csv"
GOAL = 1.5
# the modified-gradient rule sets carry one tensor, as the input gradient does
GOALS = {"attnlrp": 1.3, "cp_lrp": 1.3}


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def measure(case: str, work: str, quick: bool, batch: int, seq: int, method: str, backend: str) -> dict:
    """In this process: the peak resident memory (MB) of ``work`` above what was resident before it."""
    import torch

    import transformer_lrp as tl

    torch.manual_seed(0)
    if case == "vit":
        name, model, inputs, target, input_gradient = vit_case(quick, batch, "cpu", torch.float32)
    else:
        name, model, inputs, target, input_gradient = bert_case(quick, batch, "cpu", seq, torch.float32)

    def explain():
        return tl.explain(model, inputs, target, method=method, backend=backend)

    run = input_gradient if work == "input_gradient" else explain
    Path("/proc/self/clear_refs").write_text("5")  # the high-water mark restarts from what is resident now
    before = _status_kb("VmRSS")
    run()
    peak = _status_kb("VmHWM")
    return dict(model=name, work=work, peak_mb=(peak - before) / 1024)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--method", default="transformer_attribution")
    ap.add_argument("--backend", default="torch")
    ap.add_argument("--bert-seq", type=int, default=512, help="BERT-base's tokens (default: %(default)s)")
    ap.add_argument("--no-save", action="store_true")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:  # one measurement, printed as JSON
        print(json.dumps(measure(**json.loads(args.child))))
        return
    cases = [("bert", 4, args.bert_seq), ("vit", 8, 0)] if not args.quick else [("bert", 2, 64), ("vit", 2, 0)]
    rows = []
    print(f"machine: {machine()}; float32 CPU; {args.method}, backend={args.backend}; one process per measurement")
    for case, batch, seq in cases:
        result = {}
        for work in ("input_gradient", "explain"):
            spec = dict(case=case, work=work, quick=args.quick, batch=batch, seq=seq, method=args.method,
                        backend=args.backend)
            out = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], capture_output=True,
                                 text=True, check=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
            result[work] = json.loads(out.stdout.strip().splitlines()[-1])
        grad_mb, explain_mb = result["input_gradient"]["peak_mb"], result["explain"]["peak_mb"]
        goal = GOALS.get(args.method, GOAL)
        ratio = explain_mb / grad_mb
        name = result["explain"]["model"]
        print(f"{name:<24} batch {batch:>3}: input gradient +{grad_mb:8.0f} MB, explain +{explain_mb:8.0f} MB, "
              f"ratio {ratio:.2f} (goal ≤ {goal})")
        rows.append(dict(date=datetime.date.today().isoformat(), machine=machine(), model=name, batch=batch,
                         method=args.method, backend=args.backend, input_grad_mb=f"{grad_mb:.0f}",
                         explain_mb=f"{explain_mb:.0f}", ratio=f"{ratio:.3f}", goal=goal, quick=args.quick))
    if not args.no_save:
        save_rows(RESULTS, rows)


if __name__ == "__main__":
    main()
