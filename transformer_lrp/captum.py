"""A Captum attribution class for the method and its baselines (``pip install captum``; an optional extra).

    from transformer_lrp.captum import TransformerAttribution
    attr = TransformerAttribution(model)                               # a stock timm / transformers classifier
    a = attr.attribute(images, target=3)                               # [B, gh, gw], one value per patch
    a = attr.attribute(images, target=[3, 1], pixels=True)             # [B, 3, H, W], Captum's input shape
    a = attr.attribute(input_ids, additional_forward_args=(attention_mask,), method="gae")   # [B, T]
    a, delta = attr.attribute(images, method="full_lrp", return_convergence_delta=True)

The numbers are ``transformer_lrp.explain``'s. Captum's conventions: ``target`` an int, a list or a ``[B]``
tensor (``None``: each sample's argmax); text inputs either the tokenizer's mapping or ``input_ids`` with the
model's other positional inputs (``attention_mask``, ``token_type_ids``) in ``additional_forward_args``; the
attributions have the inputs' shape with ``pixels=True`` (vision) and for text, one value per patch otherwise.
"""

from __future__ import annotations

import torch
from captum.attr import Attribution

from transformer_lrp.api import explain
from transformer_lrp.errors import InputError

_TEXT_ARGS = ("attention_mask", "token_type_ids")


class TransformerAttribution(Attribution):
    r"""Transformer attribution (Chefer et al., 2021), GAE, rollout, raw attention, attention GradCAM, partial and
    full LRP as a ``captum.attr.Attribution``.

    Args:
        model: a stock classifier ``transformer_lrp.explain`` supports (never modified).
        method: the default method of :meth:`attribute`. Default: ``"transformer_attribution"``.
        \*\*defaults: default keyword arguments of ``explain`` (``start_layer``, ``normalize_rows``,
            ``cls_relevance``, ``backend``).
    """

    def __init__(self, model: torch.nn.Module, method: str = "transformer_attribution", **defaults):
        super().__init__(model)
        self.method = method
        self.defaults = defaults

    def attribute(
        self,
        inputs,
        target=None,
        additional_forward_args=None,
        method: str | None = None,
        pixels: bool = False,
        return_convergence_delta: bool = False,
        **kwargs,
    ):
        r"""Attributions of ``target`` for each sample of ``inputs``.

        Args:
            inputs: images ``[B, C, H, W]``; or text: ``input_ids`` ``[B, T]`` (a tensor, or a one-tuple of it) or
                the tokenizer's mapping.
            target: int, list or ``[B]`` tensor of class indices; ``None`` explains each sample's argmax.
            additional_forward_args: text with ``input_ids``: the model's next positional inputs,
                ``(attention_mask,)`` or ``(attention_mask, token_type_ids)``.
            method: one of ``transformer_lrp.METHODS``. Default: the one given at construction.
            pixels: vision: upsample to the input's ``[B, C, H, W]`` (bilinear, as ``Explanation.image_maps``
                without the min–max; ``full_lrp`` gives its own pixel relevance). Default: one value per patch,
                ``[B, gh, gw]``.
            return_convergence_delta: also return :meth:`compute_convergence_delta` (``full_lrp``, ``attnlrp``,
                ``cp_lrp``: the methods that carry relevance to the input).
            \*\*kwargs: ``explain``'s keyword arguments, over the construction's defaults.

        Returns:
            The attributions, and with ``return_convergence_delta`` a ``[B]`` delta.
        """
        method = method or self.method
        model_inputs = self._model_inputs(inputs, additional_forward_args)
        exp = explain(self.forward_func, model_inputs, target=target, method=method, **{**self.defaults, **kwargs})
        if exp.modality == "text":
            attributions = exp.relevance
        elif not pixels:
            attributions = exp.maps()
        else:  # the pixel relevance of the methods that reach the pixels, the others' patch maps upsampled
            attributions = exp.image_maps(normalize=False)[:, None].expand(-1, model_inputs.shape[1], -1, -1)
        if return_convergence_delta:
            put_in = None if exp.conservation is None else exp.conservation.initial_relevance
            return attributions, self.compute_convergence_delta(attributions, method=method, initial_relevance=put_in)
        return attributions

    def has_convergence_delta(self) -> bool:
        return True

    def compute_convergence_delta(self, attributions: torch.Tensor, method: str | None = None,
                                  initial_relevance: torch.Tensor | None = None) -> torch.Tensor:
        """``initial_relevance − Σ attributions`` per sample: how far the relevance reaching the input is from what
        was put in at the target's logit. ``full_lrp`` puts in 1 (a one-hot start; under the baselines' rules the
        delta is not 0: their Linear rule does not conserve, docs/method.md §2.4 and §10); ``attnlrp`` and
        ``cp_lrp`` put in the logit itself, which ``initial_relevance`` `[B]` must give (``attribute`` passes it;
        their biases keep a share, docs/method.md §12.4). ``Explanation.conservation`` has the totals. The other
        methods output maps, not conserved relevance."""
        method = method or self.method
        if method not in ("full_lrp", "attnlrp", "cp_lrp"):
            raise InputError(f"the convergence delta is defined for full_lrp, attnlrp and cp_lrp (relevance "
                             f"propagated to the input), not for {method!r}, whose output is a map")
        if method != "full_lrp" and initial_relevance is None:
            raise InputError(f"{method} puts in the explained logit as relevance: give initial_relevance (the "
                             "logits), or use attribute(..., return_convergence_delta=True)")
        per_sample = attributions.reshape(attributions.shape[0], -1).sum(1)
        if attributions.dim() == 4:  # pixels: the map is repeated over the channels
            per_sample = per_sample / attributions.shape[1]
        put_in = 1.0 if method == "full_lrp" else initial_relevance.to(per_sample)
        return put_in - per_sample

    @staticmethod
    def _model_inputs(inputs, additional_forward_args):
        if isinstance(inputs, tuple):
            if len(inputs) != 1:
                raise InputError(f"inputs: one tensor (images or input_ids), got a tuple of {len(inputs)}")
            inputs = inputs[0]
        if isinstance(inputs, dict) or (torch.is_tensor(inputs) and inputs.is_floating_point()):
            if additional_forward_args is not None:
                raise InputError("additional_forward_args go with input_ids; images and tokenizer mappings take none")
            return inputs
        if not torch.is_tensor(inputs):
            raise InputError(f"inputs must be images, input_ids or a tokenizer mapping, got {type(inputs).__name__}")
        extra = additional_forward_args
        if extra is None:
            extra = ()
        elif not isinstance(extra, tuple):
            extra = (extra,)
        if len(extra) > len(_TEXT_ARGS):
            raise InputError(f"additional_forward_args: at most {_TEXT_ARGS}, got {len(extra)} values")
        return {"input_ids": inputs, **{k: v for k, v in zip(_TEXT_ARGS, extra) if v is not None}}
