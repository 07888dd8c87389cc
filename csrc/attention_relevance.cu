// Softmax attention with its relevance backward in CUDA C++ (the contract of transformer_lrp.ops.attention_forward,
// attention_relevance and attention_weighted_map; the Triton kernels of triton_kernels/attention_lrp.py are the
// other implementation). Flash-style: no [B, H, NQ, NK] tensor is written; each kernel recomputes
// P = exp(sc − lse) for the pairs it visits.
//
// Thread layout: one warp per row (a query row in the forward and the query-side backward, a key row in the
// key-side backward); each lane holds DPL = ceil(d/32) of the row's d entries (2, 4 or 8: head dims up to 256), so a
// dot product is DPL FMAs and a five-step warp shuffle, and the accumulators of a row (at most four vectors, 4·DPL
// registers) stay in registers. The rows that every warp of a block reads (the other side's K/V or Q/dO/hS tiles)
// are staged in shared memory in the accumulation dtype. The products are FMAs in float32 (float64 for float64),
// not tensor cores: this op is the independent second implementation and the torch.library entry point; the Triton
// kernels are the fast path. The per-pair math and the ranges of rows a block visits live in attention_math.cuh,
// which the host test runs on the CPU.
//
// Decoder attention: K and V may have H_kv heads shared by groups of H / H_kv query heads (GQA/MQA; query head h
// reads key head h / group, nothing is repeated in memory); the key-side warp of a key row loops over its group's
// query heads, so dK, dV, R_K, R_V come out summed per key head, shaped like K. The causal mask may carry a sliding
// window. What a block cannot attend as a whole is never visited: padding before a sample's first real key and after
// its last, keys after the block's last query (causal), keys behind the window, and in the key-side backward the
// query rows before the first that can see a key of the block. A query row that attends no key (left padding under
// the causal mask) gets O = 0 and lse = 1e30. The GradCAM map visits every pair: its masked zeros count in the min.
//
// Includes only c10's CUDA headers (no cuBLAS), so it compiles on a machine with nvcc and no GPU.

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <optional>
#include <tuple>

#include "attention_math.cuh"
#include "common.cuh"

namespace tlrp {
namespace {

using attn::kRowsPerBlock;
using attn::PairFlags;
using attn::PairTerms;
using attn::Span;

constexpr int kWarpSize = 32;
constexpr int kBlockThreads = kRowsPerBlock * kWarpSize;
// Every kernel is launched with __launch_bounds__(kBlockThreads, 1): without the minimum of one block per SM, ptxas
// traded registers for occupancy and spilled 12 bytes in the half-precision query-side backward on sm_90.

// Rows staged per shared-memory tile: 16 (float accumulation) or 8 (double) rows of up to 128 entries, half as many
// of 256, per staged tensor keeps the largest kernel (three staged tensors) at 24 KB of static shared memory.
template <typename acc_t, int DPL>
constexpr int tile_rows() {
  return (sizeof(acc_t) == 8 ? 8 : 16) / (DPL > 4 ? DPL / 4 : 1);
}

template <typename acc_t>
__device__ __forceinline__ acc_t warp_sum(acc_t x) {
#pragma unroll
  for (int offset = kWarpSize / 2; offset > 0; offset >>= 1) x += __shfl_xor_sync(0xffffffffu, x, offset);
  return x;
}

template <typename acc_t, int DPL>
__device__ __forceinline__ acc_t row_dot(const acc_t (&a)[DPL], const acc_t* b, int lane) {
  acc_t s = 0;
#pragma unroll
  for (int u = 0; u < DPL; ++u) s += a[u] * b[lane + u * kWarpSize];
  return warp_sum(s);
}

// A [B, H, N, d] tensor with a contiguous last dimension, as raw pointer and strides.
template <typename T>
struct Rows {
  const T* ptr;
  int64_t sb, sh, sn;
  __device__ __forceinline__ const T* row(int64_t b, int64_t h, int64_t n) const { return ptr + b * sb + h * sh + n * sn; }
};

template <typename T>
Rows<T> rows_of(const at::Tensor& t) {
  return {t.data_ptr<T>(), t.stride(0), t.stride(1), t.stride(2)};
}

// Lane's entries of one row (zeros past d).
template <typename acc_t, int DPL, typename T>
__device__ __forceinline__ void load_row(acc_t (&dst)[DPL], const T* src, int d, int lane, bool in_range) {
#pragma unroll
  for (int u = 0; u < DPL; ++u) {
    const int c = lane + u * kWarpSize;
    dst[u] = (in_range && c < d) ? static_cast<acc_t>(src[c]) : acc_t(0);
  }
}

// Stages rows [start, start + tile) of head h of up to three [B, H, N, d] tensors into shared memory (zeros from
// row `end` and past d).
template <typename acc_t, int DPL, typename T, typename U>
__device__ __forceinline__ void stage(acc_t* s0, acc_t* s1, acc_t* s2, const Rows<T>& t0, const Rows<T>& t1,
                                      const Rows<U>& t2, bool has1, bool has2, int64_t b, int64_t h, int64_t start,
                                      int64_t end, int d) {
  constexpr int width = DPL * kWarpSize, tile = tile_rows<acc_t, DPL>();
  for (int idx = threadIdx.x; idx < tile * width; idx += blockDim.x) {
    const int r = idx / width, c = idx % width;
    const int64_t row = start + r;
    const bool in = row < end && c < d;
    s0[idx] = in ? static_cast<acc_t>(t0.row(b, h, row)[c]) : acc_t(0);
    if (has1) s1[idx] = in ? static_cast<acc_t>(t1.row(b, h, row)[c]) : acc_t(0);
    if (has2) s2[idx] = in ? static_cast<acc_t>(t2.row(b, h, row)[c]) : acc_t(0);
  }
}

// Which pairs attend: the padding mask, each sample's range of real keys (what the kernels skip around) and the
// causal mask with its sliding window.
struct Masking {
  const bool* keep;      // [B, NK] or null
  const int64_t* range;  // [B, 2]: the first real key and one past the last; null without a padding mask
  int64_t nk;
  bool causal;
  int64_t window;        // 0: none

