// LayerNorm (or RMSNorm) backward fused with the relevance rules next to it, in CUDA C++: the same two passes as
// triton_kernels/layernorm_lrp.py, for z = u + v feeding the norm (split case).
//
// Pass 1 (one block per row): the norm's statistics of z, dz = LN'(dY) (+ the residual gradient; the row program
// of norm_math.cuh, which the host test runs too; rms: RMSNorm with the gain weight + weight_offset), the
// relevance of z (R_LN, or clone(z; R_LN, R_res)), and the row's partial sums of u·S, v·S and R_z
// (S = safe_divide(R_z, z)) in double. The host adds a sample's rows and forms the normalized add's two factors.
// Pass 2 recomputes R_z, S and writes R_u, R_v. Statistics accumulate in float (double for double inputs).

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <optional>
#include <tuple>

#include "common.cuh"
#include "norm_math.cuh"

namespace tlrp {
namespace {

// R_z in double: R_LN, or z ⊙ safe_divide(R_LN + R_res, z) when z also feeds the residual
template <typename scalar_t>
__device__ __forceinline__ double relevance_z(const scalar_t* r_ln, const scalar_t* r_res, int64_t i, double z) {
  double r = load_double(r_ln, i);
  if (r_res != nullptr) r = z * safe_div(r + load_double(r_res, i), z);
  return r;
}

template <typename scalar_t>
__global__ void ln_relevance_pass1(const scalar_t* __restrict__ u, const scalar_t* __restrict__ v,
                                   const scalar_t* __restrict__ weight, const scalar_t* __restrict__ g_ln,
                                   const scalar_t* __restrict__ g_res, const scalar_t* __restrict__ r_ln,
                                   const scalar_t* __restrict__ r_res, scalar_t* __restrict__ dz,
                                   double* __restrict__ partial, int64_t dim, double ln_eps, bool rms,
                                   double weight_offset) {
  using acc_t = at::opmath_type<scalar_t>;
  __shared__ acc_t shared[kThreads];
  __shared__ double shared_d[kThreads];
  const int64_t base = static_cast<int64_t>(blockIdx.x) * dim;
  const acc_t offset = static_cast<acc_t>(weight_offset);
  auto z_at = [&](int64_t j) { return static_cast<acc_t>(u[base + j]) + static_cast<acc_t>(v[base + j]); };
  auto g_at = [&](int64_t j) { return static_cast<acc_t>(g_ln[base + j]) * norm::gain(weight, j, offset); };
  auto for_each = [&](const auto& f) {
    for (int64_t j = threadIdx.x; j < dim; j += blockDim.x) f(j);
  };
  auto row_sum = [&](acc_t x) { return block_sum(x, shared); };
  double su = 0.0, sv = 0.0, sr = 0.0;
  // with dz, the row's relevance of z and its partial sums of u·S, v·S and R_z (S = safe_divide(R_z, z))
  auto store = [&](int64_t j, acc_t grad) {
    const int64_t i = base + j;
    if (g_res != nullptr) grad += static_cast<acc_t>(g_res[i]);
    dz[i] = from_double<scalar_t>(static_cast<double>(grad));
    const double uu = load_double(u, i), vv = load_double(v, i), z = uu + vv;
    const double r = relevance_z(r_ln, r_res, i, z);
    const double s = safe_div(r, z);
    su += uu * s;
    sv += vv * s;
    sr += r;
  };
  norm::input_grad_row<acc_t>(z_at, g_at, store, dim, static_cast<acc_t>(ln_eps), rms, for_each, row_sum);
  su = block_sum(su, shared_d);
  sv = block_sum(sv, shared_d);
  sr = block_sum(sr, shared_d);
  if (threadIdx.x == 0) {
    partial[blockIdx.x * 3 + 0] = su;
    partial[blockIdx.x * 3 + 1] = sv;
    partial[blockIdx.x * 3 + 2] = sr;
  }
}

template <typename scalar_t>
__global__ void ln_relevance_pass2(const scalar_t* __restrict__ u, const scalar_t* __restrict__ v,
                                   const scalar_t* __restrict__ r_ln, const scalar_t* __restrict__ r_res,
                                   const double* __restrict__ factor_u, const double* __restrict__ factor_v,
                                   scalar_t* __restrict__ rel_u, scalar_t* __restrict__ rel_v, int64_t dim,
                                   int64_t rows_per_sample) {
  const int64_t row = blockIdx.x;
  const int64_t base = row * dim;
  const int64_t b = row / rows_per_sample;
  for (int64_t j = threadIdx.x; j < dim; j += blockDim.x) {
    const int64_t i = base + j;
    const double uu = load_double(u, i), vv = load_double(v, i), z = uu + vv;
    const double s = safe_div(relevance_z(r_ln, r_res, i, z), z);
    rel_u[i] = from_double<scalar_t>(uu * s * factor_u[b]);
    rel_v[i] = from_double<scalar_t>(vv * s * factor_v[b]);
  }
}

template <typename scalar_t>
const scalar_t* ptr_or_null(const std::optional<at::Tensor>& t) {
  return t.has_value() ? t->data_ptr<scalar_t>() : nullptr;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> layernorm_relevance_cuda(
    const at::Tensor& u, const at::Tensor& v, const std::optional<at::Tensor>& weight, double ln_eps,
    const at::Tensor& grad_norm_out, const at::Tensor& rel_norm_out, const std::optional<at::Tensor>& grad_residual,
    const std::optional<at::Tensor>& rel_residual, bool rms, double weight_offset) {
  const char* op = "tlrp::layernorm_relevance (cuda)";
  TORCH_CHECK(u.dim() >= 2, op, ": u must be [B, ..., D]");
  auto check = [&](const at::Tensor& t, const char* name) {
    TORCH_CHECK(t.is_cuda(), op, ": ", name, " must be a CUDA tensor");
    TORCH_CHECK(t.sizes() == u.sizes(), op, ": ", name, " must have u's shape ", u.sizes(), ", got ", t.sizes());
    TORCH_CHECK(t.scalar_type() == u.scalar_type(), op, ": ", name, " must have u's dtype");
  };
  check(u, "u");
  check(v, "v");
  check(grad_norm_out, "grad_norm_out");
  check(rel_norm_out, "rel_norm_out");
  if (grad_residual.has_value()) check(*grad_residual, "grad_residual");
  if (rel_residual.has_value()) check(*rel_residual, "rel_residual");
  const int64_t dim = u.size(-1);
  if (weight.has_value()) {
    TORCH_CHECK(weight->is_cuda() && weight->numel() == dim && weight->scalar_type() == u.scalar_type(), op,
                ": weight must be a CUDA tensor of D elements and u's dtype");
  }
  const c10::cuda::CUDAGuard guard(u.device());
  auto contiguous = [](const std::optional<at::Tensor>& t) -> std::optional<at::Tensor> {
    return t.has_value() ? std::optional<at::Tensor>(t->contiguous()) : std::nullopt;
  };
  const auto uc = u.contiguous(), vc = v.contiguous(), g = grad_norm_out.contiguous(), r = rel_norm_out.contiguous();
  const auto w = contiguous(weight), g_res = contiguous(grad_residual), r_res = contiguous(rel_residual);
  const int64_t batch = u.size(0), rows = u.numel() / dim;
  auto dz = at::empty_like(uc), rel_u = at::empty_like(uc), rel_v = at::empty_like(uc);
  if (rows == 0) return {dz, rel_u, rel_v};
  auto partial = at::empty({rows, 3}, uc.options().dtype(at::kDouble));
  const auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, uc.scalar_type(), "layernorm_relevance_pass1", [&] {
    ln_relevance_pass1<scalar_t><<<rows, kThreads, 0, stream>>>(
        uc.data_ptr<scalar_t>(), vc.data_ptr<scalar_t>(), ptr_or_null<scalar_t>(w), g.data_ptr<scalar_t>(),
        ptr_or_null<scalar_t>(g_res), r.data_ptr<scalar_t>(), ptr_or_null<scalar_t>(r_res),
        dz.data_ptr<scalar_t>(), partial.data_ptr<double>(), dim, ln_eps, rms, weight_offset);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  const auto factors = normalized_add_factors(partial.view({batch, rows / batch, 3}).sum(1));
  const at::Tensor& factor_u = factors.first;  // plain references: lambdas cannot capture bindings in C++17
  const at::Tensor& factor_v = factors.second;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, uc.scalar_type(), "layernorm_relevance_pass2", [&] {
    ln_relevance_pass2<scalar_t><<<rows, kThreads, 0, stream>>>(
        uc.data_ptr<scalar_t>(), vc.data_ptr<scalar_t>(), r.data_ptr<scalar_t>(), ptr_or_null<scalar_t>(r_res),
        factor_u.data_ptr<double>(), factor_v.data_ptr<double>(), rel_u.data_ptr<scalar_t>(),
        rel_v.data_ptr<scalar_t>(), dim, rows / batch);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {dz.view(u.sizes()), rel_u.view(u.sizes()), rel_v.view(u.sizes())};
}

}  // namespace tlrp
