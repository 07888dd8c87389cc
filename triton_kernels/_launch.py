"""Kernel launches with tile candidates: one fixed candidate under the interpreter and in tests, ``triton.autotune``
over all of them on a GPU, and a recording of every launch for the ahead-of-time compile check
(``transformer_lrp._target.record_launches``, ``bench/compile_check.py``).

Each launcher states, per launch, the candidates it allows (tiles, warps, stages). The first is the default: it
runs under the interpreter, with ``TLRP_AUTOTUNE=0``, and wherever there is nothing to choose. Every candidate of
every launch the sweep can make is compiled for sm_80 and sm_90a by the compile check, which fails on a compile
error, on shared memory beyond the arch's limit, or on a register spill in a hot kernel, so the autotuner can
only pick configurations known to build cleanly.

The autotuner is this module's own (not ``triton.autotune``): it keys each choice on the kernel, its flags, the
argument dtypes, the device and the launch's size arguments *rounded up to a power of two*, so a batch of texts
padded to a new length reuses the choice made for its size class instead of re-timing every candidate. Every
launch runs under a device guard of its tensors' GPU, so a model on ``cuda:1`` launches there whatever the
current device is.
"""

from __future__ import annotations

import contextlib
import contextvars
import os
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import NamedTuple

import torch
import triton

from transformer_lrp._target import interpreting, recording


class Candidate(NamedTuple):
    """One configuration of a launch: tile constexprs (``(name, value)`` pairs), warps, pipeline stages and, where
    given, a register budget per thread (PTX ``.maxnreg``). Without a budget ptxas picks one itself, aiming at an
    occupancy, and then spills a few bytes rather than miss it; given one, it allocates within it without spilling
    where the same count fits (bench/compile_check.py measured both)."""

    tiles: tuple[tuple[str, int], ...]
    num_warps: int = 4
    num_stages: int = 1
    maxnreg: int | None = None

    @property
    def options(self) -> dict[str, int]:
        """The launch options Triton takes beside the constexprs."""
        opts = dict(num_warps=self.num_warps, num_stages=self.num_stages)
        if self.maxnreg is not None:
            opts["maxnreg"] = self.maxnreg
        return opts

    @property
    def meta(self) -> dict[str, int]:
        return dict(self.tiles)

    @property
    def label(self) -> str:
        return "x".join(str(v) for _, v in self.tiles) or "-"


