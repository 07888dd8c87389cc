// Host harness of the CUDA C++ attention op's math (csrc/attention_math.cuh), built by g++ in CI
// (tests/test_cuda_attention_host.py) and called through ctypes on contiguous CPU arrays.
//
// Each entry point runs one kernel of csrc/attention_relevance.cu with its thread layout unrolled into loops: a
// row program per query row (forward, query side, GradCAM map) or key row (key side), in blocks of
// attn::kRowsPerBlock rows that visit the other side's rows over the same ranges as the kernels' blocks
// (attn::key_span, attn::query_span: what a whole block cannot attend is skipped), in the same order, accumulating
// the same per-pair terms (attn::pair_terms, attn::OnlineSoftmax). Only the warp-shuffle dot products become plain
// sums. Keys and values have H_kv heads (query head h reads key head h / (H / H_kv)); the key-side row program of a
// key head loops over its group's query heads, as the kernel's warp does. The launcher's tensor work (Δ, hS, each
// sample's real-key range, the rollout weights, the mask add's factor) is done by the Python test with torch, as
// the CUDA launcher does it with ATen. Optional counters return how many pairs each kernel visited.

#include <cmath>
#include <cstdint>
#include <vector>

#include "../../csrc/attention_math.cuh"

namespace {

using tlrp::attn::kRowsPerBlock;
using tlrp::attn::OnlineSoftmax;
using tlrp::attn::PairFlags;
using tlrp::attn::PairTerms;
using tlrp::attn::Span;

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

// The kernels' Masking: the padding mask, each sample's real-key range, the causal mask and its window.
struct Mask {
  const uint8_t* keep;   // [B, NK] or null
  const int64_t* range;  // [B, 2] or null
  int64_t nk;
  bool causal;
  int64_t window;

