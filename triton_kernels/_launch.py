"""Kernel launches with tile candidates: one fixed candidate under the interpreter and in tests, ``triton.autotune``
over all of them on a GPU, and a recording of every launch for the ahead-of-time compile check
(``transformer_lrp._target.record_launches``, ``bench/compile_check.py``).

Each launcher states, per launch, the candidates it allows (tiles, warps, stages). The first is the default: it
runs under the interpreter, with ``TLRP_AUTOTUNE=0``, and wherever there is nothing to choose. Every candidate of
every launch the sweep can make is compiled for sm_80 and sm_90a by the compile check, which fails on a compile
error, on shared memory beyond the arch's limit, or on a register spill in a hot kernel, so the autotuner can
only pick configurations known to build cleanly.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import triton

from transformer_lrp._target import interpreting, recording


class Candidate(NamedTuple):
    """One configuration of a launch: tile constexprs (``(name, value)`` pairs), warps and pipeline stages."""

    tiles: tuple[tuple[str, int], ...]
    num_warps: int = 4
    num_stages: int = 1

    @property
    def meta(self) -> dict[str, int]:
        return dict(self.tiles)

    @property
    def label(self) -> str:
        return "x".join(str(v) for _, v in self.tiles) or "-"


def candidate(num_warps: int = 4, num_stages: int = 1, **tiles: int) -> Candidate:
    return Candidate(tuple(tiles.items()), num_warps, num_stages)


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
        self.kernel[self.grid(meta)](*self.args, **meta, num_warps=cand.num_warps, num_stages=cand.num_stages)


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
    job = Launch(kernel, grid, tuple(args), dict(constexprs), tuple(candidates), tuple(tune_key), tuple(reset))
    rec = recording()
    if rec is not None:
        rec.launches.append(job)
        if not rec.execute:
            return
    forced = (_FORCED.get() or {}).get(job.name)
    if forced is not None:
        job.run(forced)
    elif interpreting() or len(job.candidates) == 1 or not autotune_enabled():
        job.run(job.candidates[0])
    else:
        tuned = _autotuner(kernel, job.candidates, job.tune_key + tuple(job.constexprs), job.reset)
        tuned[grid](*job.args, **job.constexprs)


@functools.cache
def _autotuner(kernel, candidates: tuple[Candidate, ...], key: tuple[str, ...], reset: tuple[str, ...]):
    # Built on first use on a GPU (no device query at import or in a decorator). Triton keys its cache on the
    # named arguments and the dtypes of the tensor arguments.
    configs = [triton.Config(c.meta, num_warps=c.num_warps, num_stages=c.num_stages) for c in candidates]
    return triton.autotune(configs=configs, key=list(key), reset_to_zero=list(reset) or None)(kernel)
