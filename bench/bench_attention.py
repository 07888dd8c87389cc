"""The attention kernels alone: time, achieved FLOP rate and bandwidth against the device's measured ceilings,
next to the reference op (which materializes ``A``), on the shapes of the issue's goals.

    python bench/bench_attention.py                  # GPU: ViT-B/16 (B=64, N=197) and BERT-base (B=32, N=512)
    python bench/bench_attention.py --quick          # tiny shapes (on a CPU: the Triton interpreter; a smoke run)

FLOPs counted: forward 2 GEMM-shaped products (``QKᵀ``, ``PV``): ``4·B·H·N²·d``; the backward of transformer
attribution (gradient + relevance + map): 12 products (7 in the key-tile kernel, 5 in the query-tile kernel):
``24·B·H·N²·d``. Bytes counted: each ``[B, H, N, d]`` operand read or written once (the floor, not the traffic).
Ceilings are measured here, on this device: a large ``torch.matmul`` in the same dtype (TF32 off for float32, as
the kernels' ``ieee`` products unless ``--tf32``) and a device-to-device copy.
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys
from functools import partial
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_explain import machine, measure, save_rows  # noqa: E402

from transformer_lrp.ops.attention import attention_forward, attention_relevance  # noqa: E402

RESULTS = Path(__file__).parent / "results" / "attention_kernels.csv"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def matmul_ceiling(dtype: torch.dtype, device: str) -> float:
    """FLOP/s of a large square matmul in ``dtype`` (the achievable compute ceiling)."""
    n = 8192 if device == "cuda" else 512
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    (t,) = measure([lambda: a @ b], 5, device)
    return 2 * n**3 / t


def copy_ceiling(device: str) -> float:
    """Bytes/s of a device-to-device copy (read + write)."""
    n = (1 << 28) if device == "cuda" else (1 << 22)
    a = torch.empty(n, dtype=torch.float32, device=device)
    b = torch.empty_like(a)
    (t,) = measure([lambda: b.copy_(a)], 5, device)
    return 2 * a.numel() * a.element_size() / t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="bfloat16,float32")
    ap.add_argument("--tf32", action="store_true")
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--no-save", action="store_true")
    ap.add_argument("--csv", default=str(RESULTS), help="where the rows are appended (default: %(default)s)")
    args = ap.parse_args()
    dev = args.device
    if dev == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = args.tf32
    cases = [("tiny", 2, 3, 37, 16)] if args.quick else [("vit_b16_b64", 64, 12, 197, 64),
                                                          ("bert_base_512_b32", 32, 12, 512, 64)]
    bandwidth = copy_ceiling(dev)
    print(f"machine: {machine()}; torch {torch.__version__}; copy ceiling {bandwidth / 1e9:.0f} GB/s")
    print(f"{'shape':<20} {'dtype':<9} {'op':<10} {'triton ms':>10} {'torch ms':>10} {'speedup':>8} "
          f"{'TFLOP/s':>8} {'% mm':>6} {'GB/s':>7} {'% copy':>7}")
    for dname in args.dtype.split(","):
        dtype = DTYPES[dname]
        ceiling = matmul_ceiling(dtype, dev)
        for name, b, h, n, d in cases:
            g = torch.Generator().manual_seed(0)
            q, k, v, d_o, r_o = (torch.randn(b, h, n, d, generator=g).to(dev, dtype) for _ in range(5))
            scale = d**-0.5
            roll = torch.rand(b, n, device=dev)
            o, lse = attention_forward(q, k, v, scale, backend="triton")
            fwd = partial(attention_forward, q, k, v, scale)
            bwd = partial(attention_relevance, q, k, v, o, lse, scale, grad_out=d_o, rel_out=r_o,
                          map_mode="transformer_attribution", rollout=roll)
            for op, fn, flop_factor, tensors in (("forward", fwd, 4, 4), ("backward", bwd, 24, 12)):
                t_triton, t_torch = measure([partial(fn, backend="triton"), partial(fn, backend="torch")],
                                            args.repeats, dev)
                flops = flop_factor * b * h * n * n * d / t_triton
                moved = tensors * b * h * n * d * q.element_size() / t_triton
                print(f"{name:<20} {dname:<9} {op:<10} {t_triton * 1e3:10.3f} {t_torch * 1e3:10.3f} "
                      f"{t_torch / t_triton:8.2f} {flops / 1e12:8.2f} {100 * flops / ceiling:6.1f} "
                      f"{moved / 1e9:7.1f} {100 * moved / bandwidth:7.1f}", flush=True)
                row = (dict(date=datetime.date.today().isoformat(), machine=machine(), torch=torch.__version__,
                                 shape=name, dtype=dname + ("+tf32" if args.tf32 and dname == "float32" else ""),
                                 op=op, triton_ms=f"{t_triton * 1e3:.4f}", torch_ms=f"{t_torch * 1e3:.4f}",
                                 tflops=f"{flops / 1e12:.3f}", matmul_ceiling_tflops=f"{ceiling / 1e12:.3f}",
                                 gbs=f"{moved / 1e9:.2f}", copy_ceiling_gbs=f"{bandwidth / 1e9:.2f}",
                                 quick=args.quick))
                if not args.no_save:  # appended as measured
                    save_rows(Path(args.csv), [row])

if __name__ == "__main__":
    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")
    main()
