"""The sweep (forward without attention maps; gradient and relevance in one reverse pass) against the autograd
engine (tests/_autograd_engine.py: a materialized forward, attention gradients by autograd, relevance by hand),
for every method: with the reference ops on every model family (float64), and with the Triton kernels
(TRITON_INTERPRET=1 on CPU, compiled on a GPU) on small models."""

import _autograd_engine as engine
import _models as M
import pytest
import torch
from _device import on_device
from _poison import nan_buffers

import transformer_lrp as tl
from transformer_lrp import methods
from transformer_lrp.adapters import build_encoder

FAMILIES = {
    "timm_vit": (lambda: M.timm_vit(depth=3), lambda: M.images(3)),
    "timm_deit_distilled": (M.timm_deit_distilled, lambda: M.images(2)),
    "timm_layerscale_registers": (M.timm_dinov2_like, lambda: M.images(2, size=28)),
    "hf_vit": (M.hf_vit, lambda: M.images(2)),
    "timm_quick_gelu_non_square": (lambda: M.timm_vit(img_size=(24, 40), act_layer="quick_gelu"),
                                   lambda: torch.randn(2, 3, 24, 40, dtype=torch.float64)),
    "bert_types_padded": (M.hf_bert, lambda: M.text_batch(with_types=True)),
    "roberta": (M.hf_roberta, lambda: M.text_batch()),
    "distilbert_padded": (M.hf_distilbert, lambda: M.text_batch((9, 4))),
}
SETTINGS = {
    "all_layers": dict(start_layer=0, normalize_rows=False),
    "from_1_normalized": dict(start_layer=1, normalize_rows=True),
    "last_block": dict(start_layer=-1, normalize_rows=False),
}


def _rows(model, inputs, method, setting, backend, target=None):
    """(engine row, sweep row) for one call, without the API's post-processing (on the GPU for the kernels, when
    there is one); full LRP on vision compares the pixels."""
    if backend != "torch":
        model, inputs = on_device(model), on_device(inputs)
    enc = build_encoder(model)
    emb = enc.embed(inputs)
    start = setting["start_layer"] % enc.depth

    def check_target(logits, t):
        return logits.argmax(-1) if t is None else t

    ref = engine.run(enc, emb, method, target, start, setting["normalize_rows"], check_target)
    out = methods.run(enc, emb, method, target, start, setting["normalize_rows"], check_target, backend)
    assert torch.equal(out.target, ref.target)
    torch.testing.assert_close(out.logits, ref.logits)
    if out.pixels is not None:
        return ref.pixels, out.pixels
    return ref.row, out.row


def _assert_close(out, ref, rel):
    err = (out.double() - ref.double()).abs().max() / ref.double().abs().max()
    assert err <= rel, f"relative error {err:.2e}"


# every method the engine implements (the rule sets AttnLRP and CP-LRP have their own oracle, the stock model's
# modified gradient: tests/test_modified_gradient.py); the layered ones at every setting
ENGINE_METHODS = [m for m in methods.METHODS if m not in methods.MODIFIED_GRADIENT]
CALLS = [(m, s) for m in ENGINE_METHODS for s in (SETTINGS if m in methods.LAYERED else ["all_layers"])]


@pytest.mark.parametrize("method, setting", CALLS, ids=[f"{m}-{s}" for m, s in CALLS])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_sweep_with_reference_ops_equals_engine(family, method, setting):
    make_model, make_inputs = FAMILIES[family]
    kw = SETTINGS[setting]
    if method == "rollout":  # always row-normalized
        kw = dict(kw, normalize_rows=True)
    ref, out = _rows(make_model(), make_inputs(), method, kw, "torch")
    # full LRP ends in pixels, through the patch embedding's ε-rule, whose signed sums cancel: there the two orders
    # of summation differ by ~1e4 ulp of the largest pixel (1.3e-12 measured), elsewhere by less than 1e-12
    _assert_close(out, ref, 1e-11 if method == "full_lrp" else 1e-12)


TRITON_CASES = {
    "timm_vit": (lambda dt: M.timm_vit(dt, depth=2), lambda dt: M.images(2, dtype=dt)),
    "bert_padded": (lambda dt: M.hf_bert(dt, num_hidden_layers=2), lambda dt: M.text_batch((9, 6))),
}


TRITON_CALLS = [(m, s) for m in methods.METHODS
                for s in (["all_layers", "from_1_normalized"] if m in methods.LAYERED else ["all_layers"])]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
