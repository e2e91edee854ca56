// CPU kernels of seqfast::ctc_loss_forward / seqfast::ctc_loss_backward (schemas and semantics:
// seqfast/ops/ctc_loss.py).
//
// Forward: per sample, the alpha recursion over the 2L+1 states of the extended target (blank, l1, blank, ...,
// lL, blank), one frame per step; a step is a shifted three-term sum along the states, so it vectorises over s.
// float32 on AVX2 / AVX-512 runs it on extended-range linear numbers (mantissa + int32 exponent: no exp / log per
// state, rounding relative to the value instead of to |log alpha|; ctc_loss_simd.h, ctc_loss_simd512.h);
// float64 and CPUs without AVX2 run it in log space. Each frame's emissions come straight from the log_probs row
// (float32, or 16-bit bits widened in registers): one exp per label and one for the blank, not one per state
// (emission_gather_avx2). The stored log_alpha rows take one log per state (a table
// log of the mantissa). Without keep_alpha (no gradient to come) nothing is stored and no log is taken; the loss
// is the same bits either way.
// Checkpoints (alpha_every = K > 1, float32 on AVX2 / AVX-512 only): the forward stores every K-th frame's row in
// extended form instead (mantissas and exponents, no log), and backward recomputes each segment of K frames from
// its checkpoint into per-sample scratch, with forward's own row operation on the same emissions (the same bits),
// just before beta walks down through it; the recompute keeps the frame's emissions for beta, and the posteriors
// come from the linear numbers (alpha * beta * exp(nll): no exp per state). The scratch is K rows of 16 bytes a
// state per sample; seqfast/ops/ctc_loss.py chooses K so that a thread's share stays inside L2.
//
// Loop order: samples are split over threads in runs of consecutive samples of about equal cost (for_sample_runs);
// each thread advances a run frame by frame (t outer, n inner), so that the log_probs rows it reads, (t, n0..n1),
// are adjacent in memory, and it prefetches the emissions of the next step into L1 and of kFarSteps ahead into
// L2. GCC deletes __builtin_prefetch in these loops, hence the inline-asm prefetch_line.
//
// Backward, in two passes so that neither needs atomics:
//  1. per sample: beta from t = input_length - 1 down to 0, keeping two rows; with the stored alpha it gives
//     the state posteriors, reduced right away to what the gradient needs per frame: the blank's total (all
//     even states) and one value per target position, (N, T, S+1) -- half the size of log_alpha, so the peak
//     stays below torch's, which keeps a whole log_beta.
//  2. per frame (t, n) (parallel over T*N rows, which balances even for a batch of one):
//     grad[t, n, :] = g * exp(lp) (a streaming pass, prefetching 4 KiB ahead), then the posteriors are
//     subtracted at the blank and at each distinct label (its positions' posteriors summed in target order:
//     LabelGroups), without any shared writes.
// With float32 on AVX2 and at least one sample per thread, the two are fused, frame-major like forward: each
// beta step is followed by its gradient row (same row operations, so the same bits), without the buffer.
// Every element is computed by one thread in a fixed order: results are identical run to run, and the AVX-512
// row kernels do per lane exactly what the AVX2 ones do, so the two ISAs give identical bits as well
// (SEQFAST_CPU_ISA / _C.set_cpu_isa cap the ISA, for tests: cpu_features.h).
//
// Outputs of 1 MiB or more (log_alpha, the gradient) come from BufferCache (buffer_cache.h): freed outputs are
// kept, bounded, and handed out again, because the page faults of a fresh multi-MiB buffer cost more than the
// kernels themselves on large shapes.
//
// float16 / bfloat16 are read as float32 and computed in float32; float64 runs a scalar float64 path.
//
// NaN and +inf log-probs give torch's NaN losses without a test in the recursions: these run with such values as
// probability 0 and note per sample whether one came by (one add per vector of forward emissions); only for those
// samples is torch's spread of the NaN replayed (poison_reaches_end).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <cmath>
#include <cstdint>
#include <limits>
#include <memory>
#include <type_traits>
#include <utility>
#include <vector>

#include "buffer_cache.h"
#include "cpu_features.h"
#include "ctc_loss_simd.h"
#include "ctc_loss_simd512.h"
#include "half_rows.h"
#include "task_order.h"

namespace seqfast {
namespace {

constexpr int64_t kLanes = 8;  // scratch rows are padded to whole AVX2 float vectors

int64_t pad_to_lanes(int64_t n) { return (n + kLanes - 1) / kLanes * kLanes; }

// The two bounds of a frame's states that can matter, shared by the forward (AlphaExt) and backward (BetaExt)
// recursions. Each frame advances at most two states, so at frame t the states from 2t+2 on are not reachable
// from the start yet: the end of the padded row's vectors that hold any that are (padded: the row's length).
inline int64_t reachable_end(int64_t padded, int64_t t) { return std::min(padded, pad_to_lanes(2 * t + 2)); }
// And the states below states - 2 (len - t) can no longer reach the end by frame len - 1: the first that can.
inline int64_t first_live_state(int64_t states, int64_t len, int64_t t) {
  return std::max<int64_t>(0, states - 2 * (len - t));
}

template <typename T>
constexpr T neg_inf() {
  return -std::numeric_limits<T>::infinity();
}

// ---------------------------------------------------------------------------------------------------
// Row operations, scalar versions (float64, and float32 on CPUs without AVX2). Same contracts as the
// AVX2 versions in ctc_loss_simd.h; `n` need not be padded here.

template <typename T>
T logaddexp3(T a, T b, T c) {
  const T m = std::max(a, std::max(b, c));
  if (m == neg_inf<T>()) return a + b + c;  // -inf, or NaN if one of them is NaN
  return m + std::log(std::exp(a - m) + std::exp(b - m) + std::exp(c - m));
}

template <typename T>
T logaddexp2(T a, T b) {
  const T m = std::max(a, b);
  if (m == neg_inf<T>()) return a + b;
  return m + std::log(std::exp(a - m) + std::exp(b - m));
}

template <typename T>
void alpha_row_scalar(T* out, const T* prev, const T* skip, const T* lpe, int64_t n) {
  for (int64_t s = 0; s < n; ++s) out[s] = logaddexp3(prev[s], prev[s - 1], prev[s - 2] + skip[s]) + lpe[s];
}

template <typename T>
void beta_row_scalar(T* bx, T* b, const T* next, const T* skip, const T* lpe, int64_t n) {
  for (int64_t s = 0; s < n; ++s) {
    bx[s] = logaddexp3(next[s], next[s + 1], next[s + 2] + skip[s]);
    b[s] = bx[s] + lpe[s];
  }
}

template <typename T>
T posterior_row_scalar(T* post, const T* alpha, const T* bx, T nll, int64_t n) {
  T blank = 0;
  for (int64_t s = 0; s < n; ++s) {
    post[s] = std::exp(alpha[s] + bx[s] + nll);
    if (s % 2 == 0) blank += post[s];
  }
  return blank;
}

template <typename T>
void exp_row_scalar(T* out, const T* in, T off, T g, int64_t n) {
  for (int64_t c = 0; c < n; ++c) out[c] = g * std::exp(in[c] - off);
}

template <typename T>
T logsumexp_row_scalar(const T* in, int64_t n) {
  T m = neg_inf<T>();
  for (int64_t c = 0; c < n; ++c) m = std::max(m, in[c]);
  if (!std::isfinite(m)) return std::numeric_limits<T>::quiet_NaN();  // as logsumexp_row_avx2
  T sum = 0;
  for (int64_t c = 0; c < n; ++c) sum += std::exp(in[c] - m);
  return m + std::log(sum);
}

template <typename T>
struct RowOps {
  void (*alpha_row)(T*, const T*, const T*, const T*, int64_t);
  void (*beta_row)(T*, T*, const T*, const T*, const T*, int64_t);
  T (*posterior_row)(T*, const T*, const T*, T, int64_t);
  void (*exp_row)(T*, const T*, T, T, int64_t);
  T (*logsumexp_row)(const T*, int64_t);
};

template <typename T>
RowOps<T> scalar_ops() {
  return {&alpha_row_scalar<T>, &beta_row_scalar<T>, &posterior_row_scalar<T>, &exp_row_scalar<T>,
          &logsumexp_row_scalar<T>};
}

template <typename T>
RowOps<T> row_ops() {
  if constexpr (std::is_same_v<T, float>) {
#if SEQFAST_X86
    if (has_avx2()) {
      return {&ctc_simd::alpha_row_avx2, &ctc_simd::beta_row_avx2, &ctc_simd::posterior_row_avx2,
              has_avx512() ? &ctc_simd::exp_row_avx512 : &ctc_simd::exp_row_avx2,
              has_avx512() ? &ctc_simd::logsumexp_row_avx512 : &ctc_simd::logsumexp_row_avx2};
    }
#endif
  }
  return scalar_ops<T>();
}

// ---------------------------------------------------------------------------------------------------

template <typename scalar_t>
using acc_type = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;

struct Sizes {
  int64_t T, N, C, S;
};

Sizes check_inputs(const at::Tensor& log_probs, const at::Tensor& targets, const at::Tensor& input_lengths,
                   const at::Tensor& target_lengths, int64_t blank) {
  TORCH_CHECK(log_probs.dim() == 3, "ctc_loss: log_probs must be (T, N, C), got ", log_probs.sizes());
  TORCH_CHECK(log_probs.device().is_cpu(), "ctc_loss: CPU kernel got a tensor on ", log_probs.device());
  const int64_t T = log_probs.size(0), N = log_probs.size(1), C = log_probs.size(2);
  TORCH_CHECK(targets.dim() == 2 && targets.size(0) == N && targets.scalar_type() == at::kLong,
              "ctc_loss: targets must be (N, S) int64, got ", targets.sizes(), " ", targets.scalar_type());
  for (const at::Tensor* len : {&input_lengths, &target_lengths}) {
    TORCH_CHECK(len->dim() == 1 && len->size(0) == N && len->scalar_type() == at::kLong,
                "ctc_loss: lengths must be (N,) int64, got ", len->sizes(), " ", len->scalar_type());
  }
  TORCH_CHECK(0 <= blank && blank < C, "ctc_loss: blank must be in [0, ", C, "), got ", blank);
  return {T, N, C, targets.size(1)};
}

// Checked again here (cheap, O(N S)) because a bad length or label would read out of bounds.
void check_values(const Sizes& z, const int64_t* il, const int64_t* tl, const int64_t* tg, int64_t blank) {
  for (int64_t n = 0; n < z.N; ++n) {
    TORCH_CHECK(0 <= il[n] && il[n] <= z.T, "ctc_loss: input_lengths[", n, "] = ", il[n], " not in [0, ", z.T, "]");
    TORCH_CHECK(0 <= tl[n] && tl[n] <= z.S, "ctc_loss: target_lengths[", n, "] = ", tl[n], " not in [0, ", z.S, "]");
    for (int64_t k = 0; k < tl[n]; ++k) {
      const int64_t l = tg[n * z.S + k];
      TORCH_CHECK(0 <= l && l < z.C && l != blank, "ctc_loss: targets[", n, ", ", k, "] = ", l,
                  " is not a label in [0, ", z.C, ") other than blank");
    }
  }
}

// Per-sample scratch: the extended target's emissions lpe[s] = lp[t, n, ext[s]] for one frame, and the
// skip mask (0 where state s may be reached from s-2, -inf elsewhere).
template <typename scalar_t, typename acc_t>
struct Sample {
  int64_t L, states, padded;
  const int64_t* labels;
  std::vector<acc_t> skip;  // [padded + 2]: -inf past the last state, so that skip + 2 serves beta
  std::vector<acc_t> lpe;   // [padded]: -inf past the last state
  std::vector<int32_t> lab32;  // the labels as int32, then class 0 up to L + 24 (the lookups' reach)
  std::vector<int32_t> cls32;  // [padded + 16]: label k's class at state 2k + 1, class 0 elsewhere