  __device__ __forceinline__ int64_t first(int64_t b) const { return range ? range[2 * b] : 0; }
  __device__ __forceinline__ int64_t end(int64_t b) const { return range ? range[2 * b + 1] : nk; }
  __device__ __forceinline__ bool real_key(int64_t b, int64_t j) const {
    return j < nk && (keep == nullptr || keep[b * nk + j]);
  }
  __device__ __forceinline__ bool attends(int64_t b, int64_t i, int64_t j) const {
    return real_key(b, j) && attn::in_band(causal, window, i, j);
  }
  // the keys that the block of query rows starting at i0 visits
  __device__ __forceinline__ Span keys_of_block(int64_t b, int64_t i0, int64_t nq) const {
    return attn::key_span(i0, i0 + kRowsPerBlock < nq ? i0 + kRowsPerBlock : nq, first(b), end(b), causal, window);
  }
  // the query rows that the block of key rows starting at j0 visits
  __device__ __forceinline__ Span queries_of_block(int64_t b, int64_t j0, int64_t nq) const {
    return attn::query_span(j0, j0 + kRowsPerBlock < nk ? j0 + kRowsPerBlock : nk, nq, first(b), end(b), causal,
                            window);
  }
};

// ------------------------------------------------------------------------------------------------- forward

template <typename scalar_t, int DPL>
__global__ void __launch_bounds__(kBlockThreads, 1)
attention_forward_kernel(Rows<scalar_t> q, Rows<scalar_t> k, Rows<scalar_t> v, Masking mask,
                         scalar_t* __restrict__ out, at::opmath_type<scalar_t>* __restrict__ lse, int64_t heads,
                         int64_t group, int64_t nq, int d, at::opmath_type<scalar_t> scale) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr int width = DPL * kWarpSize, tile = tile_rows<acc_t, DPL>();
  __shared__ acc_t k_s[tile * width], v_s[tile * width];
  const int64_t bh = blockIdx.x, b = bh / heads, h = bh % heads, hk = h / group;
  const int lane = threadIdx.x % kWarpSize;
  const int64_t i0 = static_cast<int64_t>(blockIdx.y) * kRowsPerBlock, i = i0 + threadIdx.x / kWarpSize;
  const bool row_in = i < nq;
  acc_t q_r[DPL], acc[DPL];
  load_row(q_r, q.row(b, h, row_in ? i : 0), d, lane, row_in);
#pragma unroll
  for (int u = 0; u < DPL; ++u) {
    q_r[u] *= scale;  // (scale·q)·k, rounded as the reference
    acc[u] = 0;
  }
  attn::OnlineSoftmax<acc_t> softmax;
  const Span keys = mask.keys_of_block(b, i0, nq);
  for (int64_t start = keys.lo; start < keys.hi; start += tile) {
    __syncthreads();
    stage<acc_t, DPL>(k_s, v_s, v_s, k, v, v, true, false, b, hk, start, keys.hi, d);
    __syncthreads();
    const int count = static_cast<int>(keys.hi - start < tile ? keys.hi - start : tile);
    for (int r = 0; r < count; ++r) {
      const acc_t sc = row_dot<acc_t, DPL>(q_r, k_s + r * width, lane);
      acc_t alpha, p;
      softmax.add(sc, mask.attends(b, i, start + r), &alpha, &p);
#pragma unroll
      for (int u = 0; u < DPL; ++u) acc[u] = acc[u] * alpha + p * v_s[r * width + lane + u * kWarpSize];
    }
  }
  if (!row_in) return;
  const acc_t inv = softmax.inv_sum();
  scalar_t* o = out + (bh * nq + i) * d;
#pragma unroll
  for (int u = 0; u < DPL; ++u) {
    const int c = lane + u * kWarpSize;
    if (c < d) o[c] = static_cast<scalar_t>(acc[u] * inv);
  }
  if (lane == 0) lse[bh * nq + i] = softmax.lse();
}

// ------------------------------------------------------------------------------------------------ backward

// What a backward launch reads besides Q, K, V; flags and sizes.
template <typename scalar_t>
struct BackwardArgs {
  using acc_t = at::opmath_type<scalar_t>;
  Rows<scalar_t> q, k, v, grad_out;  // K, V with H / group heads; grad_out.ptr null when not given
  Rows<acc_t> half_s;                // hS = safe_divide(R_O, O)/2, [B, H, NQ, d]; null when not needed
  const acc_t* lse;                  // [B, H, NQ]
  const acc_t* delta;                // [B, H, NQ] Δ = rowsum(dO ⊙ O); null without gradient
  Masking mask;
  int64_t heads, group, nq, nk;      // heads: query heads H; group: query heads per key head
  int d;
  acc_t scale;
  PairFlags flags;
  bool need_dp, need_ra;             // dO·v and hS·v are read (gradient, relevance or the map)
};

// Query side, one warp per query row: dQ, R_Q and the row sums Σ_j E_ij.
template <typename scalar_t, int DPL>
__global__ void __launch_bounds__(kBlockThreads, 1)
attention_backward_query_kernel(BackwardArgs<scalar_t> a, scalar_t* __restrict__ dq, scalar_t* __restrict__ rq,
                                at::opmath_type<scalar_t>* __restrict__ rowsum) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr int width = DPL * kWarpSize, tile = tile_rows<acc_t, DPL>();
  __shared__ acc_t k_s[tile * width], v_s[tile * width];
  const int64_t bh = blockIdx.x, b = bh / a.heads, h = bh % a.heads, hk = h / a.group;
  const int lane = threadIdx.x % kWarpSize;
  const int64_t i0 = static_cast<int64_t>(blockIdx.y) * kRowsPerBlock, i = i0 + threadIdx.x / kWarpSize;
  const bool row_in = i < a.nq;
  const int64_t ir = row_in ? i : 0;
  acc_t q_r[DPL], qs_r[DPL], do_r[DPL], hs_r[DPL], acc_dq[DPL], acc_rq[DPL];
  load_row(q_r, a.q.row(b, h, ir), a.d, lane, row_in);
  load_row(do_r, a.grad_out.ptr ? a.grad_out.row(b, h, ir) : a.q.row(b, h, ir), a.d, lane, row_in && a.need_dp);
  load_row(hs_r, a.half_s.ptr ? a.half_s.row(b, h, ir) : nullptr, a.d, lane, row_in && a.need_ra);
#pragma unroll
  for (int u = 0; u < DPL; ++u) {
    qs_r[u] = q_r[u] * a.scale;
    acc_dq[u] = acc_rq[u] = 0;
  }
  const acc_t lse = row_in ? a.lse[bh * a.nq + i] : acc_t(0);
  const acc_t delta = (row_in && a.delta) ? a.delta[bh * a.nq + i] : acc_t(0);
  acc_t row_e = 0;
  const Span keys = a.mask.keys_of_block(b, i0, a.nq);
  for (int64_t start = keys.lo; start < keys.hi; start += tile) {
    __syncthreads();
    stage<acc_t, DPL>(k_s, v_s, v_s, a.k, a.v, a.v, a.need_dp || a.need_ra, false, b, hk, start, keys.hi, a.d);
    __syncthreads();
    const int count = static_cast<int>(keys.hi - start < tile ? keys.hi - start : tile);
    for (int r = 0; r < count; ++r) {
      const acc_t* k_row = k_s + r * width;
      const acc_t sc = row_dot<acc_t, DPL>(qs_r, k_row, lane);
      const acc_t dp = a.need_dp ? row_dot<acc_t, DPL>(do_r, v_s + r * width, lane) : acc_t(0);
      const acc_t hv = a.need_ra ? row_dot<acc_t, DPL>(hs_r, v_s + r * width, lane) : acc_t(0);
      const bool valid = row_in && a.mask.attends(b, i, start + r);
      const PairTerms<acc_t> t = attn::pair_terms(sc, dp, hv, lse, delta, valid, a.scale, a.flags);
#pragma unroll
      for (int u = 0; u < DPL; ++u) {
        const acc_t kc = k_row[lane + u * kWarpSize];
        acc_dq[u] += t.ds * kc;
        acc_rq[u] += t.t * kc;
      }
      row_e += t.e;
    }
  }
  if (!row_in) return;
  const int64_t off = (bh * a.nq + i) * a.d;
#pragma unroll
  for (int u = 0; u < DPL; ++u) {
    const int c = lane + u * kWarpSize;
    if (c >= a.d) continue;
    if (dq) dq[off + c] = static_cast<scalar_t>(acc_dq[u] * a.scale);
    if (rq) rq[off + c] = static_cast<scalar_t>(q_r[u] * acc_rq[u] * (acc_t(0.5) * a.scale));
  }
  if (rowsum && lane == 0) rowsum[bh * a.nq + i] = row_e;
}

