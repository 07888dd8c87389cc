"""Bad input gets a clear error that names the problem."""

import _models as M
import pytest
import torch

import transformer_lrp as tl


@pytest.fixture(scope="module")
def vit():
    return M.timm_vit()


@pytest.fixture(scope="module")
def bert():
    return M.hf_bert()


@pytest.mark.parametrize(
    "images,match",
    [
        (torch.zeros(3, 32, 32, dtype=torch.float64), r"\[B, C, H, W\]"),
        (torch.zeros(1, 1, 32, 32, dtype=torch.float64), "channels"),
        (torch.zeros(1, 3, 48, 32, dtype=torch.float64), "size"),
        (torch.zeros(1, 3, 32, 32, dtype=torch.float32), "dtype"),
        (torch.zeros(1, 3, 32, 32, dtype=torch.long), "floating"),
        (torch.full((1, 3, 32, 32), float("nan"), dtype=torch.float64), "NaN or Inf"),
        (torch.full((1, 3, 32, 32), float("inf"), dtype=torch.float64), "NaN or Inf"),
        ({"input_ids": torch.zeros(1, 3, dtype=torch.long)}, "image tensor"),
    ],
    ids=["3d", "channels", "size", "dtype", "integer", "nan", "inf", "dict"],
)
def test_bad_images(vit, images, match):
    with pytest.raises(tl.InputError, match=match):
        tl.explain(vit, images)


@pytest.mark.parametrize(
    "target,match",
    [
        (7, "out of range"),
        (-1, "out of range"),
        (torch.tensor([0, 9]), "out of range"),
        (torch.tensor([0, 1, 2]), r"shape \[2\]"),
        (torch.tensor([[0, 1]]), "shape"),
        (torch.tensor([0.5, 1.0]), "class indices"),
        (True, "class indices"),
    ],
    ids=["too_big", "negative", "one_too_big", "wrong_batch", "2d", "float", "bool"],
)
def test_bad_targets(vit, target, match):
    with pytest.raises(tl.InputError, match=match):
        tl.explain(vit, M.images(2), target)


def test_numpy_targets_are_class_indices(vit):
    """numpy integer scalars and arrays are targets like ints and tensors; numpy floats and bools are not."""
    import numpy as np

    x = M.images(2)
    ref = tl.explain(vit, x, torch.tensor([3, 1])).relevance
    for target in (np.array([3, 1]), np.array([3, 1], dtype=np.int32), [np.int64(3), np.int64(1)]):
        torch.testing.assert_close(tl.explain(vit, x, target).relevance, ref, rtol=0, atol=0)
    torch.testing.assert_close(tl.explain(vit, x, np.int64(3)).relevance,
                               tl.explain(vit, x, 3).relevance, rtol=0, atol=0)
    for bad in (np.float64(3.0), np.array([0.5, 1.0]), np.bool_(True), np.array([True, False])):
        with pytest.raises(tl.InputError, match="class indices"):
            tl.explain(vit, x, bad)
    with pytest.raises(tl.InputError, match="out of range"):
        tl.explain(vit, x, np.array([3, 9]))


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(method="lime"), "unknown method"),
        (dict(start_layer=3), "out of range"),
        (dict(start_layer=-4), "out of range"),
        (dict(method="raw_attention", start_layer=1), "start_layer applies"),
        (dict(method="full_lrp", normalize_rows=True), "normalize_rows applies"),
        (dict(cls_relevance="drop"), "cls_relevance"),
        (dict(start_layer=1.0), "must be an int"),
    ],
)
def test_bad_arguments(vit, kwargs, match):
    with pytest.raises(tl.InputError, match=match):
        tl.explain(vit, M.images(1), **kwargs)


def _ids(*rows):
    return torch.tensor(rows)


