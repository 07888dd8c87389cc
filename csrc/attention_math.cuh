// The per-element math of the attention relevance op (csrc/attention_relevance.cu), as __host__ __device__
// functions with no CUDA or ATen dependency, so that the host test (tests/host/attention_host.cpp, built by g++ in
// CI) runs exactly this code on CPU tiles against the torch reference. The kernels only add the thread layout: the
// warp-wide dot products that feed these functions and the sums of their results.
//
// Notation (triton_kernels/attention_lrp.py, docs/method.md §2.6): sc = scale·q·k, P = exp(sc − lse), dP = dO·v,
// hS = safe_divide(R_O, O)/2, Δ = dO·O; gradient dS = P (dP − Δ); relevance R_A = P (hS·v), the BERT mask add's
// z-rule share R_sc = sc·safe_divide(R_A, sc), T = safe_divide(R_sc, sc, eps·scale); the map E by map mode.
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define TLRP_HD __host__ __device__ __forceinline__
#else
#define TLRP_HD inline
#endif

namespace tlrp {
namespace attn {

constexpr double kEps = 1e-9;         // the reference's denominator offset (docs/method.md §2.2)
constexpr double kNegBig = -1.0e30;   // finite "minus infinity": a fully masked row never makes inf − inf
// lse of a query row that attends no key (a left-padded position under the causal mask), a finite "plus infinity"
// so that the backward's exp(sc − lse) is 0 without overflow; ops.attention.EMPTY_ROW_LSE, the Triton kernels' too
constexpr double kEmptyRowLse = 1.0e30;
// Rows per block (one warp each). The kernels skip what a whole block cannot attend, so the host test runs its row
// programs in blocks of the same size.
constexpr int kRowsPerBlock = 4;

// map modes, as triton_kernels/attention_lrp.py's MAP_* and ops.attention.MAP_MODES
enum MapMode : int { kMapNone = 0, kMapTransformerAttribution = 1, kMapGae = 2, kMapRollout = 3, kMapPartialLrp = 4 };

TLRP_HD bool map_reads_relevance(int mode) { return mode == kMapTransformerAttribution || mode == kMapPartialLrp; }
TLRP_HD bool map_reads_gradient(int mode) { return mode == kMapTransformerAttribution || mode == kMapGae; }

// safe_divide of the reference: a / (b + eps), eps where that sum is 0, and 0 where b == 0
template <typename acc_t>
TLRP_HD acc_t safe_div(acc_t a, acc_t b, acc_t eps) {
  if (b == acc_t(0)) return acc_t(0);
  acc_t den = b + eps;
  if (den == acc_t(0)) den = eps;
  return a / den;
}

TLRP_HD float exp_of(float x) { return expf(x); }
TLRP_HD double exp_of(double x) { return exp(x); }
TLRP_HD float log_of(float x) { return logf(x); }
TLRP_HD double log_of(double x) { return log(x); }

// Online softmax of one query row (the forward): the running max and sum of exp, and the factor that rescales the
// output accumulator when a new key raises the max.
template <typename acc_t>
struct OnlineSoftmax {
  acc_t row_max = acc_t(kNegBig);
  acc_t row_sum = acc_t(0);

