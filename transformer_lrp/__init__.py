"""transformer-lrp: class-specific explanations of transformer classifiers (Chefer, Gur & Wolf, CVPR 2021),
batched, on stock timm and transformers models, with the paper's baselines."""

from transformer_lrp.adapters import SUPPORTED, build_encoder
from transformer_lrp.adapters.spec import clear_cache
from transformer_lrp.api import explain
from transformer_lrp.errors import InputError, UnsupportedModelError
from transformer_lrp.explanation import ClipExplanation, Explanation
from transformer_lrp.methods import METHODS

__version__ = "0.1.0"

__all__ = [
    "METHODS",
    "SUPPORTED",
    "ClipExplanation",
    "Explanation",
    "InputError",
    "UnsupportedModelError",
    "build_encoder",
    "clear_cache",
    "explain",
    "__version__",
]
