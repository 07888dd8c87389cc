"""A performance model on paper of one explanation against a plain input gradient on an H100, until a GPU can
measure both (``bench/gpu_check.sh`` prints the measured ratio next to the modelled one).

For ViT-B/16 at 224 px (batch 64) and BERT-base at 512 tokens (batch 32), in bf16 and in TF32, every op of the sweep
on the Triton kernels (``transformer_lrp/sweep.py``, transformer attribution from block 0) and of the input gradient
(the model's own forward and autograd backward to the input, parameters frozen) is counted in FLOPs and HBM bytes
and turned into a time: GEMMs and attention at a stated fraction of the tensor-core peak, elementwise passes at a
stated fraction of HBM bandwidth. Writes ``bench/results/gpu_model.md`` and ``gpu_model.csv``. A model, not a
measurement.

    python3 bench/gpu_model.py                                      # writes the model
    python3 bench/gpu_model.py --compare bench/results/explain_ratio.csv   # the model next to measured ratios
"""

from __future__ import annotations

import csv
import sys
from dataclasses import dataclass
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"

# H100 SXM5 ceilings (NVIDIA H100 Tensor Core GPU datasheet, dense, i.e. half the "with sparsity" figures).
PEAK = {"bf16": 989e12, "tf32": 495e12}
FP32_FMA = 67e12
HBM = 3.35e12
# Fractions of those ceilings, the model's assumptions:
GEMM_EFF = 0.65  # cuBLAS on these mid-size GEMMs (M = B·N ≈ 12.6k–16.4k, N, K = 768–3072)
# FlashAttention-3 paper (Shah et al., 2024, arXiv:2407.08608), H100 SXM5, non-causal, seq 512: FlashAttention-2's
# forward at head dim 64 reaches 282 TF/s (28.5 % of 989) and its backward at head dim 128 214 TF/s (21.6 %).
ATTN_FWD_EFF = 0.285
ATTN_BWD_EFF = 0.216
SHORT_SEQ_DERATE = 0.7  # N ≈ 197 (ViT): fewer, emptier tiles than at 512 (assumption)
BW_EFF = 0.8  # elementwise passes


@dataclass(frozen=True)
class Shape:
    name: str
    batch: int
    tokens: int
    width: int
    heads: int
    mlp: int
    depth: int
    pooled: int  # rows the top block computes in the sweep (CLS)


SHAPES = [Shape("vit_base_patch16_224", 64, 197, 768, 12, 3072, 12, 1),
          Shape("bert_base_seq512", 32, 512, 768, 12, 3072, 12, 1)]


@dataclass
class Op:
    name: str
    flops: float = 0.0  # tensor-core FLOPs (GEMM or attention)
    bytes: float = 0.0  # HBM traffic of elementwise passes
    kind: str = "gemm"  # gemm | attn_fwd | attn_bwd | mem
    count: int = 1  # how many blocks run it

    def seconds(self, precision: str, shape: Shape) -> float:
        eff = {"gemm": GEMM_EFF, "attn_fwd": ATTN_FWD_EFF, "attn_bwd": ATTN_BWD_EFF, "mem": 0.0}[self.kind]
        if self.kind.startswith("attn") and shape.tokens < 384:
            eff *= SHORT_SEQ_DERATE
        compute = self.flops / (eff * PEAK[precision]) if self.flops else 0.0
        memory = self.bytes / (BW_EFF * HBM)
        return self.count * max(compute, memory)


def _gemm(m: int, k: int, n: int) -> float:
    return 2.0 * m * k * n


def forward_ops(s: Shape, e: int, pooled_top: bool) -> list[Op]:
    """One forward of every block (``pooled_top``: the sweep's, whose top block computes the pooled rows only)."""
    m, d, f, n, bh = s.batch * s.tokens, s.width, s.mlp, s.tokens, s.batch * s.heads
    hd = d // s.heads
    attn = Op("attention forward (flash)", 4.0 * bh * n * n * hd, 4 * m * d * e, "attn_fwd", s.depth)
    ops = [Op("LayerNorm ×2", 0, 4 * m * d * e, "mem", s.depth),
           Op("qkv GEMM", _gemm(m, d, 3 * d), 0, "gemm", s.depth), attn,
           Op("proj, fc1, fc2 GEMMs", _gemm(m, d, d) + 2 * _gemm(m, d, f), 0, "gemm", s.depth),
           Op("GELU, residual adds", 0, (2 * f + 6 * d) * m * e, "mem", s.depth)]
    if pooled_top:  # the top block: keys and values of every token, the rest for the pooled rows (negligible)
        for op in ops:
            op.count -= 1 if op.name != "qkv GEMM" else 0
    return ops


