"""transformer-lrp: class-specific explanations of transformer classifiers (Chefer, Gur & Wolf, CVPR 2021),
batched, on stock timm and transformers models, with the paper's baselines."""

import importlib.util as _importlib_util
import sys as _sys
from pathlib import Path as _Path


def _kernels_of_source_tree() -> None:
    """Make ``transformer_lrp.triton_kernels`` the checkout's top-level ``triton_kernels/`` folder when the package is
    imported from a source tree (``PYTHONPATH=.``, or an install whose CUDA build failed): setup.py maps that folder
    into the package only when it installs, and a bare GPU machine may run the tree uninstalled."""
    name = __name__ + ".triton_kernels"
    folder = _Path(__file__).resolve().parent.parent / "triton_kernels"
    if name in _sys.modules or not (folder / "attention_lrp.py").is_file():
        return
    spec = _importlib_util.spec_from_file_location(name, folder / "__init__.py",
                                                   submodule_search_locations=[str(folder)])
    module = _importlib_util.module_from_spec(spec)
    _sys.modules[name] = module
    spec.loader.exec_module(module)


_kernels_of_source_tree()

# imported after the kernels' folder is mapped (above), which some of these modules reach
from transformer_lrp.adapters import SUPPORTED, build_encoder  # noqa: E402
from transformer_lrp.adapters.spec import clear_cache  # noqa: E402
from transformer_lrp.api import explain, explain_generation  # noqa: E402
from transformer_lrp.conservation import Conservation, ConservationWarning  # noqa: E402
from transformer_lrp.errors import InputError, UnsupportedModelError  # noqa: E402
from transformer_lrp.explanation import ClipExplanation, Explanation, GenerationExplanation  # noqa: E402
from transformer_lrp.methods import METHODS  # noqa: E402
from transformer_lrp.targets import Continuation, Contrast  # noqa: E402

__version__ = "0.1.0"

__all__ = [
    "METHODS",
    "SUPPORTED",
    "ClipExplanation",
    "Contrast",
    "Continuation",
    "Conservation",
    "ConservationWarning",
    "Explanation",
    "GenerationExplanation",
    "InputError",
    "UnsupportedModelError",
    "build_encoder",
    "clear_cache",
    "explain",
    "explain_generation",
    "__version__",
]
