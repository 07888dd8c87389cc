// Normalized add (docs/method.md §2.8) in CUDA C++: the same two passes as triton_kernels/residual_lrp.py.
//
// Pass 1: grid (B, chunks); each block reduces one chunk of one sample to its partial sums of u·S, v·S and R
// (S = safe_divide(R, u + v)), in double, written to partial[b][chunk][0..2]. The host adds the chunks and forms
// the two per-sample factors with the reference's safe_divide. Pass 2 recomputes S and writes R_u and R_v.
// Includes only c10's CUDA headers (no cuBLAS), so it compiles on a machine with nvcc and no GPU.

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <tuple>

#include "common.cuh"

namespace tlrp {
namespace {

template <typename scalar_t>
__global__ void partial_sums_kernel(const scalar_t* __restrict__ r, const scalar_t* __restrict__ u,
                                    const scalar_t* __restrict__ v, double* __restrict__ partial,
                                    int64_t per_sample, int64_t chunk_len) {
  const int64_t b = blockIdx.x;  // the batch on x: y and z are limited to 65535
  const int64_t base = b * per_sample;
  const int64_t start = static_cast<int64_t>(blockIdx.y) * chunk_len;
  const int64_t end = start + chunk_len < per_sample ? start + chunk_len : per_sample;
  double su = 0.0, sv = 0.0, sr = 0.0;
  for (int64_t i = start + threadIdx.x; i < end; i += blockDim.x) {
    const double rr = load_double(r, base + i), uu = load_double(u, base + i), vv = load_double(v, base + i);
    const double s = safe_div(rr, uu + vv);
    su += uu * s;
    sv += vv * s;
    sr += rr;
  }
  __shared__ double shared[kThreads];
  su = block_sum(su, shared);
  sv = block_sum(sv, shared);
  sr = block_sum(sr, shared);
  if (threadIdx.x == 0) {
    double* out = partial + (b * gridDim.y + blockIdx.y) * 3;
    out[0] = su;
    out[1] = sv;
    out[2] = sr;
  }
}

template <typename scalar_t>
__global__ void scale_kernel(const scalar_t* __restrict__ r, const scalar_t* __restrict__ u,
                             const scalar_t* __restrict__ v, const double* __restrict__ factor_u,
                             const double* __restrict__ factor_v, scalar_t* __restrict__ r_u,
                             scalar_t* __restrict__ r_v, int64_t per_sample, int64_t total) {
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t b = i / per_sample;
    const double uu = load_double(u, i), vv = load_double(v, i);
    const double s = safe_div(load_double(r, i), uu + vv);
    r_u[i] = from_double<scalar_t>(uu * s * factor_u[b]);
    r_v[i] = from_double<scalar_t>(vv * s * factor_v[b]);
  }
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> normalized_add_cuda(const at::Tensor& relevance, const at::Tensor& u,
                                                       const at::Tensor& v) {
  TORCH_CHECK(relevance.is_cuda() && u.is_cuda() && v.is_cuda(),
              "tlrp::normalized_add (cuda): relevance, u and v must be CUDA tensors");
  TORCH_CHECK(u.sizes() == relevance.sizes() && v.sizes() == relevance.sizes(),
              "tlrp::normalized_add (cuda): relevance, u and v must have one shape, got ", relevance.sizes(), ", ",
              u.sizes(), ", ", v.sizes());
  TORCH_CHECK(u.scalar_type() == relevance.scalar_type() && v.scalar_type() == relevance.scalar_type(),
              "tlrp::normalized_add (cuda): relevance, u and v must have one dtype");
  TORCH_CHECK(relevance.dim() >= 1, "tlrp::normalized_add (cuda): needs a batch dimension");
  const c10::cuda::CUDAGuard guard(relevance.device());
  const auto r = relevance.contiguous(), uc = u.contiguous(), vc = v.contiguous();
  const int64_t batch = r.size(0);
  auto r_u = at::empty_like(r), r_v = at::empty_like(r);
  if (r.numel() == 0) return {r_u, r_v};
  const int64_t per_sample = r.numel() / batch;
  const int64_t chunks = std::min<int64_t>(1024, std::max<int64_t>(1, per_sample / (kThreads * 16)));
  const int64_t chunk_len = (per_sample + chunks - 1) / chunks;
  auto partial = at::empty({batch, chunks, 3}, r.options().dtype(at::kDouble));
  const auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, r.scalar_type(), "normalized_add_sums", [&] {
    partial_sums_kernel<scalar_t><<<dim3(batch, chunks), kThreads, 0, stream>>>(
        r.data_ptr<scalar_t>(), uc.data_ptr<scalar_t>(), vc.data_ptr<scalar_t>(), partial.data_ptr<double>(),
        per_sample, chunk_len);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  const auto factors = normalized_add_factors(partial.sum(1));  // sums: [B, 3]
  const at::Tensor& factor_u = factors.first;  // plain references: lambdas cannot capture bindings in C++17
  const at::Tensor& factor_v = factors.second;
  const int64_t n = r.numel();
  const int blocks = static_cast<int>(std::min<int64_t>((n + kThreads - 1) / kThreads, 65535));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, r.scalar_type(), "normalized_add_scale", [&] {
    scale_kernel<scalar_t><<<blocks, kThreads, 0, stream>>>(
        r.data_ptr<scalar_t>(), uc.data_ptr<scalar_t>(), vc.data_ptr<scalar_t>(), factor_u.data_ptr<double>(),
        factor_v.data_ptr<double>(), r_u.data_ptr<scalar_t>(), r_v.data_ptr<scalar_t>(), per_sample, n);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {r_u.view(relevance.sizes()), r_v.view(relevance.sizes())};
}

}  // namespace tlrp
