"""Scorers for :func:`seqfast.ctc_beam_search`: a token n-gram language model and hot-word tables.

:class:`CharNGramLM` is an n-gram model over the acoustic model's tokens (characters for a character
vocabulary) with interpolated Witten-Bell smoothing, stored as a backoff model (ARPA's form): per context h of
1 .. order-1 symbols, log P(w | h) for the w seen after h and a backoff weight log(1 - lambda_h) for the rest.
The beam search evaluates it natively (csrc/ctc_beam_search.cpp): its tables travel to the op as tensors.

Symbols: tokens 0 .. C-1 (the blank never occurs in training text), C = beginning of sentence (in contexts)
and end of sentence (predicted). A sentence is one line of text or one token sequence.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch

from seqfast.validation import ArgumentError


def _context_key(context: Sequence[int], base: int) -> int:
    """The op's key of a context: its symbols + 1 as digits in ``base`` = C + 2 (no digit 0: lengths differ)."""
    key = 0
    for s in context:
        key = key * base + s + 1
    return key


class CharNGramLM:
    """A token (character) n-gram LM with interpolated Witten-Bell smoothing.

    P_k(w | h) = (c(h, w) + u(h) * P_{k-1}(w | h')) / (c(h) + u(h)), with c counts, u(h) the number of distinct
    symbols seen after h, h' = h without its oldest symbol, and P_0(w) interpolated the same way with the
    uniform distribution over the C tokens and the end of sentence.

    Build with :meth:`from_text` (a character vocabulary: ``labels[i]`` is the text of token i) or
    :meth:`from_sequences` (token ids).
    """

    def __init__(self, order: int, num_classes: int, unigram: list[float],
                 contexts: dict[tuple[int, ...], tuple[float, dict[int, float]]]):
        self.order = order
        self.num_classes = num_classes
        self.unigram = unigram  # (C+1,) log P(symbol), index C = end of sentence
        self.contexts = contexts  # context -> (log backoff, {symbol: log P(symbol | context)})
        self._tables: list[torch.Tensor] | None = None

    @classmethod
    def from_sequences(cls, sentences: Iterable[Sequence[int]], num_classes: int, order: int = 3,
                       blank: int | None = 0) -> CharNGramLM:
        """Train on token sequences (each a sentence) over ``num_classes`` tokens; ``blank`` may not occur."""
        if isinstance(order, bool) or not isinstance(order, int) or order < 1:
            raise ArgumentError(f"order must be an int >= 1, got {order!r}")
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
            raise ArgumentError(f"num_classes must be an int >= 1, got {num_classes!r}")
        if (num_classes + 2) ** max(order - 1, 0) >= 2**62:
            raise ArgumentError(f"order {order} is too high for {num_classes} classes: (C + 2)^(order - 1) must "
                                "stay below 2^62")
        C = num_classes
        counts: list[dict[tuple[int, ...], dict[int, int]]] = [defaultdict(lambda: defaultdict(int))
                                                               for _ in range(order)]
        for sentence in sentences:
            seq = [int(s) for s in sentence]
            for s in seq:
                if not 0 <= s < C or s == blank:
                    raise ArgumentError(f"sentences must hold tokens in [0, {C}) other than blank={blank}, got {s}")
            history = [C] + seq
            for i, w in enumerate(seq + [C]):
                for k in range(min(order - 1, i + 1) + 1):
                    counts[k][tuple(history[i + 1 - k:i + 1])][w] += 1
        V = C + 1
        uni = counts[0][()]
        total, types = sum(uni.values()), len(uni)
        if total:
            unigram = [math.log((uni.get(w, 0) + types / V) / (total + types)) for w in range(V)]
        else:
            unigram = [-math.log(V)] * V
        lm = cls(order, C, unigram, {})
        for k in range(1, order):  # shorter contexts first: their probabilities feed the longer ones
            for h, followers in counts[k].items():
                c, u = sum(followers.values()), len(followers)
                lower = h[1:]
                probs = {w: math.log((n + u * math.exp(lm.score(lower, w))) / (c + u))
                         for w, n in sorted(followers.items())}
                lm.contexts[h] = (math.log(u / (c + u)), probs)
        return lm

    @classmethod
    def from_tables(cls, tables: Sequence[torch.Tensor]) -> CharNGramLM:
        """The model back from :meth:`tables` (the op's form)."""
        meta, unigram, keys, backoff, offsets, tokens, logp = (t.tolist() for t in tables)
        order, C = meta
        contexts = {}
        for i, key in enumerate(keys):
            context = []
            while key:
                key, digit = divmod(key, C + 2)
                context.append(digit - 1)
            span = slice(offsets[i], offsets[i + 1])
            contexts[tuple(reversed(context))] = (backoff[i], dict(zip(tokens[span], logp[span])))
        return cls(order, C, unigram, contexts)

    @classmethod
    def from_text(cls, text: str, labels: Sequence[str], order: int = 3, blank: int = 0) -> CharNGramLM:
        """Train on ``text``, one sentence per line; ``labels[i]`` is the one-character text of token i (the
        blank's label is ignored). Characters no label names are left out of the sentences."""
        index = {label: i for i, label in enumerate(labels) if i != blank and len(label) == 1}
        sentences = [[index[ch] for ch in line if ch in index] for line in text.splitlines() if line.strip()]
        return cls.from_sequences(sentences, len(labels), order, blank)

    @classmethod
    def from_file(cls, path: str | Path, labels: Sequence[str], order: int = 3, blank: int = 0) -> CharNGramLM:
        """:meth:`from_text` on a UTF-8 text file."""
        return cls.from_text(Path(path).read_text(encoding="utf-8"), labels, order, blank)

    def score(self, context: Sequence[int], symbol: int) -> float:
        """log P(symbol | context): context symbols oldest first (C = beginning of sentence), only the last
        order - 1 count; ``symbol`` = C is the end of sentence."""
        acc = 0.0
        context = tuple(context)
        for k in range(min(self.order - 1, len(context)), 0, -1):
            row = self.contexts.get(context[len(context) - k:])
            if row is None:
                continue
            if symbol in row[1]:
                return acc + row[1][symbol]
            acc += row[0]
        return acc + self.unigram[symbol]

    def log_prob(self, tokens: Sequence[int]) -> float:
        """log P(sentence): every token given its history from the beginning of sentence, then the end."""
        history = [self.num_classes]
        total = 0.0
        for s in list(tokens) + [self.num_classes]:
            total += self.score(history, s)
            history.append(s)
        return total

    def tables(self) -> list[torch.Tensor]:
        """The 7 tensors ``seqfast::ctc_beam_search`` takes as ``lm_tables`` (built once, then kept)."""
        if self._tables is None:
            base = self.num_classes + 2
            rows = sorted((_context_key(h, base), h) for h in self.contexts)
            offsets, tokens, logp, backoff = [0], [], [], []
            for _, h in rows:
                bo, probs = self.contexts[h]
                backoff.append(bo)
                tokens.extend(probs)
                logp.extend(probs.values())
                offsets.append(len(tokens))
            self._tables = [
                torch.tensor([self.order, self.num_classes], dtype=torch.int64),
                torch.tensor(self.unigram, dtype=torch.float64),
                torch.tensor([k for k, _ in rows], dtype=torch.int64),
                torch.tensor(backoff, dtype=torch.float64),
                torch.tensor(offsets, dtype=torch.int64),
                torch.tensor(tokens, dtype=torch.int64),
                torch.tensor(logp, dtype=torch.float64),
            ]
        return self._tables

    def write_arpa(self, path: str | Path, words: Sequence[str], bos: str = "<s>", eos: str = "</s>") -> None:
        """Write the model in ARPA form (log10), token i named ``words[i]`` (for other decoders, e.g. kenlm)."""
        ln10 = math.log(10)
        name = list(words) + [eos]

        def ctx_name(h):
            return [bos if s == self.num_classes else words[s] for s in h]

        grams: list[list[str]] = [[] for _ in range(self.order)]
        bo_of = {h: bo for h, (bo, _) in self.contexts.items()}
        for w in range(self.num_classes + 1):
            if w == self.num_classes or words[w]:
                bo = bo_of.get((w,), None)
                grams[0].append(f"{self.unigram[w] / ln10:.7f}\t{name[w]}" + (f"\t{bo / ln10:.7f}" if bo else ""))
        grams[0].append(f"-99\t{bos}" + (f"\t{bo_of[(self.num_classes,)] / ln10:.7f}"
                                         if (self.num_classes,) in bo_of else ""))
        for h, (_, probs) in sorted(self.contexts.items()):
            for w, lp in probs.items():
                gram = h + (w,)
                bo = bo_of.get(gram) if len(gram) < self.order else None
                text = " ".join(ctx_name(h) + [name[w]])
                grams[len(h)].append(f"{lp / ln10:.7f}\t{text}" + (f"\t{bo / ln10:.7f}" if bo else ""))
        with open(path, "w", encoding="utf-8") as f:
            f.write("\\data\\\n")
            for k, lines in enumerate(grams):
                f.write(f"ngram {k + 1}={len(lines)}\n")
            for k, lines in enumerate(grams):
                f.write(f"\n\\{k + 1}-grams:\n")
                f.write("\n".join(lines) + "\n")
            f.write("\n\\end\\\n")