// Key side, one warp per key row of a key head, over the query heads of its group: dK, dV, R_K, R_V, the rollout
// product Σ_h Σ_i w_i E_hij, the mask add's per-key sums and (on request) the head-mean map, accumulated atomically.
template <typename scalar_t, int DPL>
__global__ void __launch_bounds__(kBlockThreads, 1)
attention_backward_key_kernel(BackwardArgs<scalar_t> a, const at::opmath_type<scalar_t>* __restrict__ weights,
                              scalar_t* __restrict__ dk, scalar_t* __restrict__ dv, scalar_t* __restrict__ rk,
                              scalar_t* __restrict__ rv, at::opmath_type<scalar_t>* __restrict__ roll,
                              at::opmath_type<scalar_t>* __restrict__ sums, at::opmath_type<scalar_t>* __restrict__ map,
                              bool need_grad, bool need_rel) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr int width = DPL * kWarpSize, tile = tile_rows<acc_t, DPL>();
  __shared__ acc_t q_s[tile * width], do_s[tile * width], hs_s[tile * width];
  const int64_t heads_kv = a.heads / a.group;
  const int64_t bhk = blockIdx.x, b = bhk / heads_kv, hk = bhk % heads_kv;
  const int lane = threadIdx.x % kWarpSize;
  const int64_t j0 = static_cast<int64_t>(blockIdx.y) * kRowsPerBlock, j = j0 + threadIdx.x / kWarpSize;
  const bool key_in = j < a.nk;
  const bool key_real = a.mask.real_key(b, j);
  const int64_t jr = key_in ? j : 0;
  acc_t k_r[DPL], v_r[DPL], acc_dk[DPL], acc_dv[DPL], acc_rk[DPL], acc_rv[DPL];
  load_row(k_r, a.k.row(b, hk, jr), a.d, lane, key_in);
  load_row(v_r, a.v.row(b, hk, jr), a.d, lane, key_in);
