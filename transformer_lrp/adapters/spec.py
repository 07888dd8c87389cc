"""The encoder description that adapters build from a stock model and the sweep runs on.

Every tensor here is a ``detach()``-ed view of the model's own parameter (no copy, no autograd edge to the
model), so explaining never accumulates ``.grad`` on, or changes ``requires_grad`` of, the user's weights.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch.utils.weak import WeakIdKeyDictionary

from transformer_lrp.ops.layernorm import layernorm_relevance, rms_norm
from transformer_lrp.ops.rotary import rotary_cos_sin

Modality = Literal["vision", "text"]


def _view(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.detach()


# |W| per weight parameter, for the sign-split α1β0 rule: derived once per model, not per call. Keyed by the
# parameter object (weakly: it goes with the model) and invalidated when the weight changes in place
# (``_version``) or is replaced (``data_ptr``).
_ABS_WEIGHTS = WeakIdKeyDictionary()


def cached_abs(param: torch.Tensor) -> torch.Tensor:
    state = (param._version, param.data_ptr(), param.dtype, param.device)
    hit = _ABS_WEIGHTS.get(param)
    if hit is not None and hit[0] == state:
        return hit[1]
    value = param.detach().abs()
    _ABS_WEIGHTS[param] = (state, value)
    return value


def clear_cache() -> None:
    """Free the derived weights (``|W|``) kept for models explained so far."""
    _ABS_WEIGHTS.clear()


@dataclass(frozen=True)
class LinearSpec:
    weight: torch.Tensor  # [out, in]
    bias: torch.Tensor | None  # [out]
    source: torch.Tensor | None = None  # the model's weight Parameter (key of the |W| cache)

    @classmethod
    def of(cls, module: torch.nn.Linear) -> LinearSpec:
        return cls(_view(module.weight), _view(module.bias), module.weight)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)

    @property
    def abs_weight(self) -> torch.Tensor:
        return self.weight.abs() if self.source is None else cached_abs(self.source)


@dataclass(frozen=True)
class NormSpec:
    """A LayerNorm over the last dimension, or an RMSNorm (``rms``: no centering, no bias; the weight is
    ``w + weight_offset``, Gemma's ``(1 + w)``; ``scale_in_float32``: a half-precision model multiplies by the weight
    before rounding back, as Gemma does)."""

    weight: torch.Tensor | None
    bias: torch.Tensor | None
    eps: float
    rms: bool = False
    weight_offset: float = 0.0
    scale_in_float32: bool = False

    @classmethod
    def of(cls, module: torch.nn.LayerNorm) -> NormSpec:
        return cls(_view(module.weight), _view(module.bias), float(module.eps))

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.rms:
            return rms_norm(x, self.weight, self.eps, self.weight_offset, self.scale_in_float32)
        return F.layer_norm(x, (x.shape[-1],), self.weight, self.bias, self.eps)


@dataclass(frozen=True)
class RotarySpec:
    """Rotary position embeddings on q and k: the inverse frequencies of the rotated width (``2·len(inv_freq) ≤ d``),
    and the models' amplitude factor (1 but for long-context scalings)."""

    inv_freq: torch.Tensor  # [r / 2]
    scaling: float = 1.0

    def cos_sin(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        return rotary_cos_sin(positions, self.inv_freq, self.scaling, dtype)


def _quick_gelu(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(1.702 * x)


ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "gelu": F.gelu,
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "quick_gelu": _quick_gelu,
    "relu": F.relu,
    "silu": F.silu,
    "tanh": torch.tanh,
    # CLIP's embedding normalization (a head layer): an identity for relevance, as LayerNorm
    "l2_normalize": lambda x: F.normalize(x, dim=-1),
}


@dataclass(frozen=True)
class BlockSpec:
    """One transformer block. Relevance passes unchanged through norms, activations, LayerScale and dropout.

    Decoder LLMs add: key/value heads shared by groups of query heads (``kv_heads``), per-head norms of q and k
    (``q_norm``, ``k_norm``, before the rotary embedding), the rotary embedding (``rope``), a sliding window, a gated
    MLP (``gate``: ``fc2(act(gate(h)) ⊙ fc1(h))``, or ``fused_gate_up``: ``fc1`` gives ``[gate; up]``), and norms
    on the two branches before the residual adds (Gemma's ``post_attn_norm``, ``post_mlp_norm``)."""

    pre_norm: bool  # ViT: x + f(LN(x)); BERT: LN(x + f(x))
    norm1: NormSpec
    norm2: NormSpec
    qkv: tuple[LinearSpec, ...]  # one fused [(H + 2·H_kv)·d, D] projection, or (q, k, v)
    num_heads: int
    head_dim: int
    scale: float
    proj: LinearSpec
    fc1: LinearSpec
    act: str
    fc2: LinearSpec
    ls1: torch.Tensor | None = None  # LayerScale gammas
    ls2: torch.Tensor | None = None
    # BERT-style additive padding mask inside the attention: the original code propagates relevance through
    # that add (its rule there is ≈ identity); other models mask without an add.
    mask_add: bool = False
    causal: bool = False  # a causal mask (CLIP's text tower, decoders): keys after the query are masked
    kv_heads: int | None = None  # GQA/MQA: key/value heads (None: as many as query heads)
    q_norm: NormSpec | None = None
    k_norm: NormSpec | None = None
    rope: RotarySpec | None = None
    window: int | None = None  # sliding window (with causal): a query sees its last `window` positions
    gate: LinearSpec | None = None
    fused_gate_up: bool = False
    post_attn_norm: NormSpec | None = None
    post_mlp_norm: NormSpec | None = None

    @property
    def fused_qkv(self) -> bool:
        return len(self.qkv) == 1

    @property
    def heads_kv(self) -> int:
        return self.num_heads if self.kv_heads is None else self.kv_heads

    @property
    def qkv_sizes(self) -> tuple[int, int, int]:
        """Widths of q, k, v in a fused projection's output."""
        return (self.num_heads * self.head_dim, self.heads_kv * self.head_dim, self.heads_kv * self.head_dim)

    @property
    def gated(self) -> bool:
        return self.gate is not None or self.fused_gate_up


# ("linear", LinearSpec) | ("act", name) | ("norm", NormSpec) | ("softcap", cap: tanh(x / cap)·cap, an activation)
# | ("lm_head", LinearSpec): a Linear over the vocabulary, whose relevance rule reads only the explained rows
HeadLayer = tuple[str, object]


@dataclass(frozen=True)
class HeadBranch:
    """Logits contribution ``weight · layers(tokens[:, token])``."""

    token: int
    layers: tuple[HeadLayer, ...]
    weight: float = 1.0


@dataclass
class Embedded:
    """What the embedding produced for one batch."""

    tokens: torch.Tensor  # [B, N, D], the encoder input
    key_mask: torch.Tensor | None  # [B, N] bool, True = real token (text padding)
    # Relevance of the encoder input → relevance of the model input (full LRP): vision returns pixels [B, H, W]
    # and tokens [B, P]; text returns tokens [B, N]. Arguments: (relevance [B, N, D], add_rule).
    to_input: Callable[..., tuple[torch.Tensor, torch.Tensor | None]] | None = None
    # The token the head reads, per sample (CLIP text: the EOS position), in place of the head branch's fixed
    # token; None: the branch's token (CLS). Set, the top block computes every row.
    pool_index: torch.Tensor | None = None
    # Decoders: each token's position (from the attention mask, so that a left-padded prompt gets the positions it
    # gets alone) for the rotary embedding, [B, N].
    positions: torch.Tensor | None = None
    # Explained rows that share a sample's forward (a continuation's tokens): the sample of each row, [R]; then
    # ``pool_index`` is [R] and the reverse sweep runs on R rows. None: one row per sample.
    row_sample: torch.Tensor | None = None
    # A modified gradient at the encoder input (AttnLRP, CP-LRP) → the relevance at the model's input as input ⊙
    # gradient: text returns tokens [B, N] (the word embeddings' relevance summed over the width) and None; vision
    # returns pixels [B, H, W] (summed over channels) and patch tokens [B, P] (the patch embedding's output).
    from_gradient: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor | None]] | None = None


def constant_scale_norm_grad(norm: NormSpec, x: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """The gradient at a norm's input with its scale held constant (AttnLRP's modified gradient through an embedding
    norm, e.g. BERT's embedding LayerNorm or CLIP's ln_pre)."""
    return layernorm_relevance(x, None, norm.weight, norm.bias, norm.eps, grad, None, rms=norm.rms,
                               weight_offset=norm.weight_offset, detach_scale=True, backend="torch")[0]


@dataclass
class EncoderSpec:
    family: str  # e.g. "timm.VisionTransformer"
    modality: Modality
    blocks: list[BlockSpec]
    final_norm: NormSpec | None
    head: tuple[HeadBranch, ...]
    num_classes: int
    num_prefix_tokens: int  # vision: CLS (+ distillation, registers) tokens before the patches
    embed: Callable[[object], Embedded]
    grid_size: tuple[int, int] | None = None
    image_size: tuple[int, int] | None = None
    max_tokens: int | None = None  # text: the longest input the position embeddings take
    language_model: bool = False  # a decoder's LM head: the classes are the vocabulary, read at chosen positions

    @property
    def depth(self) -> int:
        return len(self.blocks)
