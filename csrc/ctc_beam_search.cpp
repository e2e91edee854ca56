// CPU kernel of seqfast::ctc_beam_search (schema and semantics: seqfast/ops/ctc_beam_search.py).
//
// CTC prefix beam search, one sample per task (run_tasks, longest first): a sample is decoded by one thread from
// start to end, so results do not depend on the thread count and are identical run to run.
//
// Each beam entry is a prefix (a node of an append-only trie: parent, token, frame, LM context, hot-word state)
// with two log-probabilities, pb (all paths so far that end in blank) and pnb (end in the prefix's last token).
// A frame updates them in log space:
//   blank:               pb'(l)    += pb(l) + pnb(l) + lp[blank]
//   repeat of last e:    pnb'(l)   += pnb(l) + lp[e]                   (collapses into l)
//   extension by c:      pnb'(l+c) += (c == e ? pb(l) : pb(l) + pnb(l)) + lp[c]
// An extension whose prefix l+c is already in the beam is added to that entry; the others are new candidates.
// A prefix's rank is log(pb + pnb) plus its "extra": lm_weight * its LM log-prob, insertion_bonus per token and
// its hot-word bonus, all properties of the prefix fixed when its node is created.
//
// Selection is exact: the beam after a frame is the beam_size best of all entries and all candidates (ties: the
// lexicographically smaller token sequence first, a proper prefix before its extensions). Candidates of one
// parent are visited in decreasing lp[c]; an upper bound of their rank (the LM log-prob is <= 0, a hot-word gains
// at most hotword_bonus per token) stops the visit once it falls below the beam_size-th best rank so far. Without
// LM and hot-words that bound is the rank itself, so at most beam_size + 1 tokens per parent are looked at.
// Candidate pruning (top_k_tokens, token_min_logp) limits the extensions only: blank and repeats always count.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <functional>
#include <limits>
#include <unordered_map>
#include <vector>

#include "task_order.h"

namespace seqfast {
namespace {

constexpr double kNegInf = -std::numeric_limits<double>::infinity();
constexpr int64_t kNoKey = -1;  // an LM context longer than the prefix (and its BOS) can fill

// log(exp(a) + exp(b)); the reference (seqfast/reference/ctc_beam_search.py) computes it the same way.
inline double log_add(double a, double b) {
  if (a < b) std::swap(a, b);
  if (b == kNegInf) return a;
  return a + std::log1p(std::exp(b - a));
}

// A backoff n-gram LM over the model's tokens (seqfast/ngram_lm.py builds the tables). Symbols: tokens 0..C-1,
// C = BOS in contexts and EOS when predicted. A context (s1..sk) has key fold(key * (C+2) + s + 1).
struct NGramLM {
  int64_t order = 0;  // 0: no LM
  int64_t C = 0;
  const double* unigram = nullptr;  // (C+1,) log P(s)
  const double* backoff = nullptr;  // (M,)
  const int64_t* offsets = nullptr;  // (M+1,) into the entries of each context
  const int64_t* tokens = nullptr;  // (E,) ascending within a context
  const double* logp = nullptr;  // (E,)
  std::unordered_map<int64_t, int32_t> index;  // context key -> context row

  explicit NGramLM(const std::vector<at::Tensor>& t) {
    if (t.empty()) return;
    TORCH_CHECK(t.size() == 7, "ctc_beam_search: lm_tables must hold 7 tensors, got ", t.size());
    const int64_t* meta = t[0].const_data_ptr<int64_t>();
    order = meta[0];
    C = meta[1];
    unigram = t[1].const_data_ptr<double>();
    const int64_t* keys = t[2].const_data_ptr<int64_t>();
    backoff = t[3].const_data_ptr<double>();
    offsets = t[4].const_data_ptr<int64_t>();
    tokens = t[5].const_data_ptr<int64_t>();
    logp = t[6].const_data_ptr<double>();
    const int64_t M = t[2].numel();
    index.reserve(M);
    for (int64_t i = 0; i < M; ++i) index.emplace(keys[i], static_cast<int32_t>(i));
  }
  bool active() const { return order > 0; }
  int64_t base() const { return C + 2; }
  int32_t find(int64_t key) const {
    if (key == kNoKey) return -1;
    auto it = index.find(key);
    return it == index.end() ? -1 : it->second;
  }
  // log P(sym | context), ctx[k - 1] the row of the length-k context (-1: not in the model).
  double score(const int32_t* ctx, int64_t sym) const {
    double acc = 0.0;
    for (int64_t k = order - 1; k >= 1; --k) {
      const int32_t row = ctx[k - 1];
      if (row < 0) continue;
      const int64_t* b = tokens + offsets[row];
      const int64_t* e = tokens + offsets[row + 1];
      const int64_t* it = std::lower_bound(b, e, sym);
      if (it != e && *it == sym) return acc + logp[it - tokens];
      acc += backoff[row];
    }
    return acc + unigram[sym];
  }
};

// Hot-words: a trie of token sequences (node 0 the root) with Aho-Corasick failure links
// (seqfast/ngram_lm.py's hotword_tables). A prefix's hot-word score is bonus * (tokens in completed hot-words +
// depth of the partial match at its end); a partial match that breaks off loses its bonus.
struct HotWords {
  const int64_t* offsets = nullptr;  // (H+1,)
  const int64_t* child_token = nullptr;  // ascending within a node
  const int64_t* child_node = nullptr;
  const int64_t* fail = nullptr;
  const int64_t* depth = nullptr;
  const int64_t* end_depth = nullptr;  // the longest hot-word that ends on this node's path from the root
  double bonus = 0.0;
  bool active_ = false;

