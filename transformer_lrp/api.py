"""``explain``: the public entry point."""

from __future__ import annotations

import numbers
from collections.abc import Mapping
from typing import Literal

import torch
from torch import nn

from transformer_lrp import methods, sweep
from transformer_lrp._backend import select_backend
from transformer_lrp.adapters import build_encoder, clip
from transformer_lrp.conservation import warn_if_off
from transformer_lrp.errors import InputError
from transformer_lrp.explanation import ClipExplanation, Explanation, GenerationExplanation
from transformer_lrp.targets import Continuation, Contrast

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
) -> Explanation | ClipExplanation:
    r"""Explain a batch of a stock timm / transformers classifier, or image–text pairs of a CLIP model.

    Args:
        model: a timm ``VisionTransformer`` / DeiT ``VisionTransformerDistilled``, or a transformers
            ``BertForSequenceClassification``, ``RobertaForSequenceClassification``,
            ``DistilBertForSequenceClassification`` or ``ViTForImageClassification``, with its own weights. It is
            never modified: weights, ``requires_grad``, hooks, train/eval mode and attention settings stay as they
            are (the sweep recomputes the forward from the parameter tensors; dropout is off regardless of mode).
        inputs: vision: images `[B, C, H, W]` of the model's dtype and image size. Text: the tokenizer's output, a
            mapping with ``input_ids`` `[B, T]` and optionally ``attention_mask`` (right padding) and
            ``token_type_ids``. CLIP (transformers ``CLIPModel``, open_clip ``CLIP``): images and texts, as the
            processor's output (``pixel_values``, ``input_ids``, ``attention_mask``) or a tuple
            ``(images, token_ids)``; the result is a :class:`ClipExplanation` of both towers per pair.
        target: CLIP: ``None`` (the pairs (image i, text i)), `[B_img]` (a text per image) or a tuple
            ``(image_index, text_index)`` of pairs. Otherwise the class to explain:
            ``None`` (each sample's argmax), an ``int`` for all samples (numpy integers too), or `[B]` per-sample
            classes (a tensor, a list or a numpy integer array). Default: ``None``.
        method: ``"transformer_attribution"`` (the paper; alias ``"grad"``), ``"gae"``, ``"rollout"``,
            ``"raw_attention"``, ``"attention_gradcam"``, ``"partial_lrp"``, ``"full_lrp"``, ``"attnlrp"`` (AttnLRP,
            Achtibat et al. 2024, as LXT applies it: a modified gradient, relevance = input ⊙ gradient, the logit
            put in) or ``"cp_lrp"`` (CP-LRP, Ali et al. 2022: the attention and the gate held constant).
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
        An :class:`Explanation` with ``relevance`` `[B, T]`, ``target`` `[B]` and ``logits`` `[B, C]`; for
        ``full_lrp``, ``attnlrp`` and ``cp_lrp`` also ``conservation``, the relevance reaching the input against the
        relevance put in at the explained logit (vision: and ``pixel_relevance``). A
        :class:`~transformer_lrp.ConservationWarning` says when they differ by more than
        :data:`~transformer_lrp.conservation.CONSERVATION_BOUND` (docs/method.md §10: on real weights, full LRP's
        total is off by orders of magnitude, as in the original code; §12.4: AttnLRP's and CP-LRP's biases keep a
        share, so only a total beyond the bound in magnitude is warned).

    Works inside ``torch.no_grad()`` and ``torch.inference_mode()`` (the head's gradient enables its own autograd).
    An empty batch raises ``InputError``.
    """
    method = methods.ALIASES.get(method, method)
    if method not in methods.METHODS:
        raise InputError(f"unknown method {method!r}; choose one of {methods.METHODS}")
    if cls_relevance not in ("keep", "zero", "min"):
        raise InputError(f"cls_relevance must be 'keep', 'zero' or 'min', got {cls_relevance!r}")
    if normalize_rows and method not in ("transformer_attribution", "gae", "rollout"):
        raise InputError(f"normalize_rows applies to transformer_attribution, gae and rollout, not {method!r}")
    if isinstance(model, nn.Module) and clip.matches(model):
        with torch.inference_mode(False):
            return _explain_clip(clip.build(model), inputs, target, method, start_layer, normalize_rows, backend)
    enc = build_encoder(model)
    start = _check_start_layer(method, start_layer, enc.depth)
    if enc.language_model:
        if cls_relevance != "keep":
            raise InputError("cls_relevance applies to text classifiers with a [CLS] token, not to language models")
        with torch.inference_mode(False):
            return _explain_language_model(enc, inputs, target, method, start, normalize_rows, backend)
    if isinstance(target, (Contrast, Continuation)):
        raise InputError(f"{type(target).__name__} targets are for language models (*ForCausalLM); "
                         f"{type(model).__name__} is a classifier: give a class index")
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


