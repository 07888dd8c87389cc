// Host harness of the CUDA C++ attention op's math (csrc/attention_math.cuh), built by g++ in CI
// (tests/test_cuda_attention_host.py) and called through ctypes on contiguous CPU arrays.
//
// Each entry point runs one kernel of csrc/attention_relevance.cu with its thread layout unrolled into loops: a
// row program per query row (forward, query side) or key row (key side), visiting the other side's rows in order
// and accumulating the same per-pair terms (attn::pair_terms, attn::OnlineSoftmax) that the warps accumulate. Only
// the warp-shuffle dot products become plain sums. The launcher's tensor work (Δ, hS, the rollout weights, the
// mask add's per-sample factor) is done by the Python test with torch, as the CUDA launcher does it with ATen.

#include <cstdint>
#include <vector>

#include "../../csrc/attention_math.cuh"

namespace {

using tlrp::attn::OnlineSoftmax;
using tlrp::attn::PairFlags;
using tlrp::attn::PairTerms;

template <typename T>
T dot(const T* a, const T* b, int64_t d) {
  T s = 0;
  for (int64_t c = 0; c < d; ++c) s += a[c] * b[c];
  return s;
}

template <typename T>
T scaled_dot(const T* q, const T* k, int64_t d, T scale) {  // (scale·q)·k, as the kernels round it
  T s = 0;
  for (int64_t c = 0; c < d; ++c) s += (q[c] * scale) * k[c];
  return s;
}

bool real_key(const uint8_t* keep, int64_t b, int64_t j, int64_t nk) { return keep == nullptr || keep[b * nk + j]; }

bool attends(const uint8_t* keep, bool causal, int64_t b, int64_t i, int64_t j, int64_t nk) {
  return real_key(keep, b, j, nk) && (!causal || j <= i);
}

template <typename T>
void forward(const T* q, const T* k, const T* v, const uint8_t* keep, T* out, T* lse, int64_t B, int64_t H,
             int64_t NQ, int64_t NK, int64_t D, T scale, bool causal) {
  std::vector<T> acc(D);
  for (int64_t bh = 0; bh < B * H; ++bh) {
    const int64_t b = bh / H;
    for (int64_t i = 0; i < NQ; ++i) {
      const T* qi = q + (bh * NQ + i) * D;
      OnlineSoftmax<T> softmax;
      for (auto& a : acc) a = 0;
      for (int64_t j = 0; j < NK; ++j) {
        T alpha, p;
        softmax.add(scaled_dot(qi, k + (bh * NK + j) * D, D, scale), attends(keep, causal, b, i, j, NK), &alpha, &p);
        for (int64_t c = 0; c < D; ++c) acc[c] = acc[c] * alpha + p * v[(bh * NK + j) * D + c];
      }
      const T inv = softmax.inv_sum();
      for (int64_t c = 0; c < D; ++c) out[(bh * NQ + i) * D + c] = acc[c] * inv;
      lse[bh * NQ + i] = softmax.lse();
    }
  }
}

template <typename T>
struct Inputs {
  const T *q, *k, *v, *grad_out, *half_s, *lse, *delta;
  const uint8_t* keep;
  bool causal;
  int64_t B, H, NQ, NK, D;
  T scale;
  PairFlags flags;
};

template <typename T>
PairTerms<T> terms(const Inputs<T>& in, int64_t bh, int64_t i, int64_t j, bool need_dp, bool need_ra,
                   const PairFlags& flags) {
  const int64_t b = bh / in.H, qi = (bh * in.NQ + i) * in.D, kj = (bh * in.NK + j) * in.D;
  const T sc = scaled_dot(in.q + qi, in.k + kj, in.D, in.scale);
  const T dp = need_dp ? dot(in.grad_out + qi, in.v + kj, in.D) : T(0);
  const T hv = need_ra ? dot(in.half_s + qi, in.v + kj, in.D) : T(0);
  const T delta = in.delta ? in.delta[bh * in.NQ + i] : T(0);
  return tlrp::attn::pair_terms(sc, dp, hv, in.lse[bh * in.NQ + i], delta, attends(in.keep, in.causal, b, i, j, in.NK),
                                in.scale, flags);
}

// The query-side kernel: dQ, R_Q (without the mask add's factor) and the row sums of E.
template <typename T>
void backward_query(const Inputs<T>& in, bool need_dp, bool need_ra, int map_mode, T* dq, T* rq, T* rowsum) {
  PairFlags flags = in.flags;
  flags.map_mode = map_mode;
  std::vector<T> acc_dq(in.D), acc_rq(in.D);
  for (int64_t bh = 0; bh < in.B * in.H; ++bh) {
    for (int64_t i = 0; i < in.NQ; ++i) {
      for (int64_t c = 0; c < in.D; ++c) acc_dq[c] = acc_rq[c] = 0;
      T row_e = 0;
      for (int64_t j = 0; j < in.NK; ++j) {
        const PairTerms<T> t = terms(in, bh, i, j, need_dp, need_ra, flags);
        const T* kj = in.k + (bh * in.NK + j) * in.D;
        for (int64_t c = 0; c < in.D; ++c) {
          acc_dq[c] += t.ds * kj[c];
          acc_rq[c] += t.t * kj[c];
        }
        row_e += t.e;
      }
      const int64_t off = (bh * in.NQ + i) * in.D;
      for (int64_t c = 0; c < in.D; ++c) {
        if (dq) dq[off + c] = acc_dq[c] * in.scale;
        if (rq) rq[off + c] = in.q[off + c] * acc_rq[c] * (T(0.5) * in.scale);
      }
      if (rowsum) rowsum[bh * in.NQ + i] = row_e;
    }
  }
}

// The key-side kernel: dK, dV, R_K, R_V, the rollout product, the mask add's per-key sums, the head-mean map.
template <typename T>
void backward_key(const Inputs<T>& in, bool need_dp, bool need_ra, const T* weights, T* dk, T* dv, T* rk, T* rv,
                  T* roll, T* sums, T* map) {
  const bool need_grad = dk != nullptr, need_rel = rk != nullptr;
  std::vector<T> acc_dk(in.D), acc_dv(in.D), acc_rk(in.D), acc_rv(in.D);
  for (int64_t bh = 0; bh < in.B * in.H; ++bh) {
    const int64_t b = bh / in.H;
    for (int64_t j = 0; j < in.NK; ++j) {
      for (int64_t c = 0; c < in.D; ++c) acc_dk[c] = acc_dv[c] = acc_rk[c] = acc_rv[c] = 0;
      T acc_roll = 0, sum_r_sc = 0, sum_ra = 0;
      for (int64_t i = 0; i < in.NQ; ++i) {
        const PairTerms<T> t = terms(in, bh, i, j, need_dp, need_ra, in.flags);
        const int64_t qi = (bh * in.NQ + i) * in.D;
        for (int64_t c = 0; c < in.D; ++c) {
          if (need_grad) {
            acc_dv[c] += t.p * in.grad_out[qi + c];
            acc_dk[c] += t.ds * in.q[qi + c];
          }
          if (need_rel) {
            acc_rv[c] += t.p * in.half_s[qi + c];
            acc_rk[c] += t.t * in.q[qi + c];
          }
        }
        sum_r_sc += t.r_sc;
        sum_ra += t.ra;
        if (weights) acc_roll += weights[b * in.NQ + i] * t.e;
        if (map && attends(in.keep, in.causal, b, i, j, in.NK)) map[(b * in.NQ + i) * in.NK + j] += t.e / T(in.H);
      }
      const int64_t off = (bh * in.NK + j) * in.D;
      for (int64_t c = 0; c < in.D; ++c) {
        if (need_grad) {
          dk[off + c] = acc_dk[c] * in.scale;
          dv[off + c] = acc_dv[c];
        }
        if (need_rel) {
          rk[off + c] = in.k[off + c] * acc_rk[c] * (T(0.5) * in.scale);
          rv[off + c] = in.v[off + c] * acc_rv[c];
        }
      }
      if (roll) roll[bh * in.NK + j] = acc_roll;
      if (sums) {
        sums[(bh * in.NK + j) * 2] = sum_r_sc;
        sums[(bh * in.NK + j) * 2 + 1] = sum_ra;
      }
    }
  }
}

}  // namespace