#pragma unroll
  for (int u = 0; u < DPL; ++u) acc_dk[u] = acc_dv[u] = acc_rk[u] = acc_rv[u] = 0;
  acc_t acc_roll = 0, sum_r_sc = 0, sum_ra = 0;
  const acc_t inv_heads = acc_t(1) / static_cast<acc_t>(a.heads);
  const Rows<scalar_t> grad_rows = a.grad_out.ptr ? a.grad_out : a.q;
  const Rows<acc_t> hs_rows = a.half_s.ptr ? a.half_s : Rows<acc_t>{nullptr, 0, 0, 0};
  const Span queries = a.mask.queries_of_block(b, j0, a.nq);
  for (int64_t g = 0; g < a.group; ++g) {
    const int64_t h = hk * a.group + g, bh = b * a.heads + h;
    for (int64_t start = queries.lo; start < queries.hi; start += tile) {
      __syncthreads();
      stage<acc_t, DPL>(q_s, do_s, hs_s, a.q, grad_rows, hs_rows, a.need_dp, a.need_ra, b, h, start, queries.hi,
                        a.d);
      __syncthreads();
      const int count = static_cast<int>(queries.hi - start < tile ? queries.hi - start : tile);
      for (int r = 0; r < count; ++r) {
        const int64_t i = start + r;
        const acc_t* q_row = q_s + r * width;
        acc_t sc = 0;
#pragma unroll
        for (int u = 0; u < DPL; ++u) sc += (q_row[lane + u * kWarpSize] * a.scale) * k_r[u];
        sc = warp_sum(sc);
        const acc_t dp = a.need_dp ? row_dot<acc_t, DPL>(v_r, do_s + r * width, lane) : acc_t(0);
        const acc_t hv = a.need_ra ? row_dot<acc_t, DPL>(v_r, hs_s + r * width, lane) : acc_t(0);
        const acc_t lse = a.lse[bh * a.nq + i];
        const acc_t delta = a.delta ? a.delta[bh * a.nq + i] : acc_t(0);
        const bool valid = key_real && attn::in_band(a.mask.causal, a.mask.window, i, j);
        const PairTerms<acc_t> t = attn::pair_terms(sc, dp, hv, lse, delta, valid, a.scale, a.flags);
#pragma unroll
        for (int u = 0; u < DPL; ++u) {
          const int c = lane + u * kWarpSize;
          if (need_grad) {
            acc_dv[u] += t.p * do_s[r * width + c];
            acc_dk[u] += t.ds * q_row[c];
          }
          if (need_rel) {
            acc_rv[u] += t.p * hs_s[r * width + c];
            acc_rk[u] += t.t * q_row[c];
          }
        }
        sum_r_sc += t.r_sc;
        sum_ra += t.ra;
        if (weights) acc_roll += weights[b * a.nq + i] * t.e;
        if (map && lane == 0 && valid) atomicAdd(map + (b * a.nq + i) * a.nk + j, t.e * inv_heads);
      }
    }
  }
  if (!key_in) return;
  const int64_t off = (bhk * a.nk + j) * a.d;
#pragma unroll
  for (int u = 0; u < DPL; ++u) {
    const int c = lane + u * kWarpSize;
    if (c >= a.d) continue;
    if (need_grad) {
      dk[off + c] = static_cast<scalar_t>(acc_dk[u] * a.scale);
      dv[off + c] = static_cast<scalar_t>(acc_dv[u]);
    }
    if (need_rel) {
      rk[off + c] = static_cast<scalar_t>(k_r[u] * acc_rk[u] * (acc_t(0.5) * a.scale));
      rv[off + c] = static_cast<scalar_t>(v_r[u] * acc_rv[u]);
    }
  }
  if (lane != 0) return;
  if (roll) roll[bhk * a.nk + j] = acc_roll;
  if (sums) {
    sums[(bhk * a.nk + j) * 2] = sum_r_sc;
    sums[(bhk * a.nk + j) * 2 + 1] = sum_ra;
  }
}

