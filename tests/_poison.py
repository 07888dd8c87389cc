"""Output buffers poisoned with NaN: a kernel that leaves any element unwritten fails its test."""

import contextlib

import torch


@contextlib.contextmanager
def nan_buffers(monkeypatch):
    real_empty, real_empty_like = torch.empty, torch.empty_like

    def empty(*args, **kw):
        t = real_empty(*args, **kw)
        return t.fill_(float("nan")) if t.is_floating_point() else t

    def empty_like(t, **kw):
        out = real_empty_like(t, **kw)
        return out.fill_(float("nan")) if out.is_floating_point() else out

    real_new_empty = torch.Tensor.new_empty

    def new_empty(self, *args, **kw):
        out = real_new_empty(self, *args, **kw)
        return out.fill_(float("nan")) if out.is_floating_point() else out

    monkeypatch.setattr(torch, "empty", empty)
    monkeypatch.setattr(torch, "empty_like", empty_like)
    monkeypatch.setattr(torch.Tensor, "new_empty", new_empty)
    try:
        yield
    finally:
        monkeypatch.undo()
