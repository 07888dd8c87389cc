"""LayerNorm backward fused with the clone and the normalized add (Triton, TRITON_INTERPRET=1 on CPU) against its
reference, and the reference against autograd and the rules it composes."""

import pytest
import torch
import torch.nn.functional as F
from _device import DEVICE
from _poison import nan_buffers

from transformer_lrp.ops.layernorm import layernorm_relevance
from transformer_lrp.ops.residual import clone_relevance, normalized_add_ref

SHAPES = [(1, 1, 5), (3, 7, 37), (2, 4, 300)]  # one row, non-powers of two, a wide row
VARIANTS = {  # which of v, weight, residual gradient, relevance, residual relevance are present
    "pre_ln_split": (True, True, True, True, True),  # ViT: z = x + branch1 → LN2, residual
    "post_ln_split": (True, True, False, True, False),  # BERT: y = LN(branch + x)
    "pre_ln_input": (False, True, True, True, True),  # ViT block input: LN1 and the residual, no split
    "no_affine": (True, False, True, True, False),
    "gradient_only": (True, True, True, False, False),  # GAE
}


def _args(shape, dtype, variant, seed=0):
    has_v, has_w, has_gres, has_rel, has_rres = VARIANTS[variant]
    g = torch.Generator().manual_seed(seed)

    def rnd(*s):
        return torch.randn(*s, generator=g, dtype=torch.float64).to(DEVICE, dtype)

    u, v = rnd(*shape), rnd(*shape)
    v[0] -= 3 * u[0].abs()  # sample 0's second branch net-negative: the normalized add's sign flip
    d = shape[-1]
    return dict(u=u, v=v if has_v else None, weight=rnd(d) if has_w else None, bias=rnd(d) if has_w else None,
                ln_eps=1e-6, grad_norm_out=rnd(*shape), rel_norm_out=rnd(*shape) if has_rel else None,
                grad_residual=rnd(*shape) if has_gres else None, rel_residual=rnd(*shape) if has_rres else None)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("shape", SHAPES, ids=["x".join(map(str, s)) for s in SHAPES])
def test_kernel_matches_reference(shape, variant, dtype, monkeypatch):
    args = _args(shape, dtype, variant)
    ref = layernorm_relevance(**args, backend="torch")
    with nan_buffers(monkeypatch):
        out = layernorm_relevance(**args, backend="triton")
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    for name, a, b in zip(("grad", "rel_u", "rel_v"), out, ref):
        assert (a is None) == (b is None), name
        if a is None:
            continue
        assert a.dtype == dtype and a.shape == shape and torch.isfinite(a).all(), name
        err = (a.double() - b.double()).abs().max() / b.double().abs().max()
        assert err <= tol, f"{name}: relative error {err:.2e}"


def test_reference_against_autograd_and_rules():
    args = _args((2, 3, 11), torch.float64, "pre_ln_split")
    grad, r_u, r_v = layernorm_relevance(**args)
    u, v = args["u"].clone().requires_grad_(True), args["v"].clone().requires_grad_(True)
    z = u + v
    out = F.layer_norm(z, (11,), args["weight"], args["bias"], args["ln_eps"])
    ((out * args["grad_norm_out"]).sum() + (z * args["grad_residual"]).sum()).backward()
    torch.testing.assert_close(grad, u.grad)
    r_z = clone_relevance(z.detach(), args["rel_norm_out"], args["rel_residual"])
    ref_u, ref_v = normalized_add_ref(r_z, args["u"], args["v"])
    torch.testing.assert_close(r_u, ref_u)
    torch.testing.assert_close(r_v, ref_v)
    # per-sample conservation of the split
    torch.testing.assert_close((r_u + r_v).sum((1, 2)), r_z.sum((1, 2)))


def test_dispatch_errors(monkeypatch):
    args = _args((2, 3, 4), torch.float64, "post_ln_split")
    cpu = {k: (v.cpu() if torch.is_tensor(v) else v) for k, v in args.items()}  # how CPU tensors are dispatched
    with pytest.raises(NotImplementedError, match="inputs are not CUDA tensors"):
        layernorm_relevance(**cpu, backend="cuda")
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # CPU tensors without the interpreter: Triton cannot run
    with pytest.raises(NotImplementedError, match="TRITON_INTERPRET=1 is not set"):
        layernorm_relevance(**cpu, backend="triton")


@pytest.mark.parametrize("variant", ["pre_ln_split", "post_ln_split"])
def test_kernel_bfloat16(variant, monkeypatch):
    """bf16 in and out, fp32/fp64 inside: within bf16 rounding of the float64 reference of the same inputs."""
    args = _args((2, 5, 37), torch.bfloat16, variant)
    with nan_buffers(monkeypatch):
        out = layernorm_relevance(**args, backend="triton")
    ref = layernorm_relevance(**{k: (v.double() if torch.is_tensor(v) else v) for k, v in args.items()})
    for a, b in zip(out, ref):
        assert a.dtype == torch.bfloat16 and torch.isfinite(a).all()
        assert (a.double() - b).abs().max() <= 2e-2 * b.abs().max()