  HotWords(const std::vector<at::Tensor>& t, double bonus_) : bonus(bonus_) {
    if (t.empty()) return;
    TORCH_CHECK(t.size() == 6, "ctc_beam_search: hotword_tables must hold 6 tensors, got ", t.size());
    offsets = t[0].const_data_ptr<int64_t>();
    child_token = t[1].const_data_ptr<int64_t>();
    child_node = t[2].const_data_ptr<int64_t>();
    fail = t[3].const_data_ptr<int64_t>();
    depth = t[4].const_data_ptr<int64_t>();
    end_depth = t[5].const_data_ptr<int64_t>();
    active_ = true;
  }
  bool active() const { return active_; }
  int64_t child(int64_t s, int64_t c) const {
    const int64_t* b = child_token + offsets[s];
    const int64_t* e = child_token + offsets[s + 1];
    const int64_t* it = std::lower_bound(b, e, c);
    return (it != e && *it == c) ? child_node[it - child_token] : -1;
  }
  bool leaf(int64_t s) const { return offsets[s] == offsets[s + 1]; }
  // (state, committed) after token c.
  void step(int64_t s, double committed, int64_t c, int32_t& s_out, double& committed_out) const {
    int64_t next = child(s, c);
    if (next < 0) {
      committed += bonus * static_cast<double>(end_depth[s]);
      // After a completed hot-word the match restarts from the root, else from the longest proper suffix.
      int64_t u = end_depth[s] > 0 ? 0 : fail[s];
      while (true) {
        next = child(u, c);
        if (next >= 0 || u == 0) break;
        u = fail[u];
      }
      if (next < 0) next = 0;
    }
    if (next != 0 && leaf(next)) {  // a hot-word completed with nothing longer to continue into
      committed += bonus * static_cast<double>(depth[next]);
      next = 0;
    }
    s_out = static_cast<int32_t>(next);
    committed_out = committed;
  }
  double score(int32_t s, double committed) const { return committed + bonus * static_cast<double>(depth[s]); }
  double final_score(int32_t s, double committed) const {
    return committed + bonus * static_cast<double>(end_depth[s]);
  }
};

// A lexicon constraint: only words of the list (a trie in hotword_tables' form; state 0 = between words) may
// be formed, separated by the word delimiter token. A prefix that leaves the trie is never a candidate; at the
// end a prefix must be between words or at a word's end.
struct Lexicon {
  HotWords trie;
  int64_t delimiter;
  Lexicon(const std::vector<at::Tensor>& t, int64_t delimiter_) : trie(t, 0.0), delimiter(delimiter_) {}
  bool active() const { return trie.active(); }
  bool word_end(int32_t s) const { return s == 0 || trie.end_depth[s] == trie.depth[s]; }
  // The state after token c, -1 where c may not follow.
  int32_t step(int32_t s, int64_t c) const {
    if (c == delimiter) return word_end(s) ? 0 : -1;
    return static_cast<int32_t>(trie.child(s, c));
  }
};

struct Node {
  int32_t parent;
  int32_t token;
  int32_t frame;
  int32_t length;
  int32_t hw_state;
  double hw_committed;
  double extra;  // lm_weight * LM log-prob + insertion_bonus * length + hot-word score
  int32_t lex_state;
};

struct Entry {
  int32_t node;
  double pb, pnb, total, rank;  // total = log_add(pb, pnb)
};

// An existing entry (node >= 0) or a new prefix parent + token (node == -1).
struct Candidate {
  double rank;
  double pb, pnb, total;
  int32_t node;
  int32_t parent;
  int32_t token;
  int32_t hw_state;
  double hw_committed;
  double extra;
  int32_t lex_state;
};

struct Options {
  int64_t blank, beam, top_k;
  double token_min_logp, beam_prune_logp, lm_weight, insertion_bonus, blank_skip_logp;
  bool frames;
};

struct Hyp {
  std::vector<int64_t> tokens, frames;
  double score, acoustic;
};

class Search {
 public:
  Search(const NGramLM& lm, const HotWords& hw, const Lexicon& lex, const Options& o, int64_t C)
      : lm_(lm), hw_(hw), lex_(lex), o_(o), C_(C) {
    nk_ = lm_.active() ? lm_.order - 1 : 0;
  }