@pytest.mark.parametrize("method, setting", TRITON_CALLS, ids=[f"{m}-{s}" for m, s in TRITON_CALLS])
@pytest.mark.parametrize("name", list(TRITON_CASES))
def test_triton_explain_equals_torch(name, method, setting, dtype, monkeypatch):
    make_model, make_inputs = TRITON_CASES[name]
    model, inputs = on_device(make_model(dtype)), on_device(make_inputs(dtype))
    kw = SETTINGS[setting] if method in ("transformer_attribution", "gae") else {}
    if method == "rollout":
        kw = dict(start_layer=SETTINGS[setting]["start_layer"])
    ref = tl.explain(model, inputs, method=method, **kw)
    with nan_buffers(monkeypatch):  # every uninitialized buffer of the call starts as NaN
        out = tl.explain(model, inputs, method=method, backend="triton", **kw)
    assert torch.equal(out.target, ref.target)
    fields = ["relevance"] + (["pixel_relevance"] if ref.pixel_relevance is not None else [])  # full LRP: pixels
    if dtype == torch.float64:
        for f in fields:
            _assert_close(getattr(out, f), getattr(ref, f), 1e-10)
        return
    # float32: random tiny models amplify rounding, so both paths are held to the float64 explanation, the kernels
    # within twice the reference path's own error
    exact = tl.explain(on_device(make_model(torch.float64)), on_device(make_inputs(torch.float64)), ref.target,
                       method=method, **kw)
    def err(e, f):
        return float((getattr(e, f).double() - getattr(exact, f)).abs().max() / getattr(exact, f).abs().max())

    for f in fields:
        assert err(out, f) <= 2 * err(ref, f) + 1e-6, (f, err(out, f), err(ref, f))


@pytest.mark.parametrize("method", ["transformer_attribution", "attention_gradcam", "partial_lrp"])
@pytest.mark.parametrize("family", ["timm_deit_distilled", "timm_layerscale_registers", "distilbert_padded"])
def test_triton_sweep_other_families(family, method):
    make_model, make_inputs = FAMILIES[family]
    ref, out = _rows(make_model(), make_inputs(), method, SETTINGS["all_layers"], "triton")
    _assert_close(out, ref, 1e-10)


def test_triton_sweep_never_materializes_attention(monkeypatch):
    """With backend="triton" the reference attention ops (the only code forming [B, H, N, N]) are never called, by
    any method."""
    import transformer_lrp.ops.attention as attention

    def forbidden(*args, **kwargs):
        raise AssertionError("materialized attention on the Triton path")

    monkeypatch.setattr(attention, "attention_forward_ref", forbidden)
    monkeypatch.setattr(attention, "attention_relevance_ref", forbidden)
    monkeypatch.setattr(torch.Tensor, "softmax", forbidden)
    model, x = on_device(M.timm_vit(depth=2)), on_device(M.images(2))
    bert, text = on_device(M.hf_bert(num_hidden_layers=2)), on_device(M.text_batch((9, 6)))
    for method in methods.METHODS:
        assert torch.isfinite(tl.explain(model, x, method=method, backend="triton").relevance).all()
        assert torch.isfinite(tl.explain(bert, text, method=method, backend="triton").relevance).all()


def test_triton_padded_sample_equals_sample_alone():
    model, lengths = on_device(M.hf_bert(num_hidden_layers=2)), (9, 5)
    inputs = on_device(M.text_batch(lengths))
    batch = tl.explain(model, inputs, target=[1, 0], backend="triton")
    for i, n in enumerate(lengths):
        alone = tl.explain(model, {k: v[i : i + 1, :n] for k, v in inputs.items()}, target=[1, 0][i],
                           backend="triton")
        _assert_close(batch.relevance[i, :n], alone.relevance[0], 1e-10)
        assert torch.equal(batch.relevance[i, n:], torch.zeros_like(batch.relevance[i, n:]))


@pytest.mark.parametrize("name", list(TRITON_CASES))
def test_triton_bf16_no_worse_than_reference(name):
    """bfloat16 models: the kernels (fp32 accumulation) stay as close to the float32 explanation as the reference
    path in bfloat16 does (random tiny models are ill-conditioned in bf16, so the bound is relative to it)."""
    make_model, make_inputs = TRITON_CASES[name]
    ref = tl.explain(on_device(make_model(torch.float32)), on_device(make_inputs(torch.float32)), 1)
    model, inputs = on_device(make_model(torch.bfloat16)), on_device(make_inputs(torch.bfloat16))
    torch_bf16 = tl.explain(model, inputs, 1)
    triton_bf16 = tl.explain(model, inputs, 1, backend="triton")
    assert triton_bf16.relevance.dtype == torch.bfloat16

    def err(e):
        return ((e.relevance.float() - ref.relevance).abs().amax(-1) / ref.relevance.abs().amax(-1)).max()

    assert err(triton_bf16) <= 2 * err(torch_bf16) + 0.02, (err(triton_bf16), err(torch_bf16))
