"""The CTC prefix beam search op (CPU only: it is sequential per sample; CUDA input is copied to the host by
``seqfast.ctc_beam_search``).

``seqfast::ctc_beam_search(log_probs, input_lengths, blank, beam_size, top_k_tokens, token_min_logp,
beam_prune_logp, return_frames, lm_tables, lm_weight, insertion_bonus, hotword_tables, hotword_bonus,
lexicon_tables, word_delimiter, blank_skip_logp) -> (tokens, lengths, scores, acoustic, frames)``

- ``log_probs``: (T, N, C) float32 or float64 (contiguous or not), no NaN or +inf (checked before the op);
  ``input_lengths``: (N,) int64 in [0, T].
- ``top_k_tokens``: 0 (off) or how many of a frame's most likely non-blank tokens may extend a prefix;
  ``token_min_logp``: -inf (off) or the least log-prob of such a token; ``beam_prune_logp``: -inf (off) or how
  far below the frame's best rank a prefix may stay in the beam.
- ``lm_tables``: [] or the 7 tensors of :meth:`seqfast.ngram_lm.CharNGramLM.tables`; ``hotword_tables``: [] or
  the 6 of :func:`seqfast.ngram_lm.hotword_tables`; ``lexicon_tables``: [] or the same 6 for the lexicon's
  words, with ``word_delimiter`` the token between words (a prefix may only spell lexicon words);
  ``blank_skip_logp``: +inf (off) or the blank log-prob from which a frame extends no prefix.
- ``tokens``: (N, K, T) int64, hypothesis k of sample n in ``tokens[n, k, :lengths[n, k]]``, padded with -1;
  ``lengths``: (N, K) int64, -1 where a sample has fewer than K hypotheses; ``scores``: (N, K) float64, the
  rank (best first): log P_ctc + lm_weight * log P_lm (end of sentence included) + insertion_bonus * length +
  the hot-word bonus, -inf where absent; ``acoustic``: (N, K) float64, log P_ctc of the labelling (the sum
  over its alignments kept by the search); ``frames``: (N, K, T) int64 (the frame at which each token's prefix
  entered the beam), or (N, K, 0) without ``return_frames``.

The kernel is csrc/ctc_beam_search.cpp; seqfast/reference/ctc_beam_search.py is the same search in Python.
"""

from __future__ import annotations

import torch

from seqfast import _backend
from seqfast.ops._registry import define
from seqfast.reference import ctc_beam_search as reference

SEARCH = define(
    "ctc_beam_search",
    "(Tensor log_probs, Tensor input_lengths, int blank, int beam_size, int top_k_tokens, float token_min_logp, "
    "float beam_prune_logp, bool return_frames, Tensor[] lm_tables, float lm_weight, float insertion_bonus, "
    "Tensor[] hotword_tables, float hotword_bonus, Tensor[] lexicon_tables, int word_delimiter, "
    "float blank_skip_logp) "
    "-> (Tensor, Tensor, Tensor, Tensor, Tensor)",
)


@torch.library.register_fake("seqfast::ctc_beam_search")
def _search_fake(log_probs, input_lengths, blank, beam_size, top_k_tokens, token_min_logp, beam_prune_logp,
                 return_frames, lm_tables, lm_weight, insertion_bonus, hotword_tables, hotword_bonus, lexicon_tables,
                 word_delimiter, blank_skip_logp=float("inf")):
    T, N, _ = log_probs.shape
    tokens = log_probs.new_empty((N, beam_size, T), dtype=torch.int64)
    lengths = log_probs.new_empty((N, beam_size), dtype=torch.int64)
    scores = log_probs.new_empty((N, beam_size), dtype=torch.float64)
    frames = log_probs.new_empty((N, beam_size, T if return_frames else 0), dtype=torch.int64)
    return tokens, lengths, scores, torch.empty_like(scores), frames


_backend.register("ctc_beam_search", "reference")(reference.ctc_beam_search_op)