  template <typename scalar_t>
  std::vector<Hyp> run(const scalar_t* lp0, int64_t row_stride, int64_t T) {
    nodes_.clear();
    keys_.clear();
    ctx_.clear();
    add_root();
    beam_.assign(1, {0, 0.0, kNegInf, 0.0, nodes_[0].extra});
    lp_.resize(C_);
    allowed_.assign(C_, -1);
    for (int64_t t = 0; t < T && !beam_.empty(); ++t) {
      const scalar_t* row = lp0 + t * row_stride;
      double* lp = lp_.data();
      for (int64_t c = 0; c < C_; ++c) lp[c] = static_cast<double>(row[c]);
      step(static_cast<int32_t>(t));
    }
    return finish(beam_);
  }

 private:
  void admit(double rank) {  // best_: a min-heap of the beam_size best ranks so far
    if (static_cast<int64_t>(best_.size()) < o_.beam) {
      best_.push_back(rank);
      std::push_heap(best_.begin(), best_.end(), std::greater<double>());
    } else if (rank > best_.front()) {
      std::pop_heap(best_.begin(), best_.end(), std::greater<double>());
      best_.back() = rank;
      std::push_heap(best_.begin(), best_.end(), std::greater<double>());
    }
  }
  double threshold() const { return static_cast<int64_t>(best_.size()) < o_.beam ? kNegInf : best_.front(); }