// Attention GradCAM's head-weighted map E = (Σ_h w_h A_h)⁺ (w already divided by H), one warp per key: the map's
// row `row` and, per key, its min and max over the real queries (±inf at padded keys). Q and K are read straight
// from global memory (cached): one block of one sample, heads summed in a register. Every query row is visited (no
// skipped ranges): the zeros of the causal mask and the window are part of the map and count in its min.
template <typename scalar_t, int DPL>
__global__ void __launch_bounds__(kBlockThreads, 1)
attention_weighted_map_kernel(Rows<scalar_t> q, Rows<scalar_t> k, const at::opmath_type<scalar_t>* __restrict__ lse,
                              Masking mask, const at::opmath_type<scalar_t>* __restrict__ weights,
                              at::opmath_type<scalar_t>* __restrict__ row_out, at::opmath_type<scalar_t>* __restrict__ part,
                              int64_t heads, int64_t group, int64_t nq, int d, at::opmath_type<scalar_t> scale,
                              const int64_t* __restrict__ rows) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t b = blockIdx.x, nk = mask.nk;
  const int lane = threadIdx.x % kWarpSize;
  const int64_t j = static_cast<int64_t>(blockIdx.y) * kRowsPerBlock + threadIdx.x / kWarpSize;
  if (j >= nk) return;  // no shared memory, no barrier: a warp past the end leaves
  const bool key_real = mask.real_key(b, j);
  const int64_t row = rows[b];
  acc_t lo = INFINITY, hi = -INFINITY, at_row = 0;
  for (int64_t i = 0; i < nq; ++i) {
    acc_t e = 0;
    const bool valid = mask.attends(b, i, j);
    for (int64_t h = 0; h < heads; ++h) {
      acc_t qs_r[DPL], k_r[DPL];
      load_row(qs_r, q.row(b, h, i), d, lane, true);
      load_row(k_r, k.row(b, h / group, j), d, lane, true);
      acc_t sc = 0;
#pragma unroll
      for (int u = 0; u < DPL; ++u) sc += (qs_r[u] * scale) * k_r[u];
      sc = warp_sum(sc);
      const acc_t p = valid ? attn::exp_of(sc - lse[(b * heads + h) * nq + i]) : acc_t(0);
      e += weights[b * heads + h] * p;
    }
    e = e > acc_t(0) ? e : acc_t(0);
    const bool real = key_real && (mask.keep == nullptr || mask.keep[b * nk + i]);
    if (real) {
      lo = e < lo ? e : lo;
      hi = e > hi ? e : hi;
    }
    if (i == row) at_row = e;
  }
  if (lane != 0) return;
  row_out[b * nk + j] = at_row;
  part[(b * nk + j) * 2] = lo;
  part[(b * nk + j) * 2 + 1] = hi;
}

// -------------------------------------------------------------------------------------------------- host

constexpr const char* kOp = "tlrp::attention (cuda)";
constexpr int64_t kMaxHeadDim = 8 * kWarpSize;  // 8 entries per lane (transformer_lrp._backend.CUDA_MAX_HEAD_DIM)

at::Tensor last_dim_contiguous(const at::Tensor& t) { return t.stride(-1) == 1 ? t : t.contiguous(); }

void check_qkv(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v) {
  TORCH_CHECK(q.is_cuda() && k.is_cuda() && v.is_cuda(), kOp, ": query, key and value must be CUDA tensors");
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4, kOp, ": query, key and value must be [B, H, N, d]");
  TORCH_CHECK(k.sizes() == v.sizes(), kOp, ": key and value must have one shape, got ", k.sizes(), " and ", v.sizes());
  TORCH_CHECK(q.size(0) == k.size(0) && q.size(3) == k.size(3), kOp, ": query ", q.sizes(), " and key ", k.sizes(),
              " must agree in B and d");
  TORCH_CHECK(k.size(1) > 0 && q.size(1) % k.size(1) == 0, kOp, ": the query heads (", q.size(1),
              ") must be a multiple of the key/value heads (", k.size(1), ")");
  TORCH_CHECK(q.scalar_type() == k.scalar_type() && q.scalar_type() == v.scalar_type(), kOp,
              ": query, key and value must have one dtype");
  TORCH_CHECK(q.size(3) <= kMaxHeadDim, kOp, ": head dimension ", q.size(3), " > ", kMaxHeadDim,
              " is not supported");
}

void check_masking(bool causal, int64_t window, int64_t nq, int64_t nk) {
  TORCH_CHECK(!causal || nq == nk, kOp, ": causal attention needs as many query rows as keys");
  TORCH_CHECK(window >= 0, kOp, ": window must be >= 0 (0: none), got ", window);
  TORCH_CHECK(window == 0 || causal, kOp, ": a sliding window is only defined with the causal mask");
}