def register_budget(num_warps: int) -> int:
    """A register budget per thread of one CTA's share of an SM's 65,536 registers (255 at most). Without a budget
    ptxas aims a kernel at an occupancy of its own (2–5 CTAs per SM) and spills 4–40 B to reach it (seen at 48 to 128
    registers in the attention kernels and the LayerNorm pass, under Triton 3.8 and 3.6 alike); with one it
    allocates within the budget, and every hot configuration of the compile check builds spill-free under both."""
    return min(255, 65536 // (32 * num_warps))


def candidate(num_warps: int = 4, num_stages: int = 1, maxnreg: int | None = None, **tiles: int) -> Candidate:
    return Candidate(tuple(tiles.items()), num_warps, num_stages, maxnreg)


@dataclass
class Launch:
    """A kernel launch as the launcher meant it: everything but the tile choice is fixed."""

    kernel: triton.runtime.JITFunction
    grid: Callable[[dict], tuple[int, ...]]  # of the constexprs, tiles included
    args: tuple  # positional runtime arguments, in the kernel's order
    constexprs: dict  # the fixed compile-time arguments (flags, dtypes, BLOCK_D, ...)
    candidates: tuple[Candidate, ...]
    tune_key: tuple[str, ...]  # runtime size arguments the autotuner keys on (with the flags and the dtypes)
    reset: tuple[str, ...] = ()  # outputs accumulated atomically: zeroed before each timing run

    @property
    def name(self) -> str:
        return self.kernel.fn.__name__

    def run(self, cand: Candidate) -> None:
        meta = {**self.constexprs, **cand.meta}
        self.kernel[self.grid(meta)](*self.args, **meta, **cand.options)


_FORCED: contextvars.ContextVar[dict[str, Candidate] | None] = contextvars.ContextVar("tlrp_forced", default=None)


@contextlib.contextmanager
def force_candidate(kernel_name: str, cand: Candidate):
    """Run every launch of ``kernel_name`` with ``cand`` instead of the launcher's choice (tests: each candidate
    the autotuner may pick, run under the interpreter)."""
    token = _FORCED.set({**(_FORCED.get() or {}), kernel_name: cand})
    try:
        yield
    finally:
        _FORCED.reset(token)


def autotune_enabled() -> bool:
    return os.environ.get("TLRP_AUTOTUNE", "1") not in ("", "0")


def _cuda_device(args: tuple) -> torch.device | None:
    """The GPU of the launch's tensors (the first CUDA tensor argument), or ``None``."""
    for a in args:
        if isinstance(a, torch.Tensor) and a.is_cuda:
            return a.device
    return None


def launch(
    kernel: triton.runtime.JITFunction,
    grid: Callable[[dict], tuple[int, ...]],
    args: tuple,
    constexprs: dict,
    candidates: tuple[Candidate, ...] | list[Candidate],
    tune_key: tuple[str, ...] = (),
    reset: tuple[str, ...] = (),
) -> None:
    """Run (or record) one launch; see the module docstring for which candidate runs."""
    job = Launch(kernel, grid, tuple(args), constexprs, tuple(candidates), tuple(tune_key), tuple(reset))
    rec = recording()
    if rec is not None:
        rec.launches.append(job)
        if not rec.execute:
            return
    device = _cuda_device(job.args)
    guard = torch.cuda.device(device) if device is not None else contextlib.nullcontext()
    with guard:
        forced = (_FORCED.get() or {}).get(job.name)
        if forced is not None:
            job.run(forced)
        elif interpreting() or len(job.candidates) == 1 or not autotune_enabled():
            job.run(job.candidates[0])
        else:
            job.run(_tuned(job, device))


# (kernel, flags, dtypes, device, bucketed sizes, candidates) → the fastest candidate
_TUNED: dict[tuple, Candidate] = {}


def size_class(n: int) -> int:
    """A size argument as the autotuner sees it: rounded up to a power of two."""
    return triton.next_power_of_2(max(1, int(n)))


def autotune_key(job: Launch, device: torch.device | None) -> tuple:
    names = job.kernel.arg_names
    sizes = tuple((name, size_class(job.args[names.index(name)])) for name in job.tune_key)
    dtypes = tuple(str(a.dtype) for a in job.args if isinstance(a, torch.Tensor))
    flags = tuple(sorted((k, str(v)) for k, v in job.constexprs.items()))
    return job.name, flags, dtypes, str(device), sizes, job.candidates


def _tuned(job: Launch, device: torch.device | None) -> Candidate:
    key = autotune_key(job, device)
    best = _TUNED.get(key)
    if best is None:
        best = _TUNED[key] = _time_candidates(job)
    return best


def _time_candidates(job: Launch) -> Candidate:
    """Times each candidate on this launch's own arguments (outputs accumulated atomically are zeroed before each
    run and again after) and returns the fastest. A candidate that fails to build or run is skipped."""
    from triton.testing import do_bench

    names = job.kernel.arg_names
    zeroed = [job.args[names.index(n)] for n in job.reset]

    def run(cand):
        for t in zeroed:
            t.zero_()
        job.run(cand)

    times = {}
    for cand in job.candidates:
        try:
            times[cand] = do_bench(partial(run, cand), warmup=5, rep=20)
        except Exception:  # noqa: BLE001 — e.g. out of shared memory on this GPU: not a choice here
            continue
    for t in zeroed:
        t.zero_()
    if not times:
        return job.candidates[0]
    return min(times, key=times.get)
