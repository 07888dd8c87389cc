"""Triton kernels and their launchers (no autograd, no dispatch), installed as ``transformer_lrp.triton_kernels``
(the top-level name ``triton_kernels`` belongs to triton-lang). Import lazily: decorating a kernel fixes whether it
runs compiled or under ``TRITON_INTERPRET=1``."""
