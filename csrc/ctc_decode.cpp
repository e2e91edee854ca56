// CPU kernels of seqfast::ctc_greedy_decode and seqfast::ctc_forced_align (schemas and semantics, ties
// included: seqfast/ops/ctc_decode.py). log_probs is read through its strides (a transposed (N, T, C) view
// needs no copy); float16 / bfloat16 are read as float32.
//
// Greedy: the argmax of every row (t, n), t < input_lengths[n], in parallel over the T*N rows (balanced even
// for a batch of one; contiguous float32 / float64 rows in one vectorised pass), then per sample the runs are
// merged and blanks dropped.
//
// Forced alignment: per sample (samples handed to the threads longest first, task_order.h), the Viterbi recursion over
// the 2L+1 states of the extended target, keeping two rows of scores and a one-byte backpointer per state and frame
// (the step taken into the state: 0, 1 or 2), then a walk back from the end. A state no path prefix reaches holds NaN,
// so that the walk back never leaves the valid paths even when every score is -inf; real NaN sums (a NaN log-prob, +inf
// meeting -inf) become -inf. Per frame only the states that are reachable from the start and can still reach the end
// are updated (states in [2L+1 - 2(T-t), 2t+2)). A frame's update is one loop of compares and selects that GCC
// vectorises (AVX-512 / AVX2 builds picked at run time); the emissions are gathered before it, one read for all blank
// states, and the next frame's label entries are prefetched.
// Every sample is computed by one thread in a fixed order: results do not depend on the thread count.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>
#include <vector>

#include "cpu_features.h"
#include "task_order.h"

