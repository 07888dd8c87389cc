"""Oracle of AttnLRP and CP-LRP that shares nothing with the sweep: the stock model's own forward, with forward hooks
that turn its autograd backward into the rule set's modified gradient, the way LXT turns it by patching classes
(docs/method.md §12). Hooks go on one test-owned instance and are removed on exit.

What each hook does (value unchanged, gradient changed):

* LayerNorm / RMSNorm modules: the output recomputed with the scale ``1/σ`` detached.
* activation modules: the identity rule, gradient ``act(x) / (x + 1e-10)``.
* q, k, v projections (separate, or one fused Linear with a per-feature factor): AttnLRP ¼, ¼, ½ (the uniform rule
  on both attention products: every map between the projection and the attention is linear in the backward, so the
  factor may be put on the projection's output); CP-LRP 0, 0, 1.
* activations applied inline by a head (RoBERTa's tanh, DistilBERT's ReLU): the identity rule as a gradient factor on
  the Linear before them.
* eager attention's softmax: computed in the input's dtype (HF's eager attention rounds it to float32).
* gated MLPs: the input of the down projection scaled by ½ in the backward (AttnLRP's uniform rule on
  ``act(gate) ⊙ up``); CP-LRP detaches the activated gate instead (and no identity rule through it).

The relevance is read where the package reads it: the word embedding's output ⊙ its gradient summed over the width
(text); the pixels ⊙ their gradient summed over channels, and the patch embedding's output ⊙ its gradient summed over
the width (vision)."""

from __future__ import annotations

import contextlib

import torch
from torch import nn

EPS = 1e-10
_FACTORS = {"attnlrp": (0.25, 0.25, 0.5), "cp_lrp": (0.0, 0.0, 1.0)}
_SEPARATE = {"q_proj": 0, "k_proj": 1, "v_proj": 2, "query": 0, "key": 1, "value": 2, "q_lin": 0, "k_lin": 1,
             "v_lin": 2}


def _with_gradient_of(value, surrogate):
    return value.detach() + (surrogate - surrogate.detach())


def _scaled_backward(t, factor):
    """``t`` forward, ``factor ·`` its gradient backward (``factor`` a number or a per-feature vector)."""
    return t * factor + t.detach() * (1 - factor)


def _is_activation(m: nn.Module) -> bool:
    return isinstance(m, (nn.GELU, nn.SiLU, nn.Tanh, nn.ReLU)) or type(m).__module__ == "transformers.activations"


def _norm_hook(module, args, out):
    x = args[0]
    if type(module).__name__.endswith("RMSNorm"):
        eps = getattr(module, "variance_epsilon", getattr(module, "eps", None))
        h = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps).detach()
        gain = (1.0 + module.weight) if type(module).__name__.startswith("Gemma") else module.weight
        return _with_gradient_of(out, h * gain)
    centered = x - x.mean(-1, keepdim=True)
    h = centered * torch.rsqrt(centered.pow(2).mean(-1, keepdim=True) + module.eps).detach()
    if module.weight is not None:
        h = h * module.weight
    if module.bias is not None:
        h = h + module.bias
    return _with_gradient_of(out, h)


def _identity_rule_hook(module, args, out):
    x = args[0]
    return _with_gradient_of(out, x * (out / (x + EPS)).detach())


# Heads that apply their activation inline (no module to hook): the identity rule is put on the Linear before it, as
# a gradient factor ``(act(z) / (z + 1e-10)) / act'(z)`` (1 where ``act'`` is 0: nothing passes there anyway).
_INLINE = {"RobertaClassificationHead": ("dense", torch.tanh, lambda z: 1 - torch.tanh(z) ** 2),
           "DistilBertForSequenceClassification": ("pre_classifier", torch.relu, lambda z: (z > 0).to(z.dtype))}


def _inline_activation_hook(act, derivative):
    def hook(module, args, out):
        slope = derivative(out)
        factor = torch.where(slope != 0, act(out) / (out + EPS) / slope.where(slope != 0, 1), 1.0)
        return _scaled_backward(out, factor.detach())
    return hook


def _detach_hook(module, args, out):
    return out.detach()


def _fused_factors(sizes: tuple[int, int, int], factors, like: torch.Tensor) -> torch.Tensor:
    return torch.cat([torch.full((n,), f, dtype=like.dtype) for n, f in zip(sizes, factors)])


