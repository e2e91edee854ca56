"""CTC beam search: ``seqfast.ctc_beam_search`` against pyctcdecode 0.5.0 at the same beam width and pruning.

In the suite (``make bench``) the baseline fills the table's ``torch`` column (there is no torch beam search):
one call decodes the whole batch, pyctcdecode one utterance after another (its own loop, no process pool).
Run as a script it prints the report of benchmarks/NOTES.md: milliseconds per utterance, medians of
alternating rounds, how often the two 1-bests agree and how often seqfast's scores at least as well under the
objective both search for (log P_ctc + lm_weight * log P_lm, computed apart), on random and on peaky
log-probs, with and without an n-gram LM, at 1 and 2 threads::

    PYTHONPATH=. .venv/bin/python benchmarks/bench_ctc_beam_search.py [--rounds 3] [--threads 1 2]

(pyctcdecode takes seconds per utterance on random input: there it decodes only the first
``--random-subset`` utterances of the batch, 4 by default; seqfast always decodes the whole batch.)

Settings (both decoders): beam width 32, candidate tokens with log-prob >= -5 (pyctcdecode's default
``token_min_logp``), prefixes within 10 of the best (its default ``beam_prune_logp``). pyctcdecode always keeps
a frame's best token as well; seqfast keeps only what passes the threshold.

Inputs: log_softmax of (T, N, C) logits. ``random``: standard normal logits. ``peaky`` (model-like): a dominant
class per frame (blank 60% of the frames, else a token drawn from the LM's Markov chain, held 1-3 frames) 8 above
normal noise. The LM: both decoders get the same token 3-gram (seqfast.CharNGramLM, Witten-Bell) trained on
2000 sentences of that Markov chain; pyctcdecode reads it as an ARPA file through kenlm, with one "word" per
token (labels ``"▁x"``), so its word LM is the same token LM; alpha = lm_weight = 0.5, beta = insertion bonus
= 0. pyctcdecode scores a word when the next one starts (or at the end), seqfast a token when it is added:
the final scores are the same quantity, the searches on the way are not.

pyctcdecode is not an exact prefix search: it keeps a prefix that ends in blank and one that ends in each
token as separate beams (each takes a slot; they are merged by summing only when text, partial word and last
character all agree), so its 1-best can differ from an exact prefix search when the beam is too narrow or the
frames are flat (random log-probs); on peaky frames the two agree.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from _harness import FWD, bench_device, measure

import seqfast

try:
    import pyctcdecode
except ImportError:  # said in every pyctcdecode case, which fails: the comparison is this benchmark's point
    pyctcdecode = None
try:
    import kenlm
except ImportError:
    kenlm = None

INSTALL = ".venv/bin/python -m pip install -q --no-deps pyctcdecode==0.5.0 pygtrie (make bench does it)"
BEAM, TOKEN_MIN_LOGP, BEAM_PRUNE_LOGP = 32, -5.0, -10.0
LM_ORDER, LM_WEIGHT = 3, 0.5
PEAK, BLANK_SHARE = 8.0, 0.6


@dataclass(frozen=True)
class BeamShape:
    T: int
    N: int
    C: int
    kind: str = "peaky"
    lm: bool = False

    @property
    def label(self) -> str:
        return f"T{self.T}_N{self.N}_C{self.C}_{self.kind}" + ("_lm" if self.lm else "")

    def work(self, direction: str) -> int:
        """Frames decoded (N * T); the rate column reads as giga-frames per second."""
        return self.N * self.T


SIZES = {"smoke": [(40, 2, 8)], "quick": [(500, 16, 32)], "default": [(500, 16, 32), (1000, 32, 1000)]}
SIZES["full"] = SIZES["default"]


# ------------------------------------------------------------------------------------------------
# Inputs and decoders


def markov_chain(C: int, seed: int = 0) -> torch.Tensor:
    """(C, C) transition probabilities between tokens 1..C-1 (row 0 = start): 4 likely successors each."""
    g = torch.Generator().manual_seed(seed)
    probs = torch.full((C, C), 0.2 / max(C - 2, 1), dtype=torch.float64)
    for c in range(C):
        nxt = torch.randint(1, C, (4,), generator=g)
        probs[c, nxt] += 0.2
    probs[:, 0] = 0.0
    return probs / probs.sum(1, keepdim=True)


def sentences(chain: torch.Tensor, count: int, seed: int = 1) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(count):
        length = int(torch.randint(5, 30, (1,), generator=g))
        c, sent = 0, []
        for _ in range(length):
            c = int(torch.multinomial(chain[c], 1, generator=g))
            sent.append(c)
        out.append(sent)
    return out


def make_inputs(shape: BeamShape, chain: torch.Tensor, seed: int = 2) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    T, N, C = shape.T, shape.N, shape.C
    logits = torch.randn(T, N, C, generator=g)
    if shape.kind == "peaky":
        for n in range(N):
            t, c = 0, 0
            while t < T:
                hold = int(torch.randint(1, 4, (1,), generator=g))
                if float(torch.rand(1, generator=g)) < BLANK_SHARE:
                    dominant = 0
                else:
                    c = int(torch.multinomial(chain[c].float(), 1, generator=g))
                    dominant = c
                logits[t:t + hold, n, dominant] += PEAK
                t += hold
    return logits.log_softmax(-1)


def labels_for(C: int) -> list[str]:
    """One-character names of tokens 1..C-1 (blank ""), prefixed "▁" so pyctcdecode makes each its own word."""
    return [""] + ["▁" + chr(0x4E00 + c) for c in range(1, C)]


def build_lm(C: int, count: int = 2000) -> seqfast.CharNGramLM:
    return seqfast.CharNGramLM.from_sequences(sentences(markov_chain(C), count), C, order=LM_ORDER)


def pyctcdecode_decoder(C: int, lm: seqfast.CharNGramLM | None, folder: str):
    if pyctcdecode is None:
        pytest.fail(f"pyctcdecode is not installed: {INSTALL}", pytrace=False)
    labels = labels_for(C)
    path = None
    if lm is not None:
        path = os.path.join(folder, f"lm_{C}.arpa")
        lm.write_arpa(path, [name[1:] for name in labels])
    import logging

    logging.getLogger("pyctcdecode").setLevel(logging.ERROR)  # its notes on ARPA loading and missing <unk>
    return pyctcdecode.build_ctcdecoder(labels, kenlm_model_path=path, alpha=LM_WEIGHT, beta=0.0)


def decode_pyctcdecode(decoder, frames: list, C: int) -> list[list[int]]:
    index = {chr(0x4E00 + c): c for c in range(1, C)}
    out = []
    for x in frames:
        text = decoder.decode_beams(x, beam_width=BEAM, beam_prune_logp=BEAM_PRUNE_LOGP,
                                    token_min_logp=TOKEN_MIN_LOGP)[0][0]
        out.append([index[w] for w in text.split()])
    return out


def decode_seqfast(log_probs: torch.Tensor, lm) -> list[list[int]]:
    results = seqfast.ctc_beam_search(log_probs, beam_size=BEAM, token_min_logp=TOKEN_MIN_LOGP,
                                      beam_prune_logp=BEAM_PRUNE_LOGP, lm=lm, lm_weight=LM_WEIGHT)
    return [hyps[0].tokens if hyps else [] for hyps in results]


# ------------------------------------------------------------------------------------------------
# make bench


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "beam_shape" in metafunc.fixturenames:
        size = metafunc.config.getoption("--bench-size")
        shapes = [BeamShape(T, N, C, "peaky", lm) for T, N, C in SIZES[size] for lm in (False, True)]
        metafunc.parametrize("beam_shape", shapes, ids=[s.label for s in shapes])
        metafunc.parametrize("provider", ["torch", "seqfast"], ids=["pyctcdecode", "seqfast"])
    bench_device(metafunc.config)


def test_ctc_beam_search(benchmark, beam_shape: BeamShape, provider: str, size: str, tmp_path) -> None:
    lm = build_lm(beam_shape.C, 100 if size == "smoke" else 2000) if beam_shape.lm else None
    lp = make_inputs(beam_shape, markov_chain(beam_shape.C))
    if provider == "torch":  # the baseline's column: pyctcdecode
        if beam_shape.lm and kenlm is None:
            pytest.skip("kenlm is not installed (`pip install kenlm`): pyctcdecode runs without an LM only")
        decoder = pyctcdecode_decoder(beam_shape.C, lm, str(tmp_path))
        frames = [lp[:, n].numpy() for n in range(beam_shape.N)]

        def fn():
            return decode_pyctcdecode(decoder, frames, beam_shape.C)
    else:
        def fn():
            return decode_seqfast(lp, lm)
    measure(benchmark, fn, op="ctc_beam_search", shape=beam_shape, direction=FWD, provider=provider, device="cpu",
            size=size)


# ------------------------------------------------------------------------------------------------
# The report


def machine() -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    load = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    return f"{cpu}, {os.cpu_count()} cores, ISA {seqfast._C.cpu_isa()}, torch {torch.__version__}; {load}"


def score_of(tokens: list[int], log_probs: torch.Tensor, lm) -> float:
    """The search's objective for one labelling: log P_ctc (-ctc_loss, float64) + lm_weight * log P_lm."""
    lp = log_probs.double()[:, None]
    targets = torch.tensor([tokens or [1]])
    nll = float(seqfast.ctc_loss(lp, targets, [lp.shape[0]], [len(tokens)], reduction="sum"))
    return -nll + (LM_WEIGHT * lm.log_prob(tokens) if lm is not None else 0.0)