  Sample(const int64_t* labels_, int64_t L_)
      : L(L_), states(2 * L_ + 1), padded(pad_to_lanes(2 * L_ + 1)), labels(labels_),
        skip(padded + 2, neg_inf<acc_t>()), lpe(padded, neg_inf<acc_t>()), lab32(L_ + 24, 0),
        cls32(padded + 16, 0) {
    for (int64_t k = 1; k < L; ++k) {
      if (labels[k] != labels[k - 1]) skip[2 * k + 1] = 0;
    }
    for (int64_t k = 0; k < L; ++k) lab32[k] = cls32[2 * k + 1] = static_cast<int32_t>(labels[k]);
  }

  // Frame t's emissions from its row of log_probs (minus the row's log-normaliser for logits).
  void gather(const scalar_t* row, acc_t lse, int64_t blank) {
    const acc_t b = static_cast<acc_t>(row[blank]) - lse;
    for (int64_t k = 0; k < L; ++k) {
      lpe[2 * k] = b;
      lpe[2 * k + 1] = static_cast<acc_t>(row[labels[k]]) - lse;
    }
    lpe[2 * L] = b;
  }

  // A later frame's emissions, scattered over its row: loading them starts while this frame computes. Two
  // distances (kFarSteps): into L2 several steps ahead (to_l2), into L1 the step before.
  // Labels from `first` on (the forward's states below can no longer reach the end: AlphaExt::first_label).
  void prefetch(const scalar_t* row, int64_t blank, int64_t C, bool to_l2 = false, int64_t first = 0) const {
    if (to_l2) {
      prefetch_lines<true>(row, blank, C, first);
    } else {
      prefetch_lines<false>(row, blank, C, first);
    }
  }

 private:
  // With more labels than cache lines in the row, the row's lines in order instead (fewer requests).
  template <bool ToL2>
  void prefetch_lines(const scalar_t* row, int64_t blank, int64_t C, int64_t first) const {
    constexpr int64_t per_line = 64 / sizeof(scalar_t);
    const auto line = [](const void* p) { ToL2 ? prefetch_line_l2(p) : prefetch_line(p); };
    if (L - first + 1 > C / per_line) {
      for (int64_t c = 0; c < C; c += per_line) line(row + c);
    } else {
      line(row + blank);
      for (int64_t k = first; k < L; ++k) line(row + labels[k]);
    }
  }
};

// How many steps (one sample's frame each, in a loop's own order) ahead the emissions are fetched into L2; the
// step just before, into L1. On scattered rows of a large log_probs one step ahead alone leaves the load misses
// waiting on each other. Measured on Zen 3 (NOTES, "Emission prefetch into L2"): the forward -8-16 % on
// (200,64,5000,50) and -10-14 % on (1000,32,1000,200); 2-4 steps did about the same, 6 and more less.
constexpr int64_t kFarSteps = 3;

// The step k ahead of (item i, frame t) in a loop that takes items [0, m) in order within each frame and the frames
// in direction dt (+1 or -1): {item, frame}.
inline std::pair<int64_t, int64_t> step_ahead(int64_t i, int64_t t, int64_t k, int64_t m, int64_t dt) {
  return {(i + k) % m, t + dt * ((i + k) / m)};
}

// A sample's target positions grouped by label, labels ascending and positions in target order within a label:
// a gradient row subtracts each label's posterior total once. Subtracting per position instead stores to the same
// entry again for a repeated label, and the loads of the next positions, guessed not to alias those stores, often
// do: about 3 cycles a label in pipeline restarts (NOTES, "CTC on CPU: fewer operations per state").
struct LabelGroups {
  std::vector<int32_t> order;  // target positions by (label, position)
  std::vector<int32_t> start;  // group j: order[start[j], start[j + 1]); one entry more than there are groups
  std::vector<int64_t> label;  // group j's label
  // The groups in blocks of 16 for label_corrections_avx512: per block, each lane's label and count, and the
  // posterior indices 1 + position, a row of 16 per position up to the block's largest count (block_rows).
  std::vector<int32_t> lane_label, lane_count, lane_idx, block_rows;
  // For alphabets of up to 32 classes (gradient_row32_avx512): class k's block * 16 + lane, or -1 (not a label).
  std::vector<int32_t> class_slot = std::vector<int32_t>(32, -1);
  std::vector<int32_t> lane_state;  // lane_idx as indices of the label states: 1 + position -> 2 position + 1

