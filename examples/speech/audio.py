"""Waveform operations for the speech data: resampling, noise, mixing at an SNR, gain, placement in a clip.

All functions take and return float32 torch tensors of shape [..., num_samples] (any leading batch shape).
"""

from __future__ import annotations

import math
from functools import lru_cache

import torch


@lru_cache(maxsize=16)
def _sinc_kernel(orig: int, new: int, zero_crossings: int, rolloff: float, beta: float) -> tuple[torch.Tensor, int]:
    """Windowed-sinc weights for `resample`: [new, taps] (float64) and the left padding in input samples.

    orig, new: the rates divided by their gcd. Output sample k*new + j sits at input position
    k*orig + j*orig/new; row j holds the filter taken at the input samples around that position.
    """
    cutoff = rolloff * min(orig, new) / orig  # low-pass corner, in cycles per input sample x2 (1 = Nyquist)
    half_width = zero_crossings / cutoff  # in input samples: `zero_crossings` lobes of the sinc each side
    pad = math.ceil(half_width)
    taps = orig + 2 * pad
    phase = torch.arange(new, dtype=torch.float64)[:, None] * orig / new  # [new, 1]
    offset = torch.arange(taps, dtype=torch.float64)[None, :] - pad  # [1, taps]
    t = offset - phase  # input sample position minus output position, in input samples
    x = cutoff * t
    sinc = torch.where(x == 0, torch.ones_like(x), torch.sin(math.pi * x) / (math.pi * x))
    # Kaiser window over [-half_width, half_width]; zero outside.
    r = (t / half_width).clamp(-1.0, 1.0)
    i0_beta = torch.special.i0(torch.tensor(beta, dtype=torch.float64))
    window = torch.special.i0(beta * torch.sqrt(1.0 - r * r)) / i0_beta
    window = torch.where(t.abs() <= half_width, window, torch.zeros_like(window))
    weights = cutoff * sinc * window
    return weights, pad


