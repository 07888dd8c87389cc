"""Adapters for decoder LLMs of transformers: ``*ForCausalLM`` (and GPT-2's ``GPT2LMHeadModel``) and
``*ForSequenceClassification`` of Llama (Llama 3 with GQA; SmolLM2 is one), Mistral, Qwen2, Qwen3, Gemma 3 (text),
Phi-3 and GPT-2.

What the description gains for them (``adapters.spec``): RMSNorm (Gemma's ``(1 + w)``), rotary embeddings on q and k
with positions taken from the attention mask, key/value heads shared by groups of query heads, per-head q/k-norms,
gated MLPs (separate or fused gate and up projections), sliding-window layers, Gemma's norms on the branches and its
embedding scale, GPT-2's ``Conv1D`` projections and learned positions, and an LM head read only at the explained
positions. Mixture-of-experts families are refused, naming what is missing.

Positions: the stock ``forward`` numbers tokens ``0 … N-1`` whatever the padding, while generation numbers the real
tokens from 0 (``cumsum(mask) - 1``); the latter is what a left-padded prompt gets alone, so it is the one used
here (the two agree on unpadded and right-padded prompts).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from transformer_lrp.adapters import _checks as chk
from transformer_lrp.adapters.spec import (
    BlockSpec,
    Embedded,
    EncoderSpec,
    HeadBranch,
    LinearSpec,
    NormSpec,
    RotarySpec,
    cached_abs,
)
from transformer_lrp.errors import InputError, UnsupportedModelError

# model_type → the module layout (llama: the Llama template shared by Mistral, Qwen2 and Qwen3)
FAMILIES = {"llama": "llama", "mistral": "llama", "qwen2": "llama", "qwen3": "llama", "gemma3_text": "gemma3",
            "phi3": "phi3", "gpt2": "gpt2"}
MIXTURES = {"mixtral", "qwen2_moe", "qwen3_moe"}
_HEADS = ("ForCausalLM", "LMHeadModel", "ForSequenceClassification")
_STATIC_ROPE = {"default", "llama3", "linear", "yarn"}
_IGNORED_KEYS = {"special_tokens_mask", "offset_mapping", "length", "overflow_to_sample_mapping", "token_type_ids"}


def _model_type(model: nn.Module) -> str | None:
    cfg = getattr(model, "config", None)
    return getattr(cfg, "model_type", None)


def matches(model: nn.Module) -> bool:
    name = type(model).__name__
    return (_model_type(model) in FAMILIES or _model_type(model) in MIXTURES) and name.endswith(_HEADS)


def is_language_model(model: nn.Module) -> bool:
    return type(model).__name__.endswith(("ForCausalLM", "LMHeadModel"))


def build(model: nn.Module) -> EncoderSpec:
    kind = _model_type(model)
    name = type(model).__name__
    if kind in MIXTURES or _has_experts(model):
        raise UnsupportedModelError(f"unsupported {name}: a mixture of experts (routed MLPs) has no relevance rule "
                                    "here; supported decoders: Llama, Mistral, Qwen2, Qwen3, Gemma 3, Phi-3, GPT-2")
    layout = FAMILIES[kind]
    cfg = model.config
    if getattr(cfg, "use_bidirectional_attention", False):
        raise UnsupportedModelError(f"unsupported {name} with use_bidirectional_attention=True (an embedding model)")
    if layout == "gpt2":
        base, blocks, final_norm, embed_of = _gpt2(model)
    else:
        base, blocks, final_norm, embed_of = _rope_family(model, layout)
    language_model = is_language_model(model)
    if language_model:
        lm_head = chk.expect_linear(model.lm_head, "lm_head")
        layers: tuple = (("lm_head", LinearSpec.of(lm_head)),)
        cap = getattr(cfg, "final_logit_softcapping", None)
        if cap:
            layers += (("softcap", float(cap)),)
        num_classes = lm_head.out_features
    else:
        score = chk.expect_linear(model.score, "score")
        layers = (("linear", LinearSpec.of(score)),)
        num_classes = score.out_features
    pad_id = getattr(cfg, "pad_token_id", None)
    word = embed_of["word"]
    max_len = int(getattr(cfg, "max_position_embeddings", 1 << 30) or 1 << 30)

    def embed(inputs: object) -> Embedded:
        ids, mask = _check_inputs(inputs, word, max_len)
        positions = _positions(mask, ids)
        tokens = embed_of["tokens"](ids, positions)
        inputs_embeds = embed_of["inputs_embeds"](ids)

        def from_gradient(grad: torch.Tensor) -> tuple[torch.Tensor, None]:
            # the word embeddings as the model's embedding module returns them (Gemma's scale included) ⊙ the
            # gradient, summed over the width; GPT-2's position embeddings keep their share. Explained rows that
            # share a sample's forward (a continuation) read their sample's embeddings.
            rows = emb.row_sample
            words = inputs_embeds if rows is None else inputs_embeds.index_select(0, rows)
            return (words * grad).sum(dim=-1), None

        if language_model:  # the last real token of each sample: the one whose next-token logits are explained
            pool = _last_real(mask, ids)
        else:  # the models' own pooling: the rightmost token that is not the pad token (input_ids only)
            pool = _sequence_pool(ids, pad_id, type(model).__name__)
        emb = Embedded(tokens=tokens, key_mask=None if mask is None or bool(mask.all()) else mask,
                       to_input=_to_input, pool_index=pool, positions=positions, from_gradient=from_gradient)
        return emb

    return EncoderSpec(
        family=f"transformers.{name}",
        modality="text",
        blocks=blocks,
        final_norm=final_norm,
        head=(HeadBranch(0, layers),),
        num_classes=int(num_classes),
        num_prefix_tokens=0,
        embed=embed,
        max_tokens=max_len,
        language_model=language_model,
    )


def _has_experts(model: nn.Module) -> bool:
    return any(any(k in type(m).__name__ for k in ("SparseMoeBlock", "Experts", "TopKRouter")) for m in model.modules())


# ----------------------------------------------------------------------------------------- Llama, Gemma, Phi-3


def _rms(module: nn.Module, path: str, gemma: bool = False) -> NormSpec:
    weight = getattr(module, "weight", None)
    eps = getattr(module, "variance_epsilon", getattr(module, "eps", None))
    if weight is None or eps is None or not type(module).__name__.endswith("RMSNorm"):
        chk.fail(path, module, "expected the model family's RMSNorm")
    return NormSpec(weight.detach(), None, float(eps), rms=True, weight_offset=1.0 if gemma else 0.0,
                    scale_in_float32=gemma)


def _rotary(rotary: nn.Module, cfg, layer_type: str | None, path: str) -> RotarySpec:
    """The rotary embedding of a layer type: its static inverse frequencies (dynamic ones are refused)."""
    params = getattr(cfg, "rope_parameters", None) or {}
    if layer_type is not None and layer_type in params:
        params = params[layer_type]
    rope_type = params.get("rope_type", "default") if isinstance(params, Mapping) else "default"
    if rope_type not in _STATIC_ROPE:
        chk.fail(path, rotary, f"rope_type {rope_type!r} changes its frequencies with the sequence length; "
                               f"supported: {sorted(_STATIC_ROPE)}")
    prefix = "" if layer_type is None or not hasattr(rotary, f"{layer_type}_inv_freq") else f"{layer_type}_"
    inv = getattr(rotary, f"{prefix}original_inv_freq", None)
    if inv is None:
        inv = getattr(rotary, f"{prefix}inv_freq")
    scaling = float(getattr(rotary, f"{prefix}attention_scaling", 1.0))
    return RotarySpec(inv.detach(), scaling)


def _activation(mlp: nn.Module, path: str) -> tuple[nn.Module, str]:
    name = "act_fn" if hasattr(mlp, "act_fn") else "activation_fn"
    return getattr(mlp, name), f"{path}.{name}"


def _window(cfg, i: int) -> int | None:
    types = getattr(cfg, "layer_types", None)
    window = getattr(cfg, "sliding_window", None)
    if types is not None:
        return int(window) if types[i] == "sliding_attention" and window else None
    return int(window) if window else None


def _rope_family(model: nn.Module, layout: str):
    cfg = model.config
    base = model.model
    gemma = layout == "gemma3"
    heads, kv_heads = int(cfg.num_attention_heads), int(getattr(cfg, "num_key_value_heads", None) or
                                                         cfg.num_attention_heads)
    head_dim = int(getattr(cfg, "head_dim", None) or cfg.hidden_size // heads)
    scale = float(cfg.query_pre_attn_scalar) ** -0.5 if gemma else head_dim**-0.5
    types = getattr(cfg, "layer_types", None)
    ropes: dict[str | None, RotarySpec] = {}
    partial = float((getattr(cfg, "rope_parameters", None) or {}).get("partial_rotary_factor", 1.0)
                    if isinstance(getattr(cfg, "rope_parameters", None), Mapping) else 1.0)
    blocks = []
    for i, layer in enumerate(base.layers):
        path = f"model.layers.{i}"
        att = layer.self_attn
        layer_type = types[i] if (gemma and types is not None) else None
        if layer_type not in ropes:
            ropes[layer_type] = _rotary(base.rotary_emb, cfg, layer_type, "model.rotary_emb")
        rope = ropes[layer_type]
        if 2 * rope.inv_freq.numel() > head_dim or (partial == 1.0 and 2 * rope.inv_freq.numel() != head_dim):
            chk.fail(f"{path}.self_attn", att, "its rotary width does not match the head width")
        if layout == "phi3":
            qkv = (LinearSpec.of(chk.expect_linear(att.qkv_proj, f"{path}.self_attn.qkv_proj")),)
            fc1 = LinearSpec.of(chk.expect_linear(layer.mlp.gate_up_proj, f"{path}.mlp.gate_up_proj"))
            gate, fused = None, True
        else:
            qkv = tuple(LinearSpec.of(chk.expect_linear(getattr(att, n), f"{path}.self_attn.{n}"))
                        for n in ("q_proj", "k_proj", "v_proj"))
            fc1 = LinearSpec.of(chk.expect_linear(layer.mlp.up_proj, f"{path}.mlp.up_proj"))
            gate, fused = LinearSpec.of(chk.expect_linear(layer.mlp.gate_proj, f"{path}.mlp.gate_proj")), False
        q_norm = _rms(att.q_norm, f"{path}.self_attn.q_norm", gemma) if hasattr(att, "q_norm") else None
        k_norm = _rms(att.k_norm, f"{path}.self_attn.k_norm", gemma) if hasattr(att, "k_norm") else None
        if gemma:  # sandwich: norms before each branch and on its output, before the residual add
            norm1, norm2 = _rms(layer.input_layernorm, f"{path}.input_layernorm", True), \
                _rms(layer.pre_feedforward_layernorm, f"{path}.pre_feedforward_layernorm", True)
            post_attn = _rms(layer.post_attention_layernorm, f"{path}.post_attention_layernorm", True)
            post_mlp = _rms(layer.post_feedforward_layernorm, f"{path}.post_feedforward_layernorm", True)
        else:
            norm1 = _rms(layer.input_layernorm, f"{path}.input_layernorm")
            norm2 = _rms(layer.post_attention_layernorm, f"{path}.post_attention_layernorm")
            post_attn = post_mlp = None
        blocks.append(BlockSpec(
            pre_norm=True, norm1=norm1, norm2=norm2, qkv=qkv, num_heads=heads, head_dim=head_dim, scale=scale,
            proj=LinearSpec.of(chk.expect_linear(att.o_proj, f"{path}.self_attn.o_proj")), fc1=fc1,
            act=chk.activation_name(*_activation(layer.mlp, f"{path}.mlp")),
            fc2=LinearSpec.of(chk.expect_linear(layer.mlp.down_proj, f"{path}.mlp.down_proj")),
            causal=True, kv_heads=kv_heads, q_norm=q_norm, k_norm=k_norm, rope=rope, window=_window(cfg, i),
            gate=gate, fused_gate_up=fused, post_attn_norm=post_attn, post_mlp_norm=post_mlp))
    word = base.embed_tokens.weight.detach()
    scale_buffer = getattr(base.embed_tokens, "embed_scale", None)  # Gemma: read, not recomputed (its rounding)

    def inputs_embeds(ids: torch.Tensor) -> torch.Tensor:
        x = word[ids]
        return x if scale_buffer is None else x * scale_buffer.to(word.dtype)

    def tokens(ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return inputs_embeds(ids)

    final = _rms(base.norm, "model.norm", gemma)
    return base, blocks, final, {"word": word, "tokens": tokens, "inputs_embeds": inputs_embeds}


# ------------------------------------------------------------------------------------------------------- GPT-2


class _Conv1DSpec(LinearSpec):
    """GPT-2's ``Conv1D`` (``y = x W + b`` with ``W [in, out]``) as a Linear over a transposed view of its weight; its
    ``|W|`` comes from the parameter's cache, transposed the same way."""

    @property
    def abs_weight(self) -> torch.Tensor:
        return cached_abs(self.source).t()