  LabelGroups() = default;
  LabelGroups(const int64_t* labels, int64_t L) : order(L) {
    for (int64_t k = 0; k < L; ++k) order[k] = static_cast<int32_t>(k);
    std::stable_sort(order.begin(), order.end(), [&](int32_t a, int32_t b) { return labels[a] < labels[b]; });
    for (int64_t i = 0; i < L; ++i) {
      if (i == 0 || labels[order[i]] != labels[order[i - 1]]) {
        start.push_back(static_cast<int32_t>(i));
        label.push_back(labels[order[i]]);
      }
    }
    start.push_back(static_cast<int32_t>(L));
    const int64_t groups = static_cast<int64_t>(label.size()), blocks = (groups + 15) / 16;
    // Lanes take the groups by decreasing count, so that a block's rows (its largest count) are few where its
    // groups are short: each row is one gather. A group's sum is its own, so the lane order changes no bits.
    std::vector<int32_t> by_count(groups);
    for (int64_t j = 0; j < groups; ++j) by_count[j] = static_cast<int32_t>(j);
    std::stable_sort(by_count.begin(), by_count.end(),
                     [&](int32_t x, int32_t y) { return start[x + 1] - start[x] > start[y + 1] - start[y]; });
    lane_label.assign(blocks * 16, 0);
    lane_count.assign(blocks * 16, 0);
    for (int64_t b = 0; b < blocks; ++b) {
      const int64_t first_lane = b * 16, lanes_here = std::min<int64_t>(16, groups - first_lane);
      int32_t rows = 0;
      for (int64_t i = first_lane; i < first_lane + lanes_here; ++i) {
        const int32_t j = by_count[i];
        lane_label[i] = static_cast<int32_t>(label[j]);
        lane_count[i] = start[j + 1] - start[j];
        rows = std::max(rows, lane_count[i]);
        if (label[j] < 32) class_slot[label[j]] = static_cast<int32_t>(i);
      }
      block_rows.push_back(rows);
      const size_t first = lane_idx.size();
      lane_idx.resize(first + rows * 16, 0);
      for (int64_t i = first_lane; i < first_lane + lanes_here; ++i) {
        const int32_t j = by_count[i];
        for (int32_t m = 0; m < lane_count[i]; ++m) {
          lane_idx[first + m * 16 + (i - first_lane)] = 1 + order[start[j] + m];
        }
      }
    }
    lane_state.resize(lane_idx.size());
    for (size_t i = 0; i < lane_idx.size(); ++i) lane_state[i] = 2 * lane_idx[i] - 1;
  }
};

// NaN and +inf emissions ("poison"). torch's log-space recursion makes alpha NaN at a poisoned state (-inf + NaN,
// inf - inf in its log-sum-exp) from frame 1 on (frame 0 starts states 0 and 1 only), and the NaN then spreads
// along every transition whatever it meets: the loss is NaN iff it reaches a final state at the last frame. The
// recursions here treat poison as probability 0, which keeps log_alpha, beta and the posteriors of everything else
// finite (the gradient shows the poison where it is: exp(NaN), exp(+inf)); they only note whether a sample had any,
// and poison_reaches_end then replays the spread for those samples alone (rare), on booleans.
template <typename T>
bool clear_poison(T* x, int64_t n) {
  bool any = false;
  for (int64_t s = 0; s < n; ++s) {
    if (!(x[s] < std::numeric_limits<T>::infinity())) {
      x[s] = neg_inf<T>();
      any = true;
    }
  }
  return any;
}

template <typename scalar_t, typename acc_t>
bool poison_reaches_end(const scalar_t* lp, const acc_t* lse, const Sizes& z, int64_t n, const int64_t* labels,
                        int64_t L, int64_t len, int64_t blank) {
  const int64_t states = 2 * L + 1;
  std::vector<char> prev(states, 0), cur(states, 0);
  for (int64_t t = 0; t < len; ++t) {
    const int64_t r = t * z.N + n;
    const acc_t off = lse ? lse[r] : acc_t(0);
    for (int64_t s = 0; s < states; ++s) {
      const acc_t x = static_cast<acc_t>(lp[r * z.C + (s % 2 ? labels[s / 2] : blank)]) - off;
      const bool poison = !(x < std::numeric_limits<acc_t>::infinity()) && (t > 0 || s < 2);
      const bool skip = s % 2 && s >= 3 && labels[s / 2] != labels[s / 2 - 1];
      cur[s] = poison || (t > 0 && (prev[s] || (s >= 1 && prev[s - 1]) || (skip && prev[s - 2])));
    }
    std::swap(prev, cur);
  }
  return prev[2 * L] || (L > 0 && prev[2 * L - 1]);
}

// Runs body(begin, end) over runs of consecutive samples on the intra-op threads, which take the runs from a shared
// counter, costliest first (run_tasks, task_order.h). The runs have about equal cost (sum of sample_cost, not equal
// counts), so a batch sorted by length does not leave one thread all the long samples (at::parallel_for's equal
// blocks did: measured 1.1-1.5x slower). Where log_probs fits in a last-level cache (row_bytes x T x N up to
// 32 MiB), there are 4 runs per thread, so that a thread whose core is taken away for a while (a shared or virtual
// machine) does fewer of them instead of holding up the call; beyond that, one run per thread, since rows streamed
// from memory read faster in long adjacent runs (measured: 4 runs per thread cost the forward 1-8 % on
// (1000,32,1000,200)). Which thread runs a sample changes no result: each sample is computed by one thread, in a
// fixed order.
template <typename Cost, typename Body>
void for_sample_runs(const Sizes& z, int64_t row_bytes, const Cost& sample_cost, const Body& body) {
  const int64_t N = z.N, threads = std::min<int64_t>(at::get_num_threads(), N);
  if (threads <= 1) {
    if (N > 0) body(0, N);
    return;
  }
  const bool cached = row_bytes * z.T * N <= (int64_t{32} << 20);
  const int64_t runs = threads * (cached ? 4 : 1);
  std::vector<int64_t> cost(N);
  int64_t total = 0;
  for (int64_t n = 0; n < N; ++n) {
    cost[n] = std::max<int64_t>(sample_cost(n), 1);
    total += cost[n];
  }
  // Run r ends at the first sample where the running cost reaches (r + 1) / runs of the total.
  std::vector<int64_t> bounds{0};
  std::vector<int64_t> run_cost;
  int64_t acc = 0, run_acc = 0;
  for (int64_t n = 0; n < N; ++n) {
    acc += cost[n];
    run_acc += cost[n];
    const int64_t r = static_cast<int64_t>(bounds.size());
    if (n + 1 == N || (r < runs && acc * runs >= r * total)) {
      bounds.push_back(n + 1);
      run_cost.push_back(run_acc);
      run_acc = 0;
    }
  }
  run_tasks(by_cost(run_cost), [] { return 0; }, [&](int64_t r, int) { body(bounds[r], bounds[r + 1]); });
}

// A sample's recursion work, frames x states (the unit of for_sample_runs' costs).
inline int64_t recursion_cost(const Sizes& z, const int64_t* il, const int64_t* tl, int64_t n) {
  return std::clamp<int64_t>(il[n], 0, z.T) * (2 * tl[n] + 1);
}

// (T, N) log-normalisers of the logits rows, computed in parallel over rows.
template <typename scalar_t, typename acc_t>
at::Tensor row_logsumexp(const scalar_t* lp, const Sizes& z, const RowOps<acc_t>& ops) {
  at::Tensor out = at::empty({z.T, z.N}, at::TensorOptions().dtype(c10::CppTypeToScalarType<acc_t>::value));
  acc_t* o = out.data_ptr<acc_t>();
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(z.C, 1));
  at::parallel_for(0, z.T * z.N, grain, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> buf;
    for (int64_t r = begin; r < end; ++r) {
      const scalar_t* row = lp + r * z.C;
      if constexpr (std::is_same_v<scalar_t, acc_t>) {
        o[r] = ops.logsumexp_row(row, z.C);
      } else {
        buf.assign(row, row + z.C);
        o[r] = ops.logsumexp_row(buf.data(), z.C);
      }
    }
  });
  return out;
}


// ---------------------------------------------------------------------------------------------------
// float32 with AVX2 / AVX-512: the recursions in extended-range linear form (ctc_loss_simd.h,
// ctc_loss_simd512.h), no exp / log per state; log_alpha rows are written as logs, beta stays in extended form.

template <typename T>
bool use_extended() {
#if SEQFAST_X86
  return std::is_same_v<T, float> && has_avx2();
#else
  return false;
#endif
}

#if SEQFAST_X86
struct ExtOps {
  decltype(&ctc_simd::alpha_ext_row_avx2) alpha_row;
  decltype(&ctc_simd::beta_ext_row_avx2) beta_row;
  decltype(&ctc_simd::posterior_ext_row_avx2) posterior;
  decltype(&ctc_simd::posterior_lin_row_avx2) posterior_lin;
  decltype(&ctc_simd::beta_post_row_avx2) beta_post;
  int64_t classes;  // C, the log_probs rows' length
  bool avx512;
};

ExtOps ext_ops(int64_t classes) {
  if (has_avx512()) {
    return {&ctc_simd::alpha_ext_row_avx512, &ctc_simd::beta_ext_row_avx512, &ctc_simd::posterior_ext_row_avx512,
            &ctc_simd::posterior_lin_row_avx512, &ctc_simd::beta_post_row_avx512, classes, true};
  }
  return {&ctc_simd::alpha_ext_row_avx2, &ctc_simd::beta_ext_row_avx2, &ctc_simd::posterior_ext_row_avx2,
          &ctc_simd::posterior_lin_row_avx2, &ctc_simd::beta_post_row_avx2, classes, false};
}

constexpr int64_t kWidenClasses = 256;  // 16-bit rows up to this long may be widened on the stack (frame_emissions)

// Emissions of states [lo, hi) of frame `row` straight from the row (ctc_simd::emission_gather_avx2, on AVX-512
// emission_gather_avx512 for float32 rows and widened 16-bit ones), or on AVX-512 for an alphabet of up to 64
// classes from the row's class emissions (class_emissions_avx512, then emission_lookup_states_avx512 or
// emission_lookup_avx512).
// The same bits either way. Sum: the forward's poison check as well (every state, whatever the range).
template <bool Sum, typename scalar_t>
void frame_emissions(const ExtOps& ops, const Sample<scalar_t, float>& smp, const scalar_t* row, float lse,
                     int64_t blank, int64_t lo, int64_t hi, float* em, int32_t* ee, float* poison) {
  const int64_t C = ops.classes, labels = (hi - lo) / 2;
  const int32_t* lab = smp.lab32.data();
  if (ops.avx512 && C <= 64 && labels >= std::max<int64_t>(16, C)) {
    // A small alphabet, more labels in the range than classes in the row: one exp per class, labels looked up.
    alignas(64) float tm[64];  // class_emissions_avx512 writes the 8 Q entries read
    alignas(64) int32_t te[64];
    if (C <= 32) {
      ctc_simd::class_emissions_avx512<Sum, 4>(tm, te, poison, row, C, lse);
      ctc_simd::emission_lookup_states_avx512(em, ee, tm, te, blank, smp.cls32.data(), smp.states, lo, hi);
    } else {
      ctc_simd::class_emissions_avx512<Sum, 8>(tm, te, poison, row, C, lse);
      ctc_simd::emission_lookup_avx512(em, ee, tm, te, blank, lab, smp.L, lo, hi);
    }
  } else {
    if constexpr (!std::is_same_v<scalar_t, float>) {
      if (C <= kWidenClasses && 2 * labels >= C) {
        // 16-bit rows with labels for at least half the classes: the row widened once (exactly, as each gathered
        // value is), then gathered as float32. Eight 16-bit scalar loads cost more than eight float ones (word
        // inserts), and here the gathers outnumber the row's vectors.
        alignas(32) float wide[kWidenClasses];
        load_row_avx2(row, C, wide);
        if (ops.avx512) {
          ctc_simd::emission_gather_avx512<Sum>(em, ee, poison, wide, lab, smp.L, lse, blank, lo, hi);
        } else {
          ctc_simd::emission_gather_avx2<Sum>(em, ee, poison, wide, lab, smp.L, lse, blank, lo, hi);
        }
        return;
      }
    }
    if constexpr (std::is_same_v<scalar_t, float>) {
      if (ops.avx512) {
        ctc_simd::emission_gather_avx512<Sum>(em, ee, poison, row, lab, smp.L, lse, blank, lo, hi);
        return;
      }
    }
    ctc_simd::emission_gather_avx2<Sum>(em, ee, poison, row, lab, smp.L, lse, blank, lo, hi);
  }
}

// Extended rows: mantissas and exponents with `front` zero guard cells before and `back` after.
struct ExtRows {
  std::vector<float> m;
  std::vector<int32_t> e;
  ExtRows(int64_t n) : m(n, 0.0f), e(n, ctc_simd::kZeroE) {}
};

