"""Decoding the recogniser's CTC outputs with seqfast's decoding ops, and the error rates of each decoder.

Five decoders of the same log-probabilities (float32 [T, N, 28], blank 0):

- ``greedy``: ``seqfast.ctc_greedy_decode`` (best path, repeats merged, blanks dropped);
- ``beam``: ``seqfast.ctc_beam_search``, no language knowledge: the labelling of highest total CTC probability
  the beam finds;
- ``beam_lexicon``: the same search constrained to the task's fixed vocabulary (digits and 364 words, spaces as
  the word delimiter): every hypothesis spells only known words;
- ``beam_lm``: the same search with a character n-gram LM of the training transcripts (``seqfast.CharNGramLM``);
- ``beam_lexicon_lm``: both, the lexicon constraint and the LM.

The LM weight and the insertion bonus (per character) of each decoder that uses them are chosen on the
validation set (training voices) from a small grid; the held-out test set chooses nothing.

    python -m examples.speech.recogniser_decoding --model runs/speech_recognition/model.pt

re-decodes a saved model's held-out test set with every decoder (``--size`` must be the run's) and prints
the table, without training.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch

import seqfast

from . import ctc_metrics, vocabulary
from .recogniser_model import ModelConfig, Recogniser
from .recogniser_training import SIZES, Utterances, eval_batches, load_utterances, rates_by_kind

DECODERS = ("greedy", "beam", "beam_lexicon", "beam_lm", "beam_lexicon_lm")
BEAM_SIZE = 64
LM_ORDER = 6
# (decoder, lm_weight, insertion_bonus) grids: the validation set picks one pair per decoder.
LM_WEIGHTS = (0.25, 0.5, 1.0)
INSERTION_BONUSES = (0.0, 0.5, 1.0, 2.0, 3.0)
TUNED = {"beam_lexicon": ((0.0,), INSERTION_BONUSES), "beam_lm": (LM_WEIGHTS, INSERTION_BONUSES),
         "beam_lexicon_lm": (LM_WEIGHTS, INSERTION_BONUSES)}
NUM_CLASSES = len(vocabulary.CHARACTERS) + 1  # blank + characters


@dataclass
class DecoderSetup:
    """What the beam-search decoders need besides the log-probabilities."""

    lexicon: list[list[int]]  # each vocabulary word as CTC labels
    word_delimiter: int  # the space's label
    lm: seqfast.CharNGramLM
    weights: dict[str, tuple[float, float]]  # decoder -> (lm_weight, insertion_bonus), set by `tune`


def decoder_setup(train_texts: list[str]) -> DecoderSetup:
    """The lexicon of the task's vocabulary and a character LM of `train_texts` (the training transcripts)."""
    words = sorted(set(vocabulary.DIGITS) | set(vocabulary.WORDS))
    lm = seqfast.CharNGramLM.from_sequences([vocabulary.encode(t) for t in train_texts], NUM_CLASSES, order=LM_ORDER)
    return DecoderSetup([vocabulary.encode(w) for w in words], vocabulary.encode(" ")[0], lm, {})


def _text(labels: list[int]) -> str:
    return " ".join(vocabulary.decode(labels).split())


def decode(name: str, log_probs: torch.Tensor, lengths: torch.Tensor, setup: DecoderSetup | None) -> list[str]:
    """Transcripts of a batch. log_probs: float [T, N, C] log-softmax outputs; lengths: int64 [N] valid frames."""
    if name == "greedy":
        tokens, counts = seqfast.ctc_greedy_decode(log_probs, lengths)
        return [_text(row[:n].tolist()) for row, n in zip(tokens, counts.tolist())]
    if setup is None:
        raise ValueError(f"decoder {name!r} needs a DecoderSetup")
    if name not in DECODERS:
        raise ValueError(f"unknown decoder {name!r}; expected one of {DECODERS}")
    options: dict = {}
    if "lexicon" in name:
        options.update(lexicon=setup.lexicon, word_delimiter=setup.word_delimiter)
    if name in TUNED:
        weight, bonus = setup.weights.get(name, (0.0, 0.0))
        options.update(insertion_bonus=bonus)
        if name.endswith("_lm"):
            options.update(lm=setup.lm, lm_weight=weight)
    hyps = seqfast.ctc_beam_search(log_probs, lengths, beam_size=BEAM_SIZE, **options)
    return [_text(best[0].tokens) if best else "" for best in hyps]


@dataclass
class DecoderRates:
    """A decoder's transcripts and corpus error rates on a set (all, digit strings, phrases), and its time."""

    hypotheses: list[str]
    rates: ctc_metrics.ErrorRates
    digits: ctc_metrics.ErrorRates
    phrases: ctc_metrics.ErrorRates
    decode_seconds: float  # wall-clock of the decoder alone, summed over the batches


