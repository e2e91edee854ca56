"""Training and evaluation of the CTC recogniser: run sizes, features, length-sorted batches, SpecAugment,
the AdamW loop with warm-up and cosine decay, greedy evaluation with timing.

Everything random in the data path (batch order, masks) comes from generators seeded by the run's seed, so
the two backends see the same batches in the same order; only dropout draws from torch's global generator.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace

import torch

from examples.common import StepTimer, progress

from . import ctc_metrics, datasets, vocabulary
from .recogniser_model import ModelConfig, Recogniser, ctc_loss


@dataclass(frozen=True)
class RunSize:
    """Data, model and schedule of one run size (smoke, quick, default)."""

    train: datasets.RecogniserConfig
    valid: datasets.RecogniserConfig  # unseen utterances of the training voices: the curves
    test: datasets.RecogniserConfig  # held-out voices: the reported figures
    model: ModelConfig
    steps: int
    batch_size: int
    peak_lr: float
    warmup_steps: int
    eval_every: int
    weight_decay: float = 0.01
    clip_norm: float = 5.0


def _train(num: int) -> datasets.RecogniserConfig:
    # Digit strings weigh more than phrases: they are the target (CER <= 5 %), phrases teach the characters.
    return datasets.RecogniserConfig(split="train", num_utterances=num, seed=0, digit_fraction=0.6)


def _valid(num: int) -> datasets.RecogniserConfig:
    return datasets.RecogniserConfig(split="train", num_utterances=num, seed=1)  # another seed: other utterances


def _test(num: int) -> datasets.RecogniserConfig:
    return datasets.RecogniserConfig(split="test", num_utterances=num, seed=0)


# Sized for a busy 2-core CPU: a 384-wide feed-forward keeps a step of 32 utterances near 8 GFLOP. No dropout:
# the model underfits (see the README's measurements); SpecAugment and weight decay remain.
_MODEL = ModelConfig(conv_channels=16, d_model=144, num_layers=4, num_heads=4, dim_feedforward=384, dropout=0.0)
SIZES = {
    "smoke": RunSize(_train(48), _valid(16), _test(16),
                     ModelConfig(conv_channels=8, d_model=64, num_layers=2, num_heads=2, dim_feedforward=128),
                     steps=40, batch_size=8, peak_lr=2e-3, warmup_steps=5, eval_every=20),
    "quick": RunSize(_train(1500), _valid(200), _test(500), _MODEL, steps=600, batch_size=32, peak_lr=4e-3,
                     warmup_steps=100, eval_every=100),
    "default": RunSize(_train(4000), _valid(200), _test(500), _MODEL, steps=2000, batch_size=32, peak_lr=4e-3,
                       warmup_steps=200, eval_every=250),
}


# ------------------------------------------------------------------------------------------------ data


@dataclass
class Utterances:
    """Normalised features and targets of a set. features: float32 [frames_i, 80] each; targets: int64
    [len(text_i)] each (labels 1..27); texts: the transcripts."""

    features: list[torch.Tensor]
    targets: list[torch.Tensor]
    texts: list[str]

    def __len__(self) -> int:
        return len(self.texts)

    def seconds(self) -> float:
        return sum(f.shape[0] for f in self.features) / 100.0  # 10 ms frames


def normalise(features: torch.Tensor) -> torch.Tensor:
    """Per-utterance, per-bin mean and variance normalisation of log-mel [frames, 80]: removes the set's
    random gain (a constant in the log domain) and the noise colour's tilt on average."""
    mean = features.mean(0, keepdim=True)
    std = features.std(0, keepdim=True) if features.shape[0] > 1 else torch.ones_like(mean)
    return (features - mean) / (std + 1e-5)


def load_utterances(config: datasets.RecogniserConfig, cache_dir: str | None = None) -> Utterances:
    """The set of `config` (synthesised or from the cache) as normalised features and CTC targets."""
    data = datasets.recogniser_set(config, cache_dir)
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # thousands of small STFTs: one thread is faster on a busy machine
    try:
        feats = [normalise(data.features(i)) for i in range(len(data))]
    finally:
        torch.set_num_threads(before)
    return Utterances(feats, [data.targets(i) for i in range(len(data))], list(data.texts))


def is_digit_string(text: str) -> bool:
    return all(word in vocabulary.DIGITS for word in text.split())