struct ExtSkip {
  std::vector<float> m;    // all-ones bits where the skip s-2 -> s is allowed, else 0
  std::vector<int32_t> e;  // 0 where allowed, kNoSkipE else
  template <typename Smp>
  explicit ExtSkip(const Smp& smp) : m(smp.padded + 2, 0.0f), e(smp.padded + 2, ctc_simd::kNoSkipE) {
    const float ones = [] {
      const uint32_t bits = 0xffffffffu;
      float f;
      std::memcpy(&f, &bits, sizeof f);
      return f;
    }();
    for (int64_t s = 0; s < smp.padded + 2; ++s) {
      if (smp.skip[s] == 0.0f) {
        m[s] = ones;
        e[s] = 0;
      }
    }
  }
};

// An emission em 2^ee (em in [0.7, 1.42] or 0) as a normalised extended number.
inline void set_normalised(float em, int32_t ee, float* m, int32_t* e) {
  if (em == 0.0f) {
    *m = 0.0f;
    *e = ctc_simd::kZeroE;
  } else if (em < 1.0f) {
    *m = 2.0f * em;
    *e = ee - 1;
  } else {
    *m = em;
    *e = ee;
  }
}

// The forward recursion of one sample in extended form, one frame per step() (t = 0, 1, ...), so that a thread
// can advance its samples frame by frame: the rows (t, n) of its block of samples are adjacent in log_probs,
// and reading them in that order streams through memory instead of jumping N * C floats per frame.
template <typename scalar_t>
class AlphaExt {
 public:
  // len: the sample's input length. live_only: no log rows are wanted (a loss alone, or checkpoints), so the
  // states that can no longer reach the end are left out (first_live).
  AlphaExt(const ExtOps& ops, const int64_t* labels, int64_t L, int64_t len, bool live_only)
      : smp(labels, L), ops_(ops), len_(len), live_only_(live_only), skip_(smp), rows_(2 * (smp.padded + 2)),
        em_(smp.padded), logrow_(smp.padded, neg_inf<float>()), ee_(smp.padded) {
    pm_ = rows_.m.data() + 2;
    pe_ = rows_.e.data() + 2;
    cm_ = rows_.m.data() + smp.padded + 4;
    ce_ = rows_.e.data() + smp.padded + 4;
  }

  // Frame t from its log_probs row (lse: the row's log-normaliser, 0 for log_probs); writes its log_alpha row
  // (width floats, -inf past the last state) to la_row unless that is null.
  void step(int64_t t, const scalar_t* row, float lse, int64_t blank, float* la_row, int64_t width) {
    const int64_t states = smp.states;
    advance(t, row, lse, blank, pm_, pe_, cm_, ce_, la_row ? logrow_.data() : nullptr);
    if (la_row) {
      std::copy(logrow_.data(), logrow_.data() + states, la_row);
      std::fill(la_row + states, la_row + width, neg_inf<float>());
    }
    std::swap(pm_, cm_);
    std::swap(pe_, ce_);
  }

  // One frame: (pm, pe), frame t-1's row (two zero guard cells in front), -> (cm, ce), frame t's; with log_out,
  // also its logs. Cells from reach(t) on are not written: states above 2t+1 are not reachable yet, and stay 0.
  void advance(int64_t t, const scalar_t* row, float lse, int64_t blank, const float* pm, const int32_t* pe, float* cm,
               int32_t* ce, float* log_out) {
    const int64_t P = smp.padded, states = smp.states;
    const int64_t hi = reach(t), lo = t == 0 || log_out ? 0 : first_vector(t);
    // Poison on states not reached yet can still reach the end: the check covers every state from lo on (those
    // below cannot reach it).
    frame_emissions<true>(ops_, smp, row, lse, blank, lo, hi, em_.data(), ee_.data(), poison_);
    if (t == 0) {  // alpha_0: the emissions of states 0 and 1
      std::fill(cm, cm + P, 0.0f);
      std::fill(ce, ce + P, ctc_simd::kZeroE);
      for (int64_t s = 0; s < std::min<int64_t>(2, states); ++s) {
        set_normalised(em_[s], ee_[s], cm + s, ce + s);
        logrow_[s] = cm[s] == 0.0f ? neg_inf<float>() : static_cast<float>(row[s == 0 ? blank : smp.labels[0]]) - lse;
      }
    } else if (lo < hi) {
      ops_.alpha_row(cm + lo, ce + lo, log_out, pm + lo, pe + lo, skip_.m.data() + lo, skip_.e.data() + lo,
                     em_.data() + lo, ee_.data() + lo, hi - lo);
    }
  }

  int64_t reach(int64_t t) const { return reachable_end(smp.padded, t); }

  // The first state of frame t that can still reach the end by frame len - 1 (each frame advances at most two
  // states). Those below feed only states below first_live(t + 1) = first_live(t) + 2, so leaving them out
  // changes no state that matters: the same loss and posteriors, bit for bit. Only with live_only.
  int64_t first_live(int64_t t) const { return live_only_ ? first_live_state(smp.states, len_, t) : 0; }
  // The vector that holds it (BetaExt::low): the row loops start there; the cells below it keep older frames'
  // values, and those of that vector below first_live(t) are computed from such: both are never read for a live
  // state.
  int64_t first_vector(int64_t t) const { return first_live(t) / kLanes * kLanes; }
  // The first label whose emission frame t reads (the forward's prefetch of a later frame's row).
  int64_t first_label(int64_t t) const { return first_vector(t) / 2; }

  // The row of the last step (frame t) as a checkpoint: states [0, width) to m and e, zeros past the last state
  // and below first_live(t).
  void save(int64_t t, float* m, int32_t* e, int64_t width) const {
    const int64_t live = std::min(first_live(t), smp.states);
    std::fill(m, m + live, 0.0f);
    std::copy(pm_ + live, pm_ + smp.states, m + live);
    std::fill(m + smp.states, m + width, 0.0f);
    std::fill(e, e + live, ctc_simd::kZeroE);
    std::copy(pe_ + live, pe_ + smp.states, e + live);
    std::fill(e + smp.states, e + width, ctc_simd::kZeroE);
  }

  // Whether a step met a NaN or +inf emission (see poison_reaches_end).
  bool poisoned() const {
    float sum = 0;
    for (float v : poison_) sum += v;
    return !(sum < std::numeric_limits<float>::infinity());
  }

  // After the last frame: -log P(target) = -log(alpha[2L] + alpha[2L-1]), summed in double from the extended form.
  float nll() const {
    const int64_t L = smp.L;
    double terms[2] = {0.0, 0.0};
    int64_t exps[2] = {0, 0};
    int k = 0;
    for (int64_t s : {2 * L, 2 * L - 1}) {
      if (s >= 0 && pm_[s] != 0.0f) {
        terms[k] = pm_[s];
        exps[k] = pe_[s];
        ++k;
      }
    }
    if (k == 0) return std::numeric_limits<float>::infinity();
    const int64_t E = k == 2 ? std::max(exps[0], exps[1]) : exps[0];
    double sum = 0;
    for (int j = 0; j < k; ++j) sum += std::ldexp(terms[j], static_cast<int>(std::max<int64_t>(exps[j] - E, -1100)));
    return static_cast<float>(-(static_cast<double>(E) * 0.693147180559945309417 + std::log(sum)));
  }

  Sample<scalar_t, float> smp;

 private:
  ExtOps ops_;
  int64_t len_;
  bool live_only_;
  ExtSkip skip_;
  ExtRows rows_;  // alpha rows with two zero guard cells in front
  float *pm_, *cm_;
  int32_t *pe_, *ce_;
  std::vector<float> em_, logrow_;
  std::vector<int32_t> ee_;
  float poison_[16] = {};  // the emissions summed lane-wise (emission_gather_avx2)
};

// Where backward finds one sample's forward variables. every = 1: the log_alpha table, frame t's row of logs at
// la + t * width. every = K > 1: checkpoints, frame cK's row in extended form at la + c * 2 * width (width
// mantissas, then width int32 exponents in float32 storage), from which each segment of K frames is recomputed.
struct AlphaSource {
  const float* la;
  int64_t every, width;
};

// One sample's log_probs rows: frame t's at lp + t * lp_stride, its log-normaliser (logits) at lse[t * lse_stride].
template <typename scalar_t>
struct Frames {
  const scalar_t* lp;
  const float* lse;
  int64_t lp_stride, lse_stride;
  const scalar_t* row(int64_t t) const { return lp + t * lp_stride; }
  float off(int64_t t) const { return lse ? lse[t * lse_stride] : 0.0f; }
};

// Pass 1 of backward for one sample, one frame per step() (t = len-1 down to 0): beta in extended form and the
// posteriors reduced to c = [blank posterior, posterior of target position 0, ..., L-1].
// With checkpoints, frame t's alpha row must have been recomputed first: when segment_top(t), load_checkpoint()
// then recompute() every frame of the segment upwards (prepare() does it all for one sample; the fused backward
// interleaves its samples frame by frame instead, as forward reads log_probs).
template <typename scalar_t>
class BetaExt {
 public:
  BetaExt(const ExtOps& ops, const int64_t* labels, int64_t L, int64_t len, float nll, AlphaSource src,
          Frames<scalar_t> frames, int64_t blank)
      : smp(labels, L), ops_(ops), len_(len), nll_(nll), src_(src), frames_(frames), blank_(blank), skip_(smp),
        rows_(2 * (smp.padded + 2)), bx_(smp.padded), em_(smp.padded), alpha_(smp.padded, neg_inf<float>()),
        post_(smp.padded, 0.0f), c_(L + 1), ee_(smp.padded),
        seg_(src.every > 1 ? src.every * (smp.padded + 2) : 0),
        seg_em_(src.every > 1 ? src.every * smp.padded : 0), seg_ee_(src.every > 1 ? src.every * smp.padded : 0),
        post_hi_(smp.padded) {
    nm_ = rows_.m.data();
    ne_ = rows_.e.data();
    cm_ = nm_ + smp.padded + 2;
    ce_ = ne_ + smp.padded + 2;
    if (src.every > 1) {
      // exp(nll) = nm 2^ne for the linear posteriors; a finite loss is at most 2^29 ln 2 (kLiveE) in size.
      const double x = std::clamp(static_cast<double>(nll), -3.7e8, 3.7e8);
      const double k = std::floor(x / 0.693147180559945309417);
      exp_nll_m_ = static_cast<float>(std::exp(x - k * 0.693147180559945309417));
      exp_nll_e_ = static_cast<int32_t>(k);
    }
  }

