"""The CTC decoding ops: greedy (best path) decoding and forced (Viterbi) alignment.

``seqfast::ctc_greedy_decode(log_probs, input_lengths, blank) -> (tokens, lengths, frames)``

- ``log_probs``: (T, N, C), any strides, float16 / bfloat16 / float32 / float64; ``input_lengths``: (N,) int64,
  checked before the op (``seqfast.validation``).
- Per frame t < input_lengths[n] the label is ``torch.argmax`` of the row (the first maximum; the first NaN
  if the row holds one); runs of one label merge and blanks drop. ``tokens`` (N, T) int64 holds sample n's
  labels in ``tokens[n, :lengths[n]]`` and ``blank`` after them; ``lengths`` (N,) int64; ``frames`` (N, T)
  int64 the first frame of each token's run, -1 after them.

``seqfast::ctc_forced_align(log_probs, targets, input_lengths, target_lengths, blank) -> (paths, scores)``

- ``targets``: (N, S) int64 padded, labels other than blank; each target fits its frames (L labels and R
  equal neighbours need L + R frames), checked before the op.
- The best-scoring frame-level path over the extended target (blank, l1, blank, ..., lL, blank) that
  collapses to the target, as torchaudio's ``forced_align``: start in the first blank or l1, stay, step to
  the next state, or skip a blank between two different labels; end on lL or the trailing blank. Its score
  is the sum of the frames' log-probs, accumulated in float64 for float64 input, else float32.
- Ties: among the best paths, the one ending on lL rather than the trailing blank; then, from the last frame
  backwards, the one in the later state at each frame (labels and blanks entered as early as the score
  allows). NaN log-probs, and sums where +inf meets -inf, count as -inf when paths are compared.
- ``paths`` (N, T) int64: the class of the path's state per frame, ``blank`` for t >= input_lengths[n];
  ``scores`` (N, T) in log_probs' dtype: ``log_probs[t, n, paths[n, t]]``, 0 for t >= input_lengths[n].

Outputs are integers or gathered values: no autograd.
"""

from __future__ import annotations

import torch

from seqfast.ops._registry import define, register_kernels
from seqfast.reference import ctc_decode as reference

GREEDY = define("ctc_greedy_decode", "(Tensor log_probs, Tensor input_lengths, int blank) -> (Tensor, Tensor, Tensor)")
ALIGN = define(
    "ctc_forced_align",
    "(Tensor log_probs, Tensor targets, Tensor input_lengths, Tensor target_lengths, int blank) -> (Tensor, Tensor)",
)


@torch.library.register_fake("seqfast::ctc_greedy_decode")
def _greedy_fake(log_probs, input_lengths, blank):
    T, N, _ = log_probs.shape
    tokens = log_probs.new_empty((N, T), dtype=torch.int64)
    return tokens, log_probs.new_empty((N,), dtype=torch.int64), torch.empty_like(tokens)


@torch.library.register_fake("seqfast::ctc_forced_align")
def _align_fake(log_probs, targets, input_lengths, target_lengths, blank):
    T, N, _ = log_probs.shape
    return log_probs.new_empty((N, T), dtype=torch.int64), log_probs.new_empty((N, T))


register_kernels("ctc_greedy_decode", "ctc_decode", reference.ctc_greedy_decode)
register_kernels("ctc_forced_align", "ctc_decode", reference.ctc_forced_align)
