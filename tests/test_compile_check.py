"""The ahead-of-time compile check (bench/compile_check.py): its CI subset compiles every kernel in every dtype for
sm_90a without a failure or a hot-kernel spill, and its table of launches covers every launch that explain() and
the ops send to Triton."""

import csv
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import _models as M
import pytest
import test_clip
import torch
from _bench import compile_check

import transformer_lrp as tl
from transformer_lrp import _target

ROOT = Path(__file__).resolve().parents[1]


def _kernel_names() -> set[str]:
    """Every Triton kernel of the package (the objects named ``_*_kernel`` in triton_kernels/)."""
    names = set()
    for path in (ROOT / "triton_kernels").glob("*.py"):
        mod = importlib.import_module(f"transformer_lrp.triton_kernels.{path.stem}")
        names |= {n for n in vars(mod) if n.startswith("_") and n.endswith("_kernel")}
    return names


@pytest.mark.slow
def test_quick_compile_check_passes(tmp_path):
    """Compiled, not interpreted (the child process has no TRITON_INTERPRET): minutes on 2 cores when Triton's
    cache is cold."""
    pytest.importorskip("triton")
    out = tmp_path / "kernel_resources.csv"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, "bench/compile_check.py", "--quick", "--csv", str(out)], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=3000)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]
    rows = list(csv.DictReader(out.open()))
    assert {r["kernel"] for r in rows} == _kernel_names()
    assert set("/".join(r["dtype"] for r in rows).split("/")) == {"bf16", "fp16", "fp32", "tf32", "fp64"}
    assert all(r["check"] == "ok" and int(r["registers"]) > 0 and r["arch"] == "sm_90a" for r in rows)
    hot = [r for r in rows if r["hot"] == "1" and set(r["dtype"].split("/")) - {"fp64"}]
    assert hot and all(int(r["spill_bytes"]) == 0 for r in hot)


# The GPU machine's Triton (3.6), installed beside CI's by scripts/install.sh (pip --target, no dependencies): the
# kernels must build without spills under both, since each Triton version allocates registers its own way.
GPU_IMAGE_TRITON = Path(os.environ.get("TLRP_GPU_IMAGE_TRITON", ROOT / ".ci-cache" / "triton-3.6.0"))


@pytest.mark.slow
def test_quick_compile_check_passes_under_the_gpu_images_triton(tmp_path):
    if not (GPU_IMAGE_TRITON / "triton" / "__init__.py").is_file():
        pytest.skip(f"no Triton 3.6 at {GPU_IMAGE_TRITON} (scripts/install.sh puts it there)")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(GPU_IMAGE_TRITON), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    version = subprocess.run([sys.executable, "-c", "import triton; print(triton.__version__)"], env=env,
                             capture_output=True, text=True, cwd=ROOT)
    assert version.stdout.strip() == "3.6.0", version.stderr
    out = tmp_path / "kernel_resources.csv"
    run = subprocess.run([sys.executable, "bench/compile_check.py", "--quick", "--csv", str(out)], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=3000)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]
    rows = list(csv.DictReader(out.open()))
    assert {r["kernel"] for r in rows} == _kernel_names()
    assert all(r["check"] == "ok" for r in rows)


