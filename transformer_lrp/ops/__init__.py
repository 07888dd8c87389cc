"""Relevance rules, one module per op, each a pure-PyTorch reference (the oracle the kernels are tested against).

Every rule takes the tensors its forward saw and the relevance of its output, and returns the relevance of its
inputs. The rules are those of SPEC.md §2: ``safe_divide`` (§2.2), the G rule for bilinear ops (§2.3, §2.6),
Linear α1β0 (§2.4) and its baseline variant, the patch-embedding z^B rule (§2.5), the normalized add (§2.8),
clone (§2.9) and the CLS select (§2.10).
"""

from transformer_lrp.ops.attention import attention_av_relevance, attention_qk_relevance
from transformer_lrp.ops.common import safe_divide
from transformer_lrp.ops.conv import patch_embed_zb_relevance
from transformer_lrp.ops.linear import (
    linear_alpha1beta0,
    linear_alpha1beta0_ref,
    linear_alpha1beta0_separate,
)
from transformer_lrp.ops.residual import clone_relevance, normalized_add, select_relevance, z_add

__all__ = [
    "attention_av_relevance",
    "attention_qk_relevance",
    "clone_relevance",
    "linear_alpha1beta0",
    "linear_alpha1beta0_ref",
    "linear_alpha1beta0_separate",
    "normalized_add",
    "patch_embed_zb_relevance",
    "safe_divide",
    "select_relevance",
    "z_add",
]