def _explain(enc, inputs, target_t, method, start, normalize_rows, cls_relevance, backend,
             frames_to_caller: int = 3) -> Explanation:
    """``frames_to_caller``: stack frames from here to explain's caller, whom a warning names (explain → _explain:
    3 counting warn_if_off's own; CLIP goes through _explain_clip, one more)."""
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
    if out.conservation is not None:
        warn_if_off(out.conservation, method, stacklevel=frames_to_caller)

    if enc.modality == "vision":
        if out.pixels is not None:  # full LRP, AttnLRP, CP-LRP: relevance down to the pixels
            relevance, pixels = out.patch_tokens, out.pixels
        else:
            relevance, pixels = out.row[:, enc.num_prefix_tokens :], None
        return Explanation(
            relevance=relevance.detach(), target=out.target, logits=out.logits, method=method, modality="vision",
            grid_size=enc.grid_size, image_size=enc.image_size, pixel_relevance=pixels, conservation=out.conservation,
        )
    relevance = _text_conventions(out.row.detach(), emb.key_mask, cls_relevance)
    return Explanation(relevance=relevance, target=out.target, logits=out.logits, method=method, modality="text",
                       attention_mask=emb.key_mask, conservation=out.conservation)


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
    message = "target must be an int, a [B] tensor, list or numpy array of class indices, or None"
    if isinstance(target, bool) or type(target).__name__ == "bool_":  # bool is an int; numpy's bool_ is not
        raise InputError(message)
    if isinstance(target, numbers.Integral):  # int and numpy's integer scalars
        return torch.tensor(int(target))
    if isinstance(target, (list, tuple)) or type(target).__module__ == "numpy":  # numpy arrays
        try:
            target = torch.as_tensor(target)
        except (TypeError, ValueError, RuntimeError) as exc:
            raise InputError(f"{message} ({exc})") from None
    if not isinstance(target, torch.Tensor) or target.dtype.is_floating_point or target.dtype.is_complex \
            or target.dtype == torch.bool:
        raise InputError(message)
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


# -------------------------------------------------------------------------------------------- language models


def _token_ids(value: object, batch: int, device, name: str) -> torch.Tensor:
    t = _target_tensor(value)
    if t is None:
        raise InputError(f"{name} must be a token id (int) or [B] token ids")
    t = t.expand(batch) if t.dim() == 0 else t
    if tuple(t.shape) != (batch,):
        raise InputError(f"{name} must be an int or have shape [{batch}], got shape {tuple(t.shape)}")
    return t.to(device)


