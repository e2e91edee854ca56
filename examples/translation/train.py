"""One run: train the Transformer on dates, measure it (accuracy, step time, decoding throughput, memory) and
draw its pictures. :func:`run` is what ``examples/translation.py`` calls once per backend."""

from __future__ import annotations

import random
import resource
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from examples.common import StepTimer, progress, seed_everything
from examples.translation import decoding, plots
from examples.translation.dates import TARGET_LENGTH, DateData
from examples.translation.model import ModelConfig, Seq2SeqTransformer, base_config, small_config, smoke_config


@dataclass(frozen=True)
class RunConfig:
    """How long and how hard to train, and how much to measure."""

    size: str = "base"  # "base", "small" or "smoke": see model.py
    steps: int = 4000
    batch_size: int = 64
    peak_lr: float = 1e-3
    warmup: int = 400
    label_smoothing: float = 0.1
    eval_every: int = 250
    val_examples: int = 200
    test_examples: int | None = None  # None: every held-out day
    beam_examples: int = 500
    beam: int = 3
    length_alpha: float = 0.6
    speed_examples: int = 128  # one batch, decoded with and without the cache
    base_timing: bool = True  # also time one fwd+bwd of the base-shape model
    base_batch_size: int = 8


def model_config(size: str, vocab: int) -> ModelConfig:
    return {"base": base_config, "small": small_config, "smoke": smoke_config}[size](vocab)


def learning_rate(step: int, peak: float, warmup: int) -> float:
    """The paper's schedule, scaled to ``peak`` at the end of the linear warm-up, then ~ 1 / sqrt(step)."""
    step = max(step, 1)
    return peak * min(step / warmup, (warmup / step) ** 0.5)


def exact_match(model: Seq2SeqTransformer, data: DateData, pairs: list[tuple[str, str]], batch_size: int = 256,
                beam: int | None = None, alpha: float = 0.6) -> float:
    """Fraction of ``pairs`` whose decoded output is exactly the ISO date (cached greedy, or beam search)."""
    v, right = data.vocab, 0
    model.eval()
    for i in range(0, len(pairs), batch_size):
        b = data.batch(pairs[i:i + batch_size])
        if beam is None:
            out = decoding.greedy(model, b.src, b.src_padding, TARGET_LENGTH + 1, v.BOS, v.EOS)
        else:
            out = decoding.beam_search(model, b.src, b.src_padding, TARGET_LENGTH + 1, v.BOS, v.EOS, beam=beam,
                                       alpha=alpha)
        right += sum(v.decode(row) == t for row, t in zip(out.tokens, b.targets))
    return right / len(pairs)


