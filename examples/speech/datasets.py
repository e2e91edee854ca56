"""The two speech datasets of the examples, synthesised, deterministic for a seed, cached on disk.

- `recogniser_set`: utterances of digit strings and short phrases with their transcripts (CTC targets), one
  speaker each, random rate and pitch, coloured noise at a random SNR, random gain.
- `trigger_set`: fixed-length clips of background (coloured noise and babble: other synthesised speech),
  distractor words and a few occurrences of a trigger word (0-3 by default) at random times, with frame labels that
  are 1 in a fixed window just after each trigger ends.

Speakers are split by voice variant (`voice_split`): the variants of the test split are never heard in the
training split, in any accent. A set is stored under the cache directory in a file named by a hash of its
configuration, the data version and the espeak-ng version; asking again loads it instead of synthesising.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from . import audio, features, synth, vocabulary

DATA_VERSION = 1  # bump when generation changes: old cache files are then ignored
SAMPLE_RATE = features.SAMPLE_RATE
_SPLITS = {"train": 0, "test": 1}


def default_cache_dir() -> Path:
    """$SEQFAST_EXAMPLES_CACHE, else ~/.cache/seqfast-examples."""
    env = os.environ.get("SEQFAST_EXAMPLES_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "seqfast-examples"


# ----------------------------------------------------------------------------------------------- voices


@dataclass(frozen=True)
class VoiceSplit:
    train: tuple[synth.Voice, ...]
    test: tuple[synth.Voice, ...]

    def voices(self, split: str) -> tuple[synth.Voice, ...]:
        return {"train": self.train, "test": self.test}[split]


def voice_split(test_fraction: float = 0.2, seed: int = 0) -> VoiceSplit:
    """Every English accent x every variant, split by variant: a seeded `test_fraction` of the variants
    (never the plain voice, variant "") are the test speakers, in all accents; the rest are training."""
    accents = synth.list_accents("en")
    variants = synth.list_variants()
    order = np.random.default_rng(seed).permutation(len(variants))
    num_test = round(test_fraction * len(variants))
    test_variants = {variants[i] for i in order[:num_test]}
    train_variants = [""] + [v for v in variants if v not in test_variants]
    train = tuple(synth.Voice(a, v) for v in train_variants for a in accents)
    test = tuple(synth.Voice(a, v) for v in sorted(test_variants) for a in accents)
    return VoiceSplit(train, test)


# ------------------------------------------------------------------------------------------ cache files


def _words_hash(words: tuple[str, ...]) -> str:
    return hashlib.sha256(" ".join(words).encode()).hexdigest()


# Fields added to a configuration after its first cached sets, with the value that makes the old sets: at that
# value the field stays out of the cache key, so those sets keep their files.
_ADDED_FIELDS = {"near_trigger_fraction": 0.0}


def _cache_key(kind: str, config: object) -> str:
    """What names a set's cache file: its configuration (less added fields at their old value), the data
    version, the espeak-ng version and the word lists it draws from."""
    fields = {k: v for k, v in asdict(config).items() if k not in _ADDED_FIELDS or v != _ADDED_FIELDS[k]}
    key_fields = {
        "kind": kind,
        "config": fields,
        "data_version": DATA_VERSION,
        "espeak": synth.library_version(),
        "words": _words_hash(vocabulary.DIGITS + vocabulary.WORDS),
    }
    if fields.get("near_trigger_fraction"):
        key_fields["near_trigger_words"] = _words_hash(vocabulary.NEAR_TRIGGER_WORDS)
    return json.dumps(key_fields, sort_keys=True)


def _cache_path(kind: str, config: object, cache_dir: Path | None) -> Path:
    digest = hashlib.sha256(_cache_key(kind, config).encode()).hexdigest()[:16]
    directory = default_cache_dir() if cache_dir is None else Path(cache_dir)
    return directory / f"{kind}-{config.split}-{digest}.pt"


def _save(path: Path, payload: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    torch.save(payload, tmp)
    os.replace(tmp, path)  # a reader never sees a half-written file


@contextlib.contextmanager
def _one_torch_thread() -> Iterator[None]:
    """Assembly is thousands of small tensor ops: on a busy machine torch's thread pool makes each one ~100x
    slower than one thread does (measured on a loaded 2-core box), so it runs on one and restores the count."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _to_int16(wave: torch.Tensor) -> torch.Tensor:
    return (wave.clamp(-1.0, 32767 / 32768) * 32768.0).round().to(torch.int16)


