"""Where the Triton kernels will run: a GPU, the interpreter (``TRITON_INTERPRET=1``), or a compile target whose
launches are only recorded (``bench/compile_check.py``). A leaf module: it imports neither triton nor the
kernels, so the dispatch (``_backend``) and the launchers (``triton_kernels/_launch.py``) can both ask it.

Recording: inside ``record_launches(arch, tf32)`` the launchers take ``meta`` tensors for CUDA tensors of a GPU of
compute capability ``arch`` (80 for A100, 90 for H100) and append every kernel launch, with all the tile
candidates it could autotune over, to the recording instead of running it. The sweep above them runs unchanged on
those meta tensors, so what is compiled ahead of time is exactly what a GPU would be sent.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import os
from dataclasses import dataclass, field

import torch


def interpreting() -> bool:
    """``TRITON_INTERPRET=1``: kernels run on the CPU under Triton's interpreter."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@dataclass
class Recording:
    arch: int  # compute capability as 10·major + minor
    tf32: bool  # float32 products on tensor cores (torch's allow_tf32), else IEEE FMA
    execute: bool  # also run each launch (interpreter tests); else record only
    launches: list = field(default_factory=list)


_RECORDING: contextvars.ContextVar[Recording | None] = contextvars.ContextVar("tlrp_recording", default=None)


def recording() -> Recording | None:
    return _RECORDING.get()


@contextlib.contextmanager
def record_launches(arch: int = 90, tf32: bool = False, execute: bool = False):
    """Collect the kernel launches made inside the block (``Recording.launches``); see the module docstring."""
    rec = Recording(arch, tf32, execute)
    token = _RECORDING.set(rec)
    try:
        yield rec
    finally:
        _RECORDING.reset(token)


def stands_for_gpu(t: torch.Tensor) -> bool:
    """A CUDA tensor, or a meta tensor while launches are recorded."""
    return t.is_cuda or (t.is_meta and recording() is not None)


@functools.cache
def _capability(index: int) -> int:
    major, minor = torch.cuda.get_device_capability(index)
    return 10 * major + minor


def device_arch(device: torch.device) -> int:
    """The compute capability the launch is for (the recording's target, else the device's; 0 on the CPU)."""
    rec = recording()
    if rec is not None:
        return rec.arch
    if device.type != "cuda":
        return 0
    return _capability(device.index if device.index is not None else torch.cuda.current_device())


def tf32_products(t: torch.Tensor) -> bool:
    """float32 products on tensor cores: torch's ``allow_tf32`` for CUDA tensors, the recording's choice for meta."""
    if t.dtype != torch.float32:
        return False
    rec = recording()
    if rec is not None and t.is_meta:
        return rec.tf32
    return t.is_cuda and torch.backends.cuda.matmul.allow_tf32