@torch.no_grad()
def log_probs_of(model: Recogniser, data: Utterances, batch_size: int = 32) -> list[tuple[list[int], torch.Tensor,
                                                                                          torch.Tensor]]:
    """The model's CTC log-probabilities per length-sorted batch: (indices, log_probs [T, N, C], lengths [N])."""
    out = []
    for batch in eval_batches(model, data, batch_size):
        logits, lengths = model(batch.features, batch.lengths)
        out.append((batch.index, logits.log_softmax(-1), lengths))
    return out


def rates_of(data: Utterances, batches, name: str, setup: DecoderSetup | None) -> DecoderRates:
    """Decode every batch of `batches` (from `log_probs_of`) with decoder `name` and score it against `data`."""
    hyps = [""] * len(data)
    seconds = 0.0
    for index, log_probs, lengths in batches:
        begin = time.perf_counter()
        texts = decode(name, log_probs, lengths, setup)
        seconds += time.perf_counter() - begin
        for i, text in zip(index, texts):
            hyps[i] = text
    return DecoderRates(hyps, *rates_by_kind(data.texts, hyps), seconds)


def tune(model: Recogniser, valid: Utterances, setup: DecoderSetup, names: tuple[str, ...]) -> dict[str, dict]:
    """For each decoder of `names` in `TUNED`, set `setup.weights[name]` to the (lm_weight, insertion_bonus) of
    its grid with the lowest validation CER (ties: the smaller pair). Returns every pair's validation CER."""
    batches = log_probs_of(model, valid)
    found = {}
    for name in (n for n in names if n in TUNED):
        weights, bonuses = TUNED[name]
        cer = {}
        for pair in ((w, b) for w in weights for b in bonuses):
            setup.weights[name] = pair
            cer[pair] = rates_of(valid, batches, name, setup).rates.cer
        setup.weights[name] = min(cer, key=lambda pair: (cer[pair], pair))
        found[name] = {"chosen": list(setup.weights[name]), "valid_cer": {f"{w},{b}": c for (w, b), c in cer.items()}}
    return found


def evaluate_decoders(model: Recogniser, test: Utterances, valid: Utterances, train_texts: list[str],
                      names: tuple[str, ...] = DECODERS) -> tuple[dict[str, DecoderRates], dict]:
    """Every decoder of `names` on the test set; LM weights and insertion bonuses chosen on `valid`. Returns the
    rates per decoder and the setup's facts (beam size, LM order, the chosen pairs and every pair's validation CER)."""
    setup = decoder_setup(train_texts)
    facts: dict = {"beam_size": BEAM_SIZE, "lm_order": LM_ORDER, "lexicon_words": len(setup.lexicon),
                   "tuned_on_validation": tune(model, valid, setup, names)}
    batches = log_probs_of(model, test)
    return {name: rates_of(test, batches, name, setup) for name in names}, facts


def summary(per_decoder: dict[str, DecoderRates]) -> dict[str, dict[str, float]]:
    """JSON-ready rates per decoder: cer, wer, cer_digits, wer_digits, cer_phrases, wer_phrases, decode_seconds."""
    return {name: {"cer": r.rates.cer, "wer": r.rates.wer, "cer_digits": r.digits.cer, "wer_digits": r.digits.wer,
                   "cer_phrases": r.phrases.cer, "wer_phrases": r.phrases.wer, "decode_seconds": r.decode_seconds}
            for name, r in per_decoder.items()}


def table(rates: dict[str, dict[str, float]]) -> str:
    """A markdown table of `summary`'s rates, in percent."""
    lines = ["| decoder | CER | WER | CER digit strings | WER digit strings | CER phrases | decoding (s) |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for name, r in rates.items():
        lines.append(f"| {name} | {100 * r['cer']:.1f} % | {100 * r['wer']:.1f} % | {100 * r['cer_digits']:.1f} % | "
                     f"{100 * r['wer_digits']:.1f} % | {100 * r['cer_phrases']:.1f} % | {r['decode_seconds']:.2f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description="Decode a saved recogniser's held-out test set with every decoder.")
    parser.add_argument("--model", required=True, help="model.pt written by examples/speech_recognition.py")
    parser.add_argument("--size", choices=tuple(SIZES), default="default", help="the run size the model came from")
    parser.add_argument("--cache", default=None, help="dataset cache (default: the examples' cache)")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", default=None, help="write the rates as JSON here")
    args = parser.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    saved = torch.load(args.model, map_location="cpu")
    model = Recogniser(ModelConfig(**saved["config"]), saved["backend"])
    model.load_state_dict(saved["state_dict"])
    size = SIZES[args.size]
    sets = {name: load_utterances(getattr(size, name), args.cache) for name in ("train", "valid", "test")}
    per_decoder, facts = evaluate_decoders(model, sets["test"], sets["valid"], sets["train"].texts)
    rates = summary(per_decoder)
    print(table(rates))
    print(json.dumps(facts))
    result = {"decoders": rates, **facts}
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