  bool segment_top(int64_t t) const { return src_.every > 1 && (t == len_ - 1 || t % src_.every == src_.every - 1); }

  // Segment c's first row from its checkpoint (and that frame's emissions).
  void load_checkpoint(int64_t c) {
    const int64_t P = smp.padded, states = smp.states;
    emit(c * src_.every, 0, low(c * src_.every), high(c * src_.every));
    const float* m = src_.la + c * 2 * src_.width;
    const int32_t* e = reinterpret_cast<const int32_t*>(m + src_.width);
    std::copy(m, m + states, seg_m(0));
    std::fill(seg_m(0) + states, seg_m(0) + P, 0.0f);
    std::copy(e, e + states, seg_e(0));
    std::fill(seg_e(0) + states, seg_e(0) + P, ctc_simd::kZeroE);
  }

  // Frame t's row (t not a multiple of every) from frame t-1's by forward's own row operation on the same
  // emissions: the same bits. The frame's emissions stay for step(t). Only the vectors from low(t) up: the states
  // below low(t) reach no end (their posteriors are 0 whatever alpha is), and the states at or above it draw on
  // those at or above low(t - 1) = low(t) - 2, rounded down. The vectors below keep another frame's (finite) values.
  void recompute(int64_t t) {
    const int64_t j = t % src_.every, P = smp.padded, lo = low(t), hi = high(t);
    emit(t, j, lo, hi);
    if (lo < hi) {
      ops_.alpha_row(seg_m(j) + lo, seg_e(j) + lo, nullptr, seg_m(j - 1) + lo, seg_e(j - 1) + lo, skip_.m.data() + lo,
                     skip_.e.data() + lo, seg_em(j) + lo, seg_ee(j) + lo, hi - lo);
    }
    if (hi < P) {  // forward's cells there were never written (0); these may hold a later segment's values
      std::fill(seg_m(j) + hi, seg_m(j) + P, 0.0f);
      std::fill(seg_e(j) + hi, seg_e(j) + P, ctc_simd::kZeroE);
    }
  }

  void prefetch_recompute(int64_t t, int64_t C, bool to_l2) const { smp.prefetch(frames_.row(t), blank_, C, to_l2); }

  void prepare(int64_t t, int64_t C) {
    if (!segment_top(t)) return;
    const int64_t first = t / src_.every * src_.every;
    load_checkpoint(first / src_.every);
    for (int64_t u = first + 1; u <= t; ++u) {
      if (u + 1 <= t) prefetch_recompute(u + 1, C, false);
      if (u + kFarSteps <= t) prefetch_recompute(u + kFarSteps, C, true);
      recompute(u);
    }
  }

  // Frame t (row: its log_probs row); returns c.
  const float* step(int64_t t, const scalar_t* row, float lse, int64_t blank) {
    const int64_t P = smp.padded, states = smp.states, L = smp.L;
    const int64_t lo = low(t);
    // With checkpoints, beta and the posteriors only below high(t): the states above are not reachable yet
    // (alpha 0, so posterior 0), and beta there feeds only such states of earlier frames. The cells of beta's rows
    // above keep older values, never read for a reachable state; the posteriors above are zeroed as the bound
    // comes down. The table keeps the whole row (its posteriors take alpha's logs).
    const int64_t hi = src_.every > 1 ? std::max(lo, high(t)) : P;
    if (hi < post_hi_) {
      std::fill(post_.begin() + hi, post_.begin() + post_hi_, 0.0f);
      post_hi_ = hi;
    }
    const float* em = em_.data();
    const int32_t* ee = ee_.data();
    if (src_.every == 1) {
      frame_emissions<false>(ops_, smp, row, lse, blank, lo, P, em_.data(), ee_.data(), nullptr);
    } else {  // recompute() left them
      em = seg_em(t % src_.every);
      ee = seg_ee(t % src_.every);
    }
    if (t == len_ - 1) {  // bx = 1 at the two final states, b = their emissions
      std::fill(bx_.m.begin(), bx_.m.end(), 0.0f);
      std::fill(bx_.e.begin(), bx_.e.end(), ctc_simd::kZeroE);
      std::fill(cm_, cm_ + P, 0.0f);
      std::fill(ce_, ce_ + P, ctc_simd::kZeroE);
      for (int64_t s = std::max<int64_t>(0, 2 * L - 1); s <= 2 * L; ++s) {
        bx_.m[s] = 1.0f;
        bx_.e[s] = 0;
        set_normalised(em[s], ee[s], cm_ + s, ce_ + s);
      }
    } else if (src_.every > 1) {  // beta and the posteriors in one pass: bx is not stored
      const int64_t j = t % src_.every;
      c_[0] = ops_.beta_post(cm_ + lo, ce_ + lo, post_.data() + lo, nm_ + lo, ne_ + lo, skip_.m.data() + 2 + lo,
                             skip_.e.data() + 2 + lo, em + lo, ee + lo, seg_m(j) + lo, seg_e(j) + lo, exp_nll_m_,
                             exp_nll_e_, hi - lo);
    } else {
      ops_.beta_row(bx_.m.data() + lo, bx_.e.data() + lo, cm_ + lo, ce_ + lo, nm_ + lo, ne_ + lo,
                    skip_.m.data() + 2 + lo, skip_.e.data() + 2 + lo, em + lo, ee + lo, P - lo);
    }
    if (src_.every == 1) {
      const float* la_row = src_.la + t * src_.width;
      std::copy(la_row, la_row + states, alpha_.data());
      c_[0] = ops_.posterior(post_.data() + lo, alpha_.data() + lo, bx_.m.data() + lo, bx_.e.data() + lo, nll_,
                             P - lo);
    } else if (t == len_ - 1) {
      const int64_t j = t % src_.every;
      c_[0] = ops_.posterior_lin(post_.data() + lo, seg_m(j) + lo, seg_e(j) + lo, bx_.m.data() + lo,
                                 bx_.e.data() + lo, exp_nll_m_, exp_nll_e_, hi - lo);
    }
    if (ops_.avx512) {
      ctc_simd::odd_entries_avx512(c_.data() + 1, post_.data(), L);
    } else {  // the extended path runs on AVX2 or AVX-512 only (use_extended)
      ctc_simd::odd_entries_avx2(c_.data() + 1, post_.data(), L);
    }
    std::swap(nm_, cm_);
    std::swap(ne_, ce_);
    return c_.data();
  }

  // The last step's posteriors of the states (c's entries 1.. are its odd ones).
  const float* posteriors() const { return post_.data(); }

  Sample<scalar_t, float> smp;

 private:
  // Row j of the segment scratch, behind two zero guard cells (alpha_row reads prev[-2], prev[-1]).
  float* seg_m(int64_t j) { return seg_.m.data() + j * (smp.padded + 2) + 2; }
  int32_t* seg_e(int64_t j) { return seg_.e.data() + j * (smp.padded + 2) + 2; }
  float* seg_em(int64_t j) { return seg_em_.data() + j * smp.padded; }
  int32_t* seg_ee(int64_t j) { return seg_ee_.data() + j * smp.padded; }

  // Frame t's emissions of states [lo, hi) into segment row j.
  void emit(int64_t t, int64_t j, int64_t lo, int64_t hi) {
    frame_emissions<false>(ops_, smp, frames_.row(t), frames_.off(t), blank_, lo, hi, seg_em(j), seg_ee(j), nullptr);
  }

  // The states below it may be reachable from the start at frame t.
  int64_t high(int64_t t) const { return reachable_end(smp.padded, t); }

  // States below states - 2 (len - t) cannot reach the end any more: beta and the posteriors stay 0 there (never
  // written: the bound only decreases). The first vector holding one that can.
  int64_t low(int64_t t) const { return first_live_state(smp.states, len_, t) / kLanes * kLanes; }

  ExtOps ops_;
  int64_t len_;
  float nll_;
  AlphaSource src_;
  Frames<scalar_t> frames_;
  int64_t blank_;
  ExtSkip skip_;
  ExtRows rows_, bx_;  // two beta rows with two zero guard cells behind; bx
  float *nm_, *cm_;
  int32_t *ne_, *ce_;
  std::vector<float> em_, alpha_, post_, c_;
  std::vector<int32_t> ee_;
  ExtRows seg_;  // checkpoints: the current segment's alpha rows and emissions
  std::vector<float> seg_em_;
  std::vector<int32_t> seg_ee_;
  float exp_nll_m_ = 1.0f;
  int32_t exp_nll_e_ = 0;
  int64_t post_hi_;  // the posteriors at and above it are zero (step)
};
#endif

