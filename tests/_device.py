"""Where the kernel tests put their tensors: the GPU when there is one (the kernels compiled for it), else the CPU
(the Triton interpreter, which tests/conftest.py switches on)."""

import torch

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def on_device(obj):
    """A tensor, a module, or a dict of tensors (tokenizer output), moved to ``DEVICE``."""
    if isinstance(obj, dict):
        return {k: v.to(DEVICE) for k, v in obj.items()}
    return obj.to(DEVICE)


def skip_fp64_attention_on_gpu(dtype) -> None:
    """On a GPU, float64 attention is routed to the torch reference (``_backend.FP64_PRODUCTS``): an explicit
    ``backend="triton"`` refuses it, so the float64 cases of the attention kernel tests run on the CPU only."""
    import pytest

    from transformer_lrp._backend import FP64_PRODUCTS

    if DEVICE.type == "cuda" and dtype == torch.float64:
        pytest.skip(FP64_PRODUCTS)
