"""The same code on a GPU (skipped where none is present): CUDA results equal the CPU float64 reference."""

import _models as M
import pytest
import torch

import transformer_lrp as tl

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")


@pytest.mark.parametrize("method", tl.METHODS)
def test_vision_cuda_matches_cpu(method):
    model, x = M.timm_vit(), M.images(3)
    target = torch.tensor([0, 1, 2])
    cpu = tl.explain(model, x, target, method=method)
    gpu = tl.explain(model.cuda(), x.cuda(), target.cuda(), method=method)
    assert gpu.relevance.is_cuda
    torch.testing.assert_close(gpu.relevance.cpu(), cpu.relevance, rtol=1e-7, atol=1e-9)


def test_text_cuda_bf16_close_to_fp32():
    inputs = M.text_batch(with_types=True)
    ref = tl.explain(M.hf_bert(torch.float32).cuda(), {k: v.cuda() for k, v in inputs.items()}, 1)
    half = tl.explain(M.hf_bert(torch.bfloat16).cuda(), {k: v.cuda() for k, v in inputs.items()}, 1)
    err = (half.relevance.float() - ref.relevance).abs().amax(-1) / ref.relevance.abs().amax(-1)
    assert (err < 0.1).all()


# The Triton kernels compiled for the GPU (TRITON_INTERPRET is unset where CUDA exists), against the CPU float64
# reference, within the device check's tolerance (bench/gpu_check.py, ``tolerance``: 4× the largest error of the
# reference path's realizations in the same precision on the same GPU; float64 the same way).
GPU_CASES = {
    "timm_vit": (lambda dt: M.timm_vit(dt, depth=3), lambda dt: M.images(3, dtype=dt)),
    "bert_padded": (lambda dt: M.hf_bert(dt), lambda dt: M.text_batch()),
}


def _to(inputs, device):
    return inputs.to(device) if torch.is_tensor(inputs) else {k: v.to(device) for k, v in inputs.items()}


def _skip_unbuilt(backend):
    if backend == "cuda":
        from transformer_lrp._backend import not_supported_reasons

        reasons = not_supported_reasons("cuda", (torch.zeros(1, device="cuda"),))
        if reasons:
            pytest.skip("; ".join(reasons))


def _gpu_check():
    import importlib.util
    import sys
    from pathlib import Path

    if "gpu_check" not in sys.modules:
        root = Path(__file__).resolve().parents[1]
        sys.path.insert(0, str(root / "bench"))
        spec = importlib.util.spec_from_file_location("gpu_check", root / "bench" / "gpu_check.py")
        sys.modules["gpu_check"] = mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
    return sys.modules["gpu_check"]


def _cast(inputs, dtype):
    return inputs.to(dtype) if torch.is_tensor(inputs) else inputs


def _bound(make_model, make_inputs, dtype, label, method, target, ref):
    """The tolerance of a kernel run: the reference path's realizations in ``dtype`` on this GPU."""
    g = _gpu_check()
    model64, inputs64 = make_model(torch.float64), make_inputs(torch.float64)
    runs = [(make_model(dtype), make_inputs(dtype))] + [
        (m.to(dtype), _cast(i, dtype)) for m, i in (g.jittered(model64, inputs64, g.UNIT_ROUNDOFF[label], seed)
                                                    for seed in range(1, g.REALIZATIONS))]
    errors = [g.relative_error(tl.explain(m.cuda(), _to(i, "cuda"), target, method=method,
                                          backend="torch").relevance, ref) for m, i in runs]
    return g.tolerance(errors)


KERNEL_BACKENDS = ["triton", "cuda"]
LABELS = {torch.float64: "fp64", torch.float32: "fp32", torch.bfloat16: "bf16"}


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=["fp64", "fp32", "bf16"])
@pytest.mark.parametrize("method", ["transformer_attribution", "gae", "rollout", "full_lrp", "attention_gradcam"])
@pytest.mark.parametrize("name", list(GPU_CASES))
def test_kernels_cuda_match_cpu_reference(name, method, dtype, backend):
    """backend="triton" and backend="cuda" (CUDA C++ attention, LayerNorm and adds) against the CPU reference."""
    _skip_unbuilt(backend)
    make_model, make_inputs = GPU_CASES[name]
    ref = tl.explain(make_model(torch.float64), make_inputs(torch.float64), method=method)
    model, inputs = make_model(dtype).cuda(), _to(make_inputs(dtype), "cuda")
    out = tl.explain(model, inputs, ref.target.cuda(), method=method, backend=backend)
    err = _gpu_check().relative_error(out.relevance, ref.relevance)
    bound = _bound(make_model, make_inputs, dtype, LABELS[dtype], method, ref.target.cuda(), ref.relevance)
    assert err <= bound, (err, bound)


def test_automatic_backend_switch(monkeypatch):
    """Once the Triton path is marked validated, backend=None picks it for CUDA inputs (and the reference on CPU)."""
    from transformer_lrp import _backend

    monkeypatch.delenv("TLRP_BACKEND", raising=False)
    x = torch.zeros(1, device="cuda")
    assert _backend.select_backend(None, (x,)) == "torch"
    monkeypatch.setattr(_backend, "TRITON_VALIDATED_ON_GPU", True)
    assert _backend.select_backend(None, (x,)) == "triton"
    assert _backend.select_backend(None, (x.cpu(),)) == "torch"


@pytest.mark.parametrize("backend", ["torch", *KERNEL_BACKENDS])
@pytest.mark.parametrize("method", ["transformer_attribution", "gae", "attention_gradcam"])
def test_clip_cuda_matches_cpu_reference(method, backend):
    """CLIP on the GPU (the text tower's causal mask in each backend's attention) against the CPU float64 run."""
    _skip_unbuilt(backend)
    import test_clip

    model, inputs = test_clip.hf_clip(), test_clip.batch()
    ref = tl.explain(model, inputs, method=method)
    out = tl.explain(model.cuda(), _to(inputs, "cuda"), method=method, backend=backend)
    for got, want in ((out.image.relevance, ref.image.relevance), (out.text.relevance, ref.text.relevance)):
        assert float((got.cpu() - want).abs().max() / want.abs().max()) <= 1e-9
