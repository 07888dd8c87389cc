// Helpers shared by the CUDA C++ relevance ops: the reference's safe_divide (docs/method.md §2.2) on the device and on
// the host, exact conversions between the storage dtypes and double, and a block-wide sum.
#pragma once

#include <ATen/ATen.h>

namespace tlrp {

constexpr double kEps = 1e-9;  // the reference's denominator offset
constexpr int kThreads = 256;

// safe_divide of the reference: a / (b + eps), eps where that sum is 0, and 0 where b == 0
__device__ __forceinline__ double safe_div(double a, double b) {
  if (b == 0.0) return 0.0;
  double den = b + kEps;
  if (den == 0.0) den = kEps;
  return a / den;
}

template <typename T>
__device__ __forceinline__ T from_double(double x) {
  return static_cast<T>(x);
}
template <>
__device__ __forceinline__ c10::Half from_double<c10::Half>(double x) {
  return c10::Half(static_cast<float>(x));
}
template <>
__device__ __forceinline__ c10::BFloat16 from_double<c10::BFloat16>(double x) {
  return c10::BFloat16(static_cast<float>(x));
}

// half types widen through float; double stays exact
template <typename scalar_t>
__device__ __forceinline__ double load_double(const scalar_t* p, int64_t i) {
  return static_cast<double>(static_cast<float>(p[i]));
}
template <>
__device__ __forceinline__ double load_double<double>(const double* p, int64_t i) {
  return p[i];
}

// Sum of one value per thread over a block of kThreads threads; every thread gets the total.
template <typename acc_t>
__device__ __forceinline__ acc_t block_sum(acc_t value, acc_t* shared) {
  shared[threadIdx.x] = value;
  __syncthreads();
  for (int stride = kThreads / 2; stride > 0; stride >>= 1) {
    if (threadIdx.x < stride) shared[threadIdx.x] += shared[threadIdx.x + stride];
    __syncthreads();
  }
  const acc_t total = shared[0];
  __syncthreads();  // shared is reused by the next call
  return total;
}

// safe_divide on tensors (the per-sample factors), as transformer_lrp.ops.common.safe_divide
inline at::Tensor safe_divide(const at::Tensor& a, const at::Tensor& b) {
  auto den = b + kEps;
  den = at::where(den == 0, at::full_like(den, kEps), den);
  return at::where(b == 0, at::zeros_like(a), a / den);
}

// The normalized add's per-sample factors f_b / s_b from the raw z-rule totals (docs/method.md §2.8); sums: [B, 3]
// double
inline std::pair<at::Tensor, at::Tensor> normalized_add_factors(const at::Tensor& sums) {
  const auto s_u = sums.select(1, 0), s_v = sums.select(1, 1), s = sums.select(1, 2);
  const auto total = s_u.abs() + s_v.abs();
  return {safe_divide(safe_divide(s_u.abs(), total) * s, s_u).contiguous(),
          safe_divide(safe_divide(s_v.abs(), total) * s, s_v).contiguous()};
}

}  // namespace tlrp