  int64_t first(int64_t b) const { return range ? range[2 * b] : 0; }
  int64_t end(int64_t b) const { return range ? range[2 * b + 1] : nk; }
  bool real_key(int64_t b, int64_t j) const { return keep == nullptr || keep[b * nk + j]; }
  bool attends(int64_t b, int64_t i, int64_t j) const {
    return real_key(b, j) && tlrp::attn::in_band(causal, window, i, j);
  }
  Span keys_of_block(int64_t b, int64_t i0, int64_t nq) const {
    return tlrp::attn::key_span(i0, i0 + kRowsPerBlock < nq ? i0 + kRowsPerBlock : nq, first(b), end(b), causal,
                                window);
  }
  Span queries_of_block(int64_t b, int64_t j0, int64_t nq) const {
    return tlrp::attn::query_span(j0, j0 + kRowsPerBlock < nk ? j0 + kRowsPerBlock : nk, nq, first(b), end(b),
                                  causal, window);
  }
};

// Shapes: B, query heads H, key/value heads HKV, NQ, NK, d.
struct Sizes {
  int64_t B, H, HKV, NQ, NK, D;
  int64_t group() const { return H / HKV; }
};

void count(int64_t* visits, int64_t n) {
  if (visits) *visits += n;
}

template <typename T>
void forward(const T* q, const T* k, const T* v, const Mask& m, T* out, T* lse, const Sizes& s, T scale,
             int64_t* visits) {
  std::vector<T> acc(s.D);
  for (int64_t bh = 0; bh < s.B * s.H; ++bh) {
    const int64_t b = bh / s.H, bhk = b * s.HKV + (bh % s.H) / s.group();
    for (int64_t i0 = 0; i0 < s.NQ; i0 += kRowsPerBlock) {
      const Span keys = m.keys_of_block(b, i0, s.NQ);
      for (int64_t i = i0; i < i0 + kRowsPerBlock && i < s.NQ; ++i) {
        const T* qi = q + (bh * s.NQ + i) * s.D;
        OnlineSoftmax<T> softmax;
        for (auto& a : acc) a = 0;
        for (int64_t j = keys.lo; j < keys.hi; ++j) {
          const T* kj = k + (bhk * s.NK + j) * s.D;
          T alpha, p;
          softmax.add(scaled_dot(qi, kj, s.D, scale), m.attends(b, i, j), &alpha, &p);
          for (int64_t c = 0; c < s.D; ++c) acc[c] = acc[c] * alpha + p * v[(bhk * s.NK + j) * s.D + c];
          count(visits, 1);
        }
        const T inv = softmax.inv_sum();
        for (int64_t c = 0; c < s.D; ++c) out[(bh * s.NQ + i) * s.D + c] = acc[c] * inv;
        lse[bh * s.NQ + i] = softmax.lse();
      }
    }
  }
}

template <typename T>
struct Inputs {
  const T *q, *k, *v, *grad_out, *half_s, *lse, *delta;
  Mask mask;
  Sizes s;
  T scale;
  PairFlags flags;
};

// The terms of (query i of head h, key j of its key head) for sample b.
template <typename T>
PairTerms<T> terms(const Inputs<T>& in, int64_t b, int64_t h, int64_t i, int64_t j, bool need_dp, bool need_ra,
                   const PairFlags& flags) {
  const Sizes& s = in.s;
  const int64_t bh = b * s.H + h, bhk = b * s.HKV + h / s.group();
  const int64_t qi = (bh * s.NQ + i) * s.D, kj = (bhk * s.NK + j) * s.D;
  const T sc = scaled_dot(in.q + qi, in.k + kj, s.D, in.scale);
  const T dp = need_dp ? dot(in.grad_out + qi, in.v + kj, s.D) : T(0);
  const T hv = need_ra ? dot(in.half_s + qi, in.v + kj, s.D) : T(0);
  const T delta = in.delta ? in.delta[bh * s.NQ + i] : T(0);
  return tlrp::attn::pair_terms(sc, dp, hv, in.lse[bh * s.NQ + i], delta, in.mask.attends(b, i, j), in.scale, flags);
}

// The query-side kernel: dQ, R_Q (without the mask add's factor) and the row sums of E.
template <typename T>
void backward_query(const Inputs<T>& in, bool need_dp, bool need_ra, int map_mode, T* dq, T* rq, T* rowsum,
                    int64_t* visits) {
  const Sizes& s = in.s;
  PairFlags flags = in.flags;
  flags.map_mode = map_mode;
  std::vector<T> acc_dq(s.D), acc_rq(s.D);
  for (int64_t bh = 0; bh < s.B * s.H; ++bh) {
    const int64_t b = bh / s.H, h = bh % s.H, bhk = b * s.HKV + h / s.group();
    for (int64_t i0 = 0; i0 < s.NQ; i0 += kRowsPerBlock) {
      const Span keys = in.mask.keys_of_block(b, i0, s.NQ);
      for (int64_t i = i0; i < i0 + kRowsPerBlock && i < s.NQ; ++i) {
        for (int64_t c = 0; c < s.D; ++c) acc_dq[c] = acc_rq[c] = 0;
        T row_e = 0;
        for (int64_t j = keys.lo; j < keys.hi; ++j) {
          const PairTerms<T> t = terms(in, b, h, i, j, need_dp, need_ra, flags);
          const T* kj = in.k + (bhk * s.NK + j) * s.D;
          for (int64_t c = 0; c < s.D; ++c) {
            acc_dq[c] += t.ds * kj[c];
            acc_rq[c] += t.t * kj[c];
          }
          row_e += t.e;
          count(visits, 1);
        }
        const int64_t off = (bh * s.NQ + i) * s.D;
        for (int64_t c = 0; c < s.D; ++c) {
          if (dq) dq[off + c] = acc_dq[c] * in.scale;
          if (rq) rq[off + c] = in.q[off + c] * acc_rq[c] * (T(0.5) * in.scale);
        }
        if (rowsum) rowsum[bh * s.NQ + i] = row_e;
      }
    }
  }
}

// The key-side kernel, one row program per key row of a key head over its group's query heads: dK, dV, R_K, R_V,
// the rollout product, the mask add's per-key sums, the head-mean map.
template <typename T>
void backward_key(const Inputs<T>& in, bool need_dp, bool need_ra, const T* weights, T* dk, T* dv, T* rk, T* rv,
                  T* roll, T* sums, T* map, int64_t* visits) {
  const Sizes& s = in.s;
  const bool need_grad = dk != nullptr, need_rel = rk != nullptr;
  std::vector<T> acc_dk(s.D), acc_dv(s.D), acc_rk(s.D), acc_rv(s.D);
  for (int64_t bhk = 0; bhk < s.B * s.HKV; ++bhk) {
    const int64_t b = bhk / s.HKV, hk = bhk % s.HKV;
    for (int64_t j0 = 0; j0 < s.NK; j0 += kRowsPerBlock) {
      const Span queries = in.mask.queries_of_block(b, j0, s.NQ);
      for (int64_t j = j0; j < j0 + kRowsPerBlock && j < s.NK; ++j) {
        for (int64_t c = 0; c < s.D; ++c) acc_dk[c] = acc_dv[c] = acc_rk[c] = acc_rv[c] = 0;
        T acc_roll = 0, sum_r_sc = 0, sum_ra = 0;
        for (int64_t g = 0; g < s.group(); ++g) {
          const int64_t h = hk * s.group() + g, bh = b * s.H + h;
          for (int64_t i = queries.lo; i < queries.hi; ++i) {
            const PairTerms<T> t = terms(in, b, h, i, j, need_dp, need_ra, in.flags);
            const int64_t qi = (bh * s.NQ + i) * s.D;
            for (int64_t c = 0; c < s.D; ++c) {
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
            if (weights) acc_roll += weights[b * s.NQ + i] * t.e;
            if (map && in.mask.attends(b, i, j)) map[(b * s.NQ + i) * s.NK + j] += t.e * (T(1) / T(s.H));
            count(visits, 1);
          }
        }
        const int64_t off = (bhk * s.NK + j) * s.D;
        for (int64_t c = 0; c < s.D; ++c) {
          if (need_grad) {
            dk[off + c] = acc_dk[c] * in.scale;
            dv[off + c] = acc_dv[c];
          }
          if (need_rel) {
            rk[off + c] = in.k[off + c] * acc_rk[c] * (T(0.5) * in.scale);
            rv[off + c] = in.v[off + c] * acc_rv[c];
          }
        }
        if (roll) roll[bhk * s.NK + j] = acc_roll;
        if (sums) {
          sums[(bhk * s.NK + j) * 2] = sum_r_sc;
          sums[(bhk * s.NK + j) * 2 + 1] = sum_ra;
        }
      }
    }
  }
}

// The GradCAM kernel, one row program per key of a sample over every query row (nothing skipped): the map's row
// `rows[b]` and per key its min and max over the real queries.
template <typename T>
void weighted_map(const T* q, const T* k, const T* lse, const Mask& m, const T* weights, const int64_t* rows,
                  T* row_out, T* part, const Sizes& s, T scale) {
  for (int64_t b = 0; b < s.B; ++b) {
    for (int64_t j = 0; j < s.NK; ++j) {
      T lo = INFINITY, hi = -INFINITY, at_row = 0;
      for (int64_t i = 0; i < s.NQ; ++i) {
        T e = 0;
        const bool valid = m.attends(b, i, j);
        for (int64_t h = 0; h < s.H; ++h) {
          const T sc = scaled_dot(q + ((b * s.H + h) * s.NQ + i) * s.D,
                                  k + ((b * s.HKV + h / s.group()) * s.NK + j) * s.D, s.D, scale);
          const T p = valid ? tlrp::attn::exp_of(sc - lse[(b * s.H + h) * s.NQ + i]) : T(0);
          e += weights[b * s.H + h] * p;
        }
        e = e > T(0) ? e : T(0);
        if (m.real_key(b, j) && m.real_key(b, i)) {
          lo = e < lo ? e : lo;
          hi = e > hi ? e : hi;
        }
        if (i == rows[b]) at_row = e;
      }
      row_out[b * s.NK + j] = at_row;
      part[(b * s.NK + j) * 2] = lo;
      part[(b * s.NK + j) * 2 + 1] = hi;
    }
  }
}

Sizes sizes_of(const int64_t* sizes) { return {sizes[0], sizes[1], sizes[2], sizes[3], sizes[4], sizes[5]}; }

}  // namespace

// sizes: [B, H, H_kv, NQ, NK, D]; mask_args: [causal, window]; range: [B, 2] each sample's real keys (null without
// a mask); flags: [need_grad, need_rel, mask_add, map_mode, need_dp, need_ra, rowsum_map_mode]; visits: a counter
// per kernel ([forward] or [query side, key side]), or null.
#define TLRP_HOST_ENTRY_POINTS(T, SUFFIX)                                                                          \
  extern "C" void tlrp_host_forward_##SUFFIX(const T* q, const T* k, const T* v, const uint8_t* keep,             \
                                              const int64_t* range, T* out, T* lse, const int64_t* sizes,          \
                                              T scale, const int64_t* mask_args, int64_t* visits) {                \
    const Sizes s = sizes_of(sizes);                                                                               \
    const Mask m{keep, range, s.NK, mask_args[0] != 0, mask_args[1]};                                              \
    forward<T>(q, k, v, m, out, lse, s, scale, visits);                                                            \
  }                                                                                                                \
  extern "C" void tlrp_host_backward_##SUFFIX(                                                                     \
      const T* q, const T* k, const T* v, const T* grad_out, const T* half_s, const T* lse, const T* delta,        \
      const uint8_t* keep, const int64_t* range, const T* weights, T* dq, T* rq, T* rowsum, T* dk, T* dv, T* rk,   \
      T* rv, T* roll, T* sums, T* map, const int64_t* sizes, T scale, const int64_t* mask_args,                    \
      const int64_t* flags, int64_t* visits) {                                                                     \
    const Sizes s = sizes_of(sizes);                                                                               \
    const PairFlags f{flags[0] != 0, flags[1] != 0, flags[2] != 0, static_cast<int>(flags[3])};                   \
    const Inputs<T> in{q, k, v, grad_out, half_s, lse, delta, Mask{keep, range, s.NK, mask_args[0] != 0,           \
                                                                   mask_args[1]},                                  \
                       s, scale, f};                                                                               \
    if (dq || rq || rowsum)                                                                                        \
      backward_query<T>(in, flags[4] != 0, flags[5] != 0, static_cast<int>(flags[6]), dq, rq, rowsum, visits);    \
    if (dk || rk || roll || map)                                                                                   \
      backward_key<T>(in, flags[4] != 0, flags[5] != 0, weights, dk, dv, rk, rv, roll, sums, map,                 \
                      visits ? visits + 1 : nullptr);                                                              \
  }                                                                                                                \
  extern "C" void tlrp_host_weighted_map_##SUFFIX(const T* q, const T* k, const T* lse, const uint8_t* keep,      \
                                                   const T* weights, const int64_t* rows, T* row_out, T* part,     \
                                                   const int64_t* sizes, T scale, const int64_t* mask_args) {      \
    const Sizes s = sizes_of(sizes);                                                                               \
    weighted_map<T>(q, k, lse, Mask{keep, nullptr, s.NK, mask_args[0] != 0, mask_args[1]}, weights, rows,         \
                    row_out, part, s, scale);                                                                      \
  }

TLRP_HOST_ENTRY_POINTS(double, f64)
TLRP_HOST_ENTRY_POINTS(float, f32)