def input_gradient_ops(s: Shape, e: int) -> list[Op]:
    m, d, f, n, bh = s.batch * s.tokens, s.width, s.mlp, s.tokens, s.batch * s.heads
    hd = d // s.heads
    back = [Op("backward: dX GEMMs (qkv, proj, fc1, fc2)", _gemm(m, 3 * d, d) + _gemm(m, d, d) + 2 * _gemm(m, f, d),
               0, "gemm", s.depth),
            # the standard count of a flash backward: 2.5× the forward's products (QKᵀ recomputed)
            Op("backward: attention (flash)", 10.0 * bh * n * n * hd, 8 * m * d * e, "attn_bwd", s.depth),
            Op("backward: LayerNorm ×2, GELU, gradient adds", 0, (10 * d + 3 * f + 6 * d) * m * e, "mem", s.depth)]
    return forward_ops(s, e, pooled_top=False) + back


def explanation_ops(s: Shape, e: int) -> list[Op]:
    """Transformer attribution from block 0 on the sweep: blocks L−1 … 1 carry gradient and relevance; the
    top block runs on the pooled rows (negligible but for its keys), the lowest stops at the attention map."""
    m, d, f, n, bh = s.batch * s.tokens, s.width, s.mlp, s.tokens, s.batch * s.heads
    hd = d // s.heads
    full = s.depth - 1  # blocks with every row; the top block is pooled
    below = s.depth - 2  # blocks the sweep passes through below the attention (not the lowest)
    acc = 4  # half_s and Δ are formed in float32
    # α1β0 with the gradient: |x||W|ᵀ, [S; dY]·W (2×), S|W| (four forward-size GEMMs); elementwise: |x|, the scale
    # pass (3 reads, 1 write of the output width), dY into the stacked operand, the combine pass (3 reads, 1 write)
    def alpha1beta0(k: int, o: int) -> tuple[float, float]:
        return 4 * _gemm(m, k, o), (2 * k + 4 * o + 2 * o + 4 * k) * m * e

    mlp2_f, mlp2_b = alpha1beta0(f, d)
    mlp1_f, mlp1_b = alpha1beta0(d, f)
    proj_f, proj_b = alpha1beta0(d, d)
    qkv_f, qkv_b = alpha1beta0(d, 3 * d)
    back = [
        Op("α1β0 + dX: fc2, fc1, proj (4 GEMMs each)", mlp2_f + mlp1_f + proj_f, 0, "gemm", full),
        Op("α1β0 + dX: qkv (4 GEMMs)", qkv_f, 0, "gemm", below),
        Op("α1β0 elementwise: fc2, fc1, proj", 0, mlp2_b + mlp1_b + proj_b, "mem", full),
        Op("α1β0 elementwise: qkv, q/k/v stacking", 0, qkv_b + 12 * m * d * e, "mem", below),
        Op("normalized add (MLP residual), GELU backward", 0, (8 * d + 3 * f) * m * e, "mem", full),
        Op("LayerNorm relevance (LN2 split, LN1)", 0, (13 * d + 7 * d) * m * e, "mem", full),
        Op("attention: G-rule factor and Δ (float32)", 0, 5 * m * d * acc, "mem", full),
        # query tiles: QKᵀ, dO Vᵀ, hS Vᵀ, dS K, T K; key tiles: those three again, Pᵀ dO, Pᵀ hS, dSᵀ Q, Tᵀ Q
        Op("attention relevance backward (query + key tiles)", 24.0 * bh * n * n * hd, 12 * m * d * e, "attn_bwd",
           below),
        Op("attention map only (lowest block)", 6.0 * bh * n * n * hd, 4 * m * d * e, "attn_bwd", 1),
    ]
    return forward_ops(s, e, pooled_top=True) + back


def model(precision: str) -> list[dict]:
    e = 2 if precision == "bf16" else 4
    rows = []
    for s in SHAPES:
        for what, ops in (("explanation", explanation_ops(s, e)), ("input gradient", input_gradient_ops(s, e))):
            for op in ops:
                rows.append(dict(model=s.name, precision=precision, pass_=what, op=op.name, blocks=op.count,
                                 gflop=op.count * op.flops / 1e9, gbyte=op.count * op.bytes / 1e9,
                                 ms=1e3 * op.seconds(precision, s)))
    return rows


_PRECISIONS = {"bfloat16": "bf16", "float32+tf32": "tf32"}


