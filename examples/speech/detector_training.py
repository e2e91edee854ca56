"""Training, inference and step timing of the trigger-word detector.

Training draws random crops of the training clips (a crop starts on an output frame, so its labels are a slice
of the clip's), masks random mel bands (SpecAugment's frequency masking), and minimises per-frame binary
cross-entropy on the logits. The same code trains either backend: only
the attention function differs (`detector_model.set_backend`).
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from examples.common import StepTimer, progress

from . import detection_metrics
from .detector_data import ClipBatch
from .detector_model import TriggerDetector, set_backend


@dataclass(frozen=True)
class TrainConfig:
    """steps of `batch` crops of `crop_frames` feature frames (a multiple of the model's downsampling; 0 =
    whole clips); AdamW with linear warm-up then cosine decay; validation every `eval_every` steps."""

    steps: int = 1000
    batch: int = 16
    crop_frames: int = 600
    lr: float = 2e-3
    weight_decay: float = 0.01
    warmup: int = 50
    clip_grad: float = 1.0
    eval_every: int = 100
    pos_weight: float = 2.0  # the labels are ~5 % ones: weigh them up so that the output rises on them
    freq_masks: int = 2  # per crop, bands of up to freq_mask_bins mel bins set to their training mean
    freq_mask_bins: int = 8


@dataclass
class History:
    """Curves of a training run: (step, value) points."""

    loss: list[tuple[float, float]] = field(default_factory=list)
    val_loss: list[tuple[float, float]] = field(default_factory=list)
    val_detection: list[tuple[float, float]] = field(default_factory=list)
    val_false_alarms: list[tuple[float, float]] = field(default_factory=list)
    step_seconds: list[float] = field(default_factory=list)


def _crops(data: ClipBatch, idx: torch.Tensor, crop_frames: int, k: int, gen: torch.Generator
           ) -> tuple[torch.Tensor, torch.Tensor]:
    """Features float32 [b, crop_frames, 80] and labels float32 [b, crop_frames // k] of random crops."""
    if crop_frames <= 0 or crop_frames >= data.features.shape[1]:
        return data.features[idx], data.labels[idx]
    out_frames = crop_frames // k
    starts = torch.randint(0, data.labels.shape[1] - out_frames + 1, (len(idx),), generator=gen)
    feats = torch.stack([data.features[i, s * k : s * k + crop_frames] for i, s in zip(idx.tolist(), starts.tolist())])
    labels = torch.stack([data.labels[i, s : s + out_frames] for i, s in zip(idx.tolist(), starts.tolist())])
    return feats, labels


def mask_frequencies(feats: torch.Tensor, mean: torch.Tensor, masks: int, max_bins: int, gen: torch.Generator
                     ) -> torch.Tensor:
    """SpecAugment's frequency masking: in each example of float32 [B, T, n_mels], `masks` bands of 0..max_bins
    bins replaced by the per-bin `mean` [n_mels] (what the model's normalisation maps to 0). Returns a copy."""
    out = feats.clone()
    n_mels = feats.shape[-1]
    for b in range(feats.shape[0]):
        for _ in range(masks):
            width = int(torch.randint(0, max_bins + 1, (), generator=gen))
            start = int(torch.randint(0, n_mels - width + 1, (), generator=gen))
            out[b, :, start : start + width] = mean[start : start + width]
    return out


def loss_fn(logits: torch.Tensor, labels: torch.Tensor, pos_weight: float) -> torch.Tensor:
    """Mean per-frame binary cross-entropy of logits float32 [B, T] against labels float32 [B, T]."""
    return F.binary_cross_entropy_with_logits(logits, labels, pos_weight=logits.new_tensor(pos_weight))


def _lr_scale(step: int, cfg: TrainConfig) -> float:
    if step < cfg.warmup:
        return (step + 1) / cfg.warmup
    progress_ = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress_)))


def make_optimizer(model: TriggerDetector, cfg: TrainConfig) -> tuple[torch.optim.Optimizer, Callable[[int], None]]:
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)

    def set_step(step: int) -> None:
        for group in opt.param_groups:
            group["lr"] = cfg.lr * _lr_scale(step, cfg)

    return opt, set_step


def train_step(model: TriggerDetector, opt: torch.optim.Optimizer, feats: torch.Tensor, labels: torch.Tensor,
               cfg: TrainConfig) -> float:
    """One optimiser step on a batch; returns the loss."""
    loss = loss_fn(model.logits(feats), labels, cfg.pos_weight)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip_grad)
    opt.step()
    return loss.item()


@torch.no_grad()
def predict(model: TriggerDetector, feats: torch.Tensor, batch: int = 16) -> torch.Tensor:
    """The offline pass in eval mode: features float32 [N, T, 80] -> probabilities float32 [N, T // k]."""
    was_training = model.training
    model.eval()
    out = torch.cat([torch.sigmoid(model.logits(feats[i : i + batch])) for i in range(0, feats.shape[0], batch)])
    model.train(was_training)
    return out