namespace seqfast {
namespace {

template <typename scalar_t>
using acc_type = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;

struct Strides {
  int64_t t, n, c;
};

Strides strides_of(const at::Tensor& lp) { return {lp.stride(0), lp.stride(1), lp.stride(2)}; }

void check_log_probs(const at::Tensor& log_probs, const char* op) {
  TORCH_CHECK(log_probs.dim() == 3, op, ": log_probs must be (T, N, C), got ", log_probs.sizes());
  TORCH_CHECK(log_probs.device().is_cpu(), op, ": CPU kernel got a tensor on ", log_probs.device());
}

// Lengths are checked again here (cheap) because a bad one would read out of bounds.
at::Tensor checked_lengths(const at::Tensor& lengths, int64_t N, int64_t hi, const char* op, const char* name) {
  TORCH_CHECK(lengths.dim() == 1 && lengths.size(0) == N && lengths.scalar_type() == at::kLong, op, ": ", name,
              " must be (N,) int64, got ", lengths.sizes(), " ", lengths.scalar_type());
  at::Tensor l = lengths.contiguous();
  const int64_t* p = l.const_data_ptr<int64_t>();
  for (int64_t n = 0; n < N; ++n) {
    TORCH_CHECK(0 <= p[n] && p[n] <= hi, op, ": ", name, "[", n, "] = ", p[n], " not in [0, ", hi, "]");
  }
  return l;
}

// torch.argmax of one row: the first NaN if there is one, else the first maximum. One pass with kLanes
// independent lanes (lane j sees entries j, j + kLanes, ...), each keeping its running maximum, the first index
// holding it and its first NaN: elementwise selects, which GCC vectorises (a single running maximum is a
// reduction it leaves scalar). The lanes are merged at the end, ties to the smaller index.
constexpr int64_t kLanes = 16;
constexpr int32_t kNoIndex = std::numeric_limits<int32_t>::max();

template <typename T>
__attribute__((always_inline)) inline int64_t row_argmax_body(const T* __restrict x, int64_t C) {
  T m[kLanes];
  int32_t at[kLanes], nan_at[kLanes];
  for (int64_t j = 0; j < kLanes; ++j) {
    m[j] = -std::numeric_limits<T>::infinity();
    at[j] = kNoIndex;
    nan_at[j] = kNoIndex;
  }
  const int64_t whole = C / kLanes * kLanes;
  for (int64_t c = 0; c < whole; c += kLanes) {
    for (int64_t j = 0; j < kLanes; ++j) {
      const T v = x[c + j];
      const int32_t i = static_cast<int32_t>(c + j);
      const bool up = v > m[j];
      m[j] = up ? v : m[j];
      at[j] = up ? i : at[j];
      nan_at[j] = ((v != v) & (nan_at[j] == kNoIndex)) ? i : nan_at[j];
    }
  }
  T best = -std::numeric_limits<T>::infinity();
  int32_t best_at = kNoIndex, first_nan = kNoIndex;
  for (int64_t j = 0; j < kLanes; ++j) {
    if (m[j] > best || (m[j] == best && at[j] < best_at)) {
      best = m[j];
      best_at = at[j];
    }
    first_nan = std::min(first_nan, nan_at[j]);
  }
  for (int64_t c = whole; c < C; ++c) {
    if (x[c] > best) {
      best = x[c];
      best_at = static_cast<int32_t>(c);
    }
    if (x[c] != x[c] && first_nan == kNoIndex) first_nan = static_cast<int32_t>(c);
  }
  if (first_nan != kNoIndex) return first_nan;
  return best_at == kNoIndex ? 0 : best_at;  // kNoIndex: every entry is -inf, and torch answers 0
}

template <typename T>
int64_t row_argmax_baseline(const T* x, int64_t C) {
  return row_argmax_body(x, C);
}

#if SEQFAST_X86
template <typename T>
SEQFAST_TARGET_AVX512 int64_t row_argmax_avx512(const T* x, int64_t C) {
  return row_argmax_body(x, C);
}
#endif

template <typename T>
using ArgmaxFn = int64_t (*)(const T*, int64_t);

template <typename T>
ArgmaxFn<T> contiguous_argmax() {
#if SEQFAST_X86
  if (has_avx512()) return &row_argmax_avx512<T>;
#endif
  return &row_argmax_baseline<T>;
}

// Any dtype and class stride: read as acc_type (float16 / bfloat16 as float32).
template <typename scalar_t>
int64_t row_argmax(const scalar_t* x, int64_t C, int64_t sc) {
  using acc_t = acc_type<scalar_t>;
  acc_t m = -std::numeric_limits<acc_t>::infinity();
  bool nan = false;
  for (int64_t c = 0; c < C; ++c) {
    const acc_t v = static_cast<acc_t>(x[c * sc]);
    m = v > m ? v : m;
    nan |= v != v;
  }
  for (int64_t c = 0; c < C; ++c) {
    const acc_t v = static_cast<acc_t>(x[c * sc]);
    if (nan ? v != v : v == m) return c;
  }
  return 0;
}

template <typename scalar_t>
std::tuple<at::Tensor, at::Tensor, at::Tensor> greedy_impl(const at::Tensor& log_probs, const at::Tensor& il,
                                                           int64_t blank) {
  const int64_t T = log_probs.size(0), N = log_probs.size(1), C = log_probs.size(2);
  const Strides st = strides_of(log_probs);
  const scalar_t* lp = log_probs.const_data_ptr<scalar_t>();
  const int64_t* len = il.const_data_ptr<int64_t>();
  at::Tensor tokens = at::empty({N, T}, at::kLong), frames = at::empty({N, T}, at::kLong);
  at::Tensor lengths = at::empty({N}, at::kLong);
  std::vector<int32_t> best(static_cast<size_t>(T * N));
  // Rows of at least 256K entries per thread: waking a second thread costs more than a shorter scan.
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 18) / std::max<int64_t>(C, 1));
  ArgmaxFn<scalar_t> fast = nullptr;
  if constexpr (std::is_same_v<scalar_t, float> || std::is_same_v<scalar_t, double>) {
    if (st.c == 1) fast = contiguous_argmax<scalar_t>();
  }
  at::parallel_for(0, T * N, grain, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const int64_t t = r / N, n = r % N;
      if (t >= len[n]) continue;
      const scalar_t* x = lp + t * st.t + n * st.n;
      best[r] = static_cast<int32_t>(fast != nullptr ? fast(x, C) : row_argmax(x, C, st.c));
    }
  });
  int64_t* tok = tokens.data_ptr<int64_t>();
  int64_t* fr = frames.data_ptr<int64_t>();
  int64_t* out_len = lengths.data_ptr<int64_t>();
  at::parallel_for(0, N, 16, [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) {
      int64_t k = 0, prev = -1;
      for (int64_t t = 0; t < len[n]; ++t) {
        const int64_t c = best[t * N + n];
        if (c != blank && c != prev) {
          tok[n * T + k] = c;
          fr[n * T + k] = t;
          ++k;
        }
        prev = c;
      }
      out_len[n] = k;
      std::fill(tok + n * T + k, tok + (n + 1) * T, blank);
      std::fill(fr + n * T + k, fr + (n + 1) * T, -1);
    }
  });
  return {tokens, lengths, frames};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> ctc_greedy_decode(const at::Tensor& log_probs,
                                                                 const at::Tensor& input_lengths, int64_t blank) {
  check_log_probs(log_probs, "ctc_greedy_decode");
  TORCH_CHECK(0 <= blank && blank < log_probs.size(2), "ctc_greedy_decode: blank must be in [0, ", log_probs.size(2),
              "), got ", blank);
  const at::Tensor il = checked_lengths(input_lengths, log_probs.size(1), log_probs.size(0), "ctc_greedy_decode",
                                        "input_lengths");
  return AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, log_probs.scalar_type(), "ctc_greedy_decode",
                                         [&] { return greedy_impl<scalar_t>(log_probs, il, blank); });
}

