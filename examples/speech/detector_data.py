"""The trigger-word detector's data: which synthesised sets a run uses, and their features and labels.

A run uses six sets of `datasets.trigger_set` clips: training (training voices), validation (training voices,
other clips) and validation background (training voices, no trigger word) which together pick the operating
point, test (held-out voices and noise) and background (held-out voices, no trigger word at all: false alarms
only) which give the reported figures. The sizes depend on the run: `smoke` (seconds, for tests), `quick`
(minutes) or `full`; the training clips on `train_data`: "plain" (distractors from the common words only),
"plain-x2" (twice as many such clips) or "hard-negatives" (the plain clips plus as many whose distractors are
half words that sound like the trigger word, `vocabulary.NEAR_TRIGGER_WORDS`).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from . import datasets, features

SIZES = ("smoke", "quick", "full")
TRAIN_DATA = ("plain", "plain-x2", "hard-negatives")
NEAR_TRIGGER_FRACTION = 0.5
# Clips per set (train, validation, validation background, test, background) for each run size. Training clips
# come in sets of the first size below; set j has seed s + _TRAIN_SEED_OFFSETS[j] (so the full run's first 1000
# are the same cache file whatever the total). A background clip is 10 s: 1440 are 4 hours.
_CLIPS = {
    "smoke": (24, 6, 4, 6, 4),
    "quick": (300, 40, 90, 100, 90),
    "full": (1000, 300, 720, 400, 1440),
}
_TRAIN_SETS = {"smoke": 1, "quick": 1, "full": 2}  # plain training sets of a run; x2 for the larger variants
_TRAIN_SEED_OFFSETS = (0, 3, 7, 8)
_NEAR_SEED_OFFSETS = (5, 6)


@dataclass(frozen=True)
class DetectorSets:
    """The `datasets.TriggerConfig` of each set of a run; the training clips may come in several sets."""

    train: tuple[datasets.TriggerConfig, ...]
    validation: datasets.TriggerConfig
    validation_background: datasets.TriggerConfig
    test: datasets.TriggerConfig
    background: datasets.TriggerConfig

    def items(self) -> list[tuple[str, tuple[datasets.TriggerConfig, ...]]]:
        return [("train", self.train), ("validation", (self.validation,)),
                ("validation_background", (self.validation_background,)), ("test", (self.test,)),
                ("background", (self.background,))]


def detector_sets(size: str, seed: int = 0, train_data: str = "hard-negatives") -> DetectorSets:
    """The set configurations of a run of `size` ("smoke", "quick" or "full") with training clips `train_data`
    (one of TRAIN_DATA). Smoke clips are 4 s with at most one trigger and two distractors, so that they
    synthesise in seconds."""
    if size not in SIZES:
        raise ValueError(f"size must be one of {SIZES}, got {size!r}")
    if train_data not in TRAIN_DATA:
        raise ValueError(f"train_data must be one of {TRAIN_DATA}, got {train_data!r}")
    n_train, n_val, n_val_background, n_test, n_background = _CLIPS[size]
    base = datasets.TriggerConfig(seed=seed)
    if size == "smoke":
        base = replace(base, clip_seconds=4.0, triggers=(0, 1), distractors=(0, 2), babble_sentences=(1, 1))
    plain = _TRAIN_SETS[size] * (2 if train_data == "plain-x2" else 1)
    train = [replace(base, split="train", num_clips=n_train, seed=seed + offset)
             for offset in _TRAIN_SEED_OFFSETS[:plain]]
    if train_data == "hard-negatives":
        train += [replace(base, split="train", num_clips=n_train, seed=seed + offset,
                          near_trigger_fraction=NEAR_TRIGGER_FRACTION)
                  for offset in _NEAR_SEED_OFFSETS[: _TRAIN_SETS[size]]]
    return DetectorSets(
        train=tuple(train),
        validation=replace(base, split="train", num_clips=n_val, seed=seed + 1),
        validation_background=replace(base, split="train", num_clips=n_val_background, seed=seed + 4,
                                      triggers=(0, 0)),
        test=replace(base, split="test", num_clips=n_test),
        background=replace(base, split="test", num_clips=n_background, seed=seed + 2, triggers=(0, 0)),
    )


@dataclass
class ClipBatch:
    """One set ready for the model. features: float32 [clips, frames, 80] log-mel; labels: float32
    [clips, frames // k] at the model's output rate; trigger_ends: per clip, sample ends of the triggers;
    seconds: clip duration in seconds."""

    features: torch.Tensor
    labels: torch.Tensor
    trigger_ends: list[list[int]]
    seconds: float
    words: list[list[tuple[str, int, int]]]  # per clip, (word, start, end) of every foreground word, for plots

    def __len__(self) -> int:
        return self.features.shape[0]


def load_clips(config: datasets.TriggerConfig, downsample: int, label_window: int,
               workers: int | None = None) -> ClipBatch:
    """The set of `config` (synthesised or from the cache) as features and labels for a model that outputs one
    frame per `downsample` feature frames; `label_window` is in output frames."""
    clips = datasets.trigger_set(config, workers=workers)
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # many small STFTs: one thread is faster on a busy machine (see datasets.py)
    try:
        feats = torch.stack([clips.features(i) for i in range(len(clips))]) if len(clips) else torch.zeros(0)
    finally:
        torch.set_num_threads(before)
    frames_out = feats.shape[1] // downsample
    hop = config.label_hop * downsample
    labels = torch.stack([trigger_labels_for(ends, frames_out, hop, label_window) for ends in clips.trigger_ends])
    return ClipBatch(feats, labels, clips.trigger_ends, config.clip_seconds, clips.words)


def load_sets(configs: tuple[datasets.TriggerConfig, ...], downsample: int, label_window: int,
              workers: int | None = None) -> ClipBatch:
    """`load_clips` of each configuration (same clip length), concatenated."""
    parts = [load_clips(c, downsample, label_window, workers) for c in configs]
    if len({p.seconds for p in parts}) != 1:
        raise ValueError("sets to concatenate must have one clip length")
    return ClipBatch(torch.cat([p.features for p in parts]), torch.cat([p.labels for p in parts]),
                     [e for p in parts for e in p.trigger_ends], parts[0].seconds, [w for p in parts for w in p.words])


def trigger_labels_for(ends: list[int], frames: int, hop: int, window: int) -> torch.Tensor:
    """float32 [frames]: `datasets.trigger_labels` at the model's output rate."""
    return datasets.trigger_labels(ends, frames, hop, window).float()


def num_feature_frames(config: datasets.TriggerConfig) -> int:
    return features.num_frames(round(config.clip_seconds * datasets.SAMPLE_RATE), config.label_hop)
