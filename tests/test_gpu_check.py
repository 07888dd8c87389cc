"""The device check (bench/gpu_check.py) without a device: its dry run proves each command fits one slot, and its
verdict tolerance passes a correct kernel and fails a wrong one (the Triton kernels under the interpreter, float32)."""

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import _models as M
import pytest
import torch

import transformer_lrp as tl

ROOT = Path(__file__).resolve().parents[1]


def _gpu_check():
    if "gpu_check" not in sys.modules:
        sys.path.insert(0, str(ROOT / "bench"))
        spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "bench" / "gpu_check.py")
        sys.modules["gpu_check"] = mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
    return sys.modules["gpu_check"]


@pytest.mark.slow
@pytest.mark.parametrize("command", ["verdicts", "ratios", "extras"])
def test_dry_run_fits_one_slot(command):
    """Every stage's estimate (its Triton compilations counted on meta tensors × the compile cost measured here, plus
    its other work) at ≤ 70 % of its limit, the limits within 420 s, and the compile counts real (not zero where the
    stage launches Triton kernels)."""
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, "bench/gpu_check.py", command, "--dry-run"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    stages = {}
    for line in run.stdout.splitlines():
        m = re.match(r"(\w+)\s+(\d+)\s+(\d+)\s+(\d+)\s+(\d+)\s+(\d+)\s+(\d+)\s+(\d+)\s+(\d+)%", line)
        if m:
            stages[m.group(1)] = dict(compiles=int(m.group(2)), estimate=int(m.group(7)), limit=int(m.group(8)),
                                      share=int(m.group(9)))
    planned = [s.name for s in _gpu_check().plan()[command]]
    assert list(stages) == planned
    assert all(s["share"] <= 70 and s["estimate"] <= 0.7 * s["limit"] + 1 for s in stages.values()), stages
    assert sum(s["limit"] for s in stages.values()) <= 420
    launching = {"verdicts": "triton", "ratios": "bf16", "extras": "autotune"}[command]
    assert stages[launching]["compiles"] > 0
    assert "OK" in run.stdout.splitlines()[-2]


def test_list_schedule_starts_each_worker_on_the_first_free_slot():
    """Hand-computed schedules: two slots, 5 | 3 then 3 (at 3) and 1 (at 5) end at 6; one slot sums; more slots than
    workers waits for the longest."""
    g = _gpu_check()
    assert g.list_schedule([5, 3, 3, 1], 2) == 6
    assert g.list_schedule([5, 3, 3, 1], 1) == 12
    assert g.list_schedule([5, 3, 3, 1], 8) == 5
    # the lightest first on the same work ends later: 1 | 3, then 3 (at 1), then 5 (at 3) ends at 8
    assert g.list_schedule([1, 3, 3, 5], 2) == 8


def test_verdict_workers_start_every_workload_and_precision_once():
    g = _gpu_check()
    pairs = [(w.name, d) for w, d in g.verdict_workers()]
    assert sorted(pairs) == sorted((w.name, d) for w in g.WORKLOADS for d in g.DTYPES)
    assert pairs[0][0].startswith("clip") or not any("clip" in w.name for w in g.WORKLOADS)


def _explain_error(model, inputs, target, method, backend, ref):
    e = tl.explain(model, inputs, target, method=method, backend=backend)
    return _gpu_check().relative_error(e.relevance, ref)


@pytest.mark.parametrize("method", ["transformer_attribution", "gae", "rollout", "raw_attention", "attention_gradcam",
                                    "full_lrp", "attnlrp"])
def test_tolerance_passes_the_kernels_and_fails_a_planted_bug(method, monkeypatch):
    """float32, padded BERT, as a verdict worker does it: the reference path's realizations (as given and jittered by
    ±2 ulp) set the error level, the Triton kernels (interpreter) stay within ``tolerance`` of the float64 reference,
    and the same kernels with the padding mask dropped (a plausible kernel bug) land far above it."""
    g = _gpu_check()
    model64, inputs = M.hf_bert(torch.float64), M.text_batch()
    target = torch.tensor([1, 0, 2])
    ref = tl.explain(model64, inputs, target, method=method).relevance
    u = g.UNIT_ROUNDOFF["fp32"]
    realizations = [(M.hf_bert(torch.float32), inputs)] + [
        (m.float(), i) for m, i in (g.jittered(model64, inputs, u, seed) for seed in range(1, g.REALIZATIONS))]
    level = [_explain_error(m, i, target, method, "torch", ref) for m, i in realizations]
    lse = g.max_log_sum_exp(model64, inputs)
    assert 0 < lse < 20
    bound = g.tolerance(level, g.OUTPUT_ROUNDOFF["fp32"], 2 * u * lse)
    model32 = realizations[0][0]
    good = _explain_error(model32, inputs, target, method, "triton", ref)
    assert good <= bound, (good, level)

    from transformer_lrp.triton_kernels import attention_lrp

    keep = attention_lrp._keep
    monkeypatch.setattr(attention_lrp, "_keep",  # padding attended
                        lambda key_mask, like: keep(None if key_mask is None else torch.ones_like(key_mask), like))
    bad = _explain_error(model32, inputs, target, method, "triton", ref)
    assert bad > 10 * bound, (bad, bound)  # far outside, even for full LRP (its float32 error is ~1e-3 here)


def test_jitter_moves_each_value_by_an_ulp_or_two():
    g = _gpu_check()
    x = torch.randn(1000, dtype=torch.float64)
    _, moved = g.jittered(torch.nn.Linear(1, 1).double(), x, g.UNIT_ROUNDOFF["fp32"], 0)
    a, b = x.float(), moved.float()
    ulps = ((a - b).abs() / torch.finfo(torch.float32).eps / a.abs()).max()
    assert 0 < ulps <= 4


@pytest.mark.slow
def test_verdicts_rehearsal_on_the_cpu(tmp_path):
    """The first command end to end on this CPU (GPU_CHECK_DEVICE=cpu: the kernels under the interpreter;
    GPU_CHECK_TINY=1: tiny models of the same three families, two precisions): every stage runs in its own process,
    the references are written per workload, every (workload, precision, method) gets a reference-path row and a
    Triton verdict, all PASS, and the cuda stage leaves one SKIP row saying why."""
    import csv

    env = {**os.environ, "GPU_CHECK_DEVICE": "cpu", "GPU_CHECK_TINY": "1", "OUT": str(tmp_path)}
    run = subprocess.run([sys.executable, "bench/gpu_check.py", "verdicts"], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=900)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    for stage in ("setup", "references", "triton", "cuda"):
        assert f"--- {stage}: done" in run.stdout
    rows = list(csv.DictReader((tmp_path / "verdicts.csv").open()))
    g = _gpu_check()
    triton = [r for r in rows if r["backend"] == "triton"]
    assert len(triton) == len(g.TINY_WORKLOADS) * 2 * len(g.METHODS)
    assert {r["verdict"] for r in triton} <= {"PASS", "VACUOUS"} and any(r["verdict"] == "PASS" for r in triton)
    assert len([r for r in rows if r["backend"] == "torch"]) == len(triton)
    assert [r["verdict"] for r in rows if r["backend"] == "cuda"] == ["SKIP"]
    log = (tmp_path / "gpu_check.log").read_text()
    assert log.count("=== verdicts/") == 4 and "=== verdicts done in" in log  # each stage's head, then the end