@pytest.mark.parametrize(
    "inputs,match",
    [
        ({"input_ids": _ids([2, 5, 3]), "position_ids": _ids([0, 1, 2])}, "unsupported text input keys"),
        ({"attention_mask": _ids([1, 1])}, "input_ids"),
        ({"input_ids": torch.tensor([[2.0, 5.0]])}, "integer tensor"),
        ({"input_ids": _ids(2, 5, 3)}, r"\[B, T\]"),
        ({"input_ids": _ids([2, 99, 3])}, "vocabulary"),
        ({"input_ids": torch.full((1, 41), 5)}, "exceeds"),
        ({"input_ids": _ids([0, 2, 5]), "attention_mask": _ids([0, 1, 1])}, "left padding"),
        ({"input_ids": _ids([2, 5, 3]), "attention_mask": _ids([1, 2, 1])}, "only 0 and 1"),
        ({"input_ids": _ids([2, 5, 3]), "attention_mask": _ids([1, 1])}, "shape"),
        ({"input_ids": _ids([2, 5, 3]), "token_type_ids": _ids([0, 0, 5])}, "token_type_ids out of range"),
        (torch.zeros(1, 3, 32, 32), "integer tensor"),
    ],
    ids=["unknown_key", "no_ids", "float_ids", "1d", "vocab", "too_long", "left_pad", "mask_values", "mask_shape",
         "types", "image"],
)
def test_bad_text(bert, inputs, match):
    with pytest.raises(tl.InputError, match=match):
        tl.explain(bert, inputs)


def test_token_types_for_a_model_without_them():
    inputs = M.text_batch()
    inputs["token_type_ids"] = torch.ones_like(inputs["input_ids"])
    with pytest.raises(tl.InputError, match="no token type embeddings"):
        tl.explain(M.hf_distilbert(), inputs)


def test_tokenizer_extras_are_accepted(bert):
    inputs = M.text_batch()
    inputs["special_tokens_mask"] = torch.zeros_like(inputs["input_ids"])
    assert tl.explain(bert, inputs).relevance.shape == inputs["input_ids"].shape


def test_backends(vit, monkeypatch):
    x = M.images(1)
    ref = tl.explain(vit, x, backend="torch").relevance
    torch.testing.assert_close(tl.explain(vit, x, backend=None).relevance, ref)
    with pytest.raises(NotImplementedError, match="'cuda'.*inputs are not CUDA tensors"):
        tl.explain(vit, x, backend="cuda")
    with pytest.raises(NotImplementedError, match="unknown backend"):
        tl.explain(vit, x, backend="tpu")
    monkeypatch.setenv("TLRP_BACKEND", "cuda")
    with pytest.raises(NotImplementedError, match="TLRP_BACKEND=cuda"):
        tl.explain(vit, x)
    monkeypatch.setenv("TLRP_BACKEND", "torch")
    torch.testing.assert_close(tl.explain(vit, x).relevance, ref)
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # CPU tensors without the interpreter: Triton cannot run
    with pytest.raises(NotImplementedError, match="'triton'.*TRITON_INTERPRET=1 is not set"):
        tl.explain(vit, x, backend="triton")


def test_non_finite_logits_are_reported():
    model = M.timm_vit()
    with torch.no_grad():
        model.head.weight[0, 0] = float("inf")
    with pytest.raises(tl.InputError, match="logits are not finite"):
        tl.explain(model, M.images(1))


@pytest.mark.parametrize("method", tl.METHODS)
def test_explain_inside_no_grad_and_inference_mode(vit, bert, method):
    """The most common inference wrappers just work, and change nothing."""
    for model, inputs in ((vit, M.images(2)), (bert, M.text_batch((7, 4)))):
        ref = tl.explain(model, inputs, method=method)
        with torch.no_grad():
            quiet = tl.explain(model, inputs, method=method)
        with torch.inference_mode():
            inference_inputs = inputs.clone() if torch.is_tensor(inputs) else {k: v.clone() for k, v in inputs.items()}
            inferred = tl.explain(model, inference_inputs, method=method)
        for out in (quiet, inferred):
            torch.testing.assert_close(out.relevance, ref.relevance, rtol=0, atol=0)
            assert torch.equal(out.target, ref.target)


def test_model_built_under_inference_mode_is_refused_with_advice():
    with torch.inference_mode():
        model = M.timm_vit()
    with pytest.raises(tl.InputError, match="inference tensors .* outside inference_mode"):
        tl.explain(model, M.images(1))


def test_empty_batch(vit, bert):
    with pytest.raises(tl.InputError, match="empty batch"):
        tl.explain(vit, M.images(1)[:0])
    ids = torch.zeros(0, 5, dtype=torch.long)
    with pytest.raises(tl.InputError, match="input_ids is empty"):
        tl.explain(bert, {"input_ids": ids, "attention_mask": torch.ones_like(ids)})