@dataclass
class Batch:
    """features float32 [N, T, 80] zero-padded; lengths int64 [N]; targets int64 [N, S] zero-padded;
    target_lengths int64 [N]; index: the utterances' positions in their set."""

    features: torch.Tensor
    lengths: torch.Tensor
    targets: torch.Tensor
    target_lengths: torch.Tensor
    index: list[int]


def collate(data: Utterances, index: list[int]) -> Batch:
    feats = [data.features[i] for i in index]
    targets = [data.targets[i] for i in index]
    return Batch(
        torch.nn.utils.rnn.pad_sequence(feats, batch_first=True),
        torch.tensor([f.shape[0] for f in feats]),
        torch.nn.utils.rnn.pad_sequence(targets, batch_first=True),
        torch.tensor([t.shape[0] for t in targets]),
        list(index),
    )


def length_sorted_batches(data: Utterances, batch_size: int, generator: torch.Generator,
                          pool: int = 50) -> Iterator[list[int]]:
    """Endless batches of indices: each epoch shuffles, sorts pools of `pool` batches by length (little
    padding), cuts them into batches and shuffles the batches."""
    lengths = torch.tensor([f.shape[0] for f in data.features])
    while True:
        order = torch.randperm(len(data), generator=generator)
        batches = []
        for start in range(0, len(order), batch_size * pool):
            chunk = order[start : start + batch_size * pool]
            chunk = chunk[torch.argsort(lengths[chunk], stable=True)].tolist()
            batches += [chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size)]
        for b in torch.randperm(len(batches), generator=generator).tolist():
            yield batches[b]


def spec_augment(batch: Batch, generator: torch.Generator, freq_masks: int = 2, freq_width: int = 15,
                 time_masks: int = 2, time_fraction: float = 0.05) -> torch.Tensor:
    """SpecAugment without warping: zero `freq_masks` bands of up to `freq_width` mel bins and `time_masks`
    spans of up to `time_fraction` of each utterance's frames. Returns a new [N, T, 80] tensor."""
    x = batch.features.clone()
    n, _, mels = x.shape
    draws = torch.rand(n, freq_masks + time_masks, 2, generator=generator).tolist()
    for i, length in enumerate(batch.lengths.tolist()):
        for k in range(freq_masks):
            width = int(draws[i][k][0] * (freq_width + 1))
            start = int(draws[i][k][1] * (mels - width + 1))
            x[i, :, start : start + width] = 0.0
        max_width = int(time_fraction * length)
        for k in range(freq_masks, freq_masks + time_masks):
            width = int(draws[i][k][0] * (max_width + 1))
            start = int(draws[i][k][1] * (length - width + 1))
            x[i, start : start + width, :] = 0.0
    return x


# ---------------------------------------------------------------------------------------------- training


def warmup_cosine(warmup_steps: int, total_steps: int) -> Callable[[int], float]:
    """Learning-rate factor: linear from 1/warmup to 1 over the warm-up, then cosine down to 2 % at the end."""
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress_ = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return 0.02 + 0.98 * 0.5 * (1.0 + math.cos(math.pi * progress_))
    return factor


@dataclass
class Evaluation:
    """Greedy transcripts of a set and their error rates; digits: the digit-string utterances only."""

    hypotheses: list[str]
    rates: ctc_metrics.ErrorRates
    digits: ctc_metrics.ErrorRates
    phrases: ctc_metrics.ErrorRates
    batch_seconds: list[float] = field(default_factory=list)  # wall-clock per inference batch
    batch_cpu_seconds: list[float] = field(default_factory=list)  # process CPU time per inference batch


def eval_batches(model: Recogniser, data: Utterances, batch_size: int = 32) -> Iterator[Batch]:
    """Every utterance of `data` once, in length-sorted batches, with `model` in eval mode meanwhile (restored
    after the last batch)."""
    was_training = model.training
    model.eval()
    order = sorted(range(len(data)), key=lambda i: data.features[i].shape[0])
    try:
        for start in range(0, len(order), batch_size):
            yield collate(data, order[start : start + batch_size])
    finally:
        model.train(was_training)


