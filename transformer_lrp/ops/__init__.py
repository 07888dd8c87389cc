"""Relevance rules, one module per op, each with a pure-PyTorch reference (the oracle the kernels are tested against).

Every rule takes the tensors its forward saw and the relevance of its output, and returns the relevance of its
inputs. The rules are those of docs/method.md §2: ``safe_divide`` (§2.2), the G rule for bilinear ops (§2.3, §2.6),
Linear α1β0 (§2.4) and its baseline variant, the patch-embedding z^B rule (§2.5), LayerNorm (and RMSNorm) as an
identity (§2.7), the normalized add (§2.8), clone (§2.9), the CLS select (§2.10), and for decoder LLMs the rotary
embedding's z-rule (§2.12) and the gate product's uniform split (§2.13).

The ops with kernels (``normalized_add``, ``linear_alpha1beta0[_with_grad]``, ``layernorm_relevance``,
``attention_forward``/``attention_relevance``/``attention_weighted_map``) take ``backend="torch" | "triton" | None``.
``lrp_linear``, ``lrp_add``, ``lrp_add_layernorm`` and ``lrp_attention`` (``LinearLRPFunction``,
``NormalizedAddFunction``, ``AddLayerNormLRPFunction``, ``AttentionLRPFunction``) are ``torch.autograd.Function``s
whose forward is the plain op and whose backward returns relevance, usable inside any autograd graph.
"""

from transformer_lrp._numerics import safe_divide
from transformer_lrp.ops.activation import identity_rule_grad
from transformer_lrp.ops.attention import (
    AttentionLRPFunction,
    attention_av_relevance,
    attention_forward,
    attention_qk_relevance,
    attention_relevance,
    attention_weighted_map,
    lrp_attention,
)
from transformer_lrp.ops.conv import patch_embed_zb_relevance
from transformer_lrp.ops.gate import gate_grad, gate_relevance
from transformer_lrp.ops.layernorm import AddLayerNormLRPFunction, layernorm_relevance, lrp_add_layernorm, rms_norm
from transformer_lrp.ops.linear import (
    LinearLRPFunction,
    linear_alpha1beta0,
    linear_alpha1beta0_ref,
    linear_alpha1beta0_separate,
    linear_alpha1beta0_with_grad,
    linear_rows_relevance,
    lrp_linear,
)
from transformer_lrp.ops.residual import (
    NormalizedAddFunction,
    clone_relevance,
    lrp_add,
    normalized_add,
    select_relevance,
    z_add,
)
from transformer_lrp.ops.rotary import rotary_apply, rotary_cos_sin, rotary_grad, rotary_relevance

__all__ = [
    "AddLayerNormLRPFunction",
    "LinearLRPFunction",
    "AttentionLRPFunction",
    "NormalizedAddFunction",
    "attention_av_relevance",
    "attention_forward",
    "attention_qk_relevance",
    "attention_relevance",
    "attention_weighted_map",
    "layernorm_relevance",
    "lrp_add",
    "lrp_add_layernorm",
    "lrp_attention",
    "lrp_linear",
    "clone_relevance",
    "gate_grad",
    "identity_rule_grad",
    "gate_relevance",
    "linear_rows_relevance",
    "rms_norm",
    "rotary_apply",
    "rotary_cos_sin",
    "rotary_grad",
    "rotary_relevance",
    "linear_alpha1beta0",
    "linear_alpha1beta0_ref",
    "linear_alpha1beta0_separate",
    "linear_alpha1beta0_with_grad",
    "normalized_add",
    "patch_embed_zb_relevance",
    "safe_divide",
    "select_relevance",
    "z_add",
]