def resample(
    wave: torch.Tensor,
    orig_rate: int,
    new_rate: int,
    zero_crossings: int = 24,
    rolloff: float = 0.94,
    beta: float = 10.0,
) -> torch.Tensor:
    """Band-limited resampling by a Kaiser-windowed sinc, evaluated exactly at every output instant.

    wave: float [..., n] at orig_rate. Returns [..., ceil(n * new_rate / orig_rate)] at new_rate.
    The low-pass corner sits at rolloff * min(orig_rate, new_rate) / 2 Hz; zero_crossings (sinc lobes each
    side) and beta (Kaiser shape) set how sharp the transition and how deep the stop band are.
    Samples outside the input are taken as zero.
    """
    if orig_rate == new_rate:
        return wave.clone()
    g = math.gcd(orig_rate, new_rate)
    orig, new = orig_rate // g, new_rate // g
    weights, pad = _sinc_kernel(orig, new, zero_crossings, rolloff, beta)
    lead = wave.shape[:-1]
    n = wave.shape[-1]
    out_len = -(-n * new // orig)
    blocks = -(-out_len // new)
    x = wave.reshape(-1, n)
    taps = weights.shape[-1]
    needed = (blocks - 1) * orig + taps
    x = torch.nn.functional.pad(x, (pad, max(0, needed - n - pad)))
    # Block k reads input samples k*orig .. k*orig + taps - 1 and gives outputs k*new .. k*new + new - 1:
    # one matrix product of the overlapping input windows [batch, blocks, taps] with the filters [taps, new].
    windows = x.unfold(-1, taps, orig)[:, :blocks]
    y = torch.matmul(windows, weights.to(wave.dtype).t())  # [batch, blocks, new]
    return y.reshape(x.shape[0], -1)[:, :out_len].reshape(*lead, out_len)


def power(wave: torch.Tensor) -> torch.Tensor:
    """Mean square over the last axis: [...] float."""
    return wave.pow(2).mean(dim=-1)


def gain_db(wave: torch.Tensor, db: float) -> torch.Tensor:
    """wave scaled by `db` decibels of amplitude."""
    return wave * (10.0 ** (db / 20.0))


def mix_at_snr(signal: torch.Tensor, noise: torch.Tensor, snr_db: float) -> torch.Tensor:
    """signal + noise scaled so that 10*log10(power(signal) / power(scaled noise)) == snr_db.

    signal, noise: [n] float (noise is cut or repeated to n). Power is the mean square over the whole
    signal, silences included. A silent noise is returned as is (nothing to scale).
    """
    n = signal.shape[-1]
    if noise.shape[-1] < n:
        noise = noise.repeat(math.ceil(n / noise.shape[-1]))
    noise = noise[..., :n]
    p_noise = power(noise)
    if float(p_noise) == 0.0:
        return signal.clone()
    scale = torch.sqrt(power(signal) / (p_noise * 10.0 ** (snr_db / 10.0)))
    return signal + scale * noise


def snr_db(signal: torch.Tensor, noise: torch.Tensor) -> float:
    """10*log10(power(signal) / power(noise)) over the last axis, for 1-D inputs."""
    return float(10.0 * torch.log10(power(signal.double()) / power(noise.double())))


def colored_noise(num_samples: int, exponent: float, generator: torch.Generator) -> torch.Tensor:
    """Gaussian noise with power spectrum ~ 1/f**exponent (0 white, 1 pink, 2 brown), unit RMS: [n] float32."""
    white = torch.randn(num_samples, generator=generator, dtype=torch.float64)
    if exponent != 0.0:
        spectrum = torch.fft.rfft(white)
        f = torch.arange(spectrum.shape[0], dtype=torch.float64)
        f[0] = 1.0  # keep DC finite; it is removed below
        spectrum = spectrum / f.pow(exponent / 2.0)
        spectrum[0] = 0.0
        white = torch.fft.irfft(spectrum, n=num_samples)
    return (white / white.pow(2).mean().sqrt()).float()


def trim_silence(wave: torch.Tensor, threshold_db: float = -40.0, frame: int = 160) -> torch.Tensor:
    """wave without its leading and trailing frames quieter than threshold_db below the loudest frame.

    wave: [n] float. Frames of `frame` samples are judged by their RMS; the kept span is whole frames.
    """
    n = wave.shape[-1]
    frames = max(1, n // frame)
    rms = wave[: frames * frame].reshape(frames, -1).pow(2).mean(dim=1).sqrt()
    peak = float(rms.max())
    if peak == 0.0:
        return wave[:0]
    loud = torch.nonzero(rms >= peak * 10.0 ** (threshold_db / 20.0)).flatten()
    first, last = int(loud[0]), int(loud[-1])
    end = n if last == frames - 1 else (last + 1) * frame
    return wave[first * frame : end]


def fade(wave: torch.Tensor, samples: int) -> torch.Tensor:
    """wave with raised-cosine ramps of `samples` at both ends (a cut mid-waveform otherwise clicks).

    wave: [n] float; returns a new tensor."""
    n = min(samples, wave.shape[-1] // 2)
    if n == 0:
        return wave.clone()
    ramp = 0.5 - 0.5 * torch.cos(torch.pi * (torch.arange(n, dtype=torch.float64) + 0.5) / n)
    out = wave.clone()
    out[:n] *= ramp.to(wave.dtype)
    out[-n:] *= ramp.flip(0).to(wave.dtype)
    return out


def place(clip: torch.Tensor, segment: torch.Tensor, start: int) -> torch.Tensor:
    """Adds segment into clip (in place) from sample `start`; the part past the clip's end is dropped.

    clip: [n] float, segment: [m] float. Returns clip.
    """
    if start < 0:
        raise ValueError(f"start must be >= 0, got {start}")
    stop = min(clip.shape[-1], start + segment.shape[-1])
    if stop > start:
        clip[start:stop] += segment[: stop - start]
    return clip


def random_starts(
    lengths: list[int], clip_len: int, min_gap: int, generator: torch.Generator, tries: int = 100
) -> list[int] | None:
    """Start samples for segments of `lengths` that fit in clip_len without overlapping (and min_gap apart).

    Rejection sampling, in the order given: each start is uniform over the clip; a draw that overlaps an
    earlier segment is drawn again, up to `tries` times. Returns None if some segment found no room.
    """
    taken: list[tuple[int, int]] = []
    starts = []
    for length in lengths:
        if length > clip_len:
            return None
        for _ in range(tries):
            s = int(torch.randint(0, clip_len - length + 1, (1,), generator=generator))
            if all(s + length + min_gap <= a or s >= b + min_gap for a, b in taken):
                break
        else:
            return None
        taken.append((s, s + length))
        starts.append(s)
    return starts