// sizes: [B, H, NQ, NK, D]; flags: [need_grad, need_rel, mask_add, map_mode, need_dp, need_ra, rowsum_map_mode,
// causal]
#define TLRP_HOST_ENTRY_POINTS(T, SUFFIX)                                                                          \
  extern "C" void tlrp_host_forward_##SUFFIX(const T* q, const T* k, const T* v, const uint8_t* keep, T* out,     \
                                              T* lse, const int64_t* sizes, T scale, int64_t causal) {           \
    forward<T>(q, k, v, keep, out, lse, sizes[0], sizes[1], sizes[2], sizes[3], sizes[4], scale, causal != 0);   \
  }                                                                                                                \
  extern "C" void tlrp_host_backward_##SUFFIX(                                                                     \
      const T* q, const T* k, const T* v, const T* grad_out, const T* half_s, const T* lse, const T* delta,        \
      const uint8_t* keep, const T* weights, T* dq, T* rq, T* rowsum, T* dk, T* dv, T* rk, T* rv, T* roll, T* sums, \
      T* map, const int64_t* sizes, T scale, const int64_t* flags) {                                               \
    const PairFlags f{flags[0] != 0, flags[1] != 0, flags[2] != 0, static_cast<int>(flags[3])};                   \
    const Inputs<T> in{q, k, v, grad_out, half_s, lse, delta, keep, flags[7] != 0, sizes[0], sizes[1], sizes[2],  \
                       sizes[3],                                                                                   \
                       sizes[4], scale, f};                                                                        \
    if (dq || rq || rowsum)                                                                                        \
      backward_query<T>(in, flags[4] != 0, flags[5] != 0, static_cast<int>(flags[6]), dq, rq, rowsum);            \
    if (dk || rk || roll || map) backward_key<T>(in, flags[4] != 0, flags[5] != 0, weights, dk, dv, rk, rv, roll,  \
                                                 sums, map);                                                       \
  }

TLRP_HOST_ENTRY_POINTS(double, f64)
TLRP_HOST_ENTRY_POINTS(float, f32)