def _conv1d(module: nn.Module, path: str) -> LinearSpec:
    if type(module).__name__ != "Conv1D":
        chk.fail(path, module, "expected transformers' Conv1D")
    return _Conv1DSpec(module.weight.detach().t(), module.bias.detach(), module.weight)


def _gpt2(model: nn.Module):
    cfg = model.config
    base = model.transformer
    if getattr(cfg, "add_cross_attention", False):
        raise UnsupportedModelError("unsupported GPT-2 with cross-attention")
    heads = int(cfg.n_head)
    head_dim = int(cfg.n_embd) // heads
    blocks = []
    for i, layer in enumerate(base.h):
        path = f"transformer.h.{i}"
        scale = head_dim**-0.5 if getattr(cfg, "scale_attn_weights", True) else 1.0
        if getattr(cfg, "scale_attn_by_inverse_layer_idx", False):
            scale /= float(i + 1)
        blocks.append(BlockSpec(
            pre_norm=True, norm1=NormSpec.of(chk.expect_layernorm(layer.ln_1, f"{path}.ln_1")),
            norm2=NormSpec.of(chk.expect_layernorm(layer.ln_2, f"{path}.ln_2")),
            qkv=(_conv1d(layer.attn.c_attn, f"{path}.attn.c_attn"),), num_heads=heads, head_dim=head_dim,
            scale=scale, proj=_conv1d(layer.attn.c_proj, f"{path}.attn.c_proj"),
            fc1=_conv1d(layer.mlp.c_fc, f"{path}.mlp.c_fc"), act=chk.activation_name(layer.mlp.act, f"{path}.mlp.act"),
            fc2=_conv1d(layer.mlp.c_proj, f"{path}.mlp.c_proj"), causal=True))
    word, position = base.wte.weight.detach(), base.wpe.weight.detach()

    def tokens(ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return word[ids] + position[positions]

    final = NormSpec.of(chk.expect_layernorm(base.ln_f, "transformer.ln_f"))
    return base, blocks, final, {"word": word, "tokens": tokens, "inputs_embeds": lambda ids: word[ids]}


# ------------------------------------------------------------------------------------------------------ inputs


def _check_inputs(inputs: object, word: torch.Tensor, max_len: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    if isinstance(inputs, torch.Tensor):
        inputs = {"input_ids": inputs}
    if not isinstance(inputs, Mapping) or "input_ids" not in inputs:
        raise InputError("decoder models take the tokenizer's output: a mapping with 'input_ids' (and optionally "
                         "'attention_mask', left or right padding)")
    unknown = set(inputs) - {"input_ids", "attention_mask", "position_ids"} - _IGNORED_KEYS
    if unknown:
        raise InputError(f"unsupported input keys: {sorted(unknown)}")
    if "position_ids" in inputs:
        raise InputError("position_ids are derived from the attention mask (each prompt numbered from 0, as "
                         "generation numbers it); do not pass them")
    ids = inputs["input_ids"]
    if not isinstance(ids, torch.Tensor) or ids.dim() != 2 or ids.dtype not in (torch.int32, torch.int64):
        shape = tuple(ids.shape) if isinstance(ids, torch.Tensor) else type(ids).__name__
        raise InputError(f"input_ids must be an integer tensor [B, T], got {shape}")
    if ids.device != word.device:
        raise InputError(f"input_ids are on {ids.device} but the model is on {word.device}")
    b, t = ids.shape
    if b == 0 or t == 0:
        raise InputError(f"input_ids is empty: shape {(b, t)}")
    if t > max_len:
        raise InputError(f"sequence length {t} exceeds the model's maximum of {max_len} positions")
    if bool((ids < 0).any()) or bool((ids >= word.shape[0]).any()):
        raise InputError(f"input_ids out of the vocabulary range [0, {word.shape[0]})")
    mask = inputs.get("attention_mask")
    if mask is not None:
        if not isinstance(mask, torch.Tensor) or tuple(mask.shape) != (b, t):
            raise InputError(f"attention_mask must have the shape of input_ids {(b, t)}")
        if bool(((mask != 0) & (mask != 1)).any()):
            raise InputError("attention_mask must hold only 0 and 1")
        mask = mask.to(device=ids.device).bool()
        real = mask.long()
        count = real.sum(1)
        if bool((count == 0).any()):
            raise InputError("a sample has no real token (its attention_mask is all 0)")
        # one contiguous run of real tokens per sample: padding on the left, on the right, or none
        first, last = real.argmax(1), t - 1 - real.flip(1).argmax(1)
        if bool((last - first + 1 != count).any()):
            raise InputError("attention_mask must be one run of real tokens per sample (left or right padding)")
    return ids.long(), mask


def _positions(mask: torch.Tensor | None, ids: torch.Tensor) -> torch.Tensor:
    """Each real token's position counted from the sample's first real token; padding gets 0 (as generation does)."""
    if mask is None:
        return torch.arange(ids.shape[1], device=ids.device).expand_as(ids)
    real = mask.long()
    return (real.cumsum(1) - 1).clamp(min=0) * real


def _last_real(mask: torch.Tensor | None, ids: torch.Tensor) -> torch.Tensor:
    n = ids.shape[1]
    if mask is None:
        return torch.full((ids.shape[0],), n - 1, dtype=torch.long, device=ids.device)
    return n - 1 - mask.long().flip(1).argmax(dim=1)


def _sequence_pool(ids: torch.Tensor, pad_id: int | None, name: str) -> torch.Tensor:
    """The token a ``*ForSequenceClassification`` pools: the rightmost one that is not ``pad_token_id``."""
    if pad_id is None:
        if ids.shape[0] > 1:
            raise InputError(f"{name} has no pad_token_id, so it cannot tell padding from text in a batch; set "
                             "model.config.pad_token_id (e.g. to the tokenizer's pad or EOS id) or explain one "
                             "sample at a time")
        return torch.full((1,), ids.shape[1] - 1, dtype=torch.long, device=ids.device)
    keep = (ids != pad_id).long()
    return (torch.arange(ids.shape[1], device=ids.device) * keep).argmax(dim=1)


def _to_input(relevance: torch.Tensor, add_rule) -> tuple[torch.Tensor, None]:
    # full LRP stops at the decoder's input embeddings (as for text encoders): sum over the width
    return relevance.sum(dim=-1), None
