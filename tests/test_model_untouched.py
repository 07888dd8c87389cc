"""The user's model is left exactly as it was: weights, requires_grad, grads, hooks, mode, attention settings —
after a successful call and after a call that fails midway."""

import copy

import _models as M
import pytest
import torch

import transformer_lrp as tl


def snapshot(model):
    return {
        "params": {k: (v.detach().clone(), v.requires_grad, v.grad) for k, v in model.named_parameters()},
        "buffers": {k: v.clone() for k, v in model.named_buffers()},
        "modes": {k: m.training for k, m in model.named_modules()},
        "hooks": {k: (dict(m._forward_hooks), dict(m._forward_pre_hooks), dict(m._backward_hooks))
                  for k, m in model.named_modules()},
        "fused": {k: getattr(m, "fused_attn", None) for k, m in model.named_modules()},
        "attn_impl": getattr(getattr(model, "config", None), "_attn_implementation", None),
    }


def assert_same(before, after):
    assert before["params"].keys() == after["params"].keys()
    for k, (value, req, grad) in before["params"].items():
        v2, req2, grad2 = after["params"][k]
        assert torch.equal(value, v2), k
        assert req == req2, k
        assert grad is None and grad2 is None, k
    for k, v in before["buffers"].items():
        assert torch.equal(v, after["buffers"][k]), k
    assert before["modes"] == after["modes"]
    assert before["hooks"] == after["hooks"]
    assert before["fused"] == after["fused"]
    assert before["attn_impl"] == after["attn_impl"]


def prepared(model):
    """A user's model in an unusual state: train mode, some params frozen, a hook installed."""
    model.train()
    first = next(model.parameters())
    first.requires_grad_(False)
    calls = []
    model.register_forward_hook(lambda m, i, o: calls.append(1))
    return model, calls


@pytest.mark.parametrize("method", tl.METHODS)
def test_timm_model_untouched(method):
    model, calls = prepared(M.timm_vit())
    for blk in model.blocks[:1]:
        blk.attn.fused_attn = not blk.attn.fused_attn
    before = snapshot(model)
    tl.explain(model, M.images(2), method=method)
    assert_same(before, snapshot(model))
    assert calls == []  # the engine never calls the model's modules, so user hooks do not fire


@pytest.mark.parametrize("method", tl.METHODS)
def test_hf_model_untouched(method):
    model, _ = prepared(M.hf_bert(attn_implementation="sdpa"))
    before = snapshot(model)
    tl.explain(model, M.text_batch(), method=method)
    assert_same(before, snapshot(model))


def test_untouched_after_failing_calls():
    model, _ = prepared(M.timm_vit())
    before = snapshot(model)
    with pytest.raises(tl.InputError):  # fails after the forward, when the target is checked against the logits
        tl.explain(model, M.images(2), target=torch.tensor([0, 99]))
    with pytest.raises(tl.InputError):
        tl.explain(model, M.images(2).fill_(float("nan")))
    with pytest.raises(tl.InputError):
        tl.explain(model, M.images(2), start_layer=7)
    assert_same(before, snapshot(model))


def test_inputs_untouched():
    model, x = M.timm_vit(), M.images(2)
    x_before = x.clone()
    tl.explain(model, x, method="full_lrp")
    assert torch.equal(x, x_before) and not x.requires_grad and x.grad is None
    inputs = M.text_batch()
    saved = copy.deepcopy(inputs)
    tl.explain(M.hf_bert(), inputs)
    assert all(torch.equal(inputs[k], saved[k]) for k in saved)
