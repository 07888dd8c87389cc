"""Where the kernel tests put their tensors: the GPU when there is one (the kernels compiled for it), else the CPU
(the Triton interpreter, which tests/conftest.py switches on)."""

import torch

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def on_device(obj):
    """A tensor, a module, or a dict of tensors (tokenizer output), moved to ``DEVICE``."""
    if isinstance(obj, dict):
        return {k: v.to(DEVICE) for k, v in obj.items()}
    return obj.to(DEVICE)
