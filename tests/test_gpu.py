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