def _peak_rss_mib() -> float:
    """The process's peak resident set (ru_maxrss: KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (2**20 if sys.platform == "darwin" else 2**10)


def train(model: Seq2SeqTransformer, data: DateData, cfg: RunConfig, seed: int) -> dict[str, Any]:
    """Adam (0.9, 0.98, 1e-9) with the warm-up schedule and label smoothing; returns the curves and step times."""
    rng = random.Random(seed)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.peak_lr, betas=(0.9, 0.98), eps=1e-9)
    val = data.held_out(data.val, seed, cfg.val_examples)
    timer = StepTimer()
    losses, accuracy = [], []
    started = time.perf_counter()
    bar = progress(range(1, cfg.steps + 1), total=cfg.steps, desc=f"train ({model.backend})")
    for step in bar:
        model.train()
        b = data.batch(data.sample(rng, data.train, cfg.batch_size))
        for group in opt.param_groups:
            group["lr"] = learning_rate(step, cfg.peak_lr, cfg.warmup)
        with timer:
            logits = model(b.src, b.src_padding, b.tgt_in)
            loss = F.cross_entropy(logits.flatten(0, 1), b.tgt_out.flatten(), label_smoothing=cfg.label_smoothing)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        losses.append((step, loss.item()))
        if step % cfg.eval_every == 0 or step == cfg.steps:
            accuracy.append((step, exact_match(model, data, val)))
            bar.set_postfix(loss=f"{loss.item():.3f}", val=f"{accuracy[-1][1]:.3f}")
    return {"losses": losses, "val_exact_match": accuracy, "step_time_s": timer.median(),
            "train_seconds": time.perf_counter() - started}


def decoding_speed(model: Seq2SeqTransformer, data: DateData, pairs: list[tuple[str, str]], beam: int,
                   alpha: float) -> dict[str, float]:
    """Generated tokens per second for one batch of ``pairs``: greedy and beam, with and without the cache."""
    v = data.vocab
    b = data.batch(pairs)
    model.eval()
    out: dict[str, float] = {}
    for cached in (True, False):
        key = "cached" if cached else "uncached"
        out[f"greedy_{key}"], _ = decoding.tokens_per_second(
            lambda c=cached: decoding.greedy(model, b.src, b.src_padding, TARGET_LENGTH + 1, v.BOS, v.EOS, cached=c),
            lambda r: decoding.generated_tokens(r.tokens))
        out[f"beam{beam}_{key}"], _ = decoding.tokens_per_second(
            lambda c=cached: decoding.beam_search(model, b.src, b.src_padding, TARGET_LENGTH + 1, v.BOS, v.EOS,
                                                  beam=beam, alpha=alpha, cached=c),
            lambda r: decoding.generated_tokens(r.tokens))
    return out


def base_step_time(backend: str, data: DateData, batch_size: int, seed: int, steps: int = 3) -> float | None:
    """Median seconds of forward + backward (no optimiser) of the base-shape model on one date batch."""
    torch.manual_seed(seed)
    model = Seq2SeqTransformer(base_config(len(data.vocab)), backend).train()
    b = data.batch(data.sample(random.Random(seed), data.train, batch_size))
    timer = StepTimer(warmup=1)
    for _ in range(steps + 1):
        with timer:
            loss = F.cross_entropy(model(b.src, b.src_padding, b.tgt_in).flatten(0, 1), b.tgt_out.flatten())
            loss.backward()
        model.zero_grad(set_to_none=True)
    return timer.median()


def attention_example(model: Seq2SeqTransformer, data: DateData, source: str) -> tuple[torch.Tensor, str]:
    """Greedy-decode ``source`` and return the last decoder layer's cross-attention, (H, T, S) over the T
    output characters, and the output."""
    v = data.vocab
    b = data.batch([(source, "0000-00-00")])
    out = decoding.greedy(model.eval(), b.src, b.src_padding, TARGET_LENGTH + 1, v.BOS, v.EOS,
                          record_attention=True)
    text = v.decode(out.tokens[0])
    weights = torch.cat([step[-1] for step in out.attention], dim=2)[0]  # (H, steps, S)
    return weights[:, : len(text)], text


def run(backend: str, cfg: RunConfig, out: Path, seed: int, init: Path | None = None) -> dict[str, Any]:
    """Train, evaluate and measure one backend; writes the PNGs under ``out`` and returns the metrics."""
    generator = seed_everything(seed)
    del generator  # the batches come from a Python RNG seeded alike, so both backends see the same data
    data = DateData(seed)
    model = Seq2SeqTransformer(model_config(cfg.size, len(data.vocab)), backend)
    if init is not None:
        model.load_state_dict(torch.load(init, weights_only=True))
    trained = train(model, data, cfg, seed)
    test = data.held_out(data.test, seed, cfg.test_examples)
    accuracy = exact_match(model, data, test)
    beam_pairs = test[: cfg.beam_examples]
    beam_accuracy = exact_match(model, data, beam_pairs, beam=cfg.beam, alpha=cfg.length_alpha)
    speed = decoding_speed(model, data, test[: cfg.speed_examples], cfg.beam, cfg.length_alpha)
    peak = _peak_rss_mib()  # before the base-shape timing, which would dominate it
    out.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), out / "model.pt")  # the trained weights (--compare times decoding on them)
    example = "thursday, may the third, 1979" if cfg.size != "smoke" else "3 may 1979"
    weights, text = attention_example(model, data, example)
    plots.cross_attention_heatmaps(out / "cross_attention.png", weights, example, text,
                                   f"cross-attention of the last decoder layer ({backend}): {example!r} -> {text!r}")
    plots.training_curves(out / "curves.png", trained["losses"], trained["val_exact_match"],
                          f"date normalisation, {cfg.size} Transformer on {backend}")
    base = base_step_time(backend, data, cfg.base_batch_size, seed) if cfg.base_timing else None
    return {
        "backend": backend, "seed": seed, "run": asdict(cfg), "model": asdict(model.config),
        "parameters": sum(p.numel() for p in model.parameters()),
        "exact_match": accuracy, "test_examples": len(test),
        f"exact_match_beam{cfg.beam}": beam_accuracy, "beam_examples": len(beam_pairs),
        "final_loss": trained["losses"][-1][1], "step_time_s": trained["step_time_s"],
        "train_seconds": trained["train_seconds"], "decode_tokens_per_s": speed,
        "peak_rss_mib": peak, "base_fwd_bwd_step_s": base, "base_batch_size": cfg.base_batch_size,
        "attention_example": {"source": example, "output": text},
        "curves": {"loss": trained["losses"], "val_exact_match": trained["val_exact_match"]},
    }