def _rms_normalised(wave: torch.Tensor, db: float) -> torch.Tensor:
    rms = float(audio.power(wave).sqrt())
    return wave if rms == 0.0 else wave * (0.1 / rms * 10.0 ** (db / 20.0))


def _resampled(waves: list[np.ndarray]) -> list[torch.Tensor]:
    rate = synth.sample_rate()
    return [audio.resample(torch.from_numpy(w), rate, SAMPLE_RATE) for w in waves]


def _rng(seed: int, split: str, index: int) -> np.random.Generator:
    return np.random.default_rng([seed, _SPLITS[split], index])


def _check_split(split: str) -> None:
    if split not in _SPLITS:
        raise ValueError(f"split must be one of {sorted(_SPLITS)}, got {split!r}")


# ------------------------------------------------------------------------------------------- recogniser


@dataclass(frozen=True)
class RecogniserConfig:
    """What `recogniser_set` makes. Ranges are inclusive (low, high) and drawn uniformly per utterance."""

    split: str = "train"
    num_utterances: int = 1000
    seed: int = 0
    digit_fraction: float = 0.5  # the rest are phrases of vocabulary words
    digit_count: tuple[int, int] = (3, 8)
    phrase_words: tuple[int, int] = (2, 5)
    rate: tuple[int, int] = (130, 220)  # words per minute
    pitch: tuple[int, int] = (25, 75)
    snr_db: tuple[float, float] = (10.0, 30.0)
    gain_db: tuple[float, float] = (-12.0, 0.0)  # after the speech is scaled to RMS 0.1
    pad_seconds: tuple[float, float] = (0.05, 0.4)  # silence (then noise) before and after the speech
    test_fraction: float = 0.2
    split_seed: int = 0


@dataclass
class SpeechSet:
    """Utterances and their transcripts. waves: int16 [total] (x / 32768 is the signal), utterance i is
    waves[offsets[i]:offsets[i + 1]] at SAMPLE_RATE; texts, voices: [n] str."""

    waves: torch.Tensor
    offsets: torch.Tensor
    texts: list[str]
    voices: list[str]
    path: Path | None = None
    generated: bool = False  # True when this call synthesised it, False when it came from the cache

    def __len__(self) -> int:
        return len(self.texts)

    def wave(self, i: int) -> torch.Tensor:
        """float32 [n_i] in [-1, 1)."""
        return self.waves[int(self.offsets[i]) : int(self.offsets[i + 1])].float() / 32768.0

    def features(self, i: int) -> torch.Tensor:
        """log-mel float32 [frames_i, 80]."""
        return features.log_mel(self.wave(i))

    def targets(self, i: int) -> torch.Tensor:
        """CTC labels of the transcript: int64 [len(text)], values 1..27 (0 is the blank)."""
        return torch.tensor(vocabulary.encode(self.texts[i]), dtype=torch.int64)


def _recogniser_text(rng: np.random.Generator, cfg: RecogniserConfig) -> str:
    if rng.random() < cfg.digit_fraction:
        count = int(rng.integers(cfg.digit_count[0], cfg.digit_count[1] + 1))
        words = [vocabulary.DIGITS[i] for i in rng.integers(0, len(vocabulary.DIGITS), count)]
    else:
        count = int(rng.integers(cfg.phrase_words[0], cfg.phrase_words[1] + 1))
        words = [vocabulary.WORDS[i] for i in rng.integers(0, len(vocabulary.WORDS), count)]
    return " ".join(words)


def _recogniser_utterance(wave: torch.Tensor, plan: dict) -> torch.Tensor:
    before, after = (round(s * SAMPLE_RATE) for s in plan["pad"])
    clean = torch.nn.functional.pad(_rms_normalised(wave, 0.0), (before, after))  # speech at RMS 0.1
    gen = torch.Generator().manual_seed(plan["noise_seed"])
    noise = audio.colored_noise(clean.shape[-1], plan["noise_exponent"], gen)
    return _to_int16(audio.gain_db(audio.mix_at_snr(clean, noise, plan["snr"]), plan["gain"]))