def report(shapes, kinds, threads, rounds: int, with_lm: bool, subset: dict[str, int]) -> None:
    print(f"machine: {machine()}")
    print(f"beam {BEAM}, token_min_logp {TOKEN_MIN_LOGP}, beam_prune_logp {BEAM_PRUNE_LOGP}, "
          f"LM: token {LM_ORDER}-gram, weight {LM_WEIGHT}")
    print("| shape (T, N, C) | input | LM | threads | seqfast ms/utt | pyctcdecode ms/utt | ratio | 1-best agree | "
          "seqfast's 1-best scores >= |")
    print("|---|---|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as folder:
        for T, N, C in shapes:
            lms = [None, build_lm(C)] if with_lm and kenlm is not None else [None]
            for lm in lms:
                decoder = pyctcdecode_decoder(C, lm, folder)
                for kind in kinds:
                    lp = make_inputs(BeamShape(T, N, C, kind), markov_chain(C))
                    m = min(N, subset.get(kind, N))  # pyctcdecode decodes the first m utterances
                    frames = [lp[:, n].numpy() for n in range(m)]
                    theirs_times, theirs = [], None
                    ours_times = {k: [] for k in threads}
                    for _ in range(rounds):  # alternating: each round times every decoder once
                        for k in threads:
                            torch.set_num_threads(k)
                            start = time.perf_counter()
                            ours = decode_seqfast(lp, lm)
                            ours_times[k].append((time.perf_counter() - start) / N)
                        start = time.perf_counter()
                        theirs = decode_pyctcdecode(decoder, frames, C)
                        theirs_times.append((time.perf_counter() - start) / m)
                    agree = sum(a == b for a, b in zip(ours, theirs)) / m
                    # Where they differ, which 1-best does the objective prefer (a narrow beam is not exact)?
                    at_least = sum(a == b or score_of(a, lp[:, n], lm) >= score_of(b, lp[:, n], lm)
                                   for n, (a, b) in enumerate(zip(ours, theirs))) / m
                    their_ms = statistics.median(theirs_times) * 1e3
                    for k in threads:
                        our_ms = statistics.median(ours_times[k]) * 1e3
                        print(f"| ({T}, {N}, {C}) | {kind} | {'3-gram' if lm else 'none'} | {k} | {our_ms:.3f} | "
                              f"{their_ms:.1f} | {their_ms / our_ms:.0f}x | {agree:.1%} of {m} | {at_least:.1%} |",
                              flush=True)
    print(f"after: {machine()}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--shapes", default="500,16,32;1000,32,1000", help="T,N,C;T,N,C")
    parser.add_argument("--kinds", nargs="+", default=["random", "peaky"])
    parser.add_argument("--no-lm", action="store_true")
    parser.add_argument("--random-subset", type=int, default=4,
                        help="pyctcdecode decodes only this many utterances of random input (it is slow there)")
    args = parser.parse_args(argv)
    if pyctcdecode is None:
        raise SystemExit(f"pyctcdecode is not installed: {INSTALL}")
    if kenlm is None and not args.no_lm:
        print("kenlm is not installed: pyctcdecode (and so this report) runs without an LM only")
    shapes = [tuple(int(v) for v in s.split(",")) for s in args.shapes.split(";")]
    report(shapes, args.kinds, args.threads, args.rounds, not args.no_lm, {"random": args.random_subset})


if __name__ == "__main__":
    main()