// One (t, n) row of the gradient: g * exp(lp - off), minus g times the posteriors c (blank first, then one per
// target position): at the blank, and at each label g times its positions' posteriors summed in target order.
// post, where the caller has it: the frame's state posteriors, whose odd entries are c[1..]. The AVX-512 label
// sums gather them there: c was stored just now, and a gather waits for such stores to retire (NOTES).
template <typename scalar_t, typename acc_t>
void gradient_row(scalar_t* out, const scalar_t* lp_row, acc_t off, acc_t g, const acc_t* c, const LabelGroups& groups,
                  int64_t blank, int64_t C, const RowOps<acc_t>& ops, std::vector<acc_t>& buf,
                  const acc_t* post = nullptr) {
#if SEQFAST_X86
  // Where the AVX-512 label sums gather the label posteriors: post (odd states) where given, else c.
  const acc_t* lab = post ? post : c;
  const int32_t* lab_idx = post ? groups.lane_state.data() : groups.lane_idx.data();
  // Up to 32 classes, the whole row in two registers (the same bits as below).
  if constexpr (std::is_same_v<acc_t, float>) {
    if (C <= 32 && has_avx512()) {
      float* dst;
      if constexpr (std::is_same_v<scalar_t, float>) {
        dst = out;
      } else {
        buf.resize(C);
        dst = buf.data();
      }
      ctc_simd::gradient_row32_avx512(dst, lp_row, off, g, c[0], blank, lab, groups.lane_count.data(), lab_idx,
                                      groups.block_rows.data(), static_cast<int64_t>(groups.block_rows.size()),
                                      groups.class_slot.data(), C);
      if constexpr (!std::is_same_v<scalar_t, float>) store_row(dst, acc_t(1), C, out, 1);
      return;
    }
  }
#endif
  acc_t* row;
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    row = out;
    ops.exp_row(row, lp_row, off, g, C);
  } else {
    buf.resize(C);
    row = buf.data();
#if SEQFAST_X86
    // Widen while taking the exp: the row is read once, prefetched ahead.
    if (has_avx512()) {
      ctc_simd::exp_rows_avx512(row, lp_row, off, g, C);
    } else if (has_avx2()) {
      ctc_simd::exp_rows_avx2(row, lp_row, off, g, C);
    } else
#endif
    {
      load_row(lp_row, 1, C, row);
      ops.exp_row(row, row, off, g, C);
    }
  }
  row[blank] -= g * c[0];
  bool corrected = false;
#if SEQFAST_X86
  if constexpr (std::is_same_v<acc_t, float>) {
    if (has_avx512()) {
      ctc_simd::label_corrections_avx512(row, lab, g, groups.lane_label.data(), groups.lane_count.data(), lab_idx,
                                         groups.block_rows.data(), static_cast<int64_t>(groups.block_rows.size()));
      corrected = true;
    } else if (has_avx2()) {
      ctc_simd::label_corrections_avx2(row, c, g, groups.lane_label.data(), groups.lane_count.data(),
                                       groups.lane_idx.data(), groups.block_rows.data(),
                                       static_cast<int64_t>(groups.block_rows.size()));
      corrected = true;
    }
  }
#endif
  if (!corrected) {
    const int32_t* order = groups.order.data();
    const int32_t* start = groups.start.data();
    for (size_t j = 0; j < groups.label.size(); ++j) {
      acc_t sum = c[1 + order[start[j]]];
      for (int32_t i = start[j] + 1; i < start[j + 1]; ++i) sum += c[1 + order[i]];
      row[groups.label[j]] -= g * sum;
    }
  }
  if constexpr (!std::is_same_v<scalar_t, acc_t>) store_row(row, acc_t(1), C, out, 1);
}

// Gradient rows that carry no posterior, as torch: frames past the input length (0), and every frame of a sample
// whose loss is +inf (0 with zero_infinity, NaN otherwise) or NaN (NaN: zero_infinity zeroes infinite losses only).
// A logits row whose log-normaliser `lse` is not finite is NaN in any case: log_softmax's backward makes it so.
template <typename scalar_t, typename acc_t>
void fill_gradient_row(scalar_t* out, int64_t C, bool past_end, acc_t nll, bool zero_infinity, acc_t lse) {
  const bool inf_loss = nll == std::numeric_limits<acc_t>::infinity();
  const bool zero = std::isfinite(lse) && (past_end || (zero_infinity && inf_loss));
  std::fill(out, out + C, zero ? scalar_t(0) : scalar_t(std::numeric_limits<float>::quiet_NaN()));
}

// Sample n's forward recursion in log space (the generic path, and torch's): its loss, and its log_alpha rows
// [0, len) into la_n (width each, -inf past the states) when given. NaN where a NaN or +inf emission reaches a
// final state, as torch.
template <typename scalar_t, typename acc_t>
acc_t log_space_forward(const RowOps<acc_t>& ops, const scalar_t* lp, const acc_t* lse, const Sizes& z, int64_t n,
                        const int64_t* labels, int64_t L, int64_t len, int64_t blank, acc_t* la_n, int64_t width) {
  Sample<scalar_t, acc_t> smp(labels, L);
  const int64_t P = smp.padded, states = smp.states;
  // Two rows with two -inf guard cells in front: prev[s-1], prev[s-2] are plain loads.
  std::vector<acc_t> rows(2 * (P + 2), neg_inf<acc_t>());
  acc_t* prev = rows.data() + 2;
  acc_t* cur = rows.data() + P + 4;
  bool poisoned = false;
  for (int64_t t = 0; t < len; ++t) {
    smp.gather(lp + (t * z.N + n) * z.C, lse ? lse[t * z.N + n] : acc_t(0), blank);
    poisoned |= clear_poison(smp.lpe.data(), states);
    if (t == 0) {
      cur[0] = smp.lpe[0];
      if (L > 0) cur[1] = smp.lpe[1];
    } else {
      ops.alpha_row(cur, prev, smp.skip.data(), smp.lpe.data(), P);
    }
    if (la_n) {
      acc_t* dst = la_n + t * width;
      std::copy(cur, cur + states, dst);
      std::fill(dst + states, dst + width, neg_inf<acc_t>());
    }
    std::swap(prev, cur);
  }
  if (poisoned && poison_reaches_end(lp, lse, z, n, labels, L, len, blank)) {
    return std::numeric_limits<acc_t>::quiet_NaN();
  }
  return -logaddexp2(prev[2 * L], L > 0 ? prev[2 * L - 1] : neg_inf<acc_t>());
}

// The float32 extended-range recursions count an emission below e^kEmitLo as 0 and a loss past 2^29 ln 2 as
// +inf. A loss below -kEmitLo met no such emission on any path that matters (any path through one costs more);
// from there on the sample's loss is recomputed in log space, as torch computes it: rare (its probability is
// below e^-8e7), but the loss is then finite where torch's is (zero_infinity must not zero it). Its gradient
// stays the extended backward's: at such a loss float32's log-space gradient is noise (measured against float64
// at losses near 5e8: torch's off by up to 1e15, a log-space backward here 3e14, the extended one by at most 1).
constexpr float kExtNllLimit = -ctc_simd::kEmitLo;

// Whether a sample of len frames can align its L labels at all (one frame per label, plus one between repeats).
inline bool alignable(const int64_t* labels, int64_t L, int64_t len) {
  int64_t need = L;
  for (int64_t k = 1; k < L; ++k) need += labels[k] == labels[k - 1];
  return len >= need;
}