def recogniser_set(
    config: RecogniserConfig, cache_dir: Path | str | None = None, workers: int | None = None
) -> SpeechSet:
    """The recogniser utterances of `config`, from the cache if there, else synthesised (in `workers`
    processes) and stored. Deterministic: the same config gives the same samples on any machine with the same
    espeak-ng version."""
    _check_split(config.split)
    path = _cache_path("recogniser", config, None if cache_dir is None else Path(cache_dir))
    if path.exists():
        d = torch.load(path, weights_only=True)
        return SpeechSet(d["waves"], d["offsets"], d["texts"], d["voices"], path=path, generated=False)

    voices = voice_split(config.test_fraction, config.split_seed).voices(config.split)
    requests, plans = [], []
    for i in range(config.num_utterances):
        rng = _rng(config.seed, config.split, i)
        text = _recogniser_text(rng, config)
        voice = voices[int(rng.integers(0, len(voices)))]
        rate = int(rng.integers(config.rate[0], config.rate[1] + 1))
        pitch = int(rng.integers(config.pitch[0], config.pitch[1] + 1))
        requests.append(synth.SynthRequest(text, voice, rate, pitch, seed=int(rng.integers(1, 2**31))))
        plans.append(
            {
                "snr": float(rng.uniform(*config.snr_db)),
                "gain": float(rng.uniform(*config.gain_db)),
                "pad": (float(rng.uniform(*config.pad_seconds)), float(rng.uniform(*config.pad_seconds))),
                "noise_exponent": float(rng.choice([0.0, 1.0, 2.0])),
                "noise_seed": int(rng.integers(0, 2**62)),
            }
        )
    with _one_torch_thread():
        speech = _resampled(synth.synthesize_many(requests, workers))
        pieces = [_recogniser_utterance(wave, plan) for wave, plan in zip(speech, plans)]
    lengths = torch.tensor([0] + [p.shape[-1] for p in pieces], dtype=torch.int64)
    payload = {
        "waves": torch.cat(pieces),
        "offsets": torch.cumsum(lengths, 0),
        "texts": [r.text for r in requests],
        "voices": [r.voice.name for r in requests],
    }
    _save(path, payload)
    return SpeechSet(**payload, path=path, generated=True)


# ----------------------------------------------------------------------------------------- trigger word


@dataclass(frozen=True)
class TriggerConfig:
    """What `trigger_set` makes. Ranges are inclusive (low, high), drawn uniformly per clip or per word.

    Levels: each foreground word (trigger or distractor) is scaled to RMS 0.1 then by word_gain_db; each
    babble sentence to RMS 0.1 then by babble_db; the noise to RMS 0.1 then by -noise_snr_db; the clip by
    clip_gain_db. Labels: frames of LABEL_HOP samples, 1 for label_window frames starting with the first
    frame after a trigger's last sample."""

    split: str = "train"
    num_clips: int = 200
    seed: int = 0
    clip_seconds: float = 10.0
    trigger_word: str = vocabulary.TRIGGER_WORD
    triggers: tuple[int, int] = (0, 3)
    distractors: tuple[int, int] = (0, 4)
    babble_sentences: tuple[int, int] = (1, 3)
    babble_words: tuple[int, int] = (6, 12)
    babble_db: tuple[float, float] = (-24.0, -10.0)
    noise_snr_db: tuple[float, float] = (10.0, 30.0)
    word_gain_db: tuple[float, float] = (-6.0, 0.0)
    clip_gain_db: tuple[float, float] = (-12.0, 0.0)
    rate: tuple[int, int] = (130, 220)
    pitch: tuple[int, int] = (25, 75)
    min_gap_seconds: float = 0.1
    near_trigger_fraction: float = 0.0  # each distractor is a vocabulary.NEAR_TRIGGER_WORDS word with this chance
    label_window: int = 50  # frames: 0.5 s at a 10 ms hop
    label_hop: int = features.HOP_LENGTH  # samples per label frame
    test_fraction: float = 0.2
    split_seed: int = 0