  void step(int32_t t) {
    const std::vector<double>& lp = lp_;
    candidate_tokens(t);
    slot_of_.resize(nodes_.size(), -1);
    const int32_t B = static_cast<int32_t>(beam_.size());
    for (int32_t i = 0; i < B; ++i) slot_of_[beam_[i].node] = i;
    kid_head_.assign(B, -1);  // per beam slot, a list (through kid_next_) of its children's slots
    kid_next_.assign(B, -1);
    cands_.clear();
    best_.clear();
    const double lp_blank = lp[o_.blank];
    // 1. The entries themselves: blank, repeat, and the extension from their parent when it is in the beam.
    for (int32_t i = 0; i < B; ++i) {
      const Entry& e = beam_[i];
      const Node& nd = nodes_[e.node];
      const double pb = e.total + lp_blank;
      double pnb = e.node == 0 ? kNegInf : e.pnb + lp[nd.token];
      if (e.node != 0) {
        const int32_t ps = slot_of_[nd.parent];
        if (ps >= 0) {
          kid_next_[i] = kid_head_[ps];
          kid_head_[ps] = i;
          if (allowed_[nd.token] == t) {
            const Entry& p = beam_[ps];
            const bool repeat = nd.parent != 0 && nodes_[nd.parent].token == nd.token;
            pnb = log_add(pnb, (repeat ? p.pb : p.total) + lp[nd.token]);
          }
        }
      }
      const double total = log_add(pb, pnb);
      const double rank = total + nd.extra;
      if (rank == kNegInf) continue;
      cands_.push_back({rank, pb, pnb, total, e.node, -1, -1, 0, 0.0, 0.0, 0});
      admit(rank);
    }
    // 2. New prefixes, best parents first.
    const double gain_bound = o_.insertion_bonus + (hw_.active() ? std::max(hw_.bonus, 0.0) : 0.0);
    for (int32_t i = 0; i < B; ++i) {
      const Entry& e = beam_[i];
      const Node& nd = nodes_[e.node];
      for (int32_t c : order_) {
        if (e.total + lp[c] + nd.extra + gain_bound < threshold()) break;
        bool in_beam = false;
        for (int32_t k = kid_head_[i]; k >= 0 && !in_beam; k = kid_next_[k]) in_beam = nodes_[beam_[k].node].token == c;
        if (in_beam) continue;
        const int32_t lex = lex_.active() ? lex_.step(nd.lex_state, c) : 0;
        if (lex < 0) continue;
        const double acoustic = ((e.node != 0 && nd.token == c) ? e.pb : e.total) + lp[c];
        if (acoustic == kNegInf) continue;
        Candidate cand{0.0, kNegInf, acoustic, acoustic, -1, e.node, c, 0, 0.0, nd.extra + o_.insertion_bonus, lex};
        if (lm_.active()) cand.extra += o_.lm_weight * lm_.score(&ctx_[e.node * nk_], c);
        if (hw_.active()) {
          hw_.step(nd.hw_state, nd.hw_committed, c, cand.hw_state, cand.hw_committed);
          cand.extra += hw_.score(cand.hw_state, cand.hw_committed) - hw_.score(nd.hw_state, nd.hw_committed);
        }
        cand.rank = acoustic + cand.extra;
        if (cand.rank < threshold()) continue;
        cands_.push_back(cand);
        admit(cand.rank);
      }
    }
    // 3. The beam_size best, ties to the smaller token sequence. Below the final threshold none can be.
    const double floor = threshold();
    order_of_cands_.clear();
    for (int32_t j = 0; j < static_cast<int32_t>(cands_.size()); ++j) {
      if (cands_[j].rank >= floor) order_of_cands_.push_back(j);
    }
    std::sort(order_of_cands_.begin(), order_of_cands_.end(), [&](int32_t i, int32_t j) {
      const Candidate& a = cands_[i];
      const Candidate& b = cands_[j];
      if (a.rank != b.rank) return a.rank > b.rank;
      return sequence(a) < sequence(b);
    });
    const size_t keep = std::min(order_of_cands_.size(), static_cast<size_t>(o_.beam));
    next_.clear();
    for (size_t j = 0; j < keep; ++j) {
      const Candidate& cd = cands_[order_of_cands_[j]];
      if (!next_.empty() && cd.rank < next_.front().rank + o_.beam_prune_logp) break;
      const int32_t node = cd.node >= 0 ? cd.node : add_child(cd, t);
      next_.push_back({node, cd.pb, cd.pnb, cd.total, cd.rank});
    }
    for (const Entry& e : beam_) slot_of_[e.node] = -1;
    beam_.swap(next_);
  }

  // Non-blank tokens that may extend a prefix at frame t (candidate pruning): allowed_[c] == t; `order_`
  // holds those a parent may need to visit, by decreasing lp (ties: smaller id first).
  void candidate_tokens(int32_t t) {
    const std::vector<double>& lp = lp_;
    std::vector<int32_t>& order = order_;
    // Branch-free compaction with the bounds in locals (the loop runs over all C tokens every frame);
    // lp >= max(token_min_logp, lowest) also leaves out -inf.
    // A frame whose blank log-prob reaches blank_skip_logp extends nothing (floor +inf: no token passes).
    const double floor = lp[o_.blank] >= o_.blank_skip_logp
                             ? std::numeric_limits<double>::infinity()
                             : std::max(o_.token_min_logp, std::numeric_limits<double>::lowest());
    const double* v = lp.data();
    const int32_t C = static_cast<int32_t>(C_);
    order.resize(C);
    int32_t* out = order.data();
    int32_t kept = 0;
    for (int32_t c = 0; c < C; ++c) {
      out[kept] = c;
      kept += v[c] >= floor;
    }
    order.resize(kept);
    auto blank_at = std::lower_bound(order.begin(), order.end(), static_cast<int32_t>(o_.blank));
    if (blank_at != order.end() && *blank_at == o_.blank) order.erase(blank_at);
    auto by_lp = [&](int32_t a, int32_t b) { return lp[a] != lp[b] ? lp[a] > lp[b] : a < b; };
    if (o_.top_k > 0 && static_cast<size_t>(o_.top_k) < order.size()) {
      std::partial_sort(order.begin(), order.begin() + o_.top_k, order.end(), by_lp);
      order.resize(o_.top_k);
    }
    for (int32_t c : order) allowed_[c] = t;
    // Without LM and hot-words no parent looks past its beam + 1 best tokens (see the top of the file).
    size_t need = order.size();
    if (!lm_.active() && !hw_.active() && !lex_.active()) need = std::min(need, static_cast<size_t>(o_.beam + 1));
    std::partial_sort(order.begin(), order.begin() + need, order.end(), by_lp);
    order.resize(need);
  }