@contextlib.contextmanager
def modified_gradient(model: nn.Module, rules: str):
    """Within the block, ``model``'s backward is ``rules``' modified gradient (``"attnlrp"`` or ``"cp_lrp"``)."""
    factors = _FACTORS[rules]
    handles = []

    def hook(module, fn, pre=False):
        handles.append(module.register_forward_pre_hook(fn) if pre else module.register_forward_hook(fn))

    gated_acts = set()
    for m in model.modules():
        gate_act = getattr(m, "act_fn", None) or getattr(m, "activation_fn", None)
        if hasattr(m, "down_proj") and (hasattr(m, "gate_proj") or hasattr(m, "gate_up_proj")):
            gated_acts.add(id(gate_act))
            if rules == "attnlrp":
                hook(m.down_proj, lambda mod, args: (_scaled_backward(args[0], 0.5),), pre=True)
                hook(gate_act, _identity_rule_hook)
            else:
                hook(gate_act, _detach_hook)
    for m in model.modules():
        if type(m).__name__ in _INLINE:
            linear, act, derivative = _INLINE[type(m).__name__]
            hook(getattr(m, linear), _inline_activation_hook(act, derivative))
    for name, m in model.named_modules():
        leaf = name.rsplit(".", 1)[-1]
        if isinstance(m, nn.LayerNorm) or type(m).__name__.endswith("RMSNorm"):
            hook(m, _norm_hook)
        elif _is_activation(m) and id(m) not in gated_acts:
            hook(m, _identity_rule_hook)
        elif leaf in _SEPARATE and isinstance(m, nn.Linear):
            f = factors[_SEPARATE[leaf]]
            hook(m, lambda mod, args, out, f=f: _scaled_backward(out, f))
        elif leaf in ("qkv", "qkv_proj", "c_attn"):
            sizes = _qkv_sizes(model, m)
            hook(m, lambda mod, args, out, s=sizes: _scaled_backward(out, _fused_factors(s, factors, out)))
    softmax = torch.nn.functional.softmax

    def float64_softmax(x, dim=None, _stacklevel=3, dtype=None):  # HF's eager attention rounds it to float32
        return softmax(x, dim=dim, dtype=None if x.dtype == torch.float64 else dtype)

    torch.nn.functional.softmax = float64_softmax
    try:
        yield model
    finally:
        torch.nn.functional.softmax = softmax
        for h in handles:
            h.remove()


def _qkv_sizes(model: nn.Module, fused: nn.Module) -> tuple[int, int, int]:
    width = fused.weight.shape[1] if type(fused).__name__ == "Conv1D" else fused.weight.shape[0]
    cfg = getattr(model, "config", None)
    if cfg is not None and getattr(cfg, "num_key_value_heads", None):  # Phi-3: q of H heads, k and v of Hkv
        d = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        kv = cfg.num_key_value_heads * d
        return width - 2 * kv, kv, kv
    return width // 3, width // 3, width // 3


def _retained(module: nn.Module, store: list):
    def keep(mod, args, out):
        out.retain_grad()
        store.append(out)
    return module.register_forward_hook(keep)


def text(model: nn.Module, inputs: dict, rules: str, target: torch.Tensor, position: torch.Tensor | None = None,
         **forward_kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    """``(relevance [B, T], explained logit [B])`` of a text model: ``position`` (decoders) the row whose next-token
    logits are explained, else the model's own pooled logits."""
    emb = []
    handle = _retained(model.get_input_embeddings(), emb)
    try:
        with modified_gradient(model, rules), torch.enable_grad():
            logits = model(**inputs, **forward_kwargs).logits
            if position is not None:
                logits = logits[torch.arange(logits.shape[0]), position]
            chosen = logits.gather(1, target[:, None])[:, 0]
            chosen.sum().backward()
    finally:
        handle.remove()
    return (emb[0] * emb[0].grad).sum(-1).detach(), chosen.detach()


def _patch_embedding(model: nn.Module) -> nn.Module:
    for path in ("patch_embed", "vit.embeddings.patch_embeddings", "vision_model.embeddings.patch_embedding"):
        m = model
        try:
            for part in path.split("."):
                m = getattr(m, part)
        except AttributeError:
            continue
        return m
    raise ValueError(f"no patch embedding in {type(model).__name__}")


def _token_relevance(t: torch.Tensor) -> torch.Tensor:
    if t.dim() == 4:  # a Conv2d's [B, D, g, g]
        return (t * t.grad).sum(1).flatten(1)
    return (t * t.grad).sum(-1)


def vision(model: nn.Module, images: torch.Tensor, rules: str, target: torch.Tensor,
           explained=None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(pixel relevance [B, H, W], patch-token relevance [B, P], explained logit [B])``; ``explained(model, x)``
    gives the logits (default: the model's own)."""
    x = images.detach().clone().requires_grad_(True)
    emb = []
    handle = _retained(_patch_embedding(model), emb)
    try:
        with modified_gradient(model, rules), torch.enable_grad():
            out = explained(model, x) if explained is not None else model(x)
            logits = out.logits if hasattr(out, "logits") else out
            chosen = logits.gather(1, target[:, None])[:, 0]
            chosen.sum().backward()
    finally:
        handle.remove()
    return (x * x.grad).sum(1).detach(), _token_relevance(emb[0]).detach(), chosen.detach()


def clip_pair_logits(model, tower: str, other: torch.Tensor):
    """The similarity logits of one CLIP tower against the other tower's embeddings ``other`` (constants), written
    with the stock submodules; the L2 normalization's scale held constant, as the norms'."""

    def logits(m, x, attention_mask=None):
        if tower == "vision":
            pooled = m.vision_model(pixel_values=x).pooler_output
            e = m.visual_projection(pooled)
        else:
            pooled = m.text_model(input_ids=x, attention_mask=attention_mask).pooler_output
            e = m.text_projection(pooled)
        e = e / e.norm(dim=-1, keepdim=True).detach()
        return m.logit_scale.exp().detach() * e @ other.T
    return logits