def hotword_tables(hotwords: Sequence[Sequence[int]], num_classes: int, blank: int) -> list[torch.Tensor]:
    """The 6 tensors ``seqfast::ctc_beam_search`` takes as ``hotword_tables``: a trie of the hot-words (node 0
    the root) as (child offsets (H+1,), child tokens, child nodes, failure links (H,), depths (H,), the longest
    hot-word ending on each node's path (H,)), all int64. Hot-words are validated by the caller."""
    children: list[dict[int, int]] = [{}]
    depth, end = [0], [False]
    for word in hotwords:
        node = 0
        for c in word:
            if c not in children[node]:
                children[node][c] = len(children)
                children.append({})
                depth.append(depth[node] + 1)
                end.append(False)
            node = children[node][c]
        end[node] = True
    H = len(children)
    fail, end_depth = [0] * H, [0] * H
    queue = list(children[0].values())
    for child in queue:
        end_depth[child] = depth[child] if end[child] else 0
    for node in queue:  # breadth first: a node's failure link is set before its children's
        for c, child in sorted(children[node].items()):
            end_depth[child] = depth[child] if end[child] else end_depth[node]
            queue.append(child)
            if node == 0:
                continue
            u = fail[node]
            while u and c not in children[u]:
                u = fail[u]
            fail[child] = children[u].get(c, 0)
    offsets, tokens, nodes = [0], [], []
    for node in range(H):
        for c, child in sorted(children[node].items()):
            tokens.append(c)
            nodes.append(child)
        offsets.append(len(tokens))
    return [torch.tensor(x, dtype=torch.int64) for x in (offsets, tokens, nodes, fail, depth, end_depth)]
