// Host harness of the CUDA C++ LayerNorm/RMSNorm gradient (csrc/norm_math.cuh), built by g++ in CI
// (tests/test_cuda_attention_host.py) and called through ctypes: the row program of
// csrc/layernorm_relevance.cu's first pass with one thread per row, so its element loop is a plain loop and its
// row sum (a block reduction in the kernel) the identity. z = u + v, as the kernel forms it.

#include <cstdint>

#include "../../csrc/norm_math.cuh"

namespace {

template <typename T>
void input_grad(const T* u, const T* v, const T* weight, const T* grad, const T* grad_residual, T* dz, int64_t rows,
                int64_t dim, T eps, bool rms, T weight_offset) {
  for (int64_t row = 0; row < rows; ++row) {
    const int64_t base = row * dim;
    auto z = [&](int64_t j) { return u[base + j] + v[base + j]; };
    auto g = [&](int64_t j) { return grad[base + j] * tlrp::norm::gain(weight, j, weight_offset); };
    auto store = [&](int64_t j, T value) {
      dz[base + j] = grad_residual ? value + grad_residual[base + j] : value;
    };
    auto for_each = [&](const auto& f) {
      for (int64_t j = 0; j < dim; ++j) f(j);
    };
    auto row_sum = [](T x) { return x; };
    tlrp::norm::input_grad_row<T>(z, g, store, dim, eps, rms, for_each, row_sum);
  }
}

}  // namespace

// weight, grad_residual: null when absent
#define TLRP_HOST_NORM_ENTRY_POINT(T, SUFFIX)                                                                      \
  extern "C" void tlrp_host_norm_grad_##SUFFIX(const T* u, const T* v, const T* weight, const T* grad,             \
                                                const T* grad_residual, T* dz, int64_t rows, int64_t dim, T eps,   \
                                                int64_t rms, T weight_offset) {                                    \
    input_grad<T>(u, v, weight, grad, grad_residual, dz, rows, dim, eps, rms != 0, weight_offset);                \
  }

TLRP_HOST_NORM_ENTRY_POINT(double, f64)
TLRP_HOST_NORM_ENTRY_POINT(float, f32)
