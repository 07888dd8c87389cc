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
    """A LayerNorm over the last dimension."""

    weight: torch.Tensor | None
    bias: torch.Tensor | None
    eps: float

    @classmethod
    def of(cls, module: torch.nn.LayerNorm) -> NormSpec:
        return cls(_view(module.weight), _view(module.bias), float(module.eps))

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, (x.shape[-1],), self.weight, self.bias, self.eps)


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
    """One transformer block. Relevance passes unchanged through norms, activations, LayerScale and dropout."""

    pre_norm: bool  # ViT: x + f(LN(x)); BERT: LN(x + f(x))
    norm1: NormSpec
    norm2: NormSpec
    qkv: tuple[LinearSpec, ...]  # one fused [3D, D] projection, or (q, k, v)
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
    causal: bool = False  # a causal mask (CLIP's text tower): keys after the query are masked

    @property
    def fused_qkv(self) -> bool:
        return len(self.qkv) == 1


HeadLayer = tuple[str, object]  # ("linear", LinearSpec) | ("act", name) | ("norm", NormSpec)


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

    @property
    def depth(self) -> int:
        return len(self.blocks)