// ---------------------------------------------------------------------------------------------------
// Forced alignment

// One frame of the recursion over states [lo, hi): cur[s] = best of prev[s], prev[s-1], prev[s-2] (the last only
// where skip_nan[s] is 0, NaN otherwise) + emit[s], and the step taken into b[s]. A candidate wins when it is
// strictly greater, or the best so far is unreached (NaN) and it is not: ties keep the smaller step. Written with
// the NaN flags of the inputs, not of intermediate selects, so that GCC vectorises it; the step goes through
// an int32 row (kk) first, as a loop storing bytes next to floats does not vectorise.
template <typename T>
__attribute__((always_inline)) inline void viterbi_row_body(T* __restrict cur, const T* __restrict prev,
                                                            const T* __restrict skip_nan, const T* __restrict emit,
                                                            int32_t* __restrict kk, uint8_t* __restrict b, int64_t lo,
                                                            int64_t hi) {
  constexpr T kNegInf = -std::numeric_limits<T>::infinity();
  for (int64_t s = lo; s < hi; ++s) {
    const T a0 = prev[s], a1 = prev[s - 1], a2 = prev[s - 2] + skip_nan[s];
    const bool n0 = a0 != a0, n1 = a1 != a1, n2 = a2 != a2;
    const bool c1 = (a1 > a0) | (n0 & !n1);
    const T b1 = c1 ? a1 : a0;
    const bool c2 = (a2 > b1) | (n0 & n1 & !n2);
    const T best = c2 ? a2 : b1;
    const bool unreached = n0 & n1 & n2;
    const T v = best + emit[s];
    cur[s] = ((v != v) & !unreached) ? kNegInf : v;  // a NaN log-prob, or +inf meeting -inf: -inf
    kk[s] = c2 ? 2 : (c1 ? 1 : 0);
  }
  for (int64_t s = lo; s < hi; ++s) b[s] = static_cast<uint8_t>(kk[s]);
}

template <typename T>
using RowFn = void (*)(T*, const T*, const T*, const T*, int32_t*, uint8_t*, int64_t, int64_t);

template <typename T>
void viterbi_row_baseline(T* cur, const T* prev, const T* skip_nan, const T* emit, int32_t* kk, uint8_t* b,
                          int64_t lo, int64_t hi) {
  viterbi_row_body(cur, prev, skip_nan, emit, kk, b, lo, hi);
}

#if SEQFAST_X86
template <typename T>
SEQFAST_TARGET_AVX2 void viterbi_row_avx2(T* cur, const T* prev, const T* skip_nan, const T* emit, int32_t* kk,
                                          uint8_t* b, int64_t lo, int64_t hi) {
  viterbi_row_body(cur, prev, skip_nan, emit, kk, b, lo, hi);
}

template <typename T>
SEQFAST_TARGET_AVX512 void viterbi_row_avx512(T* cur, const T* prev, const T* skip_nan, const T* emit, int32_t* kk,
                                              uint8_t* b, int64_t lo, int64_t hi) {
  viterbi_row_body(cur, prev, skip_nan, emit, kk, b, lo, hi);
}
#endif