def _with_continuation(inputs: object, cont: Continuation, vocab: int) -> tuple[dict, torch.Tensor, torch.Tensor,
                                                                                 torch.Tensor, torch.Tensor, int]:
    """Prompt + continuation per sample, left-padded to one length, and one explained row per continuation token:
    ``(inputs, row_sample [R], row_position [R], row_target [R], row_slot [R] (b·C + j), C)``."""
    if isinstance(inputs, torch.Tensor):
        inputs = {"input_ids": inputs}
    if not isinstance(inputs, Mapping) or "input_ids" not in inputs:
        raise InputError("language models take the tokenizer's output: a mapping with 'input_ids' and "
                         "'attention_mask'")
    ids = inputs["input_ids"]
    if not isinstance(ids, torch.Tensor) or ids.dim() != 2:
        raise InputError("input_ids must be an integer tensor [B, T]")
    b, device = ids.shape[0], ids.device
    mask = inputs.get("attention_mask")
    mask = torch.ones_like(ids, dtype=torch.bool) if mask is None else mask.to(device).bool()
    if b == 0 or ids.shape[1] == 0 or bool((mask.sum(1) == 0).any()):
        raise InputError("a prompt has no token: a continuation is explained after at least one prompt token")
    tokens, cmask = cont.tokens, cont.mask
    if isinstance(tokens, (list, tuple)):
        rows = [list(r) for r in tokens] if tokens and isinstance(tokens[0], (list, tuple)) else [list(tokens)] * b
        if len(rows) != b:
            raise InputError(f"Continuation.tokens has {len(rows)} rows for {b} prompts")
        width = max(len(r) for r in rows)
        tokens = torch.zeros(b, width, dtype=torch.long)
        cmask = torch.zeros(b, width, dtype=torch.bool)
        for i, r in enumerate(rows):
            tokens[i, : len(r)] = torch.tensor(r, dtype=torch.long)
            cmask[i, : len(r)] = True
    if not isinstance(tokens, torch.Tensor) or tokens.dim() != 2 or tokens.shape[0] != b \
            or tokens.dtype.is_floating_point:
        raise InputError(f"Continuation.tokens must be [B={b}, C] token ids")
    tokens = tokens.to(device).long()
    cmask = torch.ones_like(tokens, dtype=torch.bool) if cmask is None else cmask.to(device).bool()
    if tokens.shape[1] == 0 or not bool(cmask.any(1).all()):
        raise InputError("every prompt needs at least one continuation token")
    if bool((tokens[cmask] < 0).any()) or bool((tokens[cmask] >= vocab).any()):
        raise InputError(f"continuation token ids out of the vocabulary range [0, {vocab})")
    seqs = [torch.cat([ids[i][mask[i]], tokens[i][cmask[i]]]) for i in range(b)]
    n = max(len(q) for q in seqs)
    new_ids = torch.zeros(b, n, dtype=torch.long, device=device)
    new_mask = torch.zeros(b, n, dtype=torch.long, device=device)
    sample, position, target, slot = [], [], [], []
    c = tokens.shape[1]
    for i, q in enumerate(seqs):
        offset = n - len(q)
        new_ids[i, offset:], new_mask[i, offset:] = q, 1
        prompt = int(mask[i].sum())
        for j, tok in enumerate(tokens[i][cmask[i]].tolist()):
            sample.append(i)
            position.append(offset + prompt - 1 + j)  # the position whose next-token logit is this token's
            target.append(tok)
            slot.append(i * c + j)
    as_long = lambda v: torch.tensor(v, dtype=torch.long, device=device)  # noqa: E731
    return ({"input_ids": new_ids, "attention_mask": new_mask}, as_long(sample), as_long(position),
            as_long(target), as_long(slot), c)


