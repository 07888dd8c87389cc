"""The relevance ops as torch.autograd.Functions (forward: the plain op; backward: relevance), alone and chained
in one autograd graph, on both backends (TRITON_INTERPRET=1 on CPU)."""

import pytest
import torch
import torch.nn.functional as F
from _device import DEVICE

from transformer_lrp.ops import (
    attention_forward,
    attention_relevance,
    linear_alpha1beta0_ref,
    lrp_add_layernorm,
    lrp_attention,
    lrp_linear,
    normalized_add,
)
from transformer_lrp.ops.residual import normalized_add_ref


def _rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(DEVICE)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_linear_function(backend):
    x, w, b, r = _rand(2, 5, 7, seed=1), _rand(4, 7, seed=2), _rand(4, seed=3), _rand(2, 5, 4, seed=4)
    leaf = x.clone().requires_grad_(True)
    y = lrp_linear(leaf, w, b, backend)
    torch.testing.assert_close(y, F.linear(x, w, b))
    y.backward(r)
    torch.testing.assert_close(leaf.grad, linear_alpha1beta0_ref(x, w, r), rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_add_layernorm_function(backend):
    u, v, r, g = _rand(2, 3, 9, seed=1), _rand(2, 3, 9, seed=2), _rand(2, 3, 9, seed=3), _rand(9, seed=4)
    lu, lv = u.clone().requires_grad_(True), v.clone().requires_grad_(True)
    y = lrp_add_layernorm(lu, lv, g, None, 1e-6, backend)
    torch.testing.assert_close(y, F.layer_norm(u + v, (9,), g, None, 1e-6))
    y.backward(r)
    ref_u, ref_v = normalized_add_ref(r, u, v)  # LayerNorm passes relevance unchanged
    torch.testing.assert_close(lu.grad, ref_u, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(lv.grad, ref_v, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_functions_chained_in_one_graph(backend):
    """A post-LN attention block written with the Functions: autograd's backward of a relevance equals the rules
    applied by hand in reverse order."""
    b, n, heads, d = 2, 6, 3, 4
    dim = heads * d
    x = _rand(b, n, dim, seed=1)
    w_qkv, w_o = _rand(3 * dim, dim, seed=2) * 0.3, _rand(dim, dim, seed=3) * 0.3
    r_out = _rand(b, n, dim, seed=4)

    def split(t):
        return t.view(b, n, heads, d).transpose(1, 2)

    leaf = x.clone().requires_grad_(True)
    # x feeds the projection and the residual: autograd adds the two relevances (the clone rule, ≈ Σ)
    qkv = lrp_linear(leaf, w_qkv, None, backend)
    q, k, v = (split(t) for t in qkv.split(dim, dim=-1))
    ctx = lrp_attention(q, k, v, d**-0.5, None, backend).transpose(1, 2).reshape(b, n, dim)
    branch = lrp_linear(ctx, w_o, None, backend)
    y = lrp_add_layernorm(branch, leaf, None, None, 1e-5, backend)
    y.backward(r_out)

    # by hand
    r_branch, r_res = normalized_add(r_out, branch.detach(), x)
    r_ctx = linear_alpha1beta0_ref(ctx.detach(), w_o, r_branch)
    qd, kd, vd = q.detach(), k.detach(), v.detach()
    out, lse = attention_forward(qd, kd, vd, d**-0.5)
    rel = attention_relevance(qd, kd, vd, out, lse, d**-0.5, rel_out=split(r_ctx))
    r_qkv = torch.cat([t.transpose(1, 2).reshape(b, n, dim) for t in
                       (rel["rel_query"], rel["rel_key"], rel["rel_value"])], dim=-1)
    r_x = linear_alpha1beta0_ref(x, w_qkv, r_qkv) + r_res
    torch.testing.assert_close(leaf.grad, r_x, rtol=1e-8, atol=1e-10)