@dataclass
class TriggerSet:
    """Clips with trigger labels. waves: int16 [num_clips, clip_samples] (x / 32768 is the signal);
    trigger_ends: per clip, the sample index just past each trigger (sorted); labels: uint8
    [num_clips, frames] with frames = features.num_frames(clip_samples); words: per clip, (word, start, end)
    of every foreground word."""

    waves: torch.Tensor
    labels: torch.Tensor
    trigger_ends: list[list[int]]
    words: list[list[tuple[str, int, int]]]
    voices: list[str]
    label_window: int
    label_hop: int
    path: Path | None = None
    generated: bool = False

    def __len__(self) -> int:
        return self.waves.shape[0]

    def wave(self, i: int) -> torch.Tensor:
        return self.waves[i].float() / 32768.0

    def features(self, i: int) -> torch.Tensor:
        """log-mel float32 [frames, 80], aligned with labels[i]."""
        return features.log_mel(self.wave(i))


def trigger_labels(ends: list[int], num_frames: int, hop: int, window: int) -> torch.Tensor:
    """uint8 [num_frames]: 1 on frames e // hop + 1 .. e // hop + window for each end sample e, else 0.

    Frame t is the one centred on sample t * hop (as `features.log_mel`), so the first labelled frame is the
    first whose centre lies after the trigger's last sample e - 1. A model that outputs one frame per k
    feature frames can call this with hop * k."""
    labels = torch.zeros(num_frames, dtype=torch.uint8)
    for e in ends:
        first = e // hop + 1
        labels[first : first + window] = 1
    return labels


