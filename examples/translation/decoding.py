"""Greedy and beam-search decoding, with the KV cache (:meth:`Seq2SeqTransformer.step`) or without it (the whole
prefix through :meth:`Seq2SeqTransformer.decode` at every step), and their throughput.

Both ways encode the source once; "without the cache" re-runs the decoder over every earlier target position
(self-attention keys/values and the cross-attention projections of the memory) at each new token.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from examples.translation.model import DecoderState, Seq2SeqTransformer


@dataclass
class Decoded:
    """``tokens`` (B, T) int64 ids, without the start token, EOS then PAD after the end; ``scores`` (B,) the
    summed log-probabilities (beam search: divided by the length penalty); ``attention`` when recorded:
    per step, per decoder layer, (B, H, 1, S) cross-attention probabilities (cached greedy decoding only)."""

    tokens: torch.Tensor
    scores: torch.Tensor
    attention: list[list[torch.Tensor]] | None = None


class _Stepper:
    """Next-token log-probabilities for a batch of prefixes, with the cache or by re-decoding the prefix."""

    def __init__(self, model: Seq2SeqTransformer, memory: torch.Tensor, src_padding: torch.Tensor, max_len: int,
                 cached: bool, record_attention: bool = False) -> None:
        self.model, self.memory, self.src_padding, self.cached = model, memory, src_padding, cached
        self.state: DecoderState | None = (model.start(memory, src_padding, max_len + 1, record_attention)
                                           if cached else None)

    def log_probs(self, prefix: torch.Tensor) -> torch.Tensor:
        """(B, t) ids fed so far (start token first) -> (B, vocab) log-probabilities of the next one."""
        if self.cached:
            logits = self.model.step(prefix[:, -1:], self.state)
        else:
            logits = self.model.decode(prefix, self.memory, self.src_padding)
        return logits[:, -1].float().log_softmax(-1)

    def reorder(self, index: torch.Tensor) -> None:
        # Without the cache the prefix carries all there is; the memory rows move only among the beams of one
        # source, which hold the same memory, so it stays.
        if self.cached:
            self.state.reorder(index)


@torch.no_grad()
def greedy(model: Seq2SeqTransformer, src: torch.Tensor, src_padding: torch.Tensor, max_len: int, bos: int,
           eos: int, pad: int = 0, cached: bool = True, record_attention: bool = False) -> Decoded:
    """Most likely token at each step, for (N, S) ``src``; stops once every row has emitted ``eos``."""
    memory = model.encode(src, src_padding)
    stepper = _Stepper(model, memory, src_padding, max_len, cached, record_attention)
    N = src.shape[0]
    prefix = torch.full((N, 1), bos, dtype=torch.long, device=src.device)
    done = torch.zeros(N, dtype=torch.bool, device=src.device)
    scores = torch.zeros(N, device=src.device)
    for _ in range(max_len):
        lp = stepper.log_probs(prefix)
        best, token = lp.max(-1)
        token = token.masked_fill(done, pad)
        scores += best.masked_fill(done, 0.0)
        prefix = torch.cat([prefix, token[:, None]], 1)
        done |= token == eos
        if done.all():
            break
    attention = stepper.state.attention if cached and record_attention else None
    return Decoded(prefix[:, 1:], scores, attention)


def length_penalty(length: torch.Tensor, alpha: float) -> torch.Tensor:
    """GNMT's ((5 + length) / 6) ** alpha (Wu et al. 2016); alpha 0 ranks by plain log-probability."""
    return ((5.0 + length.float()) / 6.0) ** alpha


@torch.no_grad()
def beam_search(model: Seq2SeqTransformer, src: torch.Tensor, src_padding: torch.Tensor, max_len: int, bos: int,
                eos: int, pad: int = 0, beam: int = 3, alpha: float = 0.6, cached: bool = True) -> Decoded:
    """The best of ``beam`` hypotheses per source by log-probability / :func:`length_penalty`.

    Hypotheses that emitted ``eos`` stay in the beam with their score frozen (they only extend with padding);
    the search ends when all have or after ``max_len`` tokens. Returns the best hypothesis of each of the
    N sources.
    """
    memory = model.encode(src, src_padding)
    N, K = src.shape[0], beam
    rows = torch.arange(N, device=src.device).repeat_interleave(K)  # (N*K,) source of each hypothesis
    stepper = _Stepper(model, memory[rows], src_padding[rows], max_len, cached)
    prefix = torch.full((N * K, 1), bos, dtype=torch.long, device=src.device)
    # Only the first beam is live at the start, so the first step does not pick the same token K times.
    scores = torch.full((N, K), float("-inf"), device=src.device)
    scores[:, 0] = 0.0
    scores = scores.flatten()
    done = torch.zeros(N * K, dtype=torch.bool, device=src.device)
    lengths = torch.zeros(N * K, dtype=torch.long, device=src.device)
    for _ in range(max_len):
        lp = stepper.log_probs(prefix)  # (N*K, V)
        V = lp.shape[-1]
        # A finished hypothesis continues with padding at no cost, once.
        lp[done] = float("-inf")
        lp[done, pad] = 0.0
        total = (scores[:, None] + lp).view(N, K * V)
        # Rank by the length-normalised score the hypotheses would have after this step.
        new_len = (lengths + (~done).long())[:, None].expand(N * K, V).reshape(N, K * V)
        ranked = total / length_penalty(new_len, alpha)
        _, pick = ranked.topk(K, dim=-1)  # (N, K)
        parent = (pick // V + torch.arange(N, device=src.device)[:, None] * K).flatten()
        token = (pick % V).flatten()
        scores = total.gather(1, pick).flatten()
        lengths = new_len.gather(1, pick).flatten()
        done = done[parent] | (token == eos)
        prefix = torch.cat([prefix[parent], token[:, None]], 1)
        stepper.reorder(parent)
        if done.all():
            break
    final = (scores / length_penalty(lengths, alpha)).view(N, K)
    best = final.argmax(-1) + torch.arange(N, device=src.device) * K
    return Decoded(prefix[best, 1:], final.flatten()[best])


def tokens_per_second(fn, tokens_of) -> tuple[float, object]:
    """Run ``fn()`` once (after one warm-up call) and return (generated tokens / second, its result);
    ``tokens_of(result)`` counts the tokens generated (up to and including each row's end token)."""
    fn()
    start = time.perf_counter()
    result = fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return tokens_of(result) / (time.perf_counter() - start), result


def generated_tokens(tokens: torch.Tensor) -> int:
    """Tokens a batch decoding produced: rows x steps run ((B, T) ``tokens``). Every row runs every step of its
    batch (finished rows emit padding), so this is what the time was spent on."""
    return tokens.numel()