def compare(measured_csv: Path) -> None:
    """The modelled ratio of each case next to the last measured one (Triton backend, transformer attribution from
    block 0, on CUDA) in ``bench_explain.py``'s CSV."""
    modelled = {(r["model"], r["precision"]): r for r in csv.DictReader((RESULTS / "gpu_model.csv").open())}
    last = {}
    for r in csv.DictReader(measured_csv.open()) if measured_csv.exists() else []:
        key = (r["model"], _PRECISIONS.get(r["dtype"], r["dtype"]))
        if (r["backend"] == "triton" and r["method"] == "transformer_attribution" and r["settings"] == "start_layer=0"
                and key in modelled):
            last[key] = r
    print(f"{'model':<24} {'precision':<9} {'modelled':>8} {'measured':>8}  device")
    for key, m in modelled.items():
        r = last.get(key)
        print(f"{key[0]:<24} {key[1]:<9} {float(m['ratio']):8.2f} {float(r['ratio']) if r else float('nan'):8.2f}  "
              f"{r['machine'] if r else 'not measured'}")


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "--compare":
        compare(Path(sys.argv[2]))
        return
    RESULTS.mkdir(exist_ok=True)
    rows = model("bf16") + model("tf32")
    summary = []
    for s in SHAPES:
        for p in ("bf16", "tf32"):
            t = {w: sum(r["ms"] for r in rows if r["model"] == s.name and r["precision"] == p and r["pass_"] == w)
                 for w in ("explanation", "input gradient")}
            summary.append(dict(model=s.name, batch=s.batch, precision=p, explain_ms=round(t["explanation"], 3),
                                input_grad_ms=round(t["input gradient"], 3),
                                ratio=round(t["explanation"] / t["input gradient"], 2)))
    with open(RESULTS / "gpu_model.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(summary[0]))
        w.writeheader()
        w.writerows(summary)
    out = ["# Performance model of the sweep on the Triton kernels, H100 (a model, not a measurement)", "",
           "Written by `python3 bench/gpu_model.py`; `bench/gpu_check.sh` prints the measured ratios next to these "
           "when a GPU is lent.", "",
           f"Ceilings (NVIDIA H100 SXM5 datasheet, dense): bf16 {PEAK['bf16'] / 1e12:.0f} TF/s, TF32 "
           f"{PEAK['tf32'] / 1e12:.0f} TF/s, fp32/fp64 {FP32_FMA / 1e12:.0f} TF/s, HBM {HBM / 1e12:.2f} TB/s.",
           f"Assumed fractions: GEMMs {GEMM_EFF:.0%} of peak; attention forward {ATTN_FWD_EFF:.1%} and backward "
           f"{ATTN_BWD_EFF:.1%}, FlashAttention-2's on an H100 at 512 tokens (FlashAttention-3 paper, Shah et al. "
           f"2024, arXiv:2407.08608: 282 TF/s forward at head dim 64, 214 TF/s backward at head dim 128), "
           f"×{SHORT_SEQ_DERATE} for ViT's 197 tokens; elementwise passes {BW_EFF:.0%} of HBM bandwidth. Each op "
           "takes the larger of its compute and memory time.", "",
           "What is counted: the explanation is transformer attribution from block 0 on the sweep (forward "
           "with the flash-style kernel; top block on the pooled row; four GEMMs per Linear for α1β0 with the "
           "gradient sharing `[S; dY]·W`; the attention relevance backward with 24 N²d products per head against "
           "a flash backward's 10; the lowest block stops at the map). The input gradient is the model's own "
           "forward and an autograd backward to the input (dX GEMMs only, flash attention backward).", "",
           "| model | batch | precision | explanation (ms) | input gradient (ms) | predicted ratio |",
           "|---|---:|---|---:|---:|---:|"]
    for r in summary:
        out.append(f"| {r['model']} | {r['batch']} | {r['precision']} | {r['explain_ms']:.2f} | "
                   f"{r['input_grad_ms']:.2f} | **{r['ratio']:.2f}** |")
    for s in SHAPES:
        for p in ("bf16", "tf32"):
            out += ["", f"## {s.name}, batch {s.batch}, {p}", "", "| pass | op | blocks | GFLOP | GB | ms |",
                    "|---|---|---:|---:|---:|---:|"]
            for r in rows:
                if r["model"] == s.name and r["precision"] == p:
                    out.append(f"| {r['pass_']} | {r['op']} | {r['blocks']} | {r['gflop']:.1f} | {r['gbyte']:.2f} | "
                               f"{r['ms']:.3f} |")
    (RESULTS / "gpu_model.md").write_text("\n".join(out) + "\n")
    for r in summary:
        print(f"{r['model']:<24} {r['precision']}: explanation {r['explain_ms']:.2f} ms, input gradient "
              f"{r['input_grad_ms']:.2f} ms, predicted ratio {r['ratio']:.2f}")


if __name__ == "__main__":
    main()
