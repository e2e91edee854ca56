"""Writes a few examples of the speech data to look at and listen to.

    PYTHONPATH=. python -m examples.speech.preview --out DIR [--cache DIR] [--count 4]

DIR gets recogniser_<i>.wav (with the transcript in recogniser.txt), trigger_<i>.wav (trigger times in
trigger.txt), recogniser.png (the log-mel of one utterance) and trigger.png (the log-mel of one clip above its
label track).
"""

from __future__ import annotations

import argparse
import wave
from pathlib import Path

import torch

from . import datasets, features


def write_wav(path: Path, samples: torch.Tensor, sample_rate: int = datasets.SAMPLE_RATE) -> None:
    """16-bit mono WAV of samples: float [n] in [-1, 1)."""
    pcm = (samples.clamp(-1.0, 32767 / 32768) * 32768.0).round().to(torch.int16)
    with wave.open(str(path), "wb") as f:
        f.setnchannels(1)
        f.setsampwidth(2)
        f.setframerate(sample_rate)
        f.writeframes(pcm.numpy().astype("<i2").tobytes())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="directory to write into")
    parser.add_argument("--cache", default=None, help=f"cache directory (default {datasets.default_cache_dir()})")
    parser.add_argument("--count", type=int, default=4, help="utterances and clips to write")
    parser.add_argument("--split", choices=["train", "test"], default="train")
    args = parser.parse_args(argv)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rec = datasets.recogniser_set(datasets.RecogniserConfig(split=args.split, num_utterances=args.count), args.cache)
    trig = datasets.trigger_set(datasets.TriggerConfig(split=args.split, num_clips=args.count), args.cache)

    lines = []
    for i in range(len(rec)):
        write_wav(out / f"recogniser_{i}.wav", rec.wave(i))
        lines.append(f"recogniser_{i}.wav\t{rec.voices[i]}\t{rec.texts[i]}")
    (out / "recogniser.txt").write_text("\n".join(lines) + "\n")
    lines = []
    for i in range(len(trig)):
        write_wav(out / f"trigger_{i}.wav", trig.wave(i))
        rate = datasets.SAMPLE_RATE
        words = ", ".join(f"{w} {s / rate:.2f}-{e / rate:.2f}s" for w, s, e in trig.words[i])
        lines.append(f"trigger_{i}.wav\t{trig.voices[i]}\t{words}")
    (out / "trigger.txt").write_text("\n".join(lines) + "\n")

    hop_s = features.HOP_LENGTH / datasets.SAMPLE_RATE
    mel = rec.features(0)
    fig, ax = plt.subplots(figsize=(8, 3))
    ax.imshow(mel.T.numpy(), origin="lower", aspect="auto", extent=(0, mel.shape[0] * hop_s, 0, mel.shape[1]))
    ax.set(title=f'"{rec.texts[0]}" ({rec.voices[0]})', xlabel="seconds", ylabel="mel bin")
    fig.tight_layout()
    fig.savefig(out / "recogniser.png", dpi=100)
    plt.close(fig)

    clip = max(range(len(trig)), key=lambda i: len(trig.trigger_ends[i]))  # the one with most triggers
    mel = trig.features(clip)
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(10, 4), sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    top.imshow(mel.T.numpy(), origin="lower", aspect="auto", extent=(0, mel.shape[0] * hop_s, 0, mel.shape[1]))
    for word, s, _ in trig.words[clip]:
        top.text(s / datasets.SAMPLE_RATE, 75, word, color="white", fontsize=8, va="top")
    top.set(title=f"trigger clip {clip} ({trig.voices[clip]})", ylabel="mel bin")
    bottom.plot(torch.arange(trig.labels.shape[1]) * hop_s, trig.labels[clip].numpy(), drawstyle="steps-post")
    bottom.set(xlabel="seconds", ylabel="label", ylim=(-0.1, 1.1))
    fig.tight_layout()
    fig.savefig(out / "trigger.png", dpi=100)
    plt.close(fig)
    print(f"wrote {len(rec)} utterances, {len(trig)} clips and two spectrograms to {out}")


if __name__ == "__main__":
    main()