def _trigger_clip(
    config: TriggerConfig, i: int, plan: dict, speech: list[torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor, list[int], list[tuple[str, int, int]]]:
    """One clip from its plan: int16 wave [clip_samples], uint8 labels [frames], trigger ends, words."""
    clip_len = round(config.clip_seconds * SAMPLE_RATE)
    frames = features.num_frames(clip_len, config.label_hop)
    gap = round(config.min_gap_seconds * SAMPLE_RATE)
    tail = config.label_window * config.label_hop  # a trigger's label window stays inside the clip
    gen = torch.Generator().manual_seed(plan["torch_seed"])
    clip = audio.colored_noise(clip_len, plan["noise_exponent"], gen) * (0.1 * 10.0 ** (-plan["noise_snr"] / 20.0))
    for index, db, position in plan["babble"]:
        sentence = _rms_normalised(speech[index], db)
        offset = int(position * (clip_len + sentence.shape[-1])) - sentence.shape[-1]
        audio.place(clip, sentence[max(0, -offset) :], max(0, offset))
    fg = plan["fg"]
    ramp = round(0.005 * SAMPLE_RATE)
    segments = [audio.fade(audio.trim_silence(speech[index]), ramp) for _, index, _, _ in fg]
    lengths = [s.shape[-1] + (tail if is_trigger else 0) for s, (_, _, is_trigger, _) in zip(segments, fg)]
    starts = audio.random_starts(lengths, clip_len, gap, gen)
    if starts is None:  # no room for every word: keep the triggers only
        keep = [k for k, (_, _, is_trigger, _) in enumerate(fg) if is_trigger]
        starts = audio.random_starts([lengths[k] for k in keep], clip_len, gap, gen)
        if starts is None:
            raise RuntimeError(f"clip {i}: the triggers do not fit in {config.clip_seconds} s")
        segments = [segments[k] for k in keep]
        fg = [fg[k] for k in keep]
    ends, words = [], []
    for segment, start, (word, _, is_trigger, db) in zip(segments, starts, fg):
        audio.place(clip, _rms_normalised(segment, db), start)
        end = start + segment.shape[-1]
        words.append((word, start, end))
        if is_trigger:
            ends.append(end)
    ends.sort()
    wave = _to_int16(audio.gain_db(clip, plan["clip_gain"]))
    labels = trigger_labels(ends, frames, config.label_hop, config.label_window)
    return wave, labels, ends, sorted(words, key=lambda w: w[1])


def trigger_set(config: TriggerConfig, cache_dir: Path | str | None = None, workers: int | None = None) -> TriggerSet:
    """The trigger-word clips of `config`, from the cache if there, else synthesised and stored."""
    _check_split(config.split)
    if config.trigger_word in vocabulary.WORDS + vocabulary.NEAR_TRIGGER_WORDS:
        raise ValueError(f"trigger word {config.trigger_word!r} is also a distractor word")
    path = _cache_path("trigger", config, None if cache_dir is None else Path(cache_dir))
    if path.exists():
        d = torch.load(path, weights_only=True)
        words = [[(w, int(s), int(e)) for w, s, e in clip] for clip in d["words"]]
        return TriggerSet(
            d["waves"], d["labels"], d["trigger_ends"], words, d["voices"], config.label_window, config.label_hop,
            path=path, generated=False,
        )

    voices = voice_split(config.test_fraction, config.split_seed).voices(config.split)
    requests: list[synth.SynthRequest] = []
    plans = []
    for i in range(config.num_clips):
        rng = _rng(config.seed, config.split, i)
        speaker = voices[int(rng.integers(0, len(voices)))]
        fg = []  # (word, request index, is trigger, gain)
        num_triggers = int(rng.integers(config.triggers[0], config.triggers[1] + 1))
        num_distractors = int(rng.integers(config.distractors[0], config.distractors[1] + 1))
        chosen = [config.trigger_word] * num_triggers
        distractors = [vocabulary.WORDS[j] for j in rng.integers(0, len(vocabulary.WORDS), num_distractors)]
        if config.near_trigger_fraction > 0.0:  # drawn only then, so that the other sets keep their clips
            near = rng.integers(0, len(vocabulary.NEAR_TRIGGER_WORDS), num_distractors)
            swap = rng.random(num_distractors) < config.near_trigger_fraction
            distractors = [vocabulary.NEAR_TRIGGER_WORDS[j] if s else w for w, j, s in zip(distractors, near, swap)]
        chosen += distractors
        for word in chosen:
            rate = int(rng.integers(config.rate[0], config.rate[1] + 1))
            pitch = int(rng.integers(config.pitch[0], config.pitch[1] + 1))
            fg.append((word, len(requests), word == config.trigger_word, float(rng.uniform(*config.word_gain_db))))
            requests.append(synth.SynthRequest(word, speaker, rate, pitch, seed=int(rng.integers(1, 2**31))))
        babble = []  # (request index, gain, position in [0, 1))
        for _ in range(int(rng.integers(config.babble_sentences[0], config.babble_sentences[1] + 1))):
            count = int(rng.integers(config.babble_words[0], config.babble_words[1] + 1))
            text = " ".join(vocabulary.WORDS[j] for j in rng.integers(0, len(vocabulary.WORDS), count))
            voice = voices[int(rng.integers(0, len(voices)))]
            rate = int(rng.integers(config.rate[0], config.rate[1] + 1))
            pitch = int(rng.integers(config.pitch[0], config.pitch[1] + 1))
            babble.append((len(requests), float(rng.uniform(*config.babble_db)), float(rng.random())))
            requests.append(synth.SynthRequest(text, voice, rate, pitch, seed=int(rng.integers(1, 2**31))))
        plans.append(
            {
                "speaker": speaker.name,
                "fg": fg,
                "babble": babble,
                "noise_snr": float(rng.uniform(*config.noise_snr_db)),
                "noise_exponent": float(rng.choice([0.0, 1.0, 2.0])),
                "clip_gain": float(rng.uniform(*config.clip_gain_db)),
                "torch_seed": int(rng.integers(0, 2**62)),
            }
        )
    with _one_torch_thread():
        speech = _resampled(synth.synthesize_many(requests, workers))
        clips = [_trigger_clip(config, i, plan, speech) for i, plan in enumerate(plans)]
    waves = torch.stack([c[0] for c in clips])
    labels = torch.stack([c[1] for c in clips])
    all_ends = [c[2] for c in clips]
    all_words = [c[3] for c in clips]
    all_voices = [plan["speaker"] for plan in plans]
    payload = {"waves": waves, "labels": labels, "trigger_ends": all_ends, "words": all_words, "voices": all_voices}
    _save(path, payload)
    return TriggerSet(
        waves, labels, all_ends, all_words, all_voices, config.label_window, config.label_hop, path=path, generated=True
    )