def _explain_language_model(enc, inputs, target, method, start, normalize_rows, backend) -> Explanation:
    """A decoder LLM: the next-token logit after each prompt (``target``: ``None`` for the predicted token, token ids,
    a :class:`Contrast`), or each token of a :class:`Continuation`."""
    continuation = isinstance(target, Continuation)
    if continuation:
        inputs, row_sample, row_position, row_target, slot, width = _with_continuation(inputs, target,
                                                                                       enc.num_classes)
    emb = enc.embed(inputs)
    batch = emb.tokens.shape[0]
    if batch == 0:
        raise InputError("empty batch: the inputs hold no sample")
    device = emb.tokens.device
    versus = None
    target_t = None
    if continuation:
        emb.row_sample, emb.pool_index, target_t = row_sample, row_position, row_target
    elif isinstance(target, Contrast):
        target_t = _token_ids(target.token, batch, device, "Contrast.token")
        versus = _token_ids(target.versus, batch, device, "Contrast.versus")
        if bool((target_t == versus).any()):
            raise InputError("Contrast.token and Contrast.versus must differ")
    elif target is not None:
        target_t = _token_ids(target, batch, device, "target")
    resolved_backend = select_backend(backend, (emb.tokens,))

    def check_target(logits: torch.Tensor, t: torch.Tensor | None) -> torch.Tensor:
        if not bool(torch.isfinite(logits).all()):
            raise InputError("the model's logits are not finite for these inputs")
        if t is None:
            return logits.argmax(dim=-1)
        for name, ids in (("target", t), ("Contrast.versus", versus)):
            if ids is not None and (bool((ids < 0).any()) or bool((ids >= logits.shape[1]).any())):
                raise InputError(f"{name} out of range: the vocabulary has {logits.shape[1]} tokens")
        return t

    out = methods.run(enc, emb, method, target_t, start, normalize_rows, check_target, resolved_backend,
                      versus=versus)
    if out.conservation is not None:
        warn_if_off(out.conservation, method, stacklevel=4)
    key_mask = emb.key_mask if emb.row_sample is None or emb.key_mask is None else emb.key_mask[emb.row_sample]
    relevance = out.row.detach() if key_mask is None else out.row.detach().masked_fill(~key_mask, 0)
    ids = inputs["input_ids"] if isinstance(inputs, Mapping) else inputs
    result = dict(relevance=relevance, target=out.target, logits=out.logits, position=emb.pool_index,
                  first_token_share=first_token_share(relevance, key_mask))
    if continuation:  # rows → [B, C, …], −1 where a ragged continuation has no token
        result = {k: _unflatten(v, slot, batch, width) for k, v in result.items()}
    return Explanation(method=method, modality="text", attention_mask=emb.key_mask, conservation=out.conservation,
                       input_ids=ids, versus=versus, **result)


def explain_generation(
    model: nn.Module,
    inputs: dict,
    max_new_tokens: int = 32,
    answer: torch.Tensor | list | None = None,
    method: str = "transformer_attribution",
    *,
    start_layer: int = 0,
    normalize_rows: bool = False,
    backend: str | None = None,
    eos_token_id: int | list[int] | None = None,
) -> GenerationExplanation:
    r"""Explain what a decoder LLM says, token by token: the relevance of every input token (the prompt and the
    answer's earlier tokens) for every answer token, `[B, n_out, n_in]`.

    The answer is generated greedily (``model.generate``, ``do_sample=False``) up to ``max_new_tokens`` and its first
    end-of-sequence token, or given (``answer``: `[B, n_out]` ids or a list of lists). Then one forward runs over
    prompt + answer and one reverse sweep over the answer tokens' rows, all sharing that forward
    (:class:`~transformer_lrp.targets.Continuation`), not one explanation per token.

    Args:
        model: a stock ``*ForCausalLM`` (or ``GPT2LMHeadModel``) of a supported family.
        inputs: the tokenizer's output for the prompts (``input_ids``, ``attention_mask``; left or right padding).
        max_new_tokens: the longest answer generated (ignored with ``answer``). Default: 32.
        answer: the answer to explain instead of generating one.
        method, start_layer, normalize_rows, backend: as in :func:`explain`.
        eos_token_id: where an answer ends (default: the model's generation config).

    Returns:
        A :class:`~transformer_lrp.explanation.GenerationExplanation`.
    """
    from transformer_lrp.adapters import decoder

    if not (isinstance(model, nn.Module) and decoder.matches(model) and decoder.is_language_model(model)):
        raise InputError(f"explain_generation takes a decoder language model (*ForCausalLM of "
                         f"{sorted(decoder.FAMILIES)}), got {type(model).__name__}")
    if isinstance(inputs, torch.Tensor):
        inputs = {"input_ids": inputs}
    if not isinstance(inputs, Mapping) or "input_ids" not in inputs:
        raise InputError("explain_generation takes the tokenizer's output: a mapping with 'input_ids' and "
                         "'attention_mask'")
    ids = inputs["input_ids"]
    mask = inputs.get("attention_mask")
    mask = torch.ones_like(ids, dtype=torch.bool) if mask is None else mask.bool()
    if answer is None:
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens <= 0:
            raise InputError(f"max_new_tokens must be a positive int, got {max_new_tokens!r}")
        answer_ids, answer_mask = _greedy_answer(model, ids, mask, max_new_tokens, eos_token_id)
    else:
        answer_ids, answer_mask = answer, None
    e = explain(model, {"input_ids": ids, "attention_mask": mask.long()}, Continuation(answer_ids, answer_mask),
                method, start_layer=start_layer, normalize_rows=normalize_rows, backend=backend)
    full_ids = e.input_ids
    real = e.attention_mask if e.attention_mask is not None else torch.ones_like(full_ids, dtype=torch.bool)
    rows = e.target >= 0
    # the prompt's tokens: the real tokens before each sample's first explained position + 1
    first_answer = e.position[:, 0] + 1
    prompt_mask = real & (torch.arange(full_ids.shape[1], device=full_ids.device)[None] < first_answer[:, None])
    explained = e.logits.gather(-1, e.target.clamp(min=0)[..., None])[..., 0].masked_fill(~rows, 0)
    return GenerationExplanation(relevance=e.relevance, input_ids=full_ids, attention_mask=real,
                                 prompt_mask=prompt_mask, answer_ids=e.target, answer_mask=rows,
                                 explained_logit=explained, position=e.position,
                                 first_token_share=e.first_token_share, method=e.method)


