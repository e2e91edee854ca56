// CPU kernels of the seqfast attention ops (schemas and semantics: seqfast/ops/attention.py).
//
// FlashAttention-2 on the CPU. Operands reach the register tiles (attention_microkernel.h) as rows
// of width padded to kNR: Q, V, K and dO are read in place when they already are such rows (compute
// dtype, unit column stride, width a multiple of kNR), else packed once into zero-padded float /
// double copies (any strides and dtypes in; O(L * D) memory). K (and V for the backward) also go
// through kNR-key panels of K^T, the B operand of the score tile, packed into each thread's scratch:
//   forward : one task per (sequence, query head, query tile); tasks of one (sequence, kv head) run
//             back to back so each thread packs that head's K^T once; key tiles stream through an
//             online softmax, only the row log-sum-exp is kept; calls of at most kRowScoresMaxRows query rows a
//             sequence (decoding) take the scores from K's rows in place (row_scores) and pack no panels, and
//             each row's P V in one pass over V's rows (row_pv: the tiles' bits);
//   backward: one parallel region of tasks, one per (sequence, kv head, key split); a task computes
//             the row terms (delta, lse) of its query heads, then each of its key tiles (panels packed
//             by the one task that owns it) accumulates dK, dV over those heads and query tiles,
//             recomputing P from the lse; dQ accumulates in per-split slabs (straight into dq when
//             there is one split), zeroed by the task that owns the rows and summed in split order by
//             the last split of the (sequence, kv head) to finish: bitwise deterministic whatever the
//             thread count. Copies, slabs and gradients come from BufferCache (no page faults at steady
//             state).
// Tiles a causal mask hides completely are skipped. Scores live in base 2 (scale * log2(e) folded
// into one multiplier) so the softmax uses exp2.
#include <ATen/Parallel.h>
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/ExpandUtils.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdlib>  // aligned_alloc
#include <limits>
#include <memory>
#include <type_traits>
#include <vector>

#include "attention_microkernel.h"
#include "buffer_cache.h"
#include "task_order.h"

namespace seqfast::attn {
namespace {

constexpr int64_t kBlockQ = 96;  // query rows per tile (a multiple of kMR)
constexpr int64_t kBlockK = 128;  // keys per backward tile (a multiple of kNR)
// Keys per forward tile: each query row pays a fixed cost per key tile (the max and sum reductions, the
// rescale of its output row, the output tile's loads and stores in P V), which 512 keys spread 4x thinner
// than 128; the score tile (96 x 512 fp32, 192 KiB) lives in L2 either way (benchmarks/NOTES.md).
constexpr int64_t kBlockKForward = 512;
// Calls whose sequences have at most this many query rows (decoding) take their scores from K's rows in place
// (row_scores) instead of packed K^T panels: each head's K is then read once, not read, written and read again.
// Rows / tiles, B8 H8 Lk1024 (benchmarks/NOTES.md): 0.83 at 4 rows, 0.91-0.96 at 5-6, 1.07-1.12 at 8.
constexpr int64_t kRowScoresMaxRows = 6;
constexpr int64_t kBackwardTasks = 16;  // key splits target this many backward tasks (fixed: determinism)
constexpr double kLog2e = 1.4426950408889634;
constexpr double kLn2 = 0.6931471805599453;

int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }
int64_t ceil_div(int64_t x, int64_t m) { return (x + m - 1) / m; }

// 64-byte aligned scratch that is not zeroed.
template <typename T>
struct Scratch {
  struct Free {
    void operator()(T* p) const { std::free(p); }
  };
  std::unique_ptr<T, Free> data;
  explicit Scratch(int64_t n)
      : data(static_cast<T*>(std::aligned_alloc(64, round_up(std::max<int64_t>(n, 1) * sizeof(T), 64)))) {
    TORCH_CHECK(data, "seqfast attention: out of memory for a ", n, "-element scratch buffer");
  }
  T* get() const { return data.get(); }
};

// ---------------------------------------------------------------------------------------------
// Dropout: a counter-based keep decision per (seed, batch, query head, query row, key column),
// murmur3's 32-bit finaliser chained over the coordinates. seqfast/_cpu_dropout.py computes the
// same bits with torch integer ops.

inline uint32_t fmix32(uint32_t h) {
  h ^= h >> 16;
  h *= 0x85EBCA6Bu;
  h ^= h >> 13;
  h *= 0xC2B2AE35u;
  h ^= h >> 16;
  return h;
}

struct Dropout {
  bool on = false;
  uint32_t seed_lo = 0, seed_hi = 0;
  uint32_t threshold = 0;  // keep iff the top 24 bits of the hash >= threshold = ceil(p * 2^24)
  double keep_scale = 1.0;

  Dropout(double p, int64_t seed) {
    on = p > 0.0;
    const auto s = static_cast<uint64_t>(seed);
    seed_lo = static_cast<uint32_t>(s & 0xFFFFFFFFu);
    seed_hi = static_cast<uint32_t>(s >> 32);
    threshold = static_cast<uint32_t>(std::ceil(p * 16777216.0));
    keep_scale = 1.0 / (1.0 - p);
  }
  uint32_t row_key(int64_t b, int64_t h, int64_t i) const {
    uint32_t k = fmix32(seed_hi ^ 0x9E3779B9u);
    k = fmix32(k ^ seed_lo);
    k = fmix32(k ^ static_cast<uint32_t>(b));
    k = fmix32(k ^ static_cast<uint32_t>(h));
    return fmix32(k ^ static_cast<uint32_t>(i));
  }
  bool keep(uint32_t row_key, int64_t j) const {
    const uint32_t col = fmix32(static_cast<uint32_t>(j) ^ 0x7F4A7C15u);
    return (fmix32(row_key ^ col) >> 8) >= threshold;
  }
  // z[c] = keep ? 1 / (1 - p) : 0 for the visible columns.
  template <typename T>
  void row_factors(T* z, int64_t b, int64_t h, int64_t i, int64_t j0, int64_t nv, int64_t ncols) const {
    const uint32_t key = row_key(b, h, i);
    const T ks = static_cast<T>(keep_scale);
    for (int64_t c = 0; c < nv; ++c) z[c] = keep(key, j0 + c) ? ks : T(0);
    for (int64_t c = nv; c < ncols; ++c) z[c] = T(0);
  }
};

// ---------------------------------------------------------------------------------------------
// Problem description, shared by the padded (B, H, L, E) ops and the packed varlen ops.

struct Seqs {
  int64_t n = 0;
  std::vector<int64_t> q_start, q_len, k_start, k_len;
  int64_t total_q = 0, total_k = 0;