std::optional<at::Tensor> keep_of(const std::optional<at::Tensor>& key_mask, const at::Tensor& k) {
  if (!key_mask.has_value()) return std::nullopt;
  TORCH_CHECK(key_mask->dim() == 2 && key_mask->size(0) == k.size(0) && key_mask->size(1) == k.size(2), kOp,
              ": key_mask must be [B, NK] = [", k.size(0), ", ", k.size(2), "], got ", key_mask->sizes());
  return key_mask->to(k.device(), at::kBool).contiguous();
}

// Each sample's real keys [first, end) as [B, 2] int64, by device ops (no host sync): the kernels skip the padding
// outside. A sample without a real key gets [0, NK) (every pair is masked by keep anyway).
std::optional<at::Tensor> key_range_of(const std::optional<at::Tensor>& keep) {
  if (!keep.has_value()) return std::nullopt;
  const auto k = keep->to(at::kInt);
  const auto first = k.argmax(1), end = k.size(1) - k.flip({1}).argmax(1);
  return at::stack({first, end}, 1).contiguous();
}

Masking masking_of(const std::optional<at::Tensor>& keep, const std::optional<at::Tensor>& range, int64_t nk,
                   bool causal, int64_t window) {
  return {keep.has_value() ? keep->data_ptr<bool>() : nullptr, range.has_value() ? range->data_ptr<int64_t>() : nullptr,
          nk, causal, window};
}

// DPL, the entries per lane, as a compile-time constant: 2 (d ≤ 64), 4 (d ≤ 128) or 8 (d ≤ 256)
template <typename F>
void with_dpl(int64_t d, F&& f) {
  if (d <= 64) {
    f(std::integral_constant<int, 2>{});
  } else if (d <= 128) {
    f(std::integral_constant<int, 4>{});
  } else {
    f(std::integral_constant<int, 8>{});
  }
}

dim3 grid_of(int64_t outer, int64_t rows) {
  TORCH_CHECK(outer < (int64_t(1) << 31) && (rows + kRowsPerBlock - 1) / kRowsPerBlock < 65536, kOp,
              ": the grid is too large for one launch");
  return dim3(static_cast<unsigned>(outer), static_cast<unsigned>((rows + kRowsPerBlock - 1) / kRowsPerBlock));
}

at::Tensor none_tensor(const at::Tensor& like) { return at::empty({0}, like.options()); }

}  // namespace

std::tuple<at::Tensor, at::Tensor> attention_forward_cuda(const at::Tensor& query, const at::Tensor& key,
                                                          const at::Tensor& value, double scale,
                                                          const std::optional<at::Tensor>& key_mask, bool causal,
                                                          int64_t window) {
  check_qkv(query, key, value);
  const c10::cuda::CUDAGuard guard(query.device());
  const auto q = last_dim_contiguous(query), k = last_dim_contiguous(key), v = last_dim_contiguous(value);
  const auto keep = keep_of(key_mask, k);
  const int64_t b = q.size(0), h = q.size(1), nq = q.size(2), nk = k.size(2), d = q.size(3);
  check_masking(causal, window, nq, nk);
  auto out = at::empty({b, h, nq, d}, q.options());
  const auto acc_type = q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  auto lse = at::empty({b, h, nq}, q.options().dtype(acc_type));
  if (out.numel() == 0) return {out, lse};
  const auto range = key_range_of(keep);
  const Masking mask = masking_of(keep, range, nk, causal, window);
  const auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "attention_forward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    with_dpl(d, [&](auto dpl) {
      attention_forward_kernel<scalar_t, decltype(dpl)::value><<<grid_of(b * h, nq), kBlockThreads, 0, stream>>>(
          rows_of<scalar_t>(q), rows_of<scalar_t>(k), rows_of<scalar_t>(v), mask, out.data_ptr<scalar_t>(),
          lse.data_ptr<acc_t>(), h, h / k.size(1), nq, static_cast<int>(d), static_cast<acc_t>(scale));
    });
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {out, lse};
}