// The same operations in every version (compares and selects, no FMA to contract): identical results.
template <typename T>
RowFn<T> viterbi_row() {
#if SEQFAST_X86
  if (has_avx512()) return &viterbi_row_avx512<T>;
  if (has_avx2()) return &viterbi_row_avx2<T>;
#endif
  return &viterbi_row_baseline<T>;
}

// One sample's Viterbi pass and walk back. ext: the 2L+1 states' classes; skip_nan: 0 where a state may be
// entered from two states back, NaN where not. bp: Tn * W scratch. Writes paths / scores of frames < Tn.
template <typename scalar_t>
void align_sample(const scalar_t* lp, const Strides& st, int64_t Tn, const int64_t* ext,
                  const acc_type<scalar_t>* skip_nan, int64_t W, std::vector<acc_type<scalar_t>>& rows,
                  std::vector<acc_type<scalar_t>>& emit, std::vector<int32_t>& kk, std::vector<uint8_t>& bp,
                  RowFn<acc_type<scalar_t>> row_fn, int64_t* path, scalar_t* score, int64_t path_stride) {
  using acc_t = acc_type<scalar_t>;
  constexpr acc_t kNaN = std::numeric_limits<acc_t>::quiet_NaN();
  constexpr acc_t kNegInf = -std::numeric_limits<acc_t>::infinity();
  if (Tn == 0) return;
  // Two rows of W + 2 scores; the two leading entries stay NaN (states -2 and -1).
  rows.assign(2 * (W + 2), kNaN);
  emit.resize(W);
  kk.resize(W);
  bp.resize(static_cast<size_t>(Tn * W));
  acc_t* prev = rows.data() + 2;
  acc_t* cur = rows.data() + W + 4;
  for (int64_t s = 0; s < std::min<int64_t>(W, 2); ++s) {
    const acc_t v = static_cast<acc_t>(lp[ext[s] * st.c]);
    prev[s] = v != v ? kNegInf : v;
  }
  for (int64_t t = 1; t < Tn; ++t) {
    const int64_t lo = std::max<int64_t>(0, W - 2 * (Tn - t)), hi = std::min<int64_t>(W, 2 * t + 2);
    const scalar_t* row = lp + t * st.t;
    // Every even state is the blank: one read for them all, a gather for the labels only.
    const acc_t blank_lp = static_cast<acc_t>(row[ext[0] * st.c]);
    for (int64_t s = lo & ~int64_t{1}; s < hi; s += 2) {
      emit[s] = blank_lp;
      if (s + 1 < W) emit[s + 1] = static_cast<acc_t>(row[ext[s + 1] * st.c]);
    }
    if (t + 1 < Tn) {  // the next frame's reads are scattered over its row: start them now
      const scalar_t* next = row + st.t;
      prefetch_line(next + ext[0] * st.c);
      for (int64_t s = lo | 1; s < hi; s += 2) prefetch_line(next + ext[s] * st.c);
    }
    row_fn(cur, prev, skip_nan, emit.data(), kk.data(), bp.data() + t * W, lo, hi);
    std::swap(prev, cur);
  }
  int64_t s = 0;
  if (W > 1) s = (prev[W - 2] != prev[W - 2] || prev[W - 1] > prev[W - 2]) ? W - 1 : W - 2;
  for (int64_t t = Tn - 1; t >= 0; --t) {
    const int64_t c = ext[s];
    path[t * path_stride] = c;
    score[t * path_stride] = lp[t * st.t + c * st.c];
    if (t > 0) s -= bp[t * W + s];
  }
}