def _greedy_answer(model, ids: torch.Tensor, mask: torch.Tensor, max_new_tokens: int, eos_token_id):
    """Greedy answers (``model.generate`` on the prompts left-padded, as generation needs), each cut after its first
    end-of-sequence token: ``([B, n_out] ids, [B, n_out] mask)``."""
    from transformers import GenerationConfig

    b, n = ids.shape
    lengths = mask.sum(1)
    left_ids = torch.zeros_like(ids)
    left_mask = torch.zeros_like(ids)
    for i in range(b):
        left_ids[i, n - int(lengths[i]):] = ids[i][mask[i]]
        left_mask[i, n - int(lengths[i]):] = 1
    eos = eos_token_id if eos_token_id is not None else model.generation_config.eos_token_id
    pad = model.generation_config.pad_token_id
    pad = pad if pad is not None else (eos[0] if isinstance(eos, (list, tuple)) else eos)
    config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=eos,
                              pad_token_id=pad if pad is not None else 0)
    with torch.no_grad():
        out = model.generate(input_ids=left_ids, attention_mask=left_mask, generation_config=config)
    answer = out[:, n:]
    ends = torch.tensor(eos if isinstance(eos, (list, tuple)) else ([] if eos is None else [eos]),
                        device=answer.device)
    is_end = torch.isin(answer, ends) if ends.numel() else torch.zeros_like(answer, dtype=torch.bool)
    after_end = (is_end.long().cumsum(1) - is_end.long()) > 0  # the end token itself stays
    keep = ~after_end
    if answer.shape[1] == 0 or not bool(keep.any(1).all()):
        raise InputError("the model generated no answer token")
    return answer.masked_fill(~keep, 0), keep


def first_token_share(relevance: torch.Tensor, key_mask: torch.Tensor | None) -> torch.Tensor:
    """Per row, the first real token's share of the total absolute relevance: decoder LLMs put much attention on it
    (an attention sink), which the maps then show."""
    first = torch.zeros(relevance.shape[0], dtype=torch.long, device=relevance.device) if key_mask is None \
        else key_mask.long().argmax(dim=1)
    magnitude = relevance.abs()
    total = magnitude.sum(dim=1)
    at_first = magnitude.gather(1, first[:, None])[:, 0]
    return torch.where(total > 0, at_first / total.clamp(min=torch.finfo(total.dtype).tiny), 0.0)


def _unflatten(v: torch.Tensor, slot: torch.Tensor, batch: int, width: int) -> torch.Tensor:
    """``[R, …]`` rows into ``[B, C, …]`` at their slots ``b·C + j`` (zeros, or −1 for indices, elsewhere)."""
    shape = (batch * width, *v.shape[1:])
    out = v.new_zeros(shape) if v.dtype.is_floating_point else v.new_full(shape, -1)
    out[slot] = v
    return out.view(batch, width, *v.shape[1:])


# ------------------------------------------------------------------------------------------------------- CLIP


