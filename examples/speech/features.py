"""Log-mel features: 80 bins, 25 ms Hann window, 10 ms hop at 16 kHz, by torch.stft.

The mel scale is HTK's: mel(f) = 2595 * log10(1 + f / 700). Filters are triangles in Hz between mel-spaced
edge frequencies, with peak 1 (no area normalisation), evaluated at the FFT bin frequencies.
"""

from __future__ import annotations

from functools import lru_cache

import torch

SAMPLE_RATE = 16000
WIN_LENGTH = 400  # 25 ms
HOP_LENGTH = 160  # 10 ms
N_FFT = 512  # the 400-sample window zero-padded to the next power of two
N_MELS = 80
LOG_FLOOR = 1e-6  # added before the log: silence gives log(1e-6) ~ -13.8 instead of -inf


def hz_to_mel(f: torch.Tensor | float) -> torch.Tensor:
    """HTK mel scale."""
    return 2595.0 * torch.log10(1.0 + torch.as_tensor(f, dtype=torch.float64) / 700.0)


def mel_to_hz(m: torch.Tensor | float) -> torch.Tensor:
    return 700.0 * (10.0 ** (torch.as_tensor(m, dtype=torch.float64) / 2595.0) - 1.0)


@lru_cache(maxsize=8)
def mel_filterbank(
    n_mels: int = N_MELS,
    n_fft: int = N_FFT,
    sample_rate: int = SAMPLE_RATE,
    f_min: float = 0.0,
    f_max: float | None = None,
) -> torch.Tensor:
    """Triangular HTK-mel filters: float32 [n_mels, n_fft // 2 + 1]; row m rises from edge m to 1 at edge m+1
    and falls to 0 at edge m+2, where the n_mels + 2 edges are equally spaced in mel from f_min to f_max
    (default sample_rate / 2)."""
    f_max = sample_rate / 2.0 if f_max is None else f_max
    edges = mel_to_hz(torch.linspace(float(hz_to_mel(f_min)), float(hz_to_mel(f_max)), n_mels + 2, dtype=torch.float64))
    bins = torch.arange(n_fft // 2 + 1, dtype=torch.float64) * sample_rate / n_fft  # [bins] Hz
    lower, center, upper = edges[:-2, None], edges[1:-1, None], edges[2:, None]  # [n_mels, 1]
    rising = (bins - lower) / (center - lower)
    falling = (upper - bins) / (upper - center)
    return torch.clamp(torch.minimum(rising, falling), min=0.0).float()


def num_frames(num_samples: int, hop_length: int = HOP_LENGTH) -> int:
    """Frames `log_mel` gives for num_samples (centred frames: frame t is centred on sample t * hop)."""
    return num_samples // hop_length + 1


def power_spectrogram(wave: torch.Tensor) -> torch.Tensor:
    """|STFT|^2: wave float [..., n] -> float32 [..., N_FFT // 2 + 1, num_frames(n)].

    Periodic Hann window of WIN_LENGTH samples centred in N_FFT; frames centred (reflect padding)."""
    lead = wave.shape[:-1]
    x = wave.reshape(-1, wave.shape[-1]).float()
    window = torch.hann_window(WIN_LENGTH, periodic=True, dtype=torch.float32, device=wave.device)
    spec = torch.stft(
        x, N_FFT, hop_length=HOP_LENGTH, win_length=WIN_LENGTH, window=window, center=True, pad_mode="reflect",
        return_complex=True,
    )
    p = spec.real.pow(2) + spec.imag.pow(2)
    return p.reshape(*lead, *p.shape[-2:])


def log_mel(wave: torch.Tensor) -> torch.Tensor:
    """log(mel power + LOG_FLOOR): wave float [..., n] at 16 kHz -> float32 [..., num_frames(n), N_MELS]."""
    p = power_spectrogram(wave)  # [..., bins, frames]
    fb = mel_filterbank().to(p.device)
    mel = torch.matmul(fb, p)  # [..., n_mels, frames]
    return torch.log(mel + LOG_FLOOR).transpose(-1, -2).contiguous()
