"""The CTC recogniser: convolutional subsampling (4x in time), a Transformer encoder, a linear layer over
characters, and its loss, for either backend.

The two backends build the same parameters in the same order from the same seed (seqfast's layers keep
torch's parameter names and initialisation), so a state dict moves between them unchanged:

- ``seqfast``: ``seqfast.nn.TransformerEncoderLayer`` and ``seqfast.ctc_loss_from_logits`` (log-softmax fused);
- ``torch``: ``torch.nn.TransformerEncoderLayer`` and ``F.ctc_loss`` after ``log_softmax``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..common import sinusoidal_positions
from . import vocabulary

NUM_CLASSES = len(vocabulary.CHARACTERS) + 1  # the characters and CTC's blank (0)


@dataclass(frozen=True)
class ModelConfig:
    """Sizes of the recogniser. The defaults are the example's default run."""

    n_mels: int = 80
    conv_channels: int = 32
    d_model: int = 144
    num_layers: int = 4
    num_heads: int = 4
    dim_feedforward: int = 576
    dropout: float = 0.1
    # Character distributions per encoder frame: 2 gives CTC 20 ms frames from the 40 ms encoder, for speech
    # that says nearly one character per 40 ms. Measured slower to train at 600 steps (see the README): off.
    outputs_per_frame: int = 1


def subsampled_lengths(frames: torch.Tensor) -> torch.Tensor:
    """Output frames of `ConvSubsampling` for inputs of `frames` frames (int64 [N]): two stride-2 convolutions
    with kernel 3 and padding 1, each giving floor((n - 1) / 2) + 1."""
    for _ in range(2):
        frames = torch.div(frames - 1, 2, rounding_mode="floor") + 1
    return frames


class ConvSubsampling(torch.nn.Module):
    """Two 3x3 stride-2 convolutions over (time, mel) with GELU, then a linear map to d_model: 4x fewer frames.

    forward(features float32 [N, T, n_mels], lengths int64 [N]) -> (float32 [N, T', d_model], int64 [N]),
    T' = subsampled_lengths(T). The first convolution's outputs past each utterance's end are zeroed, so a
    padded utterance gives the same valid frames as alone (otherwise GELU(bias) from the padding leaks into
    its last frame)."""

    def __init__(self, n_mels: int, channels: int, d_model: int) -> None:
        super().__init__()
        self.conv1 = torch.nn.Conv2d(1, channels, 3, stride=2, padding=1)
        self.conv2 = torch.nn.Conv2d(channels, channels, 3, stride=2, padding=1)
        mels_out = int(subsampled_lengths(torch.tensor(n_mels)))
        self.proj = torch.nn.Linear(channels * mels_out, d_model)

    def forward(self, features: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = F.gelu(self.conv1(features.unsqueeze(1)))  # [N, C, T1, M1]
        half = torch.div(lengths - 1, 2, rounding_mode="floor") + 1
        valid = torch.arange(x.shape[2], device=x.device)[None, :] < half[:, None]  # [N, T1]
        x = F.gelu(self.conv2(x * valid[:, None, :, None]))  # [N, C, T', M']
        n, c, t, m = x.shape
        return self.proj(x.permute(0, 2, 1, 3).reshape(n, t, c * m)), subsampled_lengths(lengths)



def encoder_layer_class(backend: str) -> type[torch.nn.TransformerEncoderLayer]:
    if backend == "seqfast":
        import seqfast.nn

        return seqfast.nn.TransformerEncoderLayer
    if backend == "torch":
        return torch.nn.TransformerEncoderLayer
    raise ValueError(f"backend must be 'seqfast' or 'torch', got {backend!r}")


class Recogniser(torch.nn.Module):
    """features float32 [N, T, n_mels] and their frame counts int64 [N] -> character logits float32
    [k T', N, NUM_CLASSES] (time first, as CTC takes them) and the output frame counts int64 [N], where
    k = config.outputs_per_frame: the head's linear layer gives k consecutive output frames per encoder frame.

    Pre-norm encoder layers (stable from scratch without a long warm-up) with a final LayerNorm."""

    def __init__(self, config: ModelConfig, backend: str) -> None:
        super().__init__()
        self.config = config
        self.backend = backend
        self.subsample = ConvSubsampling(config.n_mels, config.conv_channels, config.d_model)
        layer = encoder_layer_class(backend)
        self.layers = torch.nn.ModuleList(
            layer(config.d_model, config.num_heads, config.dim_feedforward, config.dropout, activation=F.gelu,
                  batch_first=True, norm_first=True)
            for _ in range(config.num_layers)
        )
        self.norm = torch.nn.LayerNorm(config.d_model)
        self.dropout = torch.nn.Dropout(config.dropout)
        self.head = torch.nn.Linear(config.d_model, config.outputs_per_frame * NUM_CLASSES)

    def forward(self, features: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x, out_lengths = self.subsample(features, lengths)
        # Content scaled by sqrt(d_model) before the unit-amplitude positions are added: the subsampler's
        # outputs start near 0.3 in size, and unscaled the positions would swamp them early in training.
        x = self.dropout(x * math.sqrt(self.config.d_model) + sinusoidal_positions(x.shape[1], x.shape[2]).to(x))
        padding = torch.arange(x.shape[1], device=x.device)[None, :] >= out_lengths[:, None]  # True = pad
        for layer in self.layers:
            x = layer(x, src_key_padding_mask=padding)
        k = self.config.outputs_per_frame
        logits = self.head(self.norm(x))  # [N, T', k * C]: output frames k t .. k t + k - 1 of encoder frame t
        logits = logits.reshape(x.shape[0], x.shape[1] * k, NUM_CLASSES)
        return logits.transpose(0, 1), out_lengths * k


def ctc_loss(backend: str, logits: torch.Tensor, targets: torch.Tensor, input_lengths: torch.Tensor,
             target_lengths: torch.Tensor) -> torch.Tensor:
    """Mean CTC loss (per target character, then over the batch, as torch's ``reduction="mean"``) of logits
    float32 [T, N, C]; targets int64 [N, S] padded; lengths int64 [N]. Blank is 0."""
    if backend == "seqfast":
        import seqfast

        return seqfast.ctc_loss_from_logits(logits, targets, input_lengths, target_lengths, blank=0,
                                            reduction="mean", zero_infinity=True)
    return F.ctc_loss(logits.log_softmax(-1), targets, input_lengths, target_lengths, blank=0, reduction="mean",
                      zero_infinity=True)