def _clip_inputs(inputs: object) -> tuple[torch.Tensor, object]:
    """(images, text inputs) from a processor's output (``pixel_values``, ``input_ids``, ``attention_mask``), a
    mapping with ``image``/``text``, or a tuple ``(images, token ids)``."""
    if isinstance(inputs, (tuple, list)) and len(inputs) == 2:
        return inputs[0], inputs[1]
    if isinstance(inputs, Mapping):
        images = inputs.get("pixel_values", inputs.get("image"))
        ids = inputs.get("input_ids", inputs.get("text"))
        if images is not None and ids is not None:
            text = {"input_ids": ids}
            if inputs.get("attention_mask") is not None:
                text["attention_mask"] = inputs["attention_mask"]
            return images, text
    raise InputError("CLIP models take images and texts: the processor's output (pixel_values, input_ids, "
                     "attention_mask), a mapping {'image': ..., 'text': ...}, or a tuple (images, token_ids)")


def _select_text(text: object, index: torch.Tensor) -> object:
    if isinstance(text, Mapping):
        return {k: v[index] for k, v in text.items()}
    return text[index]


def _clip_pairs(target: object, n_images: int, n_texts: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    if target is None:
        if n_images != n_texts:
            raise InputError(f"target=None explains the matched pairs (image i, text i), but there are {n_images} "
                             f"images and {n_texts} texts; give the text of each image as target, or "
                             "target=(image_index, text_index)")
        index = torch.arange(n_images, device=device)
        return index, index
    if isinstance(target, tuple):
        if len(target) != 2:
            raise InputError("target as a tuple must be (image_index, text_index)")
        images, texts = (torch.as_tensor(t, device=device).long().reshape(-1) for t in target)
        if images.shape != texts.shape:
            raise InputError(f"image_index and text_index must have one length, got {images.numel()} and "
                             f"{texts.numel()}")
    else:
        texts = _target_tensor(target)
        texts = (texts.expand(n_images) if texts.dim() == 0 else texts).to(device)
        if texts.shape != (n_images,):
            raise InputError(f"target must give one text per image ({n_images}), got shape {tuple(texts.shape)}")
        images = torch.arange(n_images, device=device)
    for name, index, n in (("image", images, n_images), ("text", texts, n_texts)):
        if index.numel() == 0:
            raise InputError("no pair to explain")
        if bool((index < 0).any()) or bool((index >= n).any()):
            raise InputError(f"{name} index out of range [0, {n}): {index.tolist()}")
    return images, texts


def _clip_embeddings(spec: clip.ClipSpec, which: str, inputs: object) -> torch.Tensor:
    """The normalized embeddings of one tower, by the sweep's forward."""
    enc = spec.encoder(which)
    emb = enc.embed(inputs)
    if emb.tokens.shape[0] == 0:
        raise InputError(f"empty batch: no {'image' if which == 'vision' else 'text'}")
    with torch.no_grad():
        x, _, rows = sweep.forward(enc, emb, enc.depth, True, "torch")
        return sweep.head_forward(enc, x, rows, emb.pool_index)[0]


def _explain_clip(spec: clip.ClipSpec, inputs, target, method, start_layer, normalize_rows, backend):
    """Both towers of each pair; see ``explain``."""
    images, text = _clip_inputs(inputs)
    image_emb = _clip_embeddings(spec, "vision", images)
    text_emb = _clip_embeddings(spec, "text", text)
    image_index, text_index = _clip_pairs(target, image_emb.shape[0], text_emb.shape[0], image_emb.device)
    per_tower = []
    for which, tower_inputs, tower_target, other in (
            ("vision", images[image_index], text_index, text_emb),
            ("text", _select_text(text, text_index.to(text_emb.device)), image_index, image_emb)):
        enc = spec.encoder(which, other)
        start = _check_start_layer(method, start_layer, enc.depth)
        per_tower.append(_explain(enc, tower_inputs, tower_target, method, start, normalize_rows, "keep", backend,
                                  frames_to_caller=4))
    return ClipExplanation(image=per_tower[0], text=per_tower[1], image_index=image_index, text_index=text_index,
                           logits_per_image=spec.logit_scale * image_emb @ text_emb.T)
