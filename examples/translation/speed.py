"""seqfast against torch on the same weights in one process, alternating, so both see the same machine load:
the training step, decoding (greedy and beam, with and without the KV cache) and the base shape's step."""

from __future__ import annotations

import random
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from examples.translation import decoding
from examples.translation.dates import TARGET_LENGTH, DateData
from examples.translation.model import Seq2SeqTransformer, base_config, twin
from examples.translation.train import RunConfig, model_config


def _timed(fn, *args):
    """(seconds, result) of ``fn(*args)``."""
    start = time.perf_counter()
    result = fn(*args)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - start, result


def _train_step(model: Seq2SeqTransformer, batch, opt: torch.optim.Optimizer) -> None:
    loss = F.cross_entropy(model(batch.src, batch.src_padding, batch.tgt_in).flatten(0, 1), batch.tgt_out.flatten())
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()


def _fwd_bwd(model: Seq2SeqTransformer, batch) -> None:
    logits = model(batch.src, batch.src_padding, batch.tgt_in)
    F.cross_entropy(logits.flatten(0, 1), batch.tgt_out.flatten()).backward()
    model.zero_grad(set_to_none=True)


def interleaved(cfg: RunConfig, seed: int, weights: Path | None, rounds: int = 5,
                base: bool = True) -> dict[str, dict[str, float]]:
    """Median over ``rounds`` of each measurement, the backends taking turns within every round.

    Returns {backend: {"step_time_s", "greedy_cached", "greedy_uncached", "beam3_cached", "beam3_uncached"
    (tokens/s: rows x decoding steps / seconds), "base_fwd_bwd_step_s"}}; ``weights`` (a state_dict file,
    e.g. a run's ``model.pt``) or the seed's initialisation.
    """
    torch.manual_seed(seed)
    data = DateData(seed)
    v = data.vocab
    first = Seq2SeqTransformer(model_config(cfg.size, len(v)), "seqfast")
    if weights is not None:
        first.load_state_dict(torch.load(weights, weights_only=True))
    models = {"seqfast": first, "torch": twin(first, "torch")}
    test = data.batch(data.held_out(data.test, seed, cfg.speed_examples))
    train_batch = data.batch(data.sample(random.Random(seed), data.train, cfg.batch_size))
    # Each backend trains its own copy (with dropout) so that the timed steps do not change the decoding weights.
    trainees = {name: twin(m, name).train() for name, m in models.items()}
    opts = {name: torch.optim.Adam(m.parameters(), lr=1e-4) for name, m in trainees.items()}
    bases = {}
    if base:
        torch.manual_seed(seed)
        bases["seqfast"] = Seq2SeqTransformer(base_config(len(v)), "seqfast").train()
        bases["torch"] = twin(bases["seqfast"], "torch")
        base_batch = data.batch(data.sample(random.Random(seed), data.train, cfg.base_batch_size))

    def decode(model, search, cached):
        if search == "greedy":
            return decoding.greedy(model, test.src, test.src_padding, TARGET_LENGTH + 1, v.BOS, v.EOS, cached=cached)
        return decoding.beam_search(model, test.src, test.src_padding, TARGET_LENGTH + 1, v.BOS, v.EOS,
                                    beam=cfg.beam, alpha=cfg.length_alpha, cached=cached)

    samples: dict[str, dict[str, list[float]]] = {name: {} for name in models}
    for r in range(rounds + 1):  # round 0 warms up
        for name, model in models.items():
            got = samples[name]
            model.eval()
            got.setdefault("step_time_s", []).append(_timed(_train_step, trainees[name], train_batch, opts[name])[0])
            for search in ("greedy", "beam"):
                for cached in (True, False):
                    t, out = _timed(decode, model, search, cached)
                    key = f"{search}{cfg.beam if search == 'beam' else ''}_{'cached' if cached else 'uncached'}"
                    got.setdefault(key, []).append(decoding.generated_tokens(out.tokens) / t)
            if base:
                got.setdefault("base_fwd_bwd_step_s", []).append(_timed(_fwd_bwd, bases[name], base_batch)[0])
        if r == 0:
            samples = {name: {} for name in models}
    return {name: {k: statistics.median(xs) for k, xs in got.items()} for name, got in samples.items()}