@pytest.mark.slow
def test_cuda_compile_check_passes(tmp_path):
    """csrc/*.cu with nvcc -Xptxas -v for sm_80 and sm_90 (about 90 s on 2 cores): no compile error, no spill, every
    attention kernel in every dtype and row width; the Triton rows already in the table are kept."""
    cc = compile_check()
    if cc._nvcc() is None:
        pytest.skip("no nvcc")
    out = tmp_path / "kernel_resources.csv"
    triton_row = dict(kernel="_attn_fwd_kernel", variant="-", dtype="bf16", arch="sm_90a", tiles="64x64", warps=4,
                      stages=2, default=1, shared_bytes=1, registers=1, spill_bytes=0, hot=1, check="ok", models="x")
    cc.write_rows(str(out), [triton_row], cuda=False)
    run = subprocess.run([sys.executable, "bench/compile_check.py", "--cuda", "--csv", str(out)], cwd=ROOT,
                         capture_output=True, text=True, timeout=1200)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]
    rows = list(csv.DictReader(out.open()))
    assert [r["kernel"] for r in rows if r["variant"] != cc.CUDA_VARIANT] == ["_attn_fwd_kernel"]
    cuda = [r for r in rows if r["variant"] == cc.CUDA_VARIANT]
    assert all(r["check"] == "ok" and r["spill_bytes"] == "0" and int(r["registers"]) > 0 for r in cuda)
    attention = {(r["kernel"], r["dtype"], r["arch"], r["tiles"]) for r in cuda if r["hot"] == "1"}
    kernels = {"attention_forward_kernel", "attention_backward_query_kernel", "attention_backward_key_kernel",
               "attention_weighted_map_kernel"}
    assert attention == {(k, dt, arch, f"entries_per_lane={n}") for k in kernels for dt in ("fp32", "fp64", "fp16",
                                                                                          "bf16")
                         for arch in ("sm_80", "sm_90") for n in (2, 4, 8)}
    assert {"layernorm_relevance.cu", "normalized_add.cu"} <= {r["models"] for r in cuda}


def test_ptxas_log_parser():
    """The nvcc -Xptxas -v lines the CUDA part reads, on a log written by hand."""
    log = ("ptxas info    : Compiling entry function '_Z3fooPf' for 'sm_80'\n"
           "ptxas info    : Function properties for _Z3fooPf\n"
           "    16 bytes stack frame, 8 bytes spill stores, 8 bytes spill loads\n"
           "ptxas info    : Used 40 registers, used 1 barriers, 4096 bytes smem, 380 bytes cmem[0]\n"
           "ptxas info    : Compiling entry function '_Z3barv' for 'sm_90'\n"
           "ptxas info    : Function properties for _Z3barv\n"
           "    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads\n"
           "ptxas info    : Used 12 registers, used 0 barriers, 368 bytes cmem[0]\n")
    assert compile_check().parse_ptxas(log) == [
        dict(mangled="_Z3fooPf", arch=80, spill=8, registers=40, shared=4096),
        dict(mangled="_Z3barv", arch=90, spill=0, registers=12, shared=0)]


def test_compile_check_routes_float64_attention_away():
    """float64 attention never reaches Triton on a GPU (its fp64 MMA lowering fails): routed to the torch op."""
    cc = compile_check()
    case = next(m for m in cc.MODELS if m.name == "bert_base_512_padded")
    with pytest.warns(UserWarning, match="runs on the torch reference"):
        names = {launch.name for launch in cc.record_case(case, "fp64", 90)}
    assert not {n for n in names if n.startswith("_attn")}
    assert "_ln_rel_pass1_kernel" in names and "_alpha1beta0_scale_kernel" in names


FAMILIES = {
    "timm_vit": (lambda: M.timm_vit(depth=3), lambda: M.images(2)),
    "timm_deit_distilled": (M.timm_deit_distilled, lambda: M.images(2)),
    "timm_layerscale_registers": (M.timm_dinov2_like, lambda: M.images(2, size=28)),
    "hf_vit": (M.hf_vit, lambda: M.images(2)),
    "bert_types_padded": (M.hf_bert, lambda: M.text_batch(with_types=True)),
    "roberta": (M.hf_roberta, lambda: M.text_batch()),
    "distilbert_padded": (M.hf_distilbert, lambda: M.text_batch((9, 4))),
    "clip_padded_causal": (lambda: test_clip.hf_clip(), lambda: {**test_clip.batch(), "pixel_values":
                                                                  test_clip.batch()["pixel_values"].float()}),
}
CALLS = [("transformer_attribution", dict(start_layer=0)), ("transformer_attribution", dict(start_layer=1,
         normalize_rows=True)), ("transformer_attribution", dict(start_layer=-1, normalize_rows=True)),
         ("gae", dict(start_layer=0, normalize_rows=True)), ("gae", dict(start_layer=1)), ("rollout", dict()),
         ("full_lrp", dict()), ("attention_gradcam", dict()), ("raw_attention", dict()), ("partial_lrp", dict())]