  void add(int64_t lq, int64_t lk) {
    q_start.push_back(total_q);
    q_len.push_back(lq);
    k_start.push_back(total_k);
    k_len.push_back(lk);
    total_q += lq;
    total_k += lk;
    ++n;
  }
};

// Element (sequence b, head h, row i, column d) of a tensor: ptr[base[b] + h*sh + i*si + d*sd].
template <typename P>
struct View {
  P* ptr;
  std::vector<int64_t> base;
  int64_t sh, si, sd;
  P* row(int64_t b, int64_t h, int64_t i) const { return ptr + base[b] + h * sh + i * si; }
};

// (B, H, L, E) tensor: sequence b is batch element b.
template <typename P>
View<P> batched_view(const at::Tensor& t, P* ptr) {
  View<P> v{ptr, {}, t.stride(1), t.stride(2), t.stride(3)};
  for (int64_t b = 0; b < t.size(0); ++b) v.base.push_back(b * t.stride(0));
  return v;
}

// (total, H, E) packed tensor: sequence b starts at row start[b].
template <typename P>
View<P> packed_view(const at::Tensor& t, P* ptr, const std::vector<int64_t>& start) {
  View<P> v{ptr, {}, t.stride(1), t.stride(0), t.stride(2)};
  for (int64_t s : start) v.base.push_back(s * t.stride(0));
  return v;
}

template <typename T>
struct Mask {
  const uint8_t* flags = nullptr;  // bool mask (True = attend)
  const T* bias = nullptr;         // additive float mask
  int64_t sb = 0, sh = 0, si = 0, sj = 0;
  at::Tensor keep_alive;
  bool on() const { return flags || bias; }
};

template <typename T>
Mask<T> make_mask(const c10::optional<at::Tensor>& attn_mask, at::IntArrayRef expected) {
  Mask<T> m;
  if (!attn_mask.has_value() || !attn_mask->defined()) return m;
  at::Tensor t = *attn_mask;
  TORCH_CHECK(t.sizes() == expected, "seqfast attention: attn_mask must be (B, Hq, Lq, Lk) = ", expected, ", got ",
              t.sizes());
  TORCH_CHECK(t.device().is_cpu(), "seqfast attention (CPU kernel): attn_mask must be on the CPU");
  if (t.scalar_type() == at::kBool) {
    m.flags = reinterpret_cast<const uint8_t*>(t.data_ptr<bool>());
  } else if (t.scalar_type() != c10::CppTypeToScalarType<T>::value) {
    // Half / bfloat16 masks: convert only the stored (non-broadcast) part, keep zero strides.
    std::vector<int64_t> sizes(t.sizes().begin(), t.sizes().end());
    std::vector<int64_t> strides(t.strides().begin(), t.strides().end());
    for (int d = 0; d < 4; ++d) sizes[d] = strides[d] == 0 ? 1 : sizes[d];
    at::Tensor compact = t.as_strided(sizes, strides, t.storage_offset())
                             .to(c10::CppTypeToScalarType<T>::value).contiguous();
    for (int d = 0; d < 4; ++d) strides[d] = strides[d] == 0 ? 0 : compact.stride(d);
    t = compact.as_strided(t.sizes(), strides);
    m.bias = t.data_ptr<T>();
  } else {
    m.bias = t.data_ptr<T>();
  }
  m.keep_alive = t;
  m.sb = t.stride(0);
  m.sh = t.stride(1);
  m.si = t.stride(2);
  m.sj = t.stride(3);
  return m;
}

template <typename T>
struct Problem {
  Seqs seq;
  int64_t Hq = 0, Hk = 0, group = 1, D = 0, Dv = 0, Dp = 0, Dvp = 0;
  int causal = 0;
  T scale = 0, f = 0;  // f = scale * log2(e): base-2 scores
  Mask<T> mask;
  Dropout dropout{0.0, 0};
  int64_t block_q = kBlockQ, block_k = kBlockK, block_k_fwd = kBlockKForward;