template <typename scalar_t>
std::tuple<at::Tensor, at::Tensor> forward_impl(const at::Tensor& log_probs, const at::Tensor& targets,
                                                const at::Tensor& input_lengths, const at::Tensor& target_lengths,
                                                int64_t blank, bool from_logits, bool keep_alpha, int64_t every,
                                                const Sizes& z) {
  using acc_t = acc_type<scalar_t>;
  const RowOps<acc_t> ops = row_ops<acc_t>();
  const auto acc_opts = log_probs.options().dtype(c10::CppTypeToScalarType<acc_t>::value);
  const int64_t width = 2 * z.S + 1;
  at::Tensor nll = at::empty({z.N}, acc_opts);
  // Without keep_alpha only the loss is wanted: the recursion keeps its two rows and nothing else. With every > 1,
  // checkpoints: int32 (N, ceil(T / every), 2, width), frame c * every's mantissas' float32 bits, then its exponents.
  const int64_t checkpoints = (z.T + every - 1) / every;
  at::Tensor log_alpha = !keep_alpha ? at::empty({z.N, 0, 0}, acc_opts)
                         : every == 1 ? BufferCache::get().empty({z.N, z.T, width}, acc_opts.dtype().toScalarType())
                                      : BufferCache::get().empty({z.N, checkpoints, 2, width}, at::kInt);
  const scalar_t* lp = log_probs.const_data_ptr<scalar_t>();
  const int64_t* tg = targets.const_data_ptr<int64_t>();
  const int64_t* il = input_lengths.const_data_ptr<int64_t>();
  const int64_t* tl = target_lengths.const_data_ptr<int64_t>();
  at::Tensor lse_t = from_logits ? row_logsumexp<scalar_t, acc_t>(lp, z, ops) : at::Tensor();
  const acc_t* lse = from_logits ? lse_t.const_data_ptr<acc_t>() : nullptr;
  acc_t* la = keep_alpha && every == 1 ? log_alpha.data_ptr<acc_t>() : nullptr;
  float* ck = keep_alpha && every > 1 ? reinterpret_cast<float*>(log_alpha.data_ptr<int32_t>()) : nullptr;
  acc_t* out = nll.data_ptr<acc_t>();
  // A sample's cost: its recursion (plus the labels' gather, about proportional).
  const auto cost = [&](int64_t n) { return recursion_cost(z, il, tl, n); };

#if SEQFAST_X86
  if constexpr (std::is_same_v<acc_t, float>) {
    if (use_extended<acc_t>()) {
      const ExtOps eops = ext_ops(z.C);
      for_sample_runs(z, z.C * sizeof(scalar_t), cost, [&](int64_t begin, int64_t end) {
        std::vector<AlphaExt<scalar_t>> alphas;
        alphas.reserve(end - begin);
        int64_t t_end = 0;
        for (int64_t n = begin; n < end; ++n) {
          alphas.emplace_back(eops, tg + n * z.S, tl[n], il[n], la == nullptr);
          t_end = std::max(t_end, il[n]);
        }
        // Frame-major over the block: see AlphaExt.
        for (int64_t t = 0; t < t_end; ++t) {
          for (int64_t n = begin; n < end; ++n) {
            if (t >= il[n]) continue;
            // The rows of the next step (the next sample's, or the block's first in the next frame) and of
            // kFarSteps ahead.
            for (const int64_t k : {int64_t{1}, kFarSteps}) {
              const auto [pi, pt] = step_ahead(n - begin, t, k, end - begin, +1);
              if (pt < std::min(t_end, il[begin + pi])) {
                alphas[pi].smp.prefetch(lp + (pt * z.N + begin + pi) * z.C, blank, z.C, k > 1,
                                        alphas[pi].first_label(pt));
              }
            }
            const int64_t r = t * z.N + n;
            alphas[n - begin].step(t, lp + r * z.C, lse ? lse[r] : 0.0f, blank,
                                   la ? la + (n * z.T + t) * width : nullptr, width);
            if (ck && t % every == 0) {
              float* m = ck + (n * checkpoints + t / every) * 2 * width;
              alphas[n - begin].save(t, m, reinterpret_cast<int32_t*>(m + width), width);
            }
          }
        }
        for (int64_t n = begin; n < end; ++n) {
          const int64_t len = il[n];
          if (la) std::fill(la + (n * z.T + len) * width, la + (n + 1) * z.T * width, neg_inf<acc_t>());
          for (int64_t c = ck ? (len + every - 1) / every : checkpoints; c < checkpoints; ++c) {  // frames past len
            float* m = ck + (n * checkpoints + c) * 2 * width;
            std::fill(m, m + width, 0.0f);
            std::fill(reinterpret_cast<int32_t*>(m + width), reinterpret_cast<int32_t*>(m + 2 * width),
                      ctc_simd::kZeroE);
          }
          out[n] = len > 0 ? alphas[n - begin].nll() : tl[n] == 0 ? 0.0f : std::numeric_limits<float>::infinity();
          if (len > 0 && alphas[n - begin].poisoned() &&
              poison_reaches_end(lp, lse, z, n, tg + n * z.S, tl[n], len, blank)) {
            out[n] = std::numeric_limits<float>::quiet_NaN();
          } else if (len > 0 && out[n] >= kExtNllLimit && alignable(tg + n * z.S, tl[n], len)) {
            out[n] = log_space_forward<scalar_t, float>(ops, lp, lse, z, n, tg + n * z.S, tl[n], len, blank,
                                                         nullptr, width);
          }
        }
      });
      return {nll, log_alpha};
    }
  }
#endif
  TORCH_CHECK(every == 1, "ctc_loss_forward: alpha_every > 1 needs float32 compute on a CPU with AVX2 (seqfast._C."
              "cpu_isa() is ", isa_name(active_isa()), ", log_probs ", log_probs.scalar_type(), "; a torch.compile "
              "graph keeps the ISA cap it was traced under: after seqfast._C.set_cpu_isa, torch._dynamo.reset())");
  for_sample_runs(z, z.C * sizeof(scalar_t), cost, [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) {
      const int64_t len = il[n];
      acc_t* la_n = la ? la + n * z.T * width : nullptr;
      if (len == 0) {
        if (la_n) std::fill(la_n, la_n + z.T * width, neg_inf<acc_t>());
        out[n] = tl[n] == 0 ? acc_t(0) : std::numeric_limits<acc_t>::infinity();
        continue;
      }
      out[n] = log_space_forward<scalar_t, acc_t>(ops, lp, lse, z, n, tg + n * z.S, tl[n], len, blank, la_n, width);
      if (la_n) std::fill(la_n + len * width, la_n + z.T * width, neg_inf<acc_t>());
    }
  });
  return {nll, log_alpha};
}

template <typename scalar_t>
at::Tensor backward_impl(const at::Tensor& grad_nll, const at::Tensor& log_probs, const at::Tensor& targets,
                         const at::Tensor& input_lengths, const at::Tensor& target_lengths, const at::Tensor& nll_t,
                         const at::Tensor& log_alpha, int64_t blank, bool zero_infinity, bool from_logits,
                         int64_t every, const Sizes& z) {
  using acc_t = acc_type<scalar_t>;
  const RowOps<acc_t> ops = row_ops<acc_t>();
  const auto acc_opts = log_probs.options().dtype(c10::CppTypeToScalarType<acc_t>::value);
  const int64_t width = 2 * z.S + 1, cw = z.S + 1;
  const scalar_t* lp = log_probs.const_data_ptr<scalar_t>();
  const int64_t* tg = targets.const_data_ptr<int64_t>();
  const int64_t* il = input_lengths.const_data_ptr<int64_t>();
  const int64_t* tl = target_lengths.const_data_ptr<int64_t>();
  const acc_t* nll = nll_t.const_data_ptr<acc_t>();
  const acc_t* gn = grad_nll.const_data_ptr<acc_t>();
  // acc_t rows of logs, or (every > 1) int32 checkpoints holding float32 mantissas and exponents.
  const acc_t* la = static_cast<const acc_t*>(log_alpha.const_data_ptr());
  at::Tensor lse_t = from_logits ? row_logsumexp<scalar_t, acc_t>(lp, z, ops) : at::Tensor();
  const acc_t* lse = from_logits ? lse_t.const_data_ptr<acc_t>() : nullptr;

  at::Tensor grad = BufferCache::get().empty({z.T, z.N, z.C}, log_probs.scalar_type());
  scalar_t* gr = grad.data_ptr<scalar_t>();
  const bool extended = use_extended<acc_t>();
  // A sample's cost in pass 1 below: its recursion (beta, posteriors).
  const auto cost = [&](int64_t n) { return recursion_cost(z, il, tl, n); };
  TORCH_CHECK(every == 1 || extended, "ctc_loss_backward: alpha_every > 1 needs float32 compute on a CPU with AVX2 "
              "(seqfast._C.cpu_isa() is ", isa_name(active_isa()), ", log_probs ", log_probs.scalar_type(), ")");
#if SEQFAST_X86
  const ExtOps eops = ext_ops(z.C);
  // Sample n's forward variables and log_probs rows, as BetaExt reads them (float32 only: the casts are no-ops).
  const int64_t per_sample = every == 1 ? z.T * width : (z.T + every - 1) / every * 2 * width;
  const auto source = [&](int64_t n) {
    return AlphaSource{reinterpret_cast<const float*>(la) + n * per_sample, every, width};
  };
  const auto frames = [&](int64_t n) {
    const float* lse_f = reinterpret_cast<const float*>(lse);
    return Frames<scalar_t>{lp + n * z.C, lse_f ? lse_f + n : nullptr, z.N * z.C, z.N};
  };
  if constexpr (std::is_same_v<acc_t, float>) {
    // With a sample per thread at least, each sample's gradient rows are written right after its beta step,
    // while the frame's log_probs row is still in cache: one pass, no posterior buffer. Every row is still
    // computed by one thread with the same operations as pass 2 below: identical bits either way.
    if (extended && z.N >= at::get_num_threads()) {
      // Fused with the gradient rows, a state (recompute, beta, posteriors) costs about what 8 entries of a row's
      // exp pass do, every frame writes its row, and frames past the length only fill it (~1/4 of the exp pass per
      // entry). Measured on (1000,32,1000,200) and (200,64,5000,50): without the row terms a length-sorted batch
      // of the 5000-class shape got slower.
      const auto fused_cost = [&](int64_t n) {
        const int64_t len = std::clamp<int64_t>(il[n], 0, z.T);
        return 8 * recursion_cost(z, il, tl, n) + len * z.C + (z.T - len) * z.C / 4;
      };
      for_sample_runs(z, z.C * sizeof(scalar_t), fused_cost, [&](int64_t begin, int64_t end) {
        std::vector<acc_t> buf;
        std::vector<std::unique_ptr<BetaExt<scalar_t>>> betas(end - begin);
        std::vector<LabelGroups> groups(end - begin);
        for (int64_t n = begin; n < end; ++n) {
          if (il[n] > 0 && std::isfinite(nll[n])) {
            groups[n - begin] = LabelGroups(tg + n * z.S, tl[n]);
            betas[n - begin] = std::make_unique<BetaExt<scalar_t>>(eops, tg + n * z.S, tl[n], il[n], nll[n], source(n),
                                                                   frames(n), blank);
          }
        }
        std::vector<BetaExt<scalar_t>*> tops;
        // Frame-major over the block, as in forward: the gradient rows are written in memory order too.
        for (int64_t t = z.T - 1; t >= 0; --t) {
          // Checkpoints: the samples whose segment ends at frame t recompute it first, frame by frame over them.
          tops.clear();
          for (int64_t n = begin; n < end; ++n) {
            BetaExt<scalar_t>* b = betas[n - begin].get();
            if (b && t < il[n] && b->segment_top(t)) tops.push_back(b);
          }
          if (!tops.empty()) {
            const int64_t first = t / every * every;
            for (BetaExt<scalar_t>* b : tops) b->load_checkpoint(first / every);
            for (int64_t u = first + 1; u <= t; ++u) {
              const int64_t m = static_cast<int64_t>(tops.size());
              for (int64_t i = 0; i < m; ++i) {
                // The rows of the next step (the next sample's, or the first sample's in the next frame) and of
                // kFarSteps ahead.
                for (const int64_t k : {int64_t{1}, kFarSteps}) {
                  const auto [pi, pu] = step_ahead(i, u, k, m, +1);
                  if (pu <= t) tops[pi]->prefetch_recompute(pu, z.C, k > 1);
                }
                tops[i]->recompute(u);
              }
            }
          }
          for (int64_t n = begin; n < end; ++n) {
            const int64_t r = t * z.N + n;
            BetaExt<scalar_t>* beta = betas[n - begin].get();
            if (beta == nullptr || t >= il[n]) {
              fill_gradient_row(gr + r * z.C, z.C, t >= il[n], nll[n], zero_infinity, lse ? lse[r] : 0.0f);
              continue;
            }
            // The rows of the next step (the next sample's in this frame, else the block's first in the frame
            // before) and of kFarSteps ahead.
            for (const int64_t k : {int64_t{1}, kFarSteps}) {
              const auto [pi, pt] = step_ahead(n - begin, t, k, end - begin, -1);
              if (pt >= 0 && betas[pi] && pt < il[begin + pi]) {
                betas[pi]->smp.prefetch(lp + (pt * z.N + begin + pi) * z.C, blank, z.C, k > 1);
              }
            }
            const acc_t off = lse ? lse[r] : acc_t(0);
            const float* c = beta->step(t, lp + r * z.C, off, blank);
            gradient_row<scalar_t, acc_t>(gr + r * z.C, lp + r * z.C, off, gn[n], c, groups[n - begin], blank, z.C,
                                          ops, buf, beta->posteriors());
          }
        }
      });
      return grad;
    }
  }
#endif

  // Pass 1: per frame, [blank posterior, posterior of target position 0, 1, ..., L-1].
  at::Tensor comp_t = at::empty({z.N, z.T, cw}, acc_opts);
  acc_t* comp = comp_t.data_ptr<acc_t>();
  for_sample_runs(z, z.C * sizeof(scalar_t), cost, [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) {
      const int64_t len = il[n];
      if (len == 0 || !std::isfinite(nll[n])) continue;  // pass 2 writes these rows without posteriors
      Sample<scalar_t, acc_t> smp(tg + n * z.S, tl[n]);
#if SEQFAST_X86
      if constexpr (std::is_same_v<acc_t, float>) {
        if (extended) {
          BetaExt<scalar_t> beta(eops, tg + n * z.S, tl[n], len, nll[n], source(n), frames(n), blank);
          for (int64_t t = len - 1; t >= 0; --t) {
            const int64_t r = t * z.N + n;
            beta.prepare(t, z.C);
            if (t > 0) beta.smp.prefetch(lp + ((t - 1) * z.N + n) * z.C, blank, z.C);  // the next step's row
            if (t >= kFarSteps) beta.smp.prefetch(lp + ((t - kFarSteps) * z.N + n) * z.C, blank, z.C, true);
            const float* c = beta.step(t, lp + r * z.C, lse ? lse[r] : 0.0f, blank);
            std::copy(c, c + beta.smp.L + 1, comp + (n * z.T + t) * cw);
          }
          continue;
        }
      }
#endif
      const int64_t P = smp.padded, states = smp.states, L = smp.L;
      // beta rows with two -inf guard cells behind: next[s+1], next[s+2] are plain loads.
      std::vector<acc_t> buf(2 * (P + 2) + 3 * P, neg_inf<acc_t>());
      acc_t* next = buf.data();
      acc_t* cur = next + P + 2;
      acc_t* bx = cur + P + 2;
      acc_t* alpha = bx + P;
      acc_t* post = alpha + P;
      const acc_t* skip_b = smp.skip.data() + 2;  // s -> s+2 allowed iff s+2 -> s is
      const acc_t nl = nll[n];
      for (int64_t t = len - 1; t >= 0; --t) {
        smp.gather(lp + (t * z.N + n) * z.C, lse ? lse[t * z.N + n] : acc_t(0), blank);
        clear_poison(smp.lpe.data(), states);  // as forward: the loss is finite, so the poison reaches no end
        if (t == len - 1) {
          std::fill(bx, bx + P, neg_inf<acc_t>());
          bx[2 * L] = 0;
          if (L > 0) bx[2 * L - 1] = 0;
          for (int64_t s = 0; s < P; ++s) cur[s] = bx[s] + smp.lpe[s];
        } else {
          ops.beta_row(bx, cur, next, skip_b, smp.lpe.data(), P);
        }
        const acc_t* la_row = la + (n * z.T + t) * width;
        std::copy(la_row, la_row + states, alpha);
        acc_t* c = comp + (n * z.T + t) * cw;
        c[0] = ops.posterior_row(post, alpha, bx, nl, P);
        for (int64_t k = 0; k < L; ++k) c[1 + k] = post[2 * k + 1];
        std::swap(next, cur);
      }
    }
  });

  // Pass 2: every (t, n) row of the gradient.
  std::vector<LabelGroups> groups(z.N);
  for (int64_t n = 0; n < z.N; ++n) groups[n] = LabelGroups(tg + n * z.S, tl[n]);
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(z.C, 1));
  at::parallel_for(0, z.T * z.N, grain, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> buf;
    for (int64_t r = begin; r < end; ++r) {
      const int64_t t = r / z.N, n = r % z.N;
      scalar_t* out = gr + r * z.C;
      if (t >= il[n] || !std::isfinite(nll[n])) {
        fill_gradient_row(out, z.C, t >= il[n], nll[n], zero_infinity, lse ? lse[r] : acc_t(0));
        continue;
      }
      gradient_row<scalar_t, acc_t>(out, lp + r * z.C, lse ? lse[r] : acc_t(0), gn[n], comp + (n * z.T + t) * cw,
                                    groups[n], blank, z.C, ops, buf);
    }
  });
  return grad;
}

