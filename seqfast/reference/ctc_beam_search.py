"""CTC prefix beam search in plain Python (float64): the same search as csrc/ctc_beam_search.cpp, written
for reading, and the exhaustive search the tests hold both against.

A beam entry is a prefix (tuple of tokens) with two log-probabilities: pb (its paths so far end in blank)
and pnb (they end in its last token). Each frame, every entry and every extension ``prefix + (c,)`` by a
candidate token c is scored; the beam keeps the ``beam_size`` best ranks (ties: the smaller token tuple).
A prefix's rank is log(exp(pb) + exp(pnb)) plus lm_weight * log P_lm(prefix) + insertion_bonus * len(prefix)
+ its hot-word score; the final score adds lm_weight * log P_lm(end of sentence | prefix) and keeps only the
hot-word bonus of completed hot-words.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence

import torch

from seqfast.ngram_lm import CharNGramLM

NEG_INF = -math.inf


def log_add(a: float, b: float) -> float:
    if a < b:
        a, b = b, a
    if b == NEG_INF:
        return a
    return a + math.log1p(math.exp(b - a))


class _HotWords:
    """The hot-word trie of ``hotword_tables`` (the op's form): per node its children, failure link, depth
    and the longest hot-word ending on its path."""

    def __init__(self, tables: Sequence[torch.Tensor], bonus: float):
        offsets, child_token, child_node, self.fail, self.depth, self.end_depth = (t.tolist() for t in tables)
        self.children = [dict(zip(child_token[offsets[i]:offsets[i + 1]], child_node[offsets[i]:offsets[i + 1]]))
                         for i in range(len(offsets) - 1)]
        self.bonus = bonus

    def step(self, state: int, committed: float, c: int) -> tuple[int, float]:
        nxt = self.children[state].get(c)
        if nxt is None:
            committed += self.bonus * self.end_depth[state]
            u = 0 if self.end_depth[state] > 0 else self.fail[state]
            while True:
                nxt = self.children[u].get(c)
                if nxt is not None or u == 0:
                    break
                u = self.fail[u]
            nxt = 0 if nxt is None else nxt
        if nxt != 0 and not self.children[nxt]:
            committed += self.bonus * self.depth[nxt]
            nxt = 0
        return nxt, committed

    def score(self, state: int, committed: float) -> float:
        return committed + self.bonus * self.depth[state]

    def final(self, state: int, committed: float) -> float:
        return committed + self.bonus * self.end_depth[state]


class _Lexicon:
    """Only words of the trie (``hotword_tables``' form; state 0 = between words), separated by ``delimiter``."""

    def __init__(self, tables: Sequence[torch.Tensor], delimiter: int):
        self.trie = _HotWords(tables, 0.0)
        self.delimiter = delimiter

    def word_end(self, state: int) -> bool:
        return state == 0 or self.trie.end_depth[state] == self.trie.depth[state]

    def step(self, state: int, c: int) -> int | None:
        if c == self.delimiter:
            return 0 if self.word_end(state) else None
        return self.trie.children[state].get(c)


def beam_search(
    log_probs: torch.Tensor,
    beam_size: int,
    blank: int = 0,
    top_k_tokens: int = 0,
    token_min_logp: float = NEG_INF,
    beam_prune_logp: float = NEG_INF,
    lm_tables: Sequence[torch.Tensor] = (),
    lm_weight: float = 0.0,
    insertion_bonus: float = 0.0,
    hotword_tables: Sequence[torch.Tensor] = (),
    hotword_bonus: float = 0.0,
    lexicon_tables: Sequence[torch.Tensor] = (),
    word_delimiter: int = -1,
    scorer: Callable[[tuple[int, ...], int | None], float] | None = None,
    blank_skip_logp: float = math.inf,
) -> list[tuple[tuple[int, ...], float, float, tuple[int, ...]]]:
    """One sample's search: ``log_probs`` (T, C) -> [(tokens, score, acoustic log-prob, frames)], best first.

    The LM is ``lm_tables`` (``CharNGramLM.tables()``) or ``scorer(prefix, token)``: the log-prob of ``token``
    after ``prefix``, ``token=None`` for the end of sentence."""
    lp_rows = log_probs.double().tolist()
    C = log_probs.shape[1]
    if lm_tables:
        table = CharNGramLM.from_tables(lm_tables)
        bos = eos = table.num_classes

        def scorer(prefix, token):
            return table.score((bos, *prefix), eos if token is None else token)

    lm = scorer
    hw = _HotWords(hotword_tables, hotword_bonus) if hotword_tables else None
    lex = _Lexicon(lexicon_tables, word_delimiter) if lexicon_tables else None
    # prefix -> (pb, pnb, extra, hot-word state, committed, frames, lexicon state)
    beam = {(): (0.0, NEG_INF, 0.0, 0, 0.0, (), 0)}
    for t, lp in enumerate(lp_rows):
        tokens = [c for c in range(C) if c != blank and lp[c] > NEG_INF and lp[c] >= token_min_logp]
        tokens.sort(key=lambda c: (-lp[c], c))
        if top_k_tokens > 0:
            tokens = tokens[:top_k_tokens]
        if lp[blank] >= blank_skip_logp:
            tokens = []
        allowed = set(tokens)
        nxt = {}
        for prefix, (pb, pnb, extra, hs, hc, frames, ls) in beam.items():
            new_pb = log_add(pb, pnb) + lp[blank]
            new_pnb = pnb + lp[prefix[-1]] if prefix else NEG_INF
            parent = beam.get(prefix[:-1]) if prefix else None
            if parent is not None and prefix[-1] in allowed:
                c = prefix[-1]
                repeat = len(prefix) > 1 and prefix[-2] == c
                new_pnb = log_add(new_pnb, (parent[0] if repeat else log_add(parent[0], parent[1])) + lp[c])
            nxt[prefix] = (new_pb, new_pnb, extra, hs, hc, frames, ls)
        for prefix, (pb, pnb, extra, hs, hc, frames, ls) in beam.items():
            for c in tokens:
                child = prefix + (c,)
                if child in beam:
                    continue
                child_ls = lex.step(ls, c) if lex is not None else 0
                if child_ls is None:
                    continue
                acoustic = (pb if prefix and prefix[-1] == c else log_add(pb, pnb)) + lp[c]
                if acoustic == NEG_INF:
                    continue
                child_extra = extra + insertion_bonus
                if lm is not None:
                    child_extra += lm_weight * lm(prefix, c)
                chs, chc = hs, hc
                if hw is not None:
                    chs, chc = hw.step(hs, hc, c)
                    child_extra += hw.score(chs, chc) - hw.score(hs, hc)
                nxt[child] = (NEG_INF, acoustic, child_extra, chs, chc, frames + (t,), child_ls)
        ranked = [(log_add(v[0], v[1]) + v[2], p) for p, v in nxt.items()]
        ranked = [r for r in ranked if r[0] > NEG_INF]
        ranked.sort(key=lambda r: (-r[0], r[1]))
        ranked = ranked[:beam_size]
        beam = {p: nxt[p] for rank, p in ranked if rank >= ranked[0][0] + beam_prune_logp}
    out = []
    for prefix, (pb, pnb, extra, hs, hc, frames, ls) in beam.items():
        if lex is not None and not lex.word_end(ls):
            continue
        acoustic = log_add(pb, pnb)
        score = acoustic + extra
        if lm is not None:
            score += lm_weight * lm(prefix, None)
        if hw is not None:
            score += hw.final(hs, hc) - hw.score(hs, hc)
        out.append((prefix, score, acoustic, frames))
    out.sort(key=lambda h: (-h[1], h[0]))
    return out


def ctc_beam_search_op(log_probs, input_lengths, blank, beam_size, top_k_tokens, token_min_logp, beam_prune_logp,
                       return_frames, lm_tables, lm_weight, insertion_bonus, hotword_tables, hotword_bonus,
                       lexicon_tables=(), word_delimiter=-1, blank_skip_logp=math.inf):
    """``seqfast::ctc_beam_search`` (schema: seqfast/ops/ctc_beam_search.py) through :func:`beam_search`."""
    T, N, _ = log_probs.shape
    K = beam_size
    tokens = torch.full((N, K, T), -1, dtype=torch.int64)
    lengths = torch.full((N, K), -1, dtype=torch.int64)
    scores = torch.full((N, K), NEG_INF, dtype=torch.float64)
    acoustic = torch.full((N, K), NEG_INF, dtype=torch.float64)
    frames = torch.full((N, K, T if return_frames else 0), -1, dtype=torch.int64)
    for n in range(N):
        hyps = beam_search(log_probs[: int(input_lengths[n]), n].cpu(), beam_size, blank, top_k_tokens,
                           token_min_logp, beam_prune_logp, lm_tables, lm_weight, insertion_bonus, hotword_tables,
                           hotword_bonus, lexicon_tables, word_delimiter, None, blank_skip_logp)
        for k, (seq, score, ac, fr) in enumerate(hyps):
            lengths[n, k] = len(seq)
            tokens[n, k, : len(seq)] = torch.tensor(seq, dtype=torch.int64)
            scores[n, k], acoustic[n, k] = score, ac
            if return_frames:
                frames[n, k, : len(fr)] = torch.tensor(fr, dtype=torch.int64)
    return tokens, lengths, scores, acoustic, frames


def labelling_log_prob(log_probs: torch.Tensor, labels: Sequence[int], blank: int = 0) -> float:
    """log P(labels | log_probs (T, C)): the sum over the labelling's alignments (the CTC forward recursion)."""
    lp = log_probs.double().tolist()
    ext = [blank]
    for c in labels:
        ext += [c, blank]
    S = len(ext)
    alpha = [NEG_INF] * S
    for t, row in enumerate(lp):
        new = [NEG_INF] * S
        for s in range(S):
            if t == 0:
                acc = 0.0 if s < 2 else NEG_INF
            else:
                acc = alpha[s]
                if s >= 1:
                    acc = log_add(acc, alpha[s - 1])
                if s >= 2 and ext[s] != blank and ext[s] != ext[s - 2]:
                    acc = log_add(acc, alpha[s - 2])
            new[s] = acc + row[ext[s]] if acc > NEG_INF else NEG_INF
        alpha = new
    if not lp:
        return 0.0 if not labels else NEG_INF
    return log_add(alpha[-1], alpha[-2]) if S > 1 else alpha[-1]


def exhaustive_search(log_probs: torch.Tensor, blank: int = 0) -> list[tuple[tuple[int, ...], float]]:
    """Every labelling of at most T tokens with its log-probability, best first (ties: smaller tuple first),
    those of probability 0 left out. Exponential in T: for tiny inputs only."""
    T, C = log_probs.shape
    labels = [c for c in range(C) if c != blank]
    out = []
    for length in range(T + 1):
        for seq in itertools.product(labels, repeat=length):
            score = labelling_log_prob(log_probs, seq, blank)
            if score > NEG_INF:
                out.append((seq, score))
    out.sort(key=lambda h: (-h[1], h[0]))
    return out
