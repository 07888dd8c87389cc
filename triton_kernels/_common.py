"""Device helpers shared by the kernels."""

import triton
import triton.language as tl

from transformer_lrp._numerics import EPS

EPS_C = tl.constexpr(EPS)  # the reference's denominator offset, a compile-time constant
EPS2_C = tl.constexpr(2 * EPS)


@triton.jit
def eps_like(x, value: tl.constexpr):
    # a constant of x's dtype, exact in float64 (a bare float literal can become a float32 constant first)
    return tl.full([], value, x.dtype)


@triton.jit
def safe_div_ref(a, b):
    # safe_divide with the reference's eps
    return safe_div(a, b, eps_like(b, EPS_C))


@triton.jit
def safe_div(a, b, eps):
    # safe_divide of the reference (docs/method.md §2.2): a / (b + eps), eps where that sum is 0, and 0 where b == 0
    den = b + eps
    den = tl.where(den == 0.0, eps, den)
    return tl.where(b == 0.0, 0.0, a / den)


@triton.jit
def to_f64(x):
    # via float32: a direct half → float64 conversion is not supported everywhere (the interpreter, some targets)
    if x.dtype != tl.float64:
        x = x.to(tl.float32).to(tl.float64)
    return x


@triton.jit
def from_f64(x, dtype: tl.constexpr):
    # float64 → the output dtype, through float32 when that is a half type (see ``to_f64``)
    if dtype != tl.float64:
        x = x.to(tl.float32).to(dtype)
    return x