std::tuple<at::Tensor, at::Tensor> ctc_loss_forward(const at::Tensor& log_probs, const at::Tensor& targets,
                                                    const at::Tensor& input_lengths, const at::Tensor& target_lengths,
                                                    int64_t blank, bool zero_infinity, bool from_logits,
                                                    bool keep_alpha, int64_t alpha_every) {
  (void)zero_infinity;  // the loss stays +inf (or NaN); the flag matters to backward only
  const Sizes z = check_inputs(log_probs, targets, input_lengths, target_lengths, blank);
  const at::Tensor lp = log_probs.contiguous(), tg = targets.contiguous();
  const at::Tensor il = input_lengths.contiguous(), tl = target_lengths.contiguous();
  check_values(z, il.const_data_ptr<int64_t>(), tl.const_data_ptr<int64_t>(), tg.const_data_ptr<int64_t>(), blank);
  TORCH_CHECK(alpha_every >= 1, "ctc_loss_forward: alpha_every must be >= 1, got ", alpha_every);
  return AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, lp.scalar_type(), "ctc_loss_forward", [&] {
    return forward_impl<scalar_t>(lp, tg, il, tl, blank, from_logits, keep_alpha, alpha_every, z);
  });
}

at::Tensor ctc_loss_backward(const at::Tensor& grad_nll, const at::Tensor& log_probs, const at::Tensor& targets,
                             const at::Tensor& input_lengths, const at::Tensor& target_lengths,
                             const at::Tensor& neg_log_likelihood, const at::Tensor& log_alpha, int64_t blank,
                             bool zero_infinity, bool from_logits, int64_t alpha_every) {
  const Sizes z = check_inputs(log_probs, targets, input_lengths, target_lengths, blank);
  const at::ScalarType acc = log_probs.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  TORCH_CHECK(alpha_every >= 1, "ctc_loss_backward: alpha_every must be >= 1, got ", alpha_every);
  if (alpha_every == 1) {
    TORCH_CHECK(log_alpha.dim() == 3 && log_alpha.size(0) == z.N && log_alpha.size(1) == z.T &&
                    log_alpha.size(2) == 2 * z.S + 1,
                "ctc_loss_backward: log_alpha must be (N, T, 2S+1), got ", log_alpha.sizes(),
                " (a forward with keep_alpha=False keeps none)");
  } else {
    TORCH_CHECK(log_alpha.dim() == 4 && log_alpha.size(0) == z.N &&
                    log_alpha.size(1) == (z.T + alpha_every - 1) / alpha_every && log_alpha.size(2) == 2 &&
                    log_alpha.size(3) == 2 * z.S + 1 && log_alpha.scalar_type() == at::kInt,
                "ctc_loss_backward: with alpha_every = ", alpha_every, " log_alpha must be the forward's int32 "
                "checkpoints (N, ceil(T / alpha_every), 2, 2S+1), got ", log_alpha.sizes(), " ",
                log_alpha.scalar_type(), " (a forward with keep_alpha=False keeps none)");
  }
  TORCH_CHECK(grad_nll.numel() == z.N && neg_log_likelihood.numel() == z.N,
              "ctc_loss_backward: grad_nll and neg_log_likelihood must have N = ", z.N, " entries");
  const at::Tensor lp = log_probs.contiguous(), tg = targets.contiguous();
  const at::Tensor il = input_lengths.contiguous(), tl = target_lengths.contiguous();
  check_values(z, il.const_data_ptr<int64_t>(), tl.const_data_ptr<int64_t>(), tg.const_data_ptr<int64_t>(), blank);
  const at::Tensor g = grad_nll.to(acc).contiguous().reshape({z.N});
  const at::Tensor nll = neg_log_likelihood.to(acc).contiguous().reshape({z.N});
  const at::Tensor la = alpha_every == 1 ? log_alpha.to(acc).contiguous() : log_alpha.contiguous();
  return AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, lp.scalar_type(), "ctc_loss_backward", [&] {
    return backward_impl<scalar_t>(g, lp, tg, il, tl, nll, la, blank, zero_infinity, from_logits, alpha_every, z);
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(seqfast, CPU, m) {
  m.impl("ctc_loss_forward", &ctc_loss_forward);
  m.impl("ctc_loss_backward", &ctc_loss_backward);
}

}  // namespace seqfast