def test_compile_table_covers_every_dispatched_launch():
    """Every (kernel, flags) that explain(backend="triton") launches, on every model family and method, under the
    interpreter, is in the compile check's table (whose dtypes and shapes then multiply it)."""
    cc = compile_check()
    table = {(launch.name, cc.variant_of(launch)) for case in cc.MODELS for launch in cc.record_case(case, "fp32", 90)}
    table |= {(launch.name, cc.variant_of(launch)) for launch in cc.record_ops("fp32", 90)}
    seen = set()
    for build, inputs in FAMILIES.values():
        model, x = build().float(), inputs()
        if not isinstance(x, dict):
            x = x.float()
        for method, kw in CALLS:
            with _target.record_launches(execute=True) as rec:
                tl.explain(model, x, method=method, backend="triton", **kw)
            seen |= {(launch.name, cc.variant_of(launch)) for launch in rec.launches}
    assert seen, "nothing was launched"
    missing = seen - table
    assert not missing, f"launches the compile table does not cover: {sorted(missing)}"


def test_compile_table_covers_the_ops_api():
    """The public ops reach flag combinations the sweep does not (the head-mean map, a gradient-only backward, …):
    the table's ops part records them, each an actual launch of the ops with meta tensors."""
    cc = compile_check()
    variants = {(launch.name, cc.variant_of(launch)) for launch in cc.record_ops("fp32", 90)}
    kv = {v for name, v in variants if name == "_attn_bwd_kv_kernel"}
    assert any("WANT_MAP" in v for v in kv) and any(v.split() == ["NEED_DP", "NEED_GRAD"] for v in kv)
    assert {name for name, _ in variants} >= {"_attn_fwd_kernel", "_attn_bwd_q_kernel", "_attn_bwd_kv_kernel",
                                              "_attn_weighted_map_kernel", "_normalized_add_sums_kernel",
                                              "_ln_rel_pass1_kernel", "_alpha1beta0_scale_kernel"}


def test_recording_leaves_nothing_running_and_tensors_untouched():
    """Recording runs the launchers on meta tensors without executing a kernel, and outside a recording meta
    tensors are not taken for GPU tensors."""
    q = torch.empty(2, 3, 17, 64, device="meta")
    assert not _target.stands_for_gpu(q)
    with _target.record_launches(arch=80, tf32=True) as rec:
        assert _target.stands_for_gpu(q) and _target.device_arch(q.device) == 80 and _target.tf32_products(q)
        out, lse = tl.ops.attention_forward(q, q, q, 0.125, backend="triton")
    assert out.is_meta and lse.is_meta and [launch.name for launch in rec.launches] == ["_attn_fwd_kernel"]
    assert rec.launches[0].constexprs["PREC"] == "tf32"
    assert _target.recording() is None


def test_float64_attention_on_a_gpu_is_routed_with_a_reason():
    """The reason is reported per op; an explanation routes the op to the torch reference and warns once; an explicit
    op call refuses. (Meta tensors stand for CUDA tensors while launches are recorded.)"""
    from transformer_lrp import _backend

    q = torch.empty(1, 2, 8, 16, dtype=torch.float64, device="meta")
    with _target.record_launches():
        assert _backend.not_supported_reasons("triton", (q,), op="attention_relevance") == [_backend.FP64_PRODUCTS]
        assert _backend.not_supported_reasons("triton", (q,), op="layernorm_relevance") == []
        assert _backend.not_supported_reasons("triton", (q,)) == []  # the explanation as a whole can run
        assert _backend.not_supported_reasons("triton", (q.float(),), op="attention_relevance") == []
        _backend._ROUTED.clear()
        with pytest.warns(UserWarning, match="attention_forward runs on the torch reference: float64"):
            assert _backend.route("attention_forward", "triton", (q,)) == "torch"
        assert _backend.route("attention_forward", "triton", (q.float(),)) == "triton"
        with pytest.raises(NotImplementedError, match="float64 tile products on a GPU"):
            tl.ops.attention_forward(q, q, q, 0.25, backend="triton")
    cpu = torch.zeros(1, dtype=torch.float64)  # CPU tensors: the interpreter runs float64
    assert _backend.not_supported_reasons("triton", (cpu,), op="attention_relevance") == []
