"""``explain``: the public entry point."""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

from transformer_lrp import methods
from transformer_lrp._backend import select_backend
from transformer_lrp.adapters import build_encoder
from transformer_lrp.errors import InputError
from transformer_lrp.explanation import Explanation

ClsRelevance = Literal["keep", "zero", "min"]


def explain(
    model: nn.Module,
    inputs: torch.Tensor | dict,
    target: int | torch.Tensor | list[int] | None = None,
    method: str = "transformer_attribution",
    *,
    start_layer: int = 0,
    normalize_rows: bool = False,
    cls_relevance: ClsRelevance = "keep",
    backend: str | None = None,
) -> Explanation:
    r"""Explain a batch of a stock timm / transformers classifier.

    Args:
        model: a timm ``VisionTransformer`` / DeiT ``VisionTransformerDistilled``, or a transformers
            ``BertForSequenceClassification``, ``RobertaForSequenceClassification``,
            ``DistilBertForSequenceClassification`` or ``ViTForImageClassification``, with its own weights. It is
            never modified: weights, ``requires_grad``, hooks, train/eval mode and attention settings stay as they
            are (the sweep recomputes the forward from the parameter tensors; dropout is off regardless of mode).
        inputs: vision: images `[B, C, H, W]` of the model's dtype and image size. Text: the tokenizer's output, a
            mapping with ``input_ids`` `[B, T]` and optionally ``attention_mask`` (right padding) and
            ``token_type_ids``.
        target: class to explain: ``None`` (each sample's argmax), an ``int`` for all samples, or `[B]` per-sample
            classes. Default: ``None``.
        method: ``"transformer_attribution"`` (the paper; alias ``"grad"``), ``"gae"``, ``"rollout"``,
            ``"raw_attention"``, ``"attention_gradcam"``, ``"partial_lrp"`` or ``"full_lrp"``.
            Default: ``"transformer_attribution"``.
        start_layer: first block aggregated by ``transformer_attribution``, ``gae`` and ``rollout``; blocks below
            it are skipped (and cost no gradient or relevance). Negative values count from the end
            (``-1``: last block only). The original code uses 1 for ViT evaluation and ``L-1`` for BERT.
            Default: 0.
        normalize_rows: row-normalize ``I + Ē`` in the product (``transformer_attribution``, ``gae``); the original
            BERT generator does, the ViT one does not. ``rollout`` always normalizes. Default: ``False``.
        cls_relevance: text only, the value at the CLS position: ``"keep"`` (the row's own entry), ``"zero"``
            (the original baselines) or ``"min"`` (the row's minimum, the original BERT transformer attribution).
            Default: ``"keep"``.
        backend: the ops under the sweep that every method runs: ``"torch"`` (the references; each attention op
            materializes its own block's ``A`` and drops it), ``"triton"`` (the kernels: flash-style attention with
            its relevance backward, LayerNorm + residual and α1β0 Linear passes, no attention matrix in memory;
            needs CUDA tensors or ``TRITON_INTERPRET=1``; float64 attention on a GPU runs the torch op, warned
            once), ``"cuda"`` (the CUDA C++ extension ``torch.ops.tlrp.*`` for attention, LayerNorm and the adds,
            cuBLAS GEMMs, the α1β0 passes on the Triton kernels; needs the built extension and CUDA tensors) or
            ``None`` (env ``TLRP_BACKEND``, else ``torch``).
            Default: ``None``.

    Returns:
        An :class:`Explanation` with ``relevance`` `[B, T]`, ``target`` `[B]` and ``logits`` `[B, C]`.

    Works inside ``torch.no_grad()`` and ``torch.inference_mode()`` (the head's gradient enables its own autograd).
    An empty batch raises ``InputError``.
    """
    method = methods.ALIASES.get(method, method)
    if method not in methods.METHODS:
        raise InputError(f"unknown method {method!r}; choose one of {methods.METHODS}")
    if cls_relevance not in ("keep", "zero", "min"):
        raise InputError(f"cls_relevance must be 'keep', 'zero' or 'min', got {cls_relevance!r}")
    enc = build_encoder(model)
    start = _check_start_layer(method, start_layer, enc.depth)
    if normalize_rows and method not in ("transformer_attribution", "gae", "rollout"):
        raise InputError(f"normalize_rows applies to transformer_attribution, gae and rollout, not {method!r}")
    target_t = _target_tensor(target)
    # Under torch.inference_mode() no autograd is possible; the sweep runs outside it (the head's gradient needs
    # autograd), and under torch.no_grad() it enables what it needs itself.
    with torch.inference_mode(False):
        try:
            return _explain(enc, inputs, target_t, method, start, normalize_rows, cls_relevance, backend)
        except RuntimeError as exc:
            if "Inference tensors" not in str(exc):
                raise
            raise InputError("the model's parameters are inference tensors (created or loaded under "
                             "torch.inference_mode()), which autograd cannot use; create or load the model outside "
                             "inference_mode (calling explain inside it is fine)") from exc