  int64_t shift(int64_t b) const { return causal == 2 ? seq.k_len[b] - seq.q_len[b] : 0; }
  // Keys of [j0, j0 + nk) visible to query row i: always a prefix, of this length.
  int64_t visible(int64_t b, int64_t i, int64_t j0, int64_t nk) const {
    if (!causal) return nk;
    return std::clamp<int64_t>(i + shift(b) - j0 + 1, 0, nk);
  }
  // Adds the explicit mask to the first nv scores of row (b, h, i) and pre-scales them by f.
  void apply_mask(T* s, int64_t b, int64_t h, int64_t i, int64_t j0, int64_t nv) const {
    constexpr T kNegInf = -std::numeric_limits<T>::infinity();
    const int64_t off = b * mask.sb + h * mask.sh + i * mask.si + j0 * mask.sj;
    if (mask.flags) {
      // Added as 0 / -inf, as torch does: a NaN or +inf score stays NaN behind a False.
      const uint8_t* mr = mask.flags + off;
      for (int64_t c = 0; c < nv; ++c) s[c] = s[c] * f + (mr[c * mask.sj] ? T(0) : kNegInf);
    } else {
      const T* mr = mask.bias + off;
      const T l2e = static_cast<T>(kLog2e);
      for (int64_t c = 0; c < nv; ++c) s[c] = s[c] * f + mr[c * mask.sj] * l2e;
    }
  }
};

// A head's rows in a (B, L, H, E)-ordered tensor lie H*E elements apart, often each on a page of its own
// for the hardware prefetchers (which stop at page boundaries): a loop over them waited on memory row by
// row. The row loops below ask for the row kRowsAhead ahead while they work on this one.
constexpr int64_t kRowsAhead = 4;

// kWrite: a row about to be written, its lines asked for with the intent to write (prefetchw), so that the
// stores find them owned rather than waiting for the read the store would trigger.
template <bool kWrite = false, typename P>
inline void prefetch_row(const P* row, int64_t n, int64_t stride) {
  if (stride != 1) return;
  const char* p = reinterpret_cast<const char*>(row);
  for (int64_t off = 0; off < n * static_cast<int64_t>(sizeof(P)); off += 64) {
    if constexpr (kWrite) {
      prefetch_line_write(p + off);
    } else {
      prefetch_line(p + off);
    }
  }
}

// Rows [row0, row0 + len) of (sequence b, head h): dst[i][0:wpad] row row0 + i, zero beyond width.
template <typename S, typename T>
void pack_head_rows(const View<const S>& v, int64_t b, int64_t h, int64_t len, int64_t width, int64_t wpad, T* dst,
                    int64_t row0 = 0) {
  if (len > 0 && load_rows(v.row(b, h, row0), v.sd, v.si, len, width, dst, wpad)) {
    if (width < wpad) {
      for (int64_t i = 0; i < len; ++i) std::fill(dst + i * wpad + width, dst + (i + 1) * wpad, T(0));
    }
    return;
  }
  for (int64_t i = 0; i < len; ++i) {
    T* d = dst + i * wpad;
    if (i + kRowsAhead < len) prefetch_row(v.row(b, h, row0 + i + kRowsAhead), width, v.sd);
    load_row(v.row(b, h, row0 + i), v.sd, width, d);
    for (int64_t c = width; c < wpad; ++c) d[c] = T(0);
  }
}

// Rows: dst[h][start[b] + i][0:wpad], zero beyond width.
template <typename S, typename T>
void pack_rows(const View<const S>& v, const std::vector<int64_t>& start, const std::vector<int64_t>& len,
               int64_t total, int64_t H, int64_t width, int64_t wpad, T* dst) {
  const int64_t n = static_cast<int64_t>(start.size());
  at::parallel_for(0, H * n, 1, [&](int64_t lo, int64_t hi) {
    for (int64_t t = lo; t < hi; ++t) {
      const int64_t h = t / n, b = t % n;
      pack_head_rows(v, b, h, len[b], width, wpad, dst + (h * total + start[b]) * wpad);
    }
  });
}

// A row operand of the products (Q, V, K rows, dO): the input itself when its rows already are what
// packing would make (compute dtype, unit column stride, width a multiple of kNR), else a packed copy
// held by `holder`. Either way row (b, h, i) starts at view.row(b, h, i), rows i apart by view.si.
template <typename S, typename T>
View<const T> row_operand(const View<const S>& v, const std::vector<int64_t>& start, const std::vector<int64_t>& len,
                          int64_t total, int64_t H, int64_t width, int64_t wpad, at::Tensor& holder) {
  if constexpr (std::is_same_v<S, T>) {
    if (v.sd == 1 && width == wpad) return View<const T>{v.ptr, v.base, v.sh, v.si, 1};
  }
  holder = BufferCache::get().empty({H * total * wpad}, c10::CppTypeToScalarType<T>::value);
  T* dst = static_cast<T*>(holder.data_ptr());
  pack_rows(v, start, len, total, H, width, wpad, dst);
  View<const T> packed{dst, {}, total * wpad, wpad, 1};
  for (int64_t s0 : start) packed.base.push_back(s0 * wpad);
  return packed;
}

// K^T panels of rows [row0, row0 + len) of (sequence b, head h): dst[p][0:wpad][0:kNR] holds row
// row0 + p*kNR + c, column d at [d][c]; zero beyond the rows and the width.
template <typename S, typename T>
void pack_head_panels(const View<const S>& v, int64_t b, int64_t h, int64_t row0, int64_t len, int64_t width,
                      int64_t wpad, T* dst) {
  constexpr int64_t kChunk = 64;  // 16-bit rows convert a chunk of columns at a time, then transpose
  T rows[kNR * kChunk];
  for (int64_t p = 0; p < ceil_div(len, kNR); ++p) {
    T* d = dst + p * wpad * kNR;
    const int64_t n_rows = std::min(kNR, len - p * kNR);
    const S* src = v.row(b, h, row0 + p * kNR);
    if (n_rows == kNR && (v.sd == 1 || !std::is_same_v<S, T>)) {
      // A full panel: register transposes, from the rows in place or from a converted chunk of them.
      std::fill(d + width * kNR, d + wpad * kNR, T(0));
      if constexpr (std::is_same_v<S, T>) {
        pack_full_panel(src, v.si, width, d);
      } else {
        for (int64_t e0 = 0; e0 < width; e0 += kChunk) {
          const int64_t n = std::min(kChunk, width - e0);
          for (int64_t c = 0; c < kNR; ++c) load_row(src + c * v.si + e0 * v.sd, v.sd, n, rows + c * kChunk);
          pack_full_panel(rows, kChunk, n, d + e0 * kNR);
        }
      }
      continue;
    }
    std::fill(d, d + wpad * kNR, T(0));
    for (int64_t c = 0; c < n_rows; ++c) {
      const S* r = src + c * v.si;
      for (int64_t e = 0; e < width; ++e) d[e * kNR + c] = static_cast<T>(r[e * v.sd]);
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Forward.

template <typename S, typename T>
void forward(const Problem<T>& pb, const View<const S>& q, const View<const S>& k, const View<const S>& v,
             const View<S>& out, const View<T>& lse) {
  const Seqs& sq = pb.seq;
  const int64_t BQ = pb.block_q, BK = pb.block_k_fwd, Dp = pb.Dp, Dvp = pb.Dvp;
  at::Tensor qp_buf, vp_buf;
  const View<const T> Qv = row_operand<S, T>(q, sq.q_start, sq.q_len, sq.total_q, pb.Hq, pb.D, Dp, qp_buf);
  bool by_rows = false;
  if constexpr (std::is_same_v<T, float>) {
    by_rows = row_scores_available() && !sq.q_len.empty() &&
              *std::max_element(sq.q_len.begin(), sq.q_len.end()) <= kRowScoresMaxRows;
  }
  // The rows path reads K and V where they lie when their rows are Dp (Dvp) wide with unit column stride, in float
  // or, on AVX-512, in 16 bits (row_reads_rows_of); else, like the panels, each thread converts the head it works on
  // into its own scratch (rows Dp, Dvp apart), not all of K and V at once: a decoding step reads each once from
  // memory, with no float copy written and read back.
  bool k_direct = false, v_direct = false;
  if constexpr (std::is_same_v<T, float>) {
    k_direct = row_reads_rows_of<S>() && k.sd == 1 && pb.D == Dp;
    v_direct = row_reads_rows_of<S>() && v.sd == 1 && pb.Dv == Dvp;
  }
  const bool v_per_head = by_rows && !v_direct;
  // The tile path's V operand: V itself where its rows are float, of unit stride and Dvp wide. Otherwise (16-bit,
  // padded width, strided elements) each thread converts the head it works on into its scratch a key block at a
  // time, as the K^T panels, instead of a float copy of all of V per call (B8 H8 Lq16 Lk2048 D128 bf16: 17.0 ->
  // 7.8 ms, benchmarks/NOTES.md). Float rows far apart (a (B, L, H, D) tensor's heads, rows H * D apart: often 4
  // KiB, one L1 set for all of them) make P V's operand loads miss: where a head serves more than one task they
  // are copied together the same way (B2 H8 L1024 D128: 45 -> 31 ms); a head read by one task only stays in place.
  int64_t max_q_blocks = 0;
  for (int64_t b = 0; b < sq.n; ++b) max_q_blocks = std::max(max_q_blocks, ceil_div(sq.q_len[b], BQ) * pb.group);
  const bool v_in_place = std::is_same_v<S, T> && v.sd == 1 && pb.Dv == Dvp;
  const bool v_pack = !by_rows && (!v_in_place || (v.si != Dvp && max_q_blocks > 1));
  const View<const T> Vv = by_rows || v_pack ? View<const T>{}
                                             : row_operand<S, T>(v, sq.k_start, sq.k_len, sq.total_k, pb.Hk, pb.Dv,
                                                                 Dvp, vp_buf);  // in place: no copy

  struct Task {
    int64_t b, h, q0;
  };
  // The keys a task's query block sees: [0, kend).
  const auto kend_of = [&](const Task& tk) {
    const int64_t nq = std::min(BQ, sq.q_len[tk.b] - tk.q0);
    return pb.causal ? std::clamp<int64_t>(tk.q0 + nq + pb.shift(tk.b), 0, sq.k_len[tk.b]) : sq.k_len[tk.b];
  };
  std::vector<Task> tasks;
  std::vector<int64_t> cost, group_cost(sq.n * pb.Hk, 0);
  int64_t max_kpan = 1;
  for (int64_t b = 0; b < sq.n; ++b) {
    max_kpan = std::max(max_kpan, ceil_div(sq.k_len[b], kNR));
    for (int64_t h = 0; h < pb.Hq; ++h) {
      for (int64_t q0 = 0; q0 < sq.q_len[b]; q0 += BQ) {
        const int64_t nq = std::min(BQ, sq.q_len[b] - q0);
        tasks.push_back({b, h, q0});
        const int64_t kend = kend_of(tasks.back());
        cost.push_back(kend * nq);
        group_cost[b * pb.Hk + h / pb.group] += kend * nq;
      }
    }
  }
  // Tasks of one (sequence, kv head) run back to back, the costliest group first and inside it the
  // costliest tile first: the threads then share a head's K^T panels, which each packs once into its
  // own scratch (O(Lk * D) per thread instead of a packed copy of all of K).
  std::vector<int64_t> order(tasks.size());
  for (size_t i = 0; i < order.size(); ++i) order[i] = static_cast<int64_t>(i);
  auto group = [&](int64_t t) { return tasks[t].b * pb.Hk + tasks[t].h / pb.group; };
  std::stable_sort(order.begin(), order.end(), [&](int64_t x, int64_t y) {
    const int64_t gx = group(x), gy = group(y);
    if (gx != gy) return group_cost[gx] != group_cost[gy] ? group_cost[gx] > group_cost[gy] : gx < gy;
    return cost[x] > cost[y];
  });

  struct Buffers {
    Scratch<T> s, o, m, l, kt, vt;
    int64_t kt_group = -1;  // the (sequence, kv head) whose K^T panels (and packed V rows) kt (vt) hold
    int64_t kt_packed = 0;  // keys [0, kt_packed) of kt_group are packed (the tile path packs as it goes)
    int64_t vt_packed = 0;  // the same for V rows (v_pack)
  };
  auto make = [&] {
    return Buffers{Scratch<T>(BQ * BK), Scratch<T>(BQ * Dvp), Scratch<T>(BQ), Scratch<T>(BQ),
                   Scratch<T>(by_rows && k_direct ? 1 : max_kpan * Dp * kNR),
                   Scratch<T>(v_per_head || v_pack ? max_kpan * kNR * Dvp : 1)};
  };
  // The tile path prefetches a head's K rows (packed into panels as the key blocks come) and V rows where they are
  // one run of memory. Rows apart (one 4 KiB page each in a (B, L, H, D) tensor), prefetching was 5-11 % slower on
  // the AVX2 path and 1-4 % faster on AVX-512's (B8 H8 Lq16 Lk2048): they are left to the demand loads.
  const bool k_runs = k.sd == 1 && k.si == pb.D;
  const bool v_runs = v_pack ? v.sd == 1 && v.si == pb.Dv : v.si == Dvp;  // of the rows the block reads: v's
  constexpr int64_t kSb = sizeof(S);
  // V rows [from, to) of (b, hk) as the product (!v_pack) or the packing (v_pack) will read them.
  const auto v_ahead = [&](Prefetch& rows, int64_t b, int64_t hk, int64_t from, int64_t to) {
    if (v_runs) rows.add(v.row(b, hk, from), (to - from) * pb.Dv * kSb);
  };
  // The tile path's key block [j0, j0 + nk) of task t: its K^T panels and (v_pack) V rows packed where not yet,
  // and the rows to prefetch while its products run: the next block's (this task's, else the next task's first).
  const auto ready_key_block = [&](Buffers& buf, int64_t t, TaskAhead& ahead, int64_t j0, int64_t nk, int64_t nkp,
                                   int64_t nq, int64_t kend) {
    const int64_t b = tasks[t].b, hk = tasks[t].h / pb.group;
    const int64_t packed_to = std::min(sq.k_len[b], j0 + nkp);
    if (packed_to > buf.kt_packed) {
      pack_head_panels(k, b, hk, buf.kt_packed, packed_to - buf.kt_packed, pb.D, Dp,
                       buf.kt.get() + buf.kt_packed / kNR * Dp * kNR);
      buf.kt_packed = packed_to;
    }
    if (v_pack && j0 + nk > buf.vt_packed) {
      pack_head_rows(v, b, hk, j0 + nk - buf.vt_packed, pb.Dv, Dvp, buf.vt.get() + buf.vt_packed * Dvp,
                     buf.vt_packed);
      buf.vt_packed = j0 + nk;
    }
    Prefetch rows;
    if (j0 + nk < kend) {
      const int64_t end = j0 + nk + std::min(BK, kend - j0 - nk), kfrom = std::max(j0 + nk, buf.kt_packed);
      if (k_runs) rows.add(k.row(b, hk, kfrom), (end - kfrom) * pb.D * kSb);
      v_ahead(rows, b, hk, v_pack ? std::max(j0 + nk, buf.vt_packed) : j0 + nk, end);
    } else if (const int64_t t2 = ahead.claim(); t2 >= 0) {
      const Task& tk = tasks[t2];
      const int64_t next = std::min(BK, kend_of(tk)), hk2 = tk.h / pb.group;
      // The same group's packed panels and V rows are already in this thread's scratch.
      if (k_runs && group(t2) != group(t)) rows.add(k.row(tk.b, hk2, 0), next * pb.D * kSb);
      if (!v_pack || group(t2) != group(t)) v_ahead(rows, tk.b, hk2, 0, next);
    }
    rows.rate = rows.lines() > tile_steps<T>(nq, nkp, Dp) + tile_steps<T>(nq, Dvp, nk) ? 2 : 1;
    return rows;
  };
  run_tasks_ahead(order, make, [&](int64_t t, Buffers& buf, TaskAhead& ahead) {
    const auto [b, h, q0] = tasks[t];
    const int64_t hk = h / pb.group;
    if (buf.kt_group != group(t)) {
      if (by_rows) {
        if (!k_direct) pack_head_rows(k, b, hk, sq.k_len[b], pb.D, Dp, buf.kt.get());
        if (v_per_head) pack_head_rows(v, b, hk, sq.k_len[b], pb.Dv, Dvp, buf.vt.get());
      }
      buf.kt_group = group(t);
      buf.kt_packed = buf.vt_packed = 0;
    }
    const int64_t nq = std::min(BQ, sq.q_len[b] - q0);
    const int64_t kend = kend_of(tasks[t]);
    T *Sb = buf.s.get(), *O = buf.o.get(), *m = buf.m.get(), *l = buf.l.get();
    std::fill(O, O + nq * Dvp, T(0));
    std::fill(m, m + nq, -std::numeric_limits<T>::infinity());
    std::fill(l, l + nq, T(0));
    const T* Qt = Qv.row(b, h, q0);
    for (int64_t j0 = 0, nk = 0; j0 < kend; j0 += nk) {
      nk = std::min(BK, kend - j0);
      // Causal: keys every row of the tile sees go through the full-tile path as a chunk of their own (kNR
      // aligned); only the rest, at most about nq keys, takes the diagonal path below, whose products
      // re-read the key panels and V rows for every block of tile_rows() rows.
      const int64_t seen_by_all = pb.visible(b, q0, j0, nk) / kNR * kNR;
      if (seen_by_all > 0 && seen_by_all < nk) nk = seen_by_all;
      const int64_t nkp = round_up(nk, kNR);
      const T* Kpan = by_rows ? nullptr : buf.kt.get() + (j0 / kNR) * Dp * kNR;
      const T* Vt = by_rows ? nullptr : v_pack ? buf.vt.get() + j0 * Dvp : Vv.row(b, hk, j0);
      const int64_t Vld = v_pack ? Dvp : Vv.si;
      Prefetch ahead_rows;
      if (!by_rows) ahead_rows = ready_key_block(buf, t, ahead, j0, nk, nkp, nq, kend);
      // Rows [r0, r0 + rows): scores for the first ncols keys, P V reduced over the first kred.
      auto rows_step = [&](int64_t r0, int64_t rows, int64_t ncols, int64_t kred) {
        if (ncols > 0 && by_rows) {
          if constexpr (std::is_same_v<T, float>) {
            const int64_t n = std::min(ncols, nk);
            auto scores = [&](const auto* K0, int64_t ks) {  // K0: S rows where they lie, or float scratch
              int64_t r = r0;
              for (; r + 2 <= r0 + rows; r += 2) {
                row_scores2(Qt + r * Qv.si, Qt + (r + 1) * Qv.si, K0, ks, n, Dp, Sb + r * BK, Sb + (r + 1) * BK);
              }
              if (r < r0 + rows) row_scores(Qt + r * Qv.si, K0, ks, n, Dp, Sb + r * BK);
            };
            if (k_direct) {
              scores(k.row(b, hk, j0), k.si);
            } else {
              scores(static_cast<const float*>(buf.kt.get() + j0 * Dp), Dp);
            }
          }
        } else if (ncols > 0) {
          gemm(Gemm<T>{rows, ncols, Dp, Qt + r0 * Qv.si, Qv.si, 1, Kpan, kNR, Dp * kNR, Sb + r0 * BK, BK, false,
                       &ahead_rows});
        }
        for (int64_t c0 = r0; c0 < r0 + rows; c0 += kSoftmaxRows) {
          const int64_t n = std::min(kSoftmaxRows, r0 + rows - c0);
          int64_t nv[kSoftmaxRows];
          T alpha[kSoftmaxRows];
          const T f = pb.mask.on() ? T(1) : pb.f;  // a mask's scores come scaled
          for (int64_t r = 0; r < n; ++r) {
            nv[r] = pb.visible(b, q0 + c0 + r, j0, nk);
            if (pb.mask.on()) pb.apply_mask(Sb + (c0 + r) * BK, b, h, q0 + c0 + r, j0, nv[r]);
          }
          online_softmax_rows(Sb + c0 * BK, BK, n, nv, ncols, f, m + c0, l + c0, alpha);
          for (int64_t r = 0; r < n; ++r) {
            if (pb.dropout.on && nv[r] > 0) {
              T* s = Sb + (c0 + r) * BK;
              const uint32_t key = pb.dropout.row_key(b, h, q0 + c0 + r);
              const T ks = static_cast<T>(pb.dropout.keep_scale);
              for (int64_t c = 0; c < nv[r]; ++c) s[c] = pb.dropout.keep(key, j0 + c) ? s[c] * ks : T(0);
            }
            if (alpha[r] != T(1)) scale_row(O + (c0 + r) * Dvp, Dvp, alpha[r]);
          }
        }
        if (kred > 0 && by_rows) {
          if constexpr (std::is_same_v<T, float>) {
            auto pv = [&](const auto* V0, int64_t vs) {  // V0: S rows where they lie, or float scratch
              int64_t r = r0;
              for (; r + 2 <= r0 + rows; r += 2) {
                row_pv2(Sb + r * BK, Sb + (r + 1) * BK, kred, V0, vs, Dvp, O + r * Dvp, O + (r + 1) * Dvp);
              }
              if (r < r0 + rows) row_pv(Sb + r * BK, kred, V0, vs, Dvp, O + r * Dvp);
            };
            if (v_direct) {
              pv(v.row(b, hk, j0), v.si);
            } else {
              pv(static_cast<const float*>(buf.vt.get() + j0 * Dvp), Dvp);
            }
          }
        } else if (kred > 0) {
          gemm(Gemm<T>{rows, Dvp, kred, Sb + r0 * BK, BK, 1, Vt, Vld, kNR, O + r0 * Dvp, Dvp, true, &ahead_rows});
        }
      };
      if (pb.visible(b, q0, j0, nk) == nk) {
        rows_step(0, nq, nkp, nk);
      } else {
        // A tile on the causal diagonal: each block of tile_rows() rows computes only the keys its last row sees.
        const int64_t step = tile_rows<T>();
        for (int64_t r0 = 0; r0 < nq; r0 += step) {
          const int64_t rows = std::min(step, nq - r0);
          const int64_t nv_last = pb.visible(b, q0 + r0 + rows - 1, j0, nk);
          rows_step(r0, rows, round_up(nv_last, kNR), nv_last);
        }
      }
    }
    for (int64_t r = 0; r < nq; ++r) {
      const int64_t i = q0 + r;
      S* dst = out.row(b, h, i);
      if (r + kRowsAhead < nq) prefetch_row<true>(out.row(b, h, i + kRowsAhead), pb.Dv, out.sd);
      // l = 0: the row saw no key. O is then 0, unless a NaN or inf in V met a zero weight (NaN, as
      // in torch's P V). l = NaN (a NaN score) makes the row NaN.
      const bool empty = l[r] == T(0);
      const T inv = empty ? T(1) : T(1) / l[r];
      store_row(O + r * Dvp, inv, pb.Dv, dst, out.sd);
      *lse.row(b, h, i) = empty ? std::numeric_limits<T>::infinity() : (m[r] + std::log2(l[r])) * static_cast<T>(kLn2);
    }
  });
}

// ---------------------------------------------------------------------------------------------
// Backward.

template <typename S, typename T>
void backward(const Problem<T>& pb, const View<const S>& dout, const View<const S>& q, const View<const S>& k,
              const View<const S>& v, const View<const S>& out, const View<const T>& lse, const View<S>& dq,
              const View<S>& dk, const View<S>& dv, T* dmask) {
  const Seqs& sq = pb.seq;
  const int64_t BQ = pb.block_q, BK = pb.block_k, Dp = pb.Dp, Dvp = pb.Dvp, G = pb.group;
  const auto dt = c10::CppTypeToScalarType<T>::value;
  at::Tensor qp_buf, dop_buf, kp_buf;
  const View<const T> Qv = row_operand<S, T>(q, sq.q_start, sq.q_len, sq.total_q, pb.Hq, pb.D, Dp, qp_buf);
  const View<const T> dOv = row_operand<S, T>(dout, sq.q_start, sq.q_len, sq.total_q, pb.Hq, pb.Dv, Dvp, dop_buf);
  const View<const T> Kv = row_operand<S, T>(k, sq.k_start, sq.k_len, sq.total_k, pb.Hk, pb.D, Dp, kp_buf);

  int64_t max_ktiles = 1, max_q = 1;
  for (int64_t b = 0; b < sq.n; ++b) {
    max_ktiles = std::max(max_ktiles, ceil_div(sq.k_len[b], BK));
    max_q = std::max(max_q, sq.q_len[b]);
  }
  const int64_t splits =
      std::clamp<int64_t>(ceil_div(kBackwardTasks, std::max<int64_t>(sq.n * pb.Hk, 1)), 1, max_ktiles);
  // dQ partial sums, one slab per split: [split][Hq][total_q][Dp], each task zeroing the rows it owns.
  // With one split and dq already in the compute layout, the sums go straight into dq instead.
  bool in_place = false;
  if constexpr (std::is_same_v<S, T>) in_place = splits == 1 && dq.sd == 1 && pb.D == Dp;
  at::Tensor dq_buf;
  std::vector<View<T>> dQv;  // one per split
  if (in_place) {
    dQv.push_back(View<T>{reinterpret_cast<T*>(dq.ptr), dq.base, dq.sh, dq.si, 1});  // S == T here
  } else {
    dq_buf = BufferCache::get().empty({splits * pb.Hq * sq.total_q * Dp}, dt);
    for (int64_t s = 0; s < splits; ++s) {
      View<T> slab{static_cast<T*>(dq_buf.data_ptr()) + s * pb.Hq * sq.total_q * Dp, {}, sq.total_q * Dp, Dp, 1};
      for (int64_t q0 : sq.q_start) slab.base.push_back(q0 * Dp);
      dQv.push_back(slab);
    }
  }
  // Splits of each (sequence, kv head) still running: the last one to finish turns the slabs into dq.
  std::unique_ptr<std::atomic<int64_t>[]> running(new std::atomic<int64_t>[std::max<int64_t>(sq.n * pb.Hk, 1)]);
  for (int64_t i = 0; i < sq.n * pb.Hk; ++i) running[i].store(splits, std::memory_order_relaxed);

  struct Task {
    int64_t b, hk, split;
  };
  std::vector<Task> tasks;
  std::vector<int64_t> cost;
  for (int64_t b = 0; b < sq.n; ++b) {
    for (int64_t hk = 0; hk < pb.Hk; ++hk) {
      for (int64_t s = 0; s < splits; ++s) {
        int64_t c = 1;  // never 0: empty tasks still zero and finish their dQ rows
        for (int64_t j0 = s * BK; j0 < sq.k_len[b]; j0 += splits * BK) {
          const int64_t qbeg = pb.causal ? std::clamp<int64_t>(j0 - pb.shift(b), 0, sq.q_len[b]) : 0;
          c += std::min(BK, sq.k_len[b] - j0) * (sq.q_len[b] - qbeg);
        }
        tasks.push_back({b, hk, s});
        cost.push_back(c);
      }
    }
  }
  struct Buffers {
    Scratch<T> p, dp, z, pd, dk, dv, kt, vt, rows, row;
  };
  auto make = [&] {
    return Buffers{Scratch<T>(BQ * BK), Scratch<T>(BQ * BK), Scratch<T>(BQ * BK), Scratch<T>(BQ * BK),
                   Scratch<T>(BK * Dp),  Scratch<T>(BK * Dvp), Scratch<T>(BK * Dp), Scratch<T>(BK * Dvp),
                   Scratch<T>(2 * G * max_q), Scratch<T>(std::max(Dp, Dvp))};
  };
  const int64_t Lk_mask = sq.n ? sq.k_len[0] : 0;  // masks exist only for the padded ops
  const int64_t Lq_mask = sq.n ? sq.q_len[0] : 0;
  // The whole backward is this one parallel region: each task also computes the row terms of its query
  // heads (recomputed by every split: Lq * Dv multiply-adds per head) and zeroes its dQ rows, and the
  // last split of a (sequence, kv head) finishes dq, so no thread waits at a barrier between phases.
  run_tasks(by_cost(cost), make, [&](int64_t t, Buffers& buf) {
    const auto [b, hk, split] = tasks[t];
    const int64_t Lq = sq.q_len[b], Lk = sq.k_len[b];
    T *P = buf.p.get(), *dP = buf.dp.get(), *dK = buf.dk.get(), *dV = buf.dv.get(), *row = buf.row.get();
    T* Z = pb.dropout.on ? buf.z.get() : nullptr;
    T* Pd = pb.dropout.on ? buf.pd.get() : P;
    T* lse2 = buf.rows.get();   // [G][Lq]: lse * log2(e)
    T* delta = lse2 + G * Lq;   // [G][Lq]: rowsum(dO * O)
    const View<T>& dQs = dQv[split];
    for (int64_t g = 0; g < G; ++g) {
      const int64_t h = hk * G + g;
      for (int64_t i = 0; i < Lq; ++i) {
        if (i + kRowsAhead < Lq) {
          prefetch_row(out.row(b, h, i + kRowsAhead), pb.Dv, out.sd);
          prefetch_row(dOv.row(b, h, i + kRowsAhead), pb.Dv, dOv.sd);
        }
        load_row(out.row(b, h, i), out.sd, pb.Dv, row);
        const T* go = dOv.row(b, h, i);
        delta[g * Lq + i] = dot_row(go, row, pb.Dv);
        lse2[g * Lq + i] = *lse.row(b, h, i) * static_cast<T>(kLog2e);
        std::fill(dQs.row(b, h, i), dQs.row(b, h, i) + Dp, T(0));
      }
    }
    for (int64_t j0 = split * BK; j0 < Lk; j0 += splits * BK) {
      const int64_t nk = std::min(BK, Lk - j0), nkp = round_up(nk, kNR);
      std::fill(dK, dK + nk * Dp, T(0));
      std::fill(dV, dV + nk * Dvp, T(0));
      // Each key tile belongs to one task: its K^T / V^T panels are packed here, once (K^T from the rows
      // already in the compute type).
      const T* Kpan = buf.kt.get();
      const T* Vpan = buf.vt.get();
      pack_head_panels(Kv, b, hk, j0, nk, pb.D, Dp, buf.kt.get());
      pack_head_panels(v, b, hk, j0, nk, pb.Dv, Dvp, buf.vt.get());
      const T* Krows = Kv.row(b, hk, j0);
      // First query row that sees key j0 under the causal mask.
      const int64_t qbeg = pb.causal ? std::clamp<int64_t>(j0 - pb.shift(b), 0, Lq) / BQ * BQ : 0;
      for (int64_t h = hk * G; h < (hk + 1) * G; ++h) {
        for (int64_t q0 = qbeg; q0 < Lq; q0 += BQ) {
          const int64_t nq = std::min(BQ, Lq - q0);
          const int64_t row0 = (h - hk * G) * Lq + q0;
          const T* Qt = Qv.row(b, h, q0);
          const T* dOt = dOv.row(b, h, q0);
          // On the causal diagonal the products skip what the mask hides, in blocks of tile_rows(): rows
          // compute only the keys their block's last row sees, keys only the rows that see them.
          const bool diagonal = pb.visible(b, q0, j0, nk) < nk;
          auto row_cols = [&](int64_t r0, int64_t rows) {
            return diagonal ? pb.visible(b, q0 + r0 + rows - 1, j0, nk) : nk;
          };
          const int64_t rstep = diagonal ? tile_rows<T>() : nq;
          for (int64_t r0 = 0; r0 < nq; r0 += rstep) {
            const int64_t rows = std::min(rstep, nq - r0), ncb = round_up(row_cols(r0, rows), kNR);
            if (ncb > 0) {
              gemm(Gemm<T>{rows, ncb, Dp, Qt + r0 * Qv.si, Qv.si, 1, Kpan, kNR, Dp * kNR, P + r0 * BK, BK, false});
            }
          }
          for (int64_t r = 0; r < nq; ++r) {
            const int64_t i = q0 + r;
            const int64_t nv = pb.visible(b, i, j0, nk);
            T* s = P + r * BK;
            T f = pb.f;
            if (pb.mask.on()) {
              pb.apply_mask(s, b, h, i, j0, nv);
              f = T(1);
            }
            probs_row(s, nv, nkp, f, lse2[row0 + r]);
            if (Z) {
              T* z = Z + r * BK;
              pb.dropout.row_factors(z, b, h, i, j0, nv, nkp);
              for (int64_t c = 0; c < nkp; ++c) Pd[r * BK + c] = s[c] * z[c];
            }
          }
          for (int64_t r0 = 0; r0 < nq; r0 += rstep) {
            const int64_t rows = std::min(rstep, nq - r0), ncb = round_up(row_cols(r0, rows), kNR);
            if (ncb > 0) {
              gemm(Gemm<T>{rows, ncb, Dvp, dOt + r0 * dOv.si, dOv.si, 1, Vpan, kNR, Dvp * kNR, dP + r0 * BK, BK,
                           false});
            }
            for (int64_t r = r0; r < r0 + rows; ++r) {
              dscores_row(P + r * BK, dP + r * BK, Z ? Z + r * BK : nullptr, ncb, delta[row0 + r]);
              std::fill(dP + r * BK + ncb, dP + r * BK + nkp, T(0));
            }
          }
          if (dmask) {
            for (int64_t r = 0; r < nq; ++r) {
              T* dst = dmask + ((b * pb.Hq + h) * Lq_mask + q0 + r) * Lk_mask + j0;
              std::copy(dP + r * BK, dP + r * BK + nk, dst);
            }
          }
          // dV += Pd^T dO and dK += dS^T Q over the rows that see each block of keys.
          const int64_t kstep = diagonal ? tile_rows<T>() : nk;
          for (int64_t c0 = 0; c0 < nk; c0 += kstep) {
            const int64_t keys = std::min(kstep, nk - c0);
            const int64_t rf = diagonal ? std::clamp<int64_t>(j0 + c0 - pb.shift(b) - q0, 0, nq) : 0;
            if (rf >= nq) continue;
            gemm(Gemm<T>{keys, Dvp, nq - rf, Pd + rf * BK + c0, 1, BK, dOt + rf * dOv.si, dOv.si, kNR, dV + c0 * Dvp,
                         Dvp, true});
            gemm(Gemm<T>{keys, Dp, nq - rf, dP + rf * BK + c0, 1, BK, Qt + rf * Qv.si, Qv.si, kNR, dK + c0 * Dp, Dp,
                         true});
          }
          for (int64_t r0 = 0; r0 < nq; r0 += rstep) {
            const int64_t rows = std::min(rstep, nq - r0), kred = row_cols(r0, rows);
            if (kred > 0) {
              gemm(Gemm<T>{rows, Dp, kred, dP + r0 * BK, BK, 1, Krows, Kv.si, kNR, dQs.row(b, h, q0 + r0), dQs.si,
                           true});
            }
          }
        }
      }
      for (int64_t r = 0; r < nk; ++r) {
        if (r + kRowsAhead < nk) {
          prefetch_row(dk.row(b, hk, j0 + r + kRowsAhead), pb.D, dk.sd);
          prefetch_row(dv.row(b, hk, j0 + r + kRowsAhead), pb.Dv, dv.sd);
        }
        store_row(dK + r * Dp, pb.scale, pb.D, dk.row(b, hk, j0 + r), dk.sd);
        store_row(dV + r * Dvp, T(1), pb.Dv, dv.row(b, hk, j0 + r), dv.sd);
      }
    }
    // The last split to finish sums the slabs in split order (the same sums whichever thread gets here).
    if (running[b * pb.Hk + hk].fetch_sub(1, std::memory_order_acq_rel) != 1) return;
    for (int64_t h = hk * G; h < (hk + 1) * G; ++h) {
      for (int64_t i = 0; i < Lq; ++i) {
        if (i + kRowsAhead < Lq) prefetch_row(dq.row(b, h, i + kRowsAhead), pb.D, dq.sd);
        if (in_place) {
          T* g = dQv[0].row(b, h, i);
          store_row(g, pb.scale, pb.D, g, 1);
          continue;
        }
        std::copy(dQv[0].row(b, h, i), dQv[0].row(b, h, i) + pb.D, row);
        for (int64_t s = 1; s < splits; ++s) {
          const T* part = dQv[s].row(b, h, i);
          for (int64_t c = 0; c < pb.D; ++c) row[c] += part[c];
        }
        store_row(row, pb.scale, pb.D, dq.row(b, h, i), dq.sd);
      }
    }
  });
}

// ---------------------------------------------------------------------------------------------
// Op entry points.

void check_inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, int64_t dims) {
  for (const at::Tensor* t : {&q, &k, &v}) {
    TORCH_CHECK(t->device().is_cpu(), "seqfast attention (CPU kernel): tensors must be on the CPU");
    TORCH_CHECK(t->dim() == dims, "seqfast attention: expected ", dims, "-D query/key/value, got ", t->sizes());
    TORCH_CHECK(t->scalar_type() == q.scalar_type(), "seqfast attention: query, key, value must share a dtype");
  }
  const int64_t hq = q.size(1), hk = k.size(1), seq_dim = dims == 4 ? 2 : 0;
  // No heads at all is an empty call (torch returns empty outputs); key/value without heads against query heads
  // is refused by the Python front.
  TORCH_CHECK((hk > 0 && hq % hk == 0) || hq == 0, "seqfast attention: query heads (", hq,
              ") must be a multiple of kv heads (", hk, ")");
  TORCH_CHECK(q.size(-1) == k.size(-1), "seqfast attention: query and key head dims differ");
  TORCH_CHECK(k.size(seq_dim) == v.size(seq_dim) && k.size(1) == v.size(1),
              "seqfast attention: key and value shapes disagree");
}

template <typename T>
Problem<T> make_problem(int64_t Hq, int64_t Hk, int64_t D, int64_t Dv, int64_t causal, double scale) {
  TORCH_CHECK(causal >= 0 && causal <= 2, "seqfast attention: causal must be 0, 1 or 2, got ", causal);
  Problem<T> pb;
  pb.Hq = Hq;
  pb.Hk = Hk;
  pb.group = Hk > 0 ? Hq / Hk : 1;
  pb.D = D;
  pb.Dv = Dv;
  pb.Dp = round_up(std::max<int64_t>(D, 1), kNR);
  pb.Dvp = round_up(std::max<int64_t>(Dv, 1), kNR);
  pb.causal = static_cast<int>(causal);
  pb.scale = static_cast<T>(scale);
  pb.f = static_cast<T>(scale * kLog2e);
  return pb;
}

template <typename S>
using CalcT = std::conditional_t<std::is_same_v<S, double>, double, float>;

// The dropout seed travels as a one-element int64 CPU tensor, so that torch.compile can draw it in the graph.
int64_t seed_value(const at::Tensor& seed) {
  TORCH_CHECK(seed.numel() == 1 && seed.scalar_type() == at::kLong && seed.device().is_cpu(),
              "seqfast attention: seed must be a one-element int64 CPU tensor");
  return seed.item<int64_t>();
}

// The forward's output, (B, Hq, Lq, Dv) in the query's layout when Dv == D (torch.empty_like(query): dense, its
// dims in the query's stride order), else contiguous: torch's fused attention gives the same, so a model's
// out.transpose(1, 2).reshape(B, Lq, Hq * D) after (B, Lq, Hq, D) queries stays a view. From BufferCache, as the
// gradients.
at::Tensor attention_output(const at::Tensor& query, int64_t Dv) {
  auto& cache = BufferCache::get();
  if (Dv != query.size(3) || query.is_contiguous()) {
    return cache.empty({query.size(0), query.size(1), query.size(2), Dv}, query.scalar_type());
  }
  const std::vector<int64_t> strides = query.is_non_overlapping_and_dense()
                                           ? query.strides().vec()
                                           : at::infer_dense_strides(query.sizes(), query.strides());
  return cache.empty({query.numel()}, query.scalar_type()).as_strided(query.sizes(), strides);
}

// The backward's gradients in the layouts torch's CPU attention gives them. Fused (no dropout, Dv == D, no mask
// gradient, no empty sequence): dQ, dK, dV (B, L, H, E)-ordered. Unfused (its math path): dQ and dV contiguous,
// dK the transpose of a contiguous (B, H, E, Lk) (a matmul's), or contiguous with grouped heads (a sum over the
// group). Keep in step with seqfast.reference.attention.fused_gradients / gradient_like (the fake, the others).
bool fused_gradients(const at::Tensor& query, const at::Tensor& key, const at::Tensor& value, double dropout_p,
                     bool mask_grad) {
  return dropout_p == 0.0 && !mask_grad && value.size(3) == query.size(3) && query.size(2) > 0 && key.size(2) > 0;
}

// `transposed`: the unfused dK. From BufferCache.
at::Tensor attention_gradient(const at::Tensor& like, bool fused, bool transposed = false) {
  auto& cache = BufferCache::get();
  const int64_t B = like.size(0), H = like.size(1), L = like.size(2), E = like.size(3);
  if (fused) return cache.empty({B, L, H, E}, like.scalar_type()).transpose(1, 2);
  if (transposed) return cache.empty({B, H, E, L}, like.scalar_type()).transpose(2, 3);
  return cache.empty(like.sizes(), like.scalar_type());
}

std::tuple<at::Tensor, at::Tensor> attention_forward(const at::Tensor& query, const at::Tensor& key,
                                                     const at::Tensor& value,
                                                     const c10::optional<at::Tensor>& attn_mask,
                                                     double dropout_p, int64_t causal, double scale,
                                                     const at::Tensor& seed) {
  check_inputs(query, key, value, 4);
  TORCH_CHECK(dropout_p >= 0.0 && dropout_p < 1.0, "seqfast attention: dropout_p must be in [0, 1)");
  const int64_t B = query.size(0), Hq = query.size(1), Lq = query.size(2), Lk = key.size(2);
  TORCH_CHECK(key.size(0) == B && value.size(0) == B, "seqfast attention: batch sizes differ");
  const auto lse_dtype = query.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor out = attention_output(query, value.size(3));
  at::Tensor lse = at::empty({B, Hq, Lq}, query.options().dtype(lse_dtype));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, query.scalar_type(), "seqfast_attention_forward", [&] {
    using T = CalcT<scalar_t>;
    Problem<T> pb = make_problem<T>(Hq, key.size(1), query.size(3), value.size(3), causal, scale);
    for (int64_t b = 0; b < B; ++b) pb.seq.add(Lq, Lk);
    pb.mask = make_mask<T>(attn_mask, {B, Hq, Lq, Lk});
    pb.dropout = Dropout(dropout_p, seed_value(seed));
    using CS = const scalar_t;
    at::Tensor lse3 = lse.unsqueeze(-1);
    forward<scalar_t, T>(pb, batched_view<CS>(query, query.data_ptr<scalar_t>()),
                         batched_view<CS>(key, key.data_ptr<scalar_t>()),
                         batched_view<CS>(value, value.data_ptr<scalar_t>()),
                         batched_view<scalar_t>(out, out.data_ptr<scalar_t>()),
                         batched_view<T>(lse3, lse3.data_ptr<T>()));
  });
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> attention_backward(
    const at::Tensor& grad_out, const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
    const c10::optional<at::Tensor>& attn_mask, const at::Tensor& out, const at::Tensor& lse, double dropout_p,
    int64_t causal, double scale, const at::Tensor& seed, bool mask_grad) {
  check_inputs(query, key, value, 4);
  const int64_t B = query.size(0), Hq = query.size(1), Lq = query.size(2), Lk = key.size(2);
  TORCH_CHECK(!mask_grad || (attn_mask.has_value() && attn_mask->is_floating_point()),
              "seqfast attention: mask_grad needs a float attn_mask");
  // Gradients of 1 MiB or more come from BufferCache: a training step frees them before the next backward,
  // which then gets the same pages back instead of faulting in fresh ones (benchmarks/NOTES.md).
  const bool fused = fused_gradients(query, key, value, dropout_p, mask_grad);
  at::Tensor dq = attention_gradient(query, fused);
  at::Tensor dk = attention_gradient(key, fused, key.size(1) == Hq);
  at::Tensor dv = attention_gradient(value, fused);
  at::Tensor dmask;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, query.scalar_type(), "seqfast_attention_backward", [&] {
    using T = CalcT<scalar_t>;
    const auto tdt = c10::CppTypeToScalarType<T>::value;
    Problem<T> pb = make_problem<T>(Hq, key.size(1), query.size(3), value.size(3), causal, scale);
    for (int64_t b = 0; b < B; ++b) pb.seq.add(Lq, Lk);
    pb.mask = make_mask<T>(attn_mask, {B, Hq, Lq, Lk});
    pb.dropout = Dropout(dropout_p, seed_value(seed));
    at::Tensor dmask_t;
    if (mask_grad) dmask_t = at::zeros({B, Hq, Lq, Lk}, query.options().dtype(tdt));
    using CS = const scalar_t;
    at::Tensor lse3 = lse.to(tdt).unsqueeze(-1);
    backward<scalar_t, T>(pb, batched_view<CS>(grad_out, grad_out.data_ptr<scalar_t>()),
                          batched_view<CS>(query, query.data_ptr<scalar_t>()),
                          batched_view<CS>(key, key.data_ptr<scalar_t>()),
                          batched_view<CS>(value, value.data_ptr<scalar_t>()),
                          batched_view<CS>(out, out.data_ptr<scalar_t>()),
                          batched_view<const T>(lse3, lse3.data_ptr<T>()),
                          batched_view<scalar_t>(dq, dq.data_ptr<scalar_t>()),
                          batched_view<scalar_t>(dk, dk.data_ptr<scalar_t>()),
                          batched_view<scalar_t>(dv, dv.data_ptr<scalar_t>()),
                          mask_grad ? dmask_t.data_ptr<T>() : nullptr);
    if (mask_grad) dmask = dmask_t.to(attn_mask->scalar_type());
  });
  if (!mask_grad) dmask = at::empty({0}, query.options());
  return {dq, dk, dv, dmask};
}

Seqs varlen_seqs(const at::Tensor& cu_q, const at::Tensor& cu_k, int64_t total_q, int64_t total_k) {
  TORCH_CHECK(cu_q.dim() == 1 && cu_k.dim() == 1 && cu_q.numel() == cu_k.numel() && cu_q.numel() >= 1,
              "seqfast varlen attention: cu_seqlens_q / cu_seqlens_k must be 1-D of the same length B+1");
  at::Tensor cq = cu_q.to(at::kLong).contiguous(), ck = cu_k.to(at::kLong).contiguous();
  const int64_t* a = cq.data_ptr<int64_t>();
  const int64_t* c = ck.data_ptr<int64_t>();
  Seqs s;
  TORCH_CHECK(a[0] == 0 && c[0] == 0, "seqfast varlen attention: cu_seqlens must start at 0");
  for (int64_t b = 0; b + 1 < cq.numel(); ++b) {
    TORCH_CHECK(a[b + 1] >= a[b] && c[b + 1] >= c[b], "seqfast varlen attention: cu_seqlens must not decrease");
    s.add(a[b + 1] - a[b], c[b + 1] - c[b]);
  }
  TORCH_CHECK(s.total_q == total_q && s.total_k == total_k,
              "seqfast varlen attention: cu_seqlens must end at the number of rows of query / key");
  return s;
}

std::tuple<at::Tensor, at::Tensor> varlen_attention_forward(const at::Tensor& query, const at::Tensor& key,
                                                            const at::Tensor& value, const at::Tensor& cu_q,
                                                            const at::Tensor& cu_k, int64_t max_q, int64_t max_k,
                                                            int64_t causal, double scale) {
  check_inputs(query, key, value, 3);
  const int64_t Hq = query.size(1);
  Seqs seqs = varlen_seqs(cu_q, cu_k, query.size(0), key.size(0));
  const auto lse_dtype = query.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor out = at::empty({query.size(0), Hq, value.size(2)}, query.options());
  at::Tensor lse = at::empty({Hq, query.size(0)}, query.options().dtype(lse_dtype));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, query.scalar_type(), "seqfast_varlen_forward", [&] {
    using T = CalcT<scalar_t>;
    Problem<T> pb = make_problem<T>(Hq, key.size(1), query.size(2), value.size(2), causal, scale);
    pb.seq = seqs;
    using CS = const scalar_t;
    // lse (Hq, total_q) seen as (total_q, Hq, 1).
    at::Tensor lse3 = lse.t().unsqueeze(-1);
    forward<scalar_t, T>(pb, packed_view<CS>(query, query.data_ptr<scalar_t>(), seqs.q_start),
                         packed_view<CS>(key, key.data_ptr<scalar_t>(), seqs.k_start),
                         packed_view<CS>(value, value.data_ptr<scalar_t>(), seqs.k_start),
                         packed_view<scalar_t>(out, out.data_ptr<scalar_t>(), seqs.q_start),
                         packed_view<T>(lse3, lse3.data_ptr<T>(), seqs.q_start));
  });
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> varlen_attention_backward(
    const at::Tensor& grad_out, const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
    const at::Tensor& cu_q, const at::Tensor& cu_k, int64_t max_q, int64_t max_k, const at::Tensor& out,
    const at::Tensor& lse, int64_t causal, double scale) {
  check_inputs(query, key, value, 3);
  const int64_t Hq = query.size(1);
  Seqs seqs = varlen_seqs(cu_q, cu_k, query.size(0), key.size(0));
  at::Tensor dq = at::empty(query.sizes(), query.options());
  at::Tensor dk = at::zeros(key.sizes(), key.options());
  at::Tensor dv = at::zeros(value.sizes(), value.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, query.scalar_type(), "seqfast_varlen_backward", [&] {
    using T = CalcT<scalar_t>;
    Problem<T> pb = make_problem<T>(Hq, key.size(1), query.size(2), value.size(2), causal, scale);
    pb.seq = seqs;
    using CS = const scalar_t;
    at::Tensor lse3 = lse.to(c10::CppTypeToScalarType<T>::value).t().unsqueeze(-1);
    backward<scalar_t, T>(pb, packed_view<CS>(grad_out, grad_out.data_ptr<scalar_t>(), seqs.q_start),
                          packed_view<CS>(query, query.data_ptr<scalar_t>(), seqs.q_start),
                          packed_view<CS>(key, key.data_ptr<scalar_t>(), seqs.k_start),
                          packed_view<CS>(value, value.data_ptr<scalar_t>(), seqs.k_start),
                          packed_view<CS>(out, out.data_ptr<scalar_t>(), seqs.q_start),
                          packed_view<const T>(lse3, lse3.data_ptr<T>(), seqs.q_start),
                          packed_view<scalar_t>(dq, dq.data_ptr<scalar_t>(), seqs.q_start),
                          packed_view<scalar_t>(dk, dk.data_ptr<scalar_t>(), seqs.k_start),
                          packed_view<scalar_t>(dv, dv.data_ptr<scalar_t>(), seqs.k_start), nullptr);
  });
  return {dq, dk, dv};
}

}  // namespace
}  // namespace seqfast::attn

TORCH_LIBRARY_IMPL(seqfast, CPU, m) {
  m.impl("attention_forward", &seqfast::attn::attention_forward);
  m.impl("attention_backward", &seqfast::attn::attention_backward);
  m.impl("varlen_attention_forward", &seqfast::attn::varlen_attention_forward);
  m.impl("varlen_attention_backward", &seqfast::attn::varlen_attention_backward);
}