def evaluate(model: TriggerDetector, data: ClipBatch, rules: detection_metrics.DetectionRules,
             cfg: TrainConfig, threshold: float = 0.5) -> tuple[float, detection_metrics.Score]:
    """Validation loss over whole clips and the detection score at `threshold`."""
    probs = predict(model, data.features, cfg.batch)
    loss = float(F.binary_cross_entropy(probs.clamp(1e-7, 1 - 1e-7), data.labels,
                                        weight=1.0 + (cfg.pos_weight - 1.0) * data.labels))
    return loss, detection_metrics.score(probs, data.trigger_ends, data.seconds, threshold, rules)


def train(model: TriggerDetector, train_data: ClipBatch, val_data: ClipBatch, cfg: TrainConfig,
          rules: detection_metrics.DetectionRules, gen: torch.Generator, desc: str = "train") -> History:
    """Train `model` in place; returns the curves and the wall-clock of every step."""
    k = model.cfg.downsample
    if cfg.crop_frames % k:
        raise ValueError(f"crop_frames ({cfg.crop_frames}) must be a multiple of the downsampling ({k})")
    opt, set_step = make_optimizer(model, cfg)
    history = History()
    timer = StepTimer(warmup=3)
    model.train()
    n = len(train_data)
    order = torch.randperm(n, generator=gen)
    cursor = 0
    bar = progress(range(cfg.steps), total=cfg.steps, desc=desc)
    running = None
    start = time.perf_counter()
    for step in bar:
        if cursor + cfg.batch > n:
            order, cursor = torch.randperm(n, generator=gen), 0
        idx = order[cursor : cursor + min(cfg.batch, n)]
        cursor += cfg.batch
        feats, labels = _crops(train_data, idx, cfg.crop_frames, k, gen)
        if cfg.freq_masks:
            feats = mask_frequencies(feats, model.mean, cfg.freq_masks, cfg.freq_mask_bins, gen)
        set_step(step)
        with timer:
            loss = train_step(model, opt, feats, labels, cfg)
        running = loss if running is None else 0.95 * running + 0.05 * loss
        history.loss.append((step + 1, loss))
        bar.set_postfix(loss=f"{running:.4f}", steps_per_s=f"{(step + 1) / (time.perf_counter() - start):.2f}")
        if len(val_data) and ((step + 1) % cfg.eval_every == 0 or step + 1 == cfg.steps):
            val_loss, s = evaluate(model, val_data, rules, cfg)
            history.val_loss.append((step + 1, val_loss))
            history.val_detection.append((step + 1, s.detection_rate))
            history.val_false_alarms.append((step + 1, s.false_alarms_per_hour))
            model.train()
    history.step_seconds = timer.seconds
    model.eval()
    return history


def time_backends(model: TriggerDetector, train_data: ClipBatch, test_data: ClipBatch, cfg: TrainConfig,
                  rounds: int, gen: torch.Generator, backends: tuple[str, ...] = ("seqfast", "torch")
                  ) -> dict[str, dict[str, float]]:
    """Median wall-clock of a training step (on a copy of `model`, so the trained weights stay) and of an
    inference batch (`cfg.batch` whole test clips, no gradient), for each backend, taken in alternation
    (round r times every backend once) so that both see the same machine load. Returns
    {backend: {"train_step_s", "inference_batch_s", and the process CPU seconds of each: "train_step_cpu_s",
    "inference_batch_cpu_s"}}: on a shared machine the wall-clock includes waiting for a core."""
    k = model.cfg.downsample
    copies = {b: set_backend(copy.deepcopy(model), b) for b in backends}
    opts = {b: make_optimizer(copies[b], cfg)[0] for b in backends}
    idx = torch.arange(min(cfg.batch, len(train_data)))
    feats, labels = _crops(train_data, idx, cfg.crop_frames, k, gen)
    test_feats = test_data.features[: cfg.batch]
    train_timers = {b: StepTimer(warmup=1) for b in backends}
    infer_timers = {b: StepTimer(warmup=1) for b in backends}
    for _ in range(rounds + 1):
        for b in backends:
            copies[b].train()
            with train_timers[b]:
                train_step(copies[b], opts[b], feats, labels, cfg)
            copies[b].eval()
            with infer_timers[b], torch.no_grad():
                copies[b].logits(test_feats)
    return {b: {"train_step_s": train_timers[b].median(), "inference_batch_s": infer_timers[b].median(),
                "train_step_cpu_s": train_timers[b].cpu_median(), "inference_batch_cpu_s": infer_timers[b].cpu_median()}
            for b in backends}
