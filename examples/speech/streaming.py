"""Streaming inference for the trigger-word detector: feed log-mel frames as they come, get the probabilities
of the output frames they complete.

The detector is causal, so a stream needs only what the previous chunks left: each convolution's unconsumed
input frames and each attention layer's keys and values (`detector_model.DetectorState`). A chunk's queries
attend to the cached keys and the new ones with bottom-right causal alignment; the outputs equal the offline
pass over the whole sequence (up to float rounding), for any chunk sizes.
"""

from __future__ import annotations

import torch

from .detector_model import DetectorState, TriggerDetector


class StreamingDetector:
    """Wraps a trained `TriggerDetector` (put in eval mode) for chunked inference.

    >>> stream = StreamingDetector(model)
    >>> for chunk in chunks:             # float32 [n, 80] (or [B, n, 80]) log-mel frames, any n >= 0
    ...     probs = stream.push(chunk)   # float32 [m] (or [B, m]): the output frames completed so far
    """

    def __init__(self, model: TriggerDetector) -> None:
        self.model = model.eval()
        self.state: DetectorState | None = None
        self.frames_in = 0
        self.frames_out = 0

    def reset(self) -> None:
        """Start a new stream: forget the cache."""
        self.state = None
        self.frames_in = self.frames_out = 0

    @property
    def cached_keys(self) -> int:
        """How many key/value positions each attention layer holds (the output frames so far)."""
        if self.state is None or not self.state.kv:
            return 0
        return self.state.kv[0][0].shape[2]

    @torch.no_grad()
    def push(self, feats: torch.Tensor) -> torch.Tensor:
        """feats: float32 [n, n_mels] or [B, n, n_mels], the next frames of the stream(s) -> sigmoid
        probabilities float32 [m] or [B, m] of the output frames these frames complete (m may be 0)."""
        single = feats.dim() == 2
        x = feats[None] if single else feats
        if self.state is not None and x.shape[0] != self.state.conv[0].shape[0]:
            raise ValueError(f"batch of {x.shape[0]} streams, but this stream has {self.state.conv[0].shape[0]}")
        logits, self.state = self.model(x, self.state)
        self.frames_in += x.shape[1]
        self.frames_out += logits.shape[1]
        probs = torch.sigmoid(logits)
        return probs[0] if single else probs


def stream_in_chunks(model: TriggerDetector, feats: torch.Tensor, chunk: int) -> torch.Tensor:
    """Run `feats` float32 [B, T, n_mels] through a fresh stream `chunk` frames at a time; returns the
    probabilities float32 [B, T // downsample], concatenated."""
    stream = StreamingDetector(model)
    pieces = [stream.push(feats[:, i : i + chunk]) for i in range(0, feats.shape[1], chunk)]
    return torch.cat(pieces, dim=1)