  std::vector<int64_t> sequence(const Candidate& c) const {
    std::vector<int64_t> out;
    int32_t n = c.node >= 0 ? c.node : c.parent;
    for (; n != 0; n = nodes_[n].parent) out.push_back(nodes_[n].token);
    std::reverse(out.begin(), out.end());
    if (c.node < 0) out.push_back(c.token);
    return out;
  }

  void add_root() {
    nodes_.push_back({-1, -1, -1, 0, 0, 0.0, 0.0, 0});
    for (int64_t k = 1; k <= nk_; ++k) {
      const int64_t key = k == 1 ? lm_.C + 1 : kNoKey;  // (BOS)
      keys_.push_back(key);
      ctx_.push_back(lm_.find(key));
    }
  }

  int32_t add_child(const Candidate& c, int32_t frame) {
    const Node& p = nodes_[c.parent];
    nodes_.push_back({c.parent, c.token, frame, p.length + 1, c.hw_state, c.hw_committed, c.extra,
                      c.lex_state});
    const int64_t base = c.parent * nk_;
    for (int64_t k = 1; k <= nk_; ++k) {
      int64_t key = c.token + 1;
      if (k > 1) {
        const int64_t shorter = keys_[base + k - 2];
        key = shorter == kNoKey ? kNoKey : shorter * lm_.base() + c.token + 1;
      }
      keys_.push_back(key);
      ctx_.push_back(lm_.find(key));
    }
    return static_cast<int32_t>(nodes_.size() - 1);
  }

  std::vector<Hyp> finish(const std::vector<Entry>& beam) const {
    std::vector<Hyp> out;
    for (const Entry& e : beam) {
      const Node& nd = nodes_[e.node];
      if (lex_.active() && !lex_.word_end(nd.lex_state)) continue;
      const double acoustic = e.total;
      double score = acoustic + nd.extra;
      if (lm_.active()) score += o_.lm_weight * lm_.score(&ctx_[e.node * nk_], lm_.C);
      if (hw_.active()) {
        score += hw_.final_score(nd.hw_state, nd.hw_committed) - hw_.score(nd.hw_state, nd.hw_committed);
      }
      Hyp h;
      h.score = score;
      h.acoustic = acoustic;
      for (int32_t n = e.node; n != 0; n = nodes_[n].parent) {
        h.tokens.push_back(nodes_[n].token);
        h.frames.push_back(nodes_[n].frame);
      }
      std::reverse(h.tokens.begin(), h.tokens.end());
      std::reverse(h.frames.begin(), h.frames.end());
      out.push_back(std::move(h));
    }
    std::sort(out.begin(), out.end(), [](const Hyp& a, const Hyp& b) {
      return a.score != b.score ? a.score > b.score : a.tokens < b.tokens;
    });
    return out;
  }

