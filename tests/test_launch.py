"""The launcher layer (triton_kernels/_launch.py) and the launchers' own bookkeeping: the autotuner's size classes,
the device guard, and the cached candidate lists; and, compiled for sm_90a on this CPU, that the attention kernels'
row loads vectorize."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from _bench import compile_check
from transformer_lrp.triton_kernels import _launch, attention_lrp

ROOT = Path(__file__).resolve().parents[1]


def _job(nq: int, nk: int, dtype=torch.bfloat16, **constexprs):
    q = torch.empty(1, dtype=dtype)
    args = [q] * 7 + [0] * 12 + [q, 12, 1, nq, nk, 0]
    return _launch.Launch(attention_lrp._attn_fwd_kernel, lambda meta: (1, 1), tuple(args),
                          dict(HEAD_DIM=64, **constexprs), (_launch.candidate(4),), ("NQ", "NK"))


def test_autotune_key_buckets_sequence_lengths():
    """A batch padded to 37 tokens and one padded to 60 share a size class (64) and so one tuning; 65 does not;
    the flags and dtypes stay part of the key."""
    key = _launch.autotune_key
    assert key(_job(37, 37), None) == key(_job(60, 60), None)
    assert key(_job(37, 37), None) != key(_job(65, 65), None)
    assert key(_job(37, 37), None) != key(_job(37, 37, CAUSAL=True), None)
    assert key(_job(37, 37), None) != key(_job(37, 37, dtype=torch.float16), None)
    assert [_launch.size_class(n) for n in (1, 16, 17, 512, 513)] == [1, 16, 32, 512, 1024]


def test_launch_enters_the_tensors_device(monkeypatch):
    """Every launch runs under a guard of its tensors' GPU (a model on cuda:1 with cuda:0 current launches on
    cuda:1). Checked without a GPU: the guard is asked for with the device of the first CUDA tensor argument."""
    entered = []

    class FakeCuda:
        device = torch.device("cuda", 1)

    class Guard:
        def __init__(self, device):
            entered.append(device)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

    ran = []
    real = _launch._cuda_device
    monkeypatch.setattr(_launch, "_cuda_device", lambda args: FakeCuda.device)
    monkeypatch.setattr(_launch.torch.cuda, "device", Guard)
    monkeypatch.setattr(_launch.Launch, "run", lambda self, cand: ran.append(cand))
    _launch.launch(attention_lrp._attn_fwd_kernel, lambda meta: (1,), (), {}, (_launch.candidate(4),))
    assert entered == [torch.device("cuda", 1)] and len(ran) == 1
    # CPU tensors (the interpreter) need no guard
    assert real((torch.zeros(1), 3, None)) is None


def test_candidate_lists_are_cached():
    """A launch rebuilds no candidate list: the same arguments give the same (cached) tuple."""
    a = attention_lrp.attention_candidates("bwd_kv", "half", 64, 256, 256, 90, True, False)
    b = attention_lrp.attention_candidates("bwd_kv", "half", 64, 256, 256, 90, True, False)
    assert a is b and a
    assert attention_lrp.attention_candidates.cache_info().hits >= 1


@pytest.mark.slow
def test_attention_row_loads_vectorize_for_sm90():
    """Compiled (not interpreted) for sm_90a on this CPU: with the head width a compile-time constant and the d-mask
    gone for a power-of-two width, the bf16 forward and both backward kernels load their rows with 16-byte vector
    loads or cp.async (a software pipeline), and never element by element (``ld.global.b16``)."""
    pytest.importorskip("triton")
    code = r'''
import json, re, sys, importlib, warnings
sys.path[:0] = [sys.argv[1], sys.argv[1] + "/bench"]
warnings.filterwarnings("ignore")
import compile_check as cc, triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
case = next(m for m in cc.MODELS if m.name == "vit_base_patch16_224")
runs = [("transformer_attribution", 0, False)]
found = {}
for ln in cc.record_case(case, "bf16", 90, runs=runs):
    if ln.name not in ("_attn_fwd_kernel", "_attn_bwd_q_kernel", "_attn_bwd_kv_kernel") or ln.name in found:
        continue
    job = cc.specialize(ln, ln.candidates[0], 90)
    fn = getattr(importlib.import_module(job["module"]), job["name"])
    ptx = triton.compile(ASTSource(fn, job["signature"], job["constexprs"], job["attrs"]),
                         target=GPUTarget("cuda", 90, 32), options=job["options"]).asm["ptx"]
    found[ln.name] = {k: len(re.findall(p, ptx)) for k, p in
                      (("vector", r"ld\.global(\.\w+)*\.v[248]\."), ("cp_async", r"cp\.async\."),
                       ("scalar_b16", r"ld\.global(\.\w+)*\.b16\b"))}
print(json.dumps(found))
'''
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, "-c", code, str(ROOT)], env=env, capture_output=True, text=True,
                         timeout=600, cwd=ROOT)
    assert run.returncode == 0, run.stderr[-3000:]
    found = json.loads(run.stdout.strip().splitlines()[-1])
    assert set(found) == {"_attn_fwd_kernel", "_attn_bwd_q_kernel", "_attn_bwd_kv_kernel"}
    for name, counts in found.items():
        assert counts["vector"] + counts["cp_async"] > 0, (name, counts)
        assert counts["scalar_b16"] == 0, (name, counts)


def test_attention_candidates_carry_a_register_budget():
    """Every forward and backward candidate states its register budget (one CTA's share of the register file, at
    most 255), which reaches Triton as the ``maxnreg`` option; the map kernel (not hot) leaves it to ptxas, whose own
    choice spills less there."""
    for kernel in ("fwd", "bwd_q", "bwd_kv"):
        for products in ("half", "tf32", "ieee"):
            for block_d in (32, 64, 128, 256):
                for heavy, causal in ((False, False), (True, False), (False, True), (True, True)):
                    for arch in (80, 90):
                        cands = attention_lrp.attention_candidates(kernel, products, block_d, 8192, 8192, arch, heavy,
                                                                   causal)
                        assert cands
                        for c in cands:
                            assert c.maxnreg == min(255, 65536 // (32 * c.num_warps))
                            assert c.options["maxnreg"] == c.maxnreg
    assert all(c.maxnreg is None and "maxnreg" not in c.options
               for c in attention_lrp.attention_candidates("map", "half", 128, 8192, 8192, 90))
    assert [_launch.register_budget(w) for w in (2, 4, 8, 16)] == [255, 255, 255, 128]


@pytest.mark.slow
def test_wide_key_tile_backward_builds_within_its_budget_without_spills():
    """Compiled for sm_90a on this CPU: Llama-3-8B's key-tile backward (head dim 128, float32, causal; AttnLRP's
    gradient pass, the 16 × 32 candidate) builds with its register budget and ptxas spills nothing. (Without the
    budget ptxas aimed this launch at three CTAs per SM, 80 registers, and spilled 12 B, under Triton 3.8.)"""
    pytest.importorskip("triton")
    code = r'''
import json, re, sys, importlib, warnings
sys.path[:0] = [sys.argv[1], sys.argv[1] + "/bench"]
warnings.filterwarnings("ignore")
import compile_check as cc
case = next(m for m in cc.MODELS if m.name == "llama3_8b_8k")
ln = next(ln for ln in cc.record_case(case, "fp32", 90, runs=[("attnlrp", 0, False)], padded=(False,))
          if ln.name == "_attn_bwd_kv_kernel")
job = cc.specialize(ln, next(c for c in ln.candidates if c.meta["BLOCK_N"] == 32), 90)
res = cc.compile_job(job)
print(json.dumps(dict(maxnreg=job["options"].get("maxnreg"), **res)))
'''
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, "-c", code, str(ROOT)], env=env, capture_output=True, text=True,
                         timeout=600, cwd=ROOT)
    assert run.returncode == 0, run.stderr[-3000:]
    res = json.loads(run.stdout.strip().splitlines()[-1])
    assert res["status"] == "ok", res
    assert res["maxnreg"] == 255 and res["registers"] <= 255
    assert res["spill_stores"] == 0 and res["spill_loads"] == 0, res


def test_tf32_key_tiles_of_256_wide_heads_compute_in_ieee():
    """Recorded on meta tensors (nothing runs): Gemma 3's 256-wide heads under TF32 run the key-tile backward's
    products in IEEE float32 with the IEEE tile list (TF32 spilled 170–210 B there), while the forward and the
    query-tile backward keep TF32; a 128-wide head (Llama-3-8B) keeps TF32 everywhere."""
    cc = compile_check()
    precisions = {}
    for name in ("gemma3_1b_head_dim_256_window_512", "llama3_8b_8k"):
        case = next(m for m in cc.MODELS if m.name == name)
        for ln in cc.record_case(case, "tf32", 90, runs=[("transformer_attribution", 0, True)], padded=(True,)):
            if ln.name in ("_attn_fwd_kernel", "_attn_bwd_q_kernel", "_attn_bwd_kv_kernel"):
                precisions.setdefault((name, ln.name), set()).add(ln.constexprs["PREC"])
                if ln.name == "_attn_bwd_kv_kernel":
                    expect = attention_lrp.attention_candidates(
                        "bwd_kv", "ieee" if name.startswith("gemma") else "tf32", ln.constexprs["BLOCK_D"],
                        8192, 8192, 90, ln.constexprs["NEED_GRAD"] and ln.constexprs["NEED_REL"], True)
                    assert [c.num_warps for c in ln.candidates] == [c.num_warps for c in expect]
    gemma, llama = "gemma3_1b_head_dim_256_window_512", "llama3_8b_8k"
    assert precisions[(gemma, "_attn_bwd_kv_kernel")] == {"ieee"}
    assert precisions[(gemma, "_attn_fwd_kernel")] == precisions[(gemma, "_attn_bwd_q_kernel")] == {"tf32"}
    assert all(p == {"tf32"} for (model, _), p in precisions.items() if model == llama)
