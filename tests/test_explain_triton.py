"""explain(backend="triton") equals the torch reference on small ViT and BERT models (TRITON_INTERPRET=1 on CPU)."""

import _models as M
import pytest
import torch

import transformer_lrp as tl

CASES = {
    "timm_vit": (lambda dt: M.timm_vit(dt, depth=2), lambda dt: M.images(2, dtype=dt)),
    "bert_padded": (lambda dt: M.hf_bert(dt, num_hidden_layers=2), lambda dt: M.text_batch((9, 6))),
}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
@pytest.mark.parametrize("name", list(CASES))
def test_triton_backend_matches_torch(name, dtype):
    make_model, make_inputs = CASES[name]
    model, inputs = make_model(dtype), make_inputs(dtype)
    ref = tl.explain(model, inputs, method="transformer_attribution")
    out = tl.explain(model, inputs, method="transformer_attribution", backend="triton")
    tol = 1e-9 if dtype == torch.float64 else 1e-4
    err = (out.relevance - ref.relevance).abs().max() / ref.relevance.abs().max()
    assert err <= tol, f"relative error {err:.2e}"
    assert torch.equal(out.target, ref.target)