  const NGramLM& lm_;
  const HotWords& hw_;
  const Lexicon& lex_;
  const Options& o_;
  int64_t C_;
  int64_t nk_ = 0;  // LM context lengths kept per node: 1 .. order - 1
  std::vector<Node> nodes_;
  std::vector<int64_t> keys_;  // (nodes, nk_) context keys
  std::vector<int32_t> ctx_;  // (nodes, nk_) context rows in the LM, -1 if absent
  // Per frame, kept to reuse their memory.
  std::vector<Entry> beam_, next_;
  std::vector<Candidate> cands_;
  std::vector<double> lp_, best_;
  std::vector<int32_t> order_, allowed_, slot_of_, kid_head_, kid_next_, order_of_cands_;
};

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> ctc_beam_search(
    const at::Tensor& log_probs, const at::Tensor& input_lengths, int64_t blank, int64_t beam_size,
    int64_t top_k_tokens, double token_min_logp, double beam_prune_logp, bool return_frames,
    at::TensorList lm_tables, double lm_weight, double insertion_bonus, at::TensorList hotword_tables,
    double hotword_bonus, at::TensorList lexicon_tables, int64_t word_delimiter, double blank_skip_logp) {
  TORCH_CHECK(log_probs.dim() == 3, "ctc_beam_search: log_probs must be (T, N, C), got ", log_probs.sizes());
  TORCH_CHECK(log_probs.scalar_type() == at::kFloat || log_probs.scalar_type() == at::kDouble,
              "ctc_beam_search: log_probs must be float32 or float64, got ", log_probs.scalar_type());
  const int64_t T = log_probs.size(0), N = log_probs.size(1), C = log_probs.size(2);
  TORCH_CHECK(0 <= blank && blank < C, "ctc_beam_search: blank must be in [0, ", C, "), got ", blank);
  TORCH_CHECK(beam_size >= 1, "ctc_beam_search: beam_size must be >= 1, got ", beam_size);
  TORCH_CHECK(input_lengths.dim() == 1 && input_lengths.size(0) == N && input_lengths.scalar_type() == at::kLong,
              "ctc_beam_search: input_lengths must be (N,) int64");
  const at::Tensor lp = log_probs.contiguous();
  const at::Tensor il = input_lengths.contiguous();
  const int64_t* len = il.const_data_ptr<int64_t>();
  for (int64_t n = 0; n < N; ++n) {
    TORCH_CHECK(0 <= len[n] && len[n] <= T, "ctc_beam_search: input_lengths[", n, "] = ", len[n],
                " is not in [0, ", T, "]");
  }
  std::vector<at::Tensor> lm_t, hw_t;
  for (const at::Tensor& t : lm_tables) lm_t.push_back(t.contiguous());
  for (const at::Tensor& t : hotword_tables) hw_t.push_back(t.contiguous());
  const NGramLM lm(lm_t);
  TORCH_CHECK(!lm.active() || lm.C == C, "ctc_beam_search: the LM has ", lm.C, " classes, log_probs ", C);
  const HotWords hw(hw_t, hotword_bonus);
  std::vector<at::Tensor> lex_t;
  for (const at::Tensor& t : lexicon_tables) lex_t.push_back(t.contiguous());
  const Lexicon lex(lex_t, word_delimiter);
  TORCH_CHECK(!lex.active() || (0 <= word_delimiter && word_delimiter < C && word_delimiter != blank),
              "ctc_beam_search: word_delimiter must be a token in [0, ", C, ") other than blank, got ", word_delimiter);
  const Options o{blank,           beam_size, top_k_tokens,    token_min_logp, beam_prune_logp,
                  lm_weight,       insertion_bonus, blank_skip_logp, return_frames};

  std::vector<std::vector<Hyp>> results(N);
  AT_DISPATCH_FLOATING_TYPES(lp.scalar_type(), "ctc_beam_search", [&] {
    const scalar_t* data = lp.const_data_ptr<scalar_t>();
    // Longest first (a sample's cost grows with its frames): see task_order.h.
    run_tasks(by_cost(std::vector<int64_t>(len, len + N)), [&] { return Search(lm, hw, lex, o, C); },
              [&](int64_t n, Search& search) { results[n] = search.run(data + n * C, N * C, len[n]); });
  });

  const int64_t K = beam_size;
  at::Tensor tokens = at::full({N, K, T}, -1, at::kLong);
  at::Tensor lengths = at::full({N, K}, -1, at::kLong);
  at::Tensor scores = at::full({N, K}, kNegInf, at::kDouble);
  at::Tensor acoustic = at::full({N, K}, kNegInf, at::kDouble);
  at::Tensor frames = return_frames ? at::full({N, K, T}, -1, at::kLong) : at::empty({N, K, 0}, at::kLong);
  int64_t* tok = tokens.data_ptr<int64_t>();
  int64_t* lens = lengths.data_ptr<int64_t>();
  double* sc = scores.data_ptr<double>();
  double* ac = acoustic.data_ptr<double>();
  int64_t* fr = frames.data_ptr<int64_t>();
  for (int64_t n = 0; n < N; ++n) {
    for (size_t k = 0; k < results[n].size(); ++k) {
      const Hyp& h = results[n][k];
      const int64_t at = n * K + static_cast<int64_t>(k);
      lens[at] = static_cast<int64_t>(h.tokens.size());
      sc[at] = h.score;
      ac[at] = h.acoustic;
      std::copy(h.tokens.begin(), h.tokens.end(), tok + at * T);
      if (return_frames) std::copy(h.frames.begin(), h.frames.end(), fr + at * T);
    }
  }
  return {tokens, lengths, scores, acoustic, frames};
}

}  // namespace

TORCH_LIBRARY_IMPL(seqfast, CPU, m) {
  m.impl("ctc_beam_search", &ctc_beam_search);
}

}  // namespace seqfast
