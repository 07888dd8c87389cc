"""A Captum attribution class for the method and its baselines (``pip install captum``; an optional extra).

    from transformer_lrp.captum import TransformerAttribution
    attr = TransformerAttribution(model)                               # a stock timm / transformers classifier
    a = attr.attribute(images, target=3)                               # [B, gh, gw], one value per patch
    a = attr.attribute(images, target=[3, 1], pixels=True)             # [B, 3, H, W], Captum's input shape
    a = attr.attribute(input_ids, additional_forward_args=(attention_mask,), method="gae")   # [B, T]
    a, delta = attr.attribute(images, method="full_lrp", return_convergence_delta=True)

    from transformer_lrp.captum import LLMTransformerAttribution
    llm = LLMTransformerAttribution(causal_lm, tokenizer)           # a stock *ForCausalLM the package explains
    result = llm.attribute("The capital of France is", max_new_tokens=5)   # captum.attr.LLMAttributionResult
    result.plot_token_attr(); result.plot_seq_attr()

The numbers are ``transformer_lrp.explain``'s (``explain_generation``'s for language models). Captum's
conventions: ``target`` an int, a list or a ``[B]`` tensor (``None``: each sample's argmax); text inputs either the
tokenizer's mapping or ``input_ids`` with the model's other positional inputs (``attention_mask``,
``token_type_ids``) in ``additional_forward_args``; the attributions have the inputs' shape with ``pixels=True``
(vision) and for text, one value per patch otherwise.
"""

from __future__ import annotations

import torch
from captum.attr import Attribution, LLMAttributionResult

from transformer_lrp.api import explain, explain_generation
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


class LLMTransformerAttribution:
    r"""What a decoder LLM says, explained token by token, as Captum's ``LLMAttributionResult`` (whose
    ``plot_token_attr()`` and ``plot_seq_attr()`` draw it), by any method of the package.

    Built on :func:`~transformer_lrp.explain_generation`: one forward over prompt + answer and one reverse sweep for
    all the answer's tokens. As in Captum's ``LLMGradientAttribution``: one prompt per call, ``token_attr`` has a row
    per answer token over the prompt's tokens and ``seq_attr`` is the sum of the rows; each row here explains that
    answer token's logit (Captum's gradient classes explain its log-probability).

    Args:
        model: a stock ``*ForCausalLM`` (or ``GPT2LMHeadModel``) of a supported family (never modified).
        tokenizer: its tokenizer.
        method: the default method of :meth:`attribute`. Default: ``"transformer_attribution"``.
        \*\*defaults: default keyword arguments of ``explain_generation`` (``start_layer``, ``normalize_rows``,
            ``backend``).
    """

    def __init__(self, model: torch.nn.Module, tokenizer, method: str = "transformer_attribution", **defaults):
        self.model = model
        self.tokenizer = tokenizer
        self.method = method
        self.defaults = defaults

    def attribute(self, prompt: str, target: str | torch.Tensor | list[int] | None = None, max_new_tokens: int = 25,
                  method: str | None = None, include_answer: bool = False, **kwargs) -> LLMAttributionResult:
        r"""Explain the answer to ``prompt``.

        Args:
            prompt: the text, tokenized as the tokenizer does by default (its special tokens included; apply a chat
                template first for a chat model).
            target: the answer to explain: ``None`` (generated greedily, up to ``max_new_tokens`` and the first
                end-of-sequence token), a string (tokenized without special tokens) or token ids.
            method: one of ``transformer_lrp.METHODS``. Default: the one given at construction.
            include_answer: also attribute to the answer's own earlier tokens: ``input_tokens`` are then the prompt's
                followed by the answer's, and row ``j`` of ``token_attr`` is 0 from answer token ``j`` on.
            \*\*kwargs: ``explain_generation``'s keyword arguments, over the construction's defaults.

        Returns:
            ``captum.attr.LLMAttributionResult`` with ``input_tokens``, ``output_tokens`` (each token decoded alone),
            ``token_attr`` `[n_out, n_in]`, ``seq_attr`` `[n_in]` and ``output_probs`` `[n_out]` (each answer token's
            probability under the model after the tokens before it).
        """
        if not isinstance(prompt, str):
            raise InputError(f"prompt must be a string, got {type(prompt).__name__}")
        device = next(self.model.parameters()).device
        inputs = {k: v.to(device) for k, v in self.tokenizer(prompt, return_tensors="pt").items()
                  if k in ("input_ids", "attention_mask")}
        answer = None
        if isinstance(target, str):
            answer = self.tokenizer(target, add_special_tokens=False)["input_ids"]
            if not answer:
                raise InputError("target is an empty answer: it has no token")
            answer = [answer]
        elif target is not None:
            answer = torch.as_tensor(target).reshape(1, -1)
        options = {**self.defaults, **kwargs}
        gen = explain_generation(self.model, inputs, max_new_tokens=max_new_tokens, answer=answer,
                                 method=method or self.method, **options)
        n_prompt = int(gen.prompt_mask[0].sum())
        answer_ids = gen.answer_ids[0][gen.answer_mask[0]]
        columns = gen.matrix(0)  # [n_out, prompt + answer]
        token_attr = columns if include_answer else columns[:, :n_prompt]
        inputs_shown = gen.input_ids[0][gen.attention_mask[0]]
        inputs_shown = inputs_shown if include_answer else inputs_shown[:n_prompt]
        return LLMAttributionResult(
            input_tokens=[self.tokenizer.decode([t]) for t in inputs_shown.tolist()],
            output_tokens=[self.tokenizer.decode([t]) for t in answer_ids.tolist()],
            seq_attr=token_attr.sum(0), token_attr=token_attr,
            output_probs=self._answer_probabilities(gen.input_ids, gen.attention_mask, gen.position, answer_ids))

    @torch.no_grad()
    def _answer_probabilities(self, ids: torch.Tensor, real: torch.Tensor, position: torch.Tensor,
                              answer_ids: torch.Tensor) -> torch.Tensor:
        """Each answer token's probability at the position before it, by the stock model (positions counted over the
        real tokens, as generation numbers them)."""
        mask = real.long()
        logits = self.model(input_ids=ids, attention_mask=mask,
                            position_ids=(mask.cumsum(1) - 1).clamp(min=0) * mask).logits[0]
        rows = position[0][: answer_ids.shape[0]]
        return logits[rows].float().softmax(-1).gather(-1, answer_ids[:, None])[:, 0]