@torch.no_grad()
def evaluate(model: Recogniser, data: Utterances, batch_size: int = 32) -> Evaluation:
    """Greedy decoding of every utterance of `data` in length-sorted batches (eval mode, restored after)."""
    hyps: list[str] = [""] * len(data)
    seconds, cpu_seconds = [], []
    for batch in eval_batches(model, data, batch_size):
        begin, cpu_begin = time.perf_counter(), time.process_time()
        logits, out_lengths = model(batch.features, batch.lengths)
        texts = ctc_metrics.greedy_transcripts(logits, out_lengths)
        seconds.append(time.perf_counter() - begin)
        cpu_seconds.append(time.process_time() - cpu_begin)
        for i, text in zip(batch.index, texts):
            hyps[i] = text
    return Evaluation(hyps, *rates_by_kind(data.texts, hyps), seconds, cpu_seconds)


def rates_by_kind(texts: list[str], hyps: list[str]) -> tuple[ctc_metrics.ErrorRates, ...]:
    """Corpus error rates of `hyps` against `texts`: all utterances, the digit strings, the phrases."""
    digit = [i for i, t in enumerate(texts) if is_digit_string(t)]
    phrase = [i for i, t in enumerate(texts) if not is_digit_string(t)]
    return (ctc_metrics.error_rates(texts, hyps),
            ctc_metrics.error_rates([texts[i] for i in digit], [hyps[i] for i in digit]),
            ctc_metrics.error_rates([texts[i] for i in phrase], [hyps[i] for i in phrase]))


@dataclass
class TrainResult:
    model: Recogniser
    losses: list[tuple[int, float]]  # (step, training loss)
    valid: list[tuple[int, float, float]]  # (step, CER, WER) on the validation set
    step_timer: StepTimer
    train_seconds: float


def build_model(config: ModelConfig, backend: str, seed: int) -> Recogniser:
    """The recogniser with weights drawn from `seed` alone: the same values for either backend."""
    torch.manual_seed(seed)
    return Recogniser(config, backend)


def train(size: RunSize, backend: str, train_set: Utterances, valid_set: Utterances, seed: int,
          steps: int | None = None, show_progress: bool = True) -> TrainResult:
    """Train a fresh recogniser for `steps` (default: the size's) with AdamW, warm-up + cosine decay,
    gradient clipping and SpecAugment; validate every `eval_every` steps and at the end."""
    steps = size.steps if steps is None else steps
    size = replace(size, steps=steps)
    model = build_model(size.model, backend, seed)
    model.train()
    decay = [p for n, p in model.named_parameters() if p.ndim > 1]
    no_decay = [p for n, p in model.named_parameters() if p.ndim <= 1]
    optimiser = torch.optim.AdamW([{"params": decay, "weight_decay": size.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=size.peak_lr, betas=(0.9, 0.98))
    schedule = torch.optim.lr_scheduler.LambdaLR(optimiser, warmup_cosine(size.warmup_steps, steps))
    order_gen = torch.Generator().manual_seed(seed)
    mask_gen = torch.Generator().manual_seed(seed + 1)
    torch.manual_seed(seed + 2)  # dropout's stream starts from the same state for either backend
    batches = length_sorted_batches(train_set, size.batch_size, order_gen)
    timer = StepTimer()
    losses: list[tuple[int, float]] = []
    valid: list[tuple[int, float, float]] = []
    running = None
    start = time.perf_counter()
    steps_range = range(1, steps + 1)
    bar = progress(steps_range, total=steps, desc=f"train ({backend})") if show_progress else steps_range
    for step in bar:
        batch = collate(train_set, next(batches))
        features = spec_augment(batch, mask_gen)
        with timer:
            logits, out_lengths = model(features, batch.lengths)
            loss = ctc_loss(backend, logits, batch.targets, out_lengths, batch.target_lengths)
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), size.clip_norm)
            optimiser.step()
        schedule.step()
        value = float(loss.detach())
        losses.append((step, value))
        running = value if running is None else 0.95 * running + 0.05 * value
        if step % size.eval_every == 0 or step == steps:
            ev = evaluate(model, valid_set)
            valid.append((step, ev.rates.cer, ev.rates.wer))
        if show_progress:
            postfix = {"loss": f"{running:.3f}", "lr": f"{schedule.get_last_lr()[0]:.1e}"}
            if valid:
                postfix["val_cer"] = f"{valid[-1][1]:.3f}"
            bar.set_postfix(postfix)
    return TrainResult(model, losses, valid, timer, time.perf_counter() - start)