  // Adds one key with score sc (valid: a real key); returns (alpha, p): acc ← alpha·acc + p·v.
  TLRP_HD void add(acc_t sc, bool valid, acc_t* alpha, acc_t* p) {
    if (!valid) {
      *alpha = acc_t(1);
      *p = acc_t(0);
      return;
    }
    // one exp per key: a new maximum rescales what came before, any other key is scaled by the maximum
    if (sc > row_max) {
      *alpha = exp_of(row_max - sc);
      *p = acc_t(1);
      row_max = sc;
    } else {
      *alpha = acc_t(1);
      *p = exp_of(sc - row_max);
    }
    row_sum = row_sum * (*alpha) + *p;
  }
  // 1 / row sum, for O = acc / row sum; a query with no real key attends to nothing (O = 0), not 0/0
  TLRP_HD acc_t inv_sum() const { return row_sum == acc_t(0) ? acc_t(1) : acc_t(1) / row_sum; }
  TLRP_HD acc_t lse() const { return row_sum == acc_t(0) ? acc_t(kEmptyRowLse) : row_max + log_of(row_sum); }
};

// ------------------------------------------------------------------------------------- masks and skipped ranges
// A pair (query i, key j) attends when j is a real key (the padding mask) and, with the causal mask, j ≤ i and
// (sliding window, window > 0) i − j < window. The ranges below bound the pairs a block visits; every pair inside
// is still checked, so they only have to contain the attended pairs (the host test also bounds what they add).

// The causal mask and the sliding window (no constraint without the causal mask)
TLRP_HD bool in_band(bool causal, int64_t window, int64_t i, int64_t j) {
  return !causal || (j <= i && (window <= 0 || i - j < window));
}

struct Span {  // [lo, hi), empty when lo >= hi
  int64_t lo, hi;
};

// The keys that query rows [i0, i1) can attend, with [first, end) the sample's real keys ([0, NK) without a mask):
// none of the padding on either side, under the causal mask none after i1 − 1 (and so none at all for left-padded
// rows before the first real key) and none window or more behind i0.
TLRP_HD Span key_span(int64_t i0, int64_t i1, int64_t first, int64_t end, bool causal, int64_t window) {
  Span s{first, end};
  if (causal) {
    if (i1 < s.hi) s.hi = i1;
    if (window > 0 && i0 - window + 1 > s.lo) s.lo = i0 - window + 1;
  }
  return s;
}

// The query rows (of nq) that can attend some key of [j0, j1): none when those keys are all padding; under the
// causal mask none before j0 or before the sample's first real key, and with a window none from j1 − 1 + window on.
TLRP_HD Span query_span(int64_t j0, int64_t j1, int64_t nq, int64_t first, int64_t end, bool causal,
                        int64_t window) {
  Span s{0, nq};
  if (j1 <= first || j0 >= end) s.hi = 0;
  if (causal) {
    s.lo = j0 > first ? j0 : first;
    if (window > 0 && j1 - 1 + window < s.hi) s.hi = j1 - 1 + window;
  }
  return s;
}

// What one (query, key) pair contributes to the backward; zeros for what is not needed.
template <typename acc_t>
struct PairTerms {
  acc_t p;    // P, the attention probability
  acc_t ds;   // dS = P (dP − Δ), the scores' gradient (before the scale)
  acc_t ra;   // R_A = P (hS·v), the attention relevance
  acc_t t;    // T = safe_divide(R_sc, sc, eps·scale): R_Q, R_K's factor
  acc_t r_sc; // R_sc, the scores' share of the mask add (R_A without a mask add): summed per key for its norm
  acc_t e;    // the map entry E
};

// Flags of one backward call (uniform over a launch).
struct PairFlags {
  bool need_grad;  // dS (gradients of q, k, v)
  bool need_rel;   // T, R_sc (relevance of q, k)
  bool mask_add;   // the model adds its padding mask to the scores (BERT): R_sc by the z-rule
  int map_mode;    // MapMode
};

// sc: scale·q·k; dp: dO·v; hv: hS·v (each 0 where not needed); lse, delta: the query row's statistics.
template <typename acc_t>
TLRP_HD PairTerms<acc_t> pair_terms(acc_t sc, acc_t dp, acc_t hv, acc_t lse, acc_t delta, bool valid, acc_t scale,
                                    const PairFlags& f) {
  PairTerms<acc_t> out{};
  out.p = valid ? exp_of(sc - lse) : acc_t(0);
  out.ra = out.p * hv;
  if (f.need_grad) out.ds = out.p * (dp - delta);
  if (f.need_rel) {
    const acc_t eps = acc_t(kEps);
    out.r_sc = f.mask_add ? sc * safe_div(out.ra, sc, eps) : out.ra;
    out.t = safe_div(out.r_sc, sc, eps * scale);
  }
  switch (f.map_mode) {
    case kMapTransformerAttribution: out.e = dp * out.ra > acc_t(0) ? dp * out.ra : acc_t(0); break;
    case kMapGae: out.e = dp * out.p > acc_t(0) ? dp * out.p : acc_t(0); break;
    case kMapRollout: out.e = out.p; break;
    case kMapPartialLrp: out.e = out.ra > acc_t(0) ? out.ra : acc_t(0); break;
    default: out.e = acc_t(0);
  }
  return out;
}

}  // namespace attn
}  // namespace tlrp