def _explain(enc, inputs, target_t, method, start, normalize_rows, cls_relevance, backend) -> Explanation:
    emb = enc.embed(inputs)
    batch = emb.tokens.shape[0]
    if batch == 0:
        raise InputError("empty batch: the inputs hold no sample")
    resolved_backend = select_backend(backend, (emb.tokens,))

    def check_target(logits: torch.Tensor, t: torch.Tensor | None) -> torch.Tensor:
        if not bool(torch.isfinite(logits).all()):
            raise InputError("the model's logits are not finite for these inputs")
        if t is None:
            return logits.argmax(dim=-1)
        if t.dim() == 0:
            t = t.expand(batch)
        if tuple(t.shape) != (batch,):
            raise InputError(f"target must be an int or have shape [{batch}], got shape {tuple(t.shape)}")
        if bool((t < 0).any()) or bool((t >= logits.shape[1]).any()):
            raise InputError(f"target out of range: the model has {logits.shape[1]} classes, got {t.tolist()}")
        return t.to(logits.device)

    out = methods.run(enc, emb, method, target_t, start, normalize_rows, check_target, resolved_backend)

    if enc.modality == "vision":
        if method == "full_lrp":
            relevance, pixels = out.patch_tokens, out.pixels
        else:
            relevance, pixels = out.row[:, enc.num_prefix_tokens :], None
        return Explanation(
            relevance=relevance.detach(), target=out.target, logits=out.logits, method=method, modality="vision",
            grid_size=enc.grid_size, image_size=enc.image_size, pixel_relevance=pixels,
        )
    relevance = _text_conventions(out.row.detach(), emb.key_mask, cls_relevance)
    return Explanation(relevance=relevance, target=out.target, logits=out.logits, method=method, modality="text",
                       attention_mask=emb.key_mask)


def _check_start_layer(method: str, start_layer: int, depth: int) -> int:
    if not isinstance(start_layer, int) or isinstance(start_layer, bool):
        raise InputError(f"start_layer must be an int, got {type(start_layer).__name__}")
    if method not in methods.LAYERED:
        if start_layer != 0:
            raise InputError(f"start_layer applies to {methods.LAYERED}, not {method!r}")
        return 0
    start = start_layer + depth if start_layer < 0 else start_layer
    if not 0 <= start < depth:
        raise InputError(f"start_layer {start_layer} out of range for a model with {depth} blocks")
    return start


def _target_tensor(target: object) -> torch.Tensor | None:
    if target is None:
        return None
    if isinstance(target, bool):
        raise InputError("target must be an int, a [B] tensor of class indices, or None")
    if isinstance(target, int):
        return torch.tensor(target)
    if isinstance(target, (list, tuple)):
        target = torch.tensor(target)
    if not isinstance(target, torch.Tensor) or target.dtype.is_floating_point or target.dtype == torch.bool:
        raise InputError("target must be an int, a [B] tensor of class indices, or None")
    if target.dim() > 1:
        raise InputError(f"target must be an int or a [B] tensor, got shape {tuple(target.shape)}")
    return target.long()


def _text_conventions(row: torch.Tensor, key_mask: torch.Tensor | None, cls_relevance: str) -> torch.Tensor:
    if key_mask is not None:
        row = row.masked_fill(~key_mask, 0)
    if cls_relevance == "zero":
        row = row.clone()
        row[:, 0] = 0
    elif cls_relevance == "min":
        valid = row if key_mask is None else row.masked_fill(~key_mask, float("inf"))
        row = row.clone()
        row[:, 0] = valid.amin(dim=1)
    return row
