"""Greedy CTC decoding and the error rates of transcripts: edit distance, CER and WER."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from . import vocabulary


def greedy_labels(logits: torch.Tensor, lengths: torch.Tensor, blank: int = 0) -> list[list[int]]:
    """Best path of each sequence with repeats merged and blanks dropped.

    logits: float [T, N, C] (or log-probabilities: only the argmax matters); lengths: int [N] valid frames.
    Returns N label lists."""
    best = logits.argmax(-1).T.tolist()  # [N][T]
    out = []
    for path, length in zip(best, lengths.tolist()):
        labels, previous = [], blank
        for label in path[:length]:
            if label != previous and label != blank:
                labels.append(label)
            previous = label
        out.append(labels)
    return out


def greedy_transcripts(logits: torch.Tensor, lengths: torch.Tensor) -> list[str]:
    """`greedy_labels` as text (blank 0, characters of `vocabulary.CHARACTERS`), with spaces normalised."""
    return [" ".join(vocabulary.decode(labels).split()) for labels in greedy_labels(logits, lengths)]


def edit_distance(reference: Sequence, hypothesis: Sequence) -> int:
    """Levenshtein distance: the fewest substitutions, insertions and deletions that turn `hypothesis` into
    `reference` (each costs 1). Any sequences of comparable items (strings, lists of words)."""
    if len(reference) < len(hypothesis):
        reference, hypothesis = hypothesis, reference  # the row is the shorter one; the distance is symmetric
    previous = list(range(len(hypothesis) + 1))
    for i, r in enumerate(reference, start=1):
        current = [i]
        for j, h in enumerate(hypothesis, start=1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (r != h)))
        previous = current
    return previous[-1]


@dataclass(frozen=True)
class ErrorRates:
    """Corpus-level rates: edits summed over utterances divided by reference lengths summed."""

    cer: float  # character edits / reference characters (spaces count as characters)
    wer: float  # word edits / reference words
    char_edits: int
    chars: int
    word_edits: int
    words: int


def error_rates(references: Sequence[str], hypotheses: Sequence[str]) -> ErrorRates:
    """CER and WER of `hypotheses` against `references` (same length, one string per utterance)."""
    if len(references) != len(hypotheses):
        raise ValueError(f"{len(references)} references but {len(hypotheses)} hypotheses")
    char_edits = chars = word_edits = words = 0
    for ref, hyp in zip(references, hypotheses):
        char_edits += edit_distance(ref, hyp)
        chars += len(ref)
        ref_words, hyp_words = ref.split(), hyp.split()
        word_edits += edit_distance(ref_words, hyp_words)
        words += len(ref_words)
    return ErrorRates(char_edits / max(chars, 1), word_edits / max(words, 1), char_edits, chars, word_edits, words)
