// The gradient of one LayerNorm or RMSNorm row at its input, as __host__ __device__ code with no CUDA or ATen
// dependency, so that the host test (tests/host/layernorm_host.cpp, built by g++) runs the row program of
// csrc/layernorm_relevance.cu's first pass on the CPU against autograd.
//
// LayerNorm: x̂ = (z − μ)·r, r = 1/sqrt(mean((z − μ)²) + eps), g = dY ⊙ w,
//            dz = r·(g − x̂·mean(g ⊙ x̂) − mean(g));
// RMSNorm:   x̂ = z·r, r = 1/sqrt(mean(z²) + eps), g = dY ⊙ (w + offset) (offset 1 for Gemma's (1 + w), 0 for
//            Llama-style weights), dz = r·(g − x̂·mean(g ⊙ x̂)) = r·g − z·r³·mean(z ⊙ g).
// The relevance rules around the norm (identity, clone, normalized add) are the same for both.
#pragma once

#include <cmath>
#include <cstdint>

#if !defined(TLRP_HD)
#if defined(__CUDACC__)
#define TLRP_HD __host__ __device__ __forceinline__
#else
#define TLRP_HD inline
#endif
#endif

namespace tlrp {
namespace norm {

TLRP_HD float sqrt_of(float x) { return sqrtf(x); }
TLRP_HD double sqrt_of(double x) { return sqrt(x); }

// The gain at column j: the weight plus the offset, or 1 without a weight (no affine; the offset is unused then)
template <typename acc_t, typename w_t>
TLRP_HD acc_t gain(const w_t* weight, int64_t j, acc_t offset) {
  return weight != nullptr ? static_cast<acc_t>(weight[j]) + offset : acc_t(1);
}

// dz of one row, handed to store(j, dz). z(j) reads the norm's input and g(j) the gradient times the gain. The
// caller's element loop and row sum carry the thread layout: for_each(f) calls f(j) for the columns this thread
// owns, sum(x) returns the total over the row of every owner's x (a block reduction in the kernel, the identity in
// the single-threaded host test). rms must be uniform over the caller's threads (sum may synchronize them).
template <typename acc_t, typename Z, typename G, typename Store, typename ForEach, typename Sum>
TLRP_HD void input_grad_row(const Z& z, const G& g, const Store& store, int64_t dim, acc_t eps, bool rms,
                            const ForEach& for_each, const Sum& sum) {
  const acc_t n = static_cast<acc_t>(dim);
  acc_t mean = 0;  // RMSNorm does not center
  if (!rms) {
    acc_t s = 0;
    for_each([&](int64_t j) { s += z(j); });
    mean = sum(s) / n;
  }
  acc_t sq = 0;
  for_each([&](int64_t j) {
    const acc_t c = z(j) - mean;
    sq += c * c;
  });
  const acc_t rstd = acc_t(1) / sqrt_of(sum(sq) / n + eps);
  acc_t c_xhat = 0, c_one = 0;
  for_each([&](int64_t j) {
    const acc_t gj = g(j);
    c_xhat += gj * (z(j) - mean) * rstd;
    c_one += gj;
  });
  c_xhat = sum(c_xhat) / n;
  c_one = rms ? acc_t(0) : sum(c_one) / n;  // the mean's gradient: LayerNorm only
  for_each([&](int64_t j) { store(j, (g(j) - (z(j) - mean) * rstd * c_xhat - c_one) * rstd); });
}

}  // namespace norm
}  // namespace tlrp
