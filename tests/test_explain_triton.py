"""explain(backend="triton") for the methods outside the fused sweep: they run the engine's path (the Triton ops
where the method's rules have one, the reference elsewhere) and equal backend="torch" (TRITON_INTERPRET=1 on CPU)."""

import _models as M
import pytest
import torch
from _device import on_device

import transformer_lrp as tl
from transformer_lrp import fused

OTHER = [m for m in tl.METHODS if m not in fused.FUSED_METHODS]


@pytest.mark.parametrize("method", OTHER)
def test_other_methods_with_triton_backend(method):
    model, x = on_device(M.timm_vit(depth=2)), on_device(M.images(2))
    ref = tl.explain(model, x, method=method)
    out = tl.explain(model, x, method=method, backend="triton")
    torch.testing.assert_close(out.relevance, ref.relevance, rtol=1e-10, atol=1e-12)
