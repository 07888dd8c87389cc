"""explain(backend="triton") for the methods outside the fused sweep equals backend="torch" (TRITON_INTERPRET=1 on
CPU): full LRP (the fused attention forward and its relevance kernel), text GradCAM (the head-weighted map kernel),
and, through the same reference code on both backends, the methods that read one block's pooled rows."""

import _models as M
import pytest
import torch
from _device import on_device

import transformer_lrp as tl
from transformer_lrp import fused

OTHER = [m for m in tl.METHODS if m not in fused.FUSED_METHODS]


CASES = {
    "timm_vit": (lambda: M.timm_vit(depth=2), lambda: M.images(2)),
    "bert_padded": (lambda: M.hf_bert(num_hidden_layers=2), lambda: M.text_batch((9, 6))),  # the mask add, z-rule
}


@pytest.mark.parametrize("method", OTHER)
@pytest.mark.parametrize("name", list(CASES))
def test_other_methods_with_triton_backend(name, method):
    model, x = (on_device(make()) for make in CASES[name])
    ref = tl.explain(model, x, method=method)
    out = tl.explain(model, x, method=method, backend="triton")
    kernels = method == "full_lrp" or (method == "attention_gradcam" and name.startswith("bert"))
    if not kernels:  # they read one block's pooled rows: the same reference code on every backend
        assert torch.equal(out.relevance, ref.relevance)
        return
    scale = float(ref.relevance.abs().max())
    torch.testing.assert_close(out.relevance, ref.relevance, rtol=1e-10, atol=1e-10 * scale)
    if ref.pixel_relevance is not None:  # full LRP down to the pixels (z^B rule of the patch embedding)
        scale = float(ref.pixel_relevance.abs().max())
        torch.testing.assert_close(out.pixel_relevance, ref.pixel_relevance, rtol=1e-10, atol=1e-10 * scale)