// Returns (grad_query, grad_key, grad_value, rel_query, rel_key, rel_value, rollout_rows, rollout_product, map),
// each an empty [0] tensor where not asked for (transformer_lrp.ops.attention_relevance builds its dict from them);
// the key and value ones shaped like K ([B, H_kv, NK, d], summed over each key head's group).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
attention_relevance_cuda(const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
                         const at::Tensor& out_, const at::Tensor& lse_, double scale,
                         const std::optional<at::Tensor>& grad_out_, const std::optional<at::Tensor>& rel_out,
                         const std::optional<at::Tensor>& key_mask, bool mask_add, int64_t map_mode,
                         const std::optional<at::Tensor>& rollout, bool normalize_rows, bool want_map, bool inputs,
                         bool mask_add_normalized, bool causal, int64_t window) {
  check_qkv(query, key, value);
  check_masking(causal, window, query.size(2), key.size(2));
  TORCH_CHECK(map_mode >= attn::kMapNone && map_mode <= attn::kMapPartialLrp, kOp, ": map_mode ", map_mode,
              " is not one of 0..4");
  TORCH_CHECK(!(attn::map_reads_gradient(map_mode) && !grad_out_.has_value()), kOp, ": this map needs grad_out");
  TORCH_CHECK(!(attn::map_reads_relevance(map_mode) && !rel_out.has_value()), kOp, ": this map needs rel_out");
  TORCH_CHECK(out_.sizes() == query.sizes(), kOp, ": out must have the query's shape");
  const c10::cuda::CUDAGuard guard(query.device());
  const auto q = last_dim_contiguous(query), k = last_dim_contiguous(key), v = last_dim_contiguous(value);
  const auto keep = keep_of(key_mask, k);
  const int64_t b = q.size(0), h = q.size(1), hk = k.size(1), nq = q.size(2), nk = k.size(2), d = q.size(3);
  const auto acc_type = q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const auto acc_opts = q.options().dtype(acc_type);
  const auto lse = lse_.to(acc_type).contiguous();
  const bool need_grad = inputs && grad_out_.has_value(), need_rel = inputs && rel_out.has_value();
  const bool rolling = rollout.has_value() && map_mode != attn::kMapNone;
  want_map = want_map && map_mode != attn::kMapNone;
  std::optional<at::Tensor> grad_out, delta, half_s;
  if (grad_out_.has_value()) {
    TORCH_CHECK(grad_out_->sizes() == query.sizes(), kOp, ": grad_out must have the query's shape");
    grad_out = last_dim_contiguous(grad_out_->to(q.scalar_type()));
  }
  if (need_grad) delta = (grad_out->to(acc_type) * out_.to(acc_type)).sum(-1).contiguous();
  if (need_rel || attn::map_reads_relevance(map_mode)) {
    TORCH_CHECK(rel_out->sizes() == query.sizes(), kOp, ": rel_out must have the query's shape");
    // the G rule's factor of O = A V, halved (docs/method.md §2.6), kept in the accumulation dtype
    half_s = safe_divide(rel_out->to(acc_type), out_.to(acc_type)).mul_(0.5).contiguous();
  }
  const bool need_dp = need_grad || attn::map_reads_gradient(map_mode);
  const bool need_ra = need_rel || attn::map_reads_relevance(map_mode);
  const PairFlags flags{need_grad, need_rel, mask_add && need_rel, static_cast<int>(map_mode)};
  const auto stream = c10::cuda::getCurrentCUDAStream();

  at::Tensor grad_q = none_tensor(q), grad_k = none_tensor(q), grad_v = none_tensor(q), rel_q = none_tensor(q),
             rel_k = none_tensor(q), rel_v = none_tensor(q), rows_out = none_tensor(lse),
             product = none_tensor(lse), map = none_tensor(lse);
  if (need_grad) {
    grad_q = at::empty({b, h, nq, d}, q.options());
    grad_k = at::empty({b, hk, nk, d}, q.options());
    grad_v = at::empty({b, hk, nk, d}, q.options());
  }
  if (need_rel) {
    rel_q = at::empty({b, h, nq, d}, q.options());
    rel_k = at::empty({b, hk, nk, d}, q.options());
    rel_v = at::empty({b, hk, nk, d}, q.options());
  }
  if (q.numel() == 0 || k.numel() == 0) {
    return {grad_q, grad_k, grad_v, rel_q, rel_k, rel_v, rows_out, product, map};
  }
  const bool want_rowsum = rolling && normalize_rows;
  at::Tensor rowsum = want_rowsum ? at::empty({b, h, nq}, acc_opts) : none_tensor(lse);
  at::Tensor roll = rolling ? at::empty({b, hk, nk}, acc_opts) : none_tensor(lse);
  at::Tensor sums = flags.mask_add ? at::empty({b, hk, nk, 2}, acc_opts) : none_tensor(lse);
  if (want_map) map = at::zeros({b, nq, nk}, acc_opts);
  at::Tensor weights;
  const auto range = key_range_of(keep);

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "attention_relevance", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    BackwardArgs<scalar_t> args{rows_of<scalar_t>(q),
                                rows_of<scalar_t>(k),
                                rows_of<scalar_t>(v),
                                grad_out.has_value() ? rows_of<scalar_t>(*grad_out) : Rows<scalar_t>{nullptr, 0, 0, 0},
                                half_s.has_value() ? rows_of<acc_t>(*half_s) : Rows<acc_t>{nullptr, 0, 0, 0},
                                lse.data_ptr<acc_t>(),
                                delta.has_value() ? delta->data_ptr<acc_t>() : nullptr,
                                masking_of(keep, range, nk, causal, window),
                                h, h / hk, nq, nk, static_cast<int>(d), static_cast<acc_t>(scale), flags, need_dp,
                                need_ra};
    with_dpl(d, [&](auto dpl) {
      constexpr int DPL = decltype(dpl)::value;
      if (need_grad || need_rel || want_rowsum) {
        // the row sums (normalized rollout) read dO·v and R_A only where the map does
        BackwardArgs<scalar_t> qa = args;
        qa.need_dp = need_grad || (want_rowsum && attn::map_reads_gradient(map_mode));
        qa.need_ra = need_rel || (want_rowsum && attn::map_reads_relevance(map_mode));
        qa.flags.map_mode = want_rowsum ? static_cast<int>(map_mode) : attn::kMapNone;
        attention_backward_query_kernel<scalar_t, DPL><<<grid_of(b * h, nq), kBlockThreads, 0, stream>>>(
            qa, need_grad ? grad_q.data_ptr<scalar_t>() : nullptr, need_rel ? rel_q.data_ptr<scalar_t>() : nullptr,
            want_rowsum ? rowsum.data_ptr<acc_t>() : nullptr);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      }
      if (rolling) {
        weights = rollout->to(acc_type).clone();  // an output of a custom op may not alias an input
        if (normalize_rows) weights = weights / (1 + rowsum.sum(1) / static_cast<double>(h));  // rows of I + Ē
        rows_out = weights;
        weights = (weights / static_cast<double>(h)).contiguous();
      }
      if (need_grad || need_rel || rolling || want_map) {
        // one warp per key row of a key head: the group's query heads are summed in its registers
        attention_backward_key_kernel<scalar_t, DPL><<<grid_of(b * hk, nk), kBlockThreads, 0, stream>>>(
            args, rolling ? weights.data_ptr<acc_t>() : nullptr, need_grad ? grad_k.data_ptr<scalar_t>() : nullptr,
            need_grad ? grad_v.data_ptr<scalar_t>() : nullptr, need_rel ? rel_k.data_ptr<scalar_t>() : nullptr,
            need_rel ? rel_v.data_ptr<scalar_t>() : nullptr, rolling ? roll.data_ptr<acc_t>() : nullptr,
            flags.mask_add ? sums.data_ptr<acc_t>() : nullptr, want_map ? map.data_ptr<acc_t>() : nullptr, need_grad,
            need_rel);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      }
    });
  });
  if (need_rel && flags.mask_add && mask_add_normalized) {
    // the padding-mask add's normalization (docs/method.md §2.8 with v = 0), per sample: scales R_Q and R_K
    const auto totals = sums.to(at::kDouble).sum({1, 2});  // [B, 2]: Σ R_sc, Σ R_A
    const auto s3 = at::stack({totals.select(1, 0), at::zeros_like(totals.select(1, 0)), totals.select(1, 1)}, 1);
    const auto f = normalized_add_factors(s3).first.to(q.scalar_type()).view({b, 1, 1, 1});
    rel_q = rel_q * f;
    rel_k = rel_k * f;
  }
  if (rolling) product = roll.sum(1);
  return {grad_q, grad_k, grad_v, rel_q, rel_k, rel_v, rows_out, product, map};
}