template <typename scalar_t>
std::tuple<at::Tensor, at::Tensor> align_impl(const at::Tensor& log_probs, const at::Tensor& tg, const at::Tensor& il,
                                              const at::Tensor& tl, int64_t blank) {
  using acc_t = acc_type<scalar_t>;
  const int64_t T = log_probs.size(0), N = log_probs.size(1), S = tg.size(1);
  const Strides st = strides_of(log_probs);
  const scalar_t* lp = log_probs.const_data_ptr<scalar_t>();
  const int64_t* in_len = il.const_data_ptr<int64_t>();
  const int64_t* tg_len = tl.const_data_ptr<int64_t>();
  const int64_t* labels = tg.const_data_ptr<int64_t>();
  at::Tensor paths = at::full({N, T}, blank, at::kLong);
  at::Tensor scores = at::zeros({N, T}, log_probs.options().memory_format(at::MemoryFormat::Contiguous));
  int64_t* path = paths.data_ptr<int64_t>();
  scalar_t* score = scores.data_ptr<scalar_t>();
  const RowFn<acc_t> row_fn = viterbi_row<acc_t>();
  struct Scratch {
    std::vector<int64_t> ext;
    std::vector<acc_t> skip_nan, rows, emit;
    std::vector<int32_t> kk;
    std::vector<uint8_t> bp;
  };
  const auto align = [&](int64_t n, Scratch& w) {
    const int64_t L = tg_len[n], W = 2 * L + 1;
    w.ext.assign(W, blank);
    w.skip_nan.assign(W, std::numeric_limits<acc_t>::quiet_NaN());
    for (int64_t k = 0; k < L; ++k) {
      w.ext[2 * k + 1] = labels[n * S + k];
      if (k > 0 && labels[n * S + k] != labels[n * S + k - 1]) w.skip_nan[2 * k + 1] = 0;
    }
    align_sample<scalar_t>(lp + n * st.n, st, in_len[n], w.ext.data(), w.skip_nan.data(), W, w.rows, w.emit, w.kk,
                           w.bp, row_fn, path + n * T, score + n * T, 1);
  };
  // A sample's cost: frames x states. Threads only for enough work (waking a second thread costs more than a
  // small batch); then the samples go longest first to whichever thread is free (task_order.h).
  std::vector<int64_t> cost(N);
  int64_t total = 0;
  for (int64_t n = 0; n < N; ++n) total += cost[n] = in_len[n] * (2 * tg_len[n] + 1);
  if (total < (int64_t{1} << 16)) {
    Scratch w;
    for (int64_t n = 0; n < N; ++n) align(n, w);
  } else {
    run_tasks(by_cost(cost), [] { return Scratch(); }, align);
  }
  return {paths, scores};
}

std::tuple<at::Tensor, at::Tensor> ctc_forced_align(const at::Tensor& log_probs, const at::Tensor& targets,
                                                    const at::Tensor& input_lengths,
                                                    const at::Tensor& target_lengths, int64_t blank) {
  check_log_probs(log_probs, "ctc_forced_align");
  const int64_t T = log_probs.size(0), N = log_probs.size(1), C = log_probs.size(2);
  TORCH_CHECK(0 <= blank && blank < C, "ctc_forced_align: blank must be in [0, ", C, "), got ", blank);
  TORCH_CHECK(targets.dim() == 2 && targets.size(0) == N && targets.scalar_type() == at::kLong,
              "ctc_forced_align: targets must be (N, S) int64, got ", targets.sizes(), " ", targets.scalar_type());
  const int64_t S = targets.size(1);
  const at::Tensor il = checked_lengths(input_lengths, N, T, "ctc_forced_align", "input_lengths");
  const at::Tensor tl = checked_lengths(target_lengths, N, S, "ctc_forced_align", "target_lengths");
  const at::Tensor tg = targets.contiguous();
  const int64_t* labels = tg.const_data_ptr<int64_t>();
  for (int64_t n = 0; n < N; ++n) {
    const int64_t L = tl.const_data_ptr<int64_t>()[n];
    int64_t need = L;
    for (int64_t k = 0; k < L; ++k) {
      const int64_t l = labels[n * S + k];
      TORCH_CHECK(0 <= l && l < C && l != blank, "ctc_forced_align: targets[", n, ", ", k, "] = ", l,
                  " is not a label in [0, ", C, ") other than blank");
      need += k > 0 && l == labels[n * S + k - 1];
    }
    TORCH_CHECK(need <= il.const_data_ptr<int64_t>()[n], "ctc_forced_align: targets[", n, "] needs ", need,
                " frames, input_lengths[", n, "] = ", il.const_data_ptr<int64_t>()[n]);
  }
  return AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, log_probs.scalar_type(), "ctc_forced_align",
                                         [&] { return align_impl<scalar_t>(log_probs, tg, il, tl, blank); });
}

}  // namespace

TORCH_LIBRARY_IMPL(seqfast, CPU, m) {
  m.impl("ctc_greedy_decode", &ctc_greedy_decode);
  m.impl("ctc_forced_align", &ctc_forced_align);
}

}  // namespace seqfast
