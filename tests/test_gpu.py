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


# The Triton kernels compiled for the GPU (TRITON_INTERPRET is unset where CUDA exists). Stated tolerances, relative
# to the map's largest entry, against the CPU float64 reference: float64 1e-9; float32 within twice the torch path's
# own float32 error; bfloat16 within twice the torch path's own bf16 error + 2 % (and 10 % for BERT).
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


KERNEL_BACKENDS = ["triton", "cuda"]


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
@pytest.mark.parametrize("method", ["transformer_attribution", "gae", "rollout", "full_lrp", "attention_gradcam"])
@pytest.mark.parametrize("name", list(GPU_CASES))
def test_kernels_cuda_match_cpu_reference(name, method, dtype, backend):
    """backend="triton" and backend="cuda" (CUDA C++ attention, LayerNorm and adds) against the CPU reference."""
    _skip_unbuilt(backend)
    make_model, make_inputs = GPU_CASES[name]
    ref = tl.explain(make_model(torch.float64), make_inputs(torch.float64), method=method)
    model, inputs = make_model(dtype).cuda(), _to(make_inputs(dtype), "cuda")
    out = tl.explain(model, inputs, ref.target.cuda(), method=method, backend=backend)

    def err(e):
        return float((e.relevance.double().cpu() - ref.relevance).abs().max() / ref.relevance.abs().max())

    if dtype == torch.float64:
        assert err(out) <= 1e-9, err(out)
    else:  # within twice the torch path's own float32 error on the same GPU (tiny random models amplify rounding)
        own = tl.explain(model, inputs, ref.target.cuda(), method=method, backend="torch")
        assert err(out) <= 2 * err(own) + 1e-6, (err(out), err(own))


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("method", ["transformer_attribution", "gae"])
@pytest.mark.parametrize("name", list(GPU_CASES))
def test_kernels_bf16_close_to_fp32(name, method, backend):
    """bf16 kernels against the fp32 explanation: within 10 % (BERT), and never worse than twice the reference
    path's own bf16 error (+2 %) (random tiny ViTs are ill-conditioned in bf16)."""
    _skip_unbuilt(backend)
    make_model, make_inputs = GPU_CASES[name]
    inputs32, inputs16 = _to(make_inputs(torch.float32), "cuda"), _to(make_inputs(torch.bfloat16), "cuda")
    ref = tl.explain(make_model(torch.float32).cuda(), inputs32, 1, method=method)
    model16 = make_model(torch.bfloat16).cuda()
    half = tl.explain(model16, inputs16, 1, method=method, backend=backend)
    half_ref = tl.explain(model16, inputs16, 1, method=method, backend="torch")

    def err(e):
        return ((e.relevance.float() - ref.relevance).abs().amax(-1) / ref.relevance.abs().amax(-1)).max()

    assert err(half) <= 2 * err(half_ref) + 0.02, (err(half), err(half_ref))
    if name.startswith("bert"):
        assert err(half) < 0.1


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