// Returns (E[:, row] [B, NK], min [B], max [B]) in the accumulation dtype.
std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_weighted_map_cuda(
    const at::Tensor& query, const at::Tensor& key, const at::Tensor& lse_, double scale, const at::Tensor& weights_,
    const std::optional<at::Tensor>& key_mask, const at::Tensor& rows_, bool causal, int64_t window) {
  check_qkv(query, key, key);
  const c10::cuda::CUDAGuard guard(query.device());
  const auto q = last_dim_contiguous(query), k = last_dim_contiguous(key);
  const auto keep = keep_of(key_mask, k);
  const int64_t b = q.size(0), h = q.size(1), nq = q.size(2), nk = k.size(2), d = q.size(3);
  TORCH_CHECK(!keep.has_value() || nq == nk, kOp, ": a key mask masks the queries too, so NQ must equal NK");
  TORCH_CHECK(weights_.dim() == 2 && weights_.size(0) == b && weights_.size(1) == h, kOp,
              ": weights must be [B, H]");
  check_masking(causal, window, nq, nk);
  TORCH_CHECK(rows_.dim() == 1 && rows_.size(0) == b, kOp, ": rows must be [B], the query row per sample");
  const auto rows = rows_.to(q.device(), at::kLong).contiguous();
  const auto acc_type = q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const auto lse = lse_.to(acc_type).contiguous();
  const auto weights = (weights_.to(q.device(), acc_type) / static_cast<double>(h)).contiguous();
  auto row_out = at::zeros({b, nk}, q.options().dtype(acc_type));
  auto part = at::empty({b, nk, 2}, q.options().dtype(acc_type));
  if (b == 0 || nk == 0) return {row_out, at::empty({b}, row_out.options()), at::empty({b}, row_out.options())};
  // no key range: this kernel visits every pair
  const Masking mask = masking_of(keep, std::nullopt, nk, causal, window);
  const auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "attention_weighted_map", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    with_dpl(d, [&](auto dpl) {
      attention_weighted_map_kernel<scalar_t, decltype(dpl)::value>
          <<<grid_of(b, nk), kBlockThreads, 0, stream>>>(
              rows_of<scalar_t>(q), rows_of<scalar_t>(k), lse.data_ptr<acc_t>(), mask, weights.data_ptr<acc_t>(),
              row_out.data_ptr<acc_t>(), part.data_ptr<acc_t>(), h, h / k.size(1), nq, static_cast<int>(d),
              static_cast<acc_t>(scale), rows.data_ptr<int64_t>());
    });
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {row_out, part.select(2, 0).amin(1), part.select(2, 1).amax(1)};
}

}  // namespace tlrp
