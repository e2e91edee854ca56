"""The trigger-word detector: a causal convolutional front end and causal self-attention layers, one sigmoid
output per frame.

Everything sees only the past, so the model runs streaming (`streaming.StreamingDetector`): each layer's
`forward` takes the state the previous chunk left (a convolution's unconsumed input frames, an attention
layer's keys and values) and returns the new state. With no state, `forward` is the ordinary offline pass.

The attention function is the only thing the backend changes (`set_backend`): ``seqfast`` calls
`seqfast.scaled_dot_product_attention`, ``torch`` calls `torch.nn.functional.scaled_dot_product_attention`,
with the same weights.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention.bias import causal_lower_right

import seqfast

from . import features

ATTENTION = {"seqfast": seqfast.scaled_dot_product_attention, "torch": F.scaled_dot_product_attention}


@dataclass(frozen=True)
class DetectorConfig:
    """Sizes of the detector. The front end downsamples by the product of `conv_strides`."""

    n_mels: int = features.N_MELS
    d_model: int = 96
    heads: int = 4
    layers: int = 3
    ffn: int = 192
    conv_kernel: int = 5
    conv_strides: tuple[int, ...] = (2, 2)
    dropout: float = 0.1

    @property
    def downsample(self) -> int:
        k = 1
        for s in self.conv_strides:
            k *= s
        return k


class CausalConv1d(nn.Module):
    """Conv1d that sees only the past: output j reads input frames j*s + s - K .. j*s + s - 1 (zeros before
    the start), so T input frames give T // s outputs and a stream can be fed any number of frames at a time.

    State: the input frames not consumed yet, float [B, C_in, n] (starts as K - s zeros)."""

    def __init__(self, c_in: int, c_out: int, kernel: int, stride: int) -> None:
        super().__init__()
        if kernel < stride:
            raise ValueError(f"kernel ({kernel}) must be at least the stride ({stride})")
        self.kernel, self.stride = kernel, stride
        self.conv = nn.Conv1d(c_in, c_out, kernel, stride)

    def initial_state(self, batch: int, like: torch.Tensor) -> torch.Tensor:
        return like.new_zeros(batch, self.conv.in_channels, self.kernel - self.stride)

    def forward(self, x: torch.Tensor, state: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """x: float [B, C_in, T] -> (float [B, C_out, T'], new state); T' = T // s with no state."""
        if state is None:
            state = self.initial_state(x.shape[0], x)
        x = torch.cat([state, x], dim=-1)
        n_out = (x.shape[-1] - self.kernel) // self.stride + 1 if x.shape[-1] >= self.kernel else 0
        y = self.conv(x[..., : (n_out - 1) * self.stride + self.kernel]) if n_out else x.new_zeros(
            x.shape[0], self.conv.out_channels, 0)
        return y, x[..., n_out * self.stride :]


class CausalSelfAttention(nn.Module):
    """Multi-head self-attention over the past: queries at positions P..P+T-1 attend to the P cached keys and
    values and to the new ones up to their own position (bottom-right causal alignment)."""

    def __init__(self, d_model: int, heads: int) -> None:
        super().__init__()
        if d_model % heads:
            raise ValueError(f"d_model ({d_model}) must be a multiple of heads ({heads})")
        self.heads = heads
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.out = nn.Linear(d_model, d_model)
        self.attention: Callable[..., torch.Tensor] = ATTENTION["seqfast"]

    def forward(self, x: torch.Tensor, past: tuple[torch.Tensor, torch.Tensor] | None = None
                ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """x: float [B, T, D]; past: keys and values [B, H, P, D / H] or None (P = 0).
        Returns float [B, T, D] and the keys and values [B, H, P + T, D / H]."""
        b, t, d = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4).unbind(0)
        if past is not None and past[0].shape[2]:
            k = torch.cat([past[0], k], dim=2)
            v = torch.cat([past[1], v], dim=2)
        if k.shape[2] == t:
            y = self.attention(q, k, v, is_causal=True)
        elif t == 1:  # one new query sees every key
            y = self.attention(q, k, v)
        else:  # queries after P cached keys: query i sees keys 0 .. P + i (both backends run it without a mask)
            y = self.attention(q, k, v, attn_mask=causal_lower_right(t, k.shape[2]))
        return self.out(y.transpose(1, 2).reshape(b, t, d)), (k, v)


class DetectorLayer(nn.Module):
    """Pre-norm transformer layer: x + attention(norm(x)), then x + feed-forward(norm(x))."""

    def __init__(self, cfg: DetectorConfig) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.d_model)
        self.attn = CausalSelfAttention(cfg.d_model, cfg.heads)
        self.norm2 = nn.LayerNorm(cfg.d_model)
        self.ffn = nn.Sequential(nn.Linear(cfg.d_model, cfg.ffn), nn.GELU(), nn.Dropout(cfg.dropout),
                                 nn.Linear(cfg.ffn, cfg.d_model))
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor, past: tuple[torch.Tensor, torch.Tensor] | None = None
                ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        a, kv = self.attn(self.norm1(x), past)
        x = x + self.drop(a)
        return x + self.drop(self.ffn(self.norm2(x))), kv


@dataclass
class DetectorState:
    """What a stream carries between chunks: each convolution's unconsumed input [B, C, n] and each attention
    layer's keys and values [B, H, P, D / H]."""

    conv: list[torch.Tensor]
    kv: list[tuple[torch.Tensor, torch.Tensor]]


class TriggerDetector(nn.Module):
    """Log-mel frames in, one trigger logit per `cfg.downsample` frames out.

    The input is normalised per mel bin by fixed statistics (`set_normalisation`, from the training set) so
    that a stream needs no look-ahead."""

    def __init__(self, cfg: DetectorConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.register_buffer("mean", torch.zeros(cfg.n_mels))
        self.register_buffer("std", torch.ones(cfg.n_mels))
        channels = [cfg.n_mels] + [cfg.d_model] * len(cfg.conv_strides)
        self.convs = nn.ModuleList(
            CausalConv1d(c_in, c_out, cfg.conv_kernel, s)
            for c_in, c_out, s in zip(channels[:-1], channels[1:], cfg.conv_strides)
        )
        self.layers = nn.ModuleList(DetectorLayer(cfg) for _ in range(cfg.layers))
        self.norm = nn.LayerNorm(cfg.d_model)
        self.head = nn.Linear(cfg.d_model, 1)

    def set_normalisation(self, feats: torch.Tensor) -> None:
        """feats: float [..., frames, n_mels]: the per-bin mean and standard deviation become the input scaling."""
        flat = feats.reshape(-1, feats.shape[-1]).double()
        self.mean.copy_(flat.mean(0).float())
        self.std.copy_(flat.std(0).clamp_min(1e-3).float())

    def forward(self, feats: torch.Tensor, state: DetectorState | None = None
                ) -> tuple[torch.Tensor, DetectorState]:
        """feats: float32 [B, T, n_mels] -> (logits float32 [B, T // downsample] with no state, the new state).

        With `state` (from a previous call), the frames continue that stream: the outputs are those the
        offline pass gives for these frames."""
        x = ((feats - self.mean) / self.std).transpose(1, 2)  # [B, n_mels, T]
        conv_states = []
        for i, conv in enumerate(self.convs):
            x, s = conv(x, None if state is None else state.conv[i])
            x = F.gelu(x)
            conv_states.append(s)
        x = x.transpose(1, 2)  # [B, T', D]
        if x.shape[1] == 0 and state is not None:  # too few frames for an output yet: the keys stay as they were
            return x.new_zeros(x.shape[0], 0), DetectorState(conv_states, state.kv)
        kvs = []
        for i, layer in enumerate(self.layers):
            x, kv = layer(x, None if state is None else state.kv[i])
            kvs.append(kv)
        return self.head(self.norm(x)).squeeze(-1), DetectorState(conv_states, kvs)

    def logits(self, feats: torch.Tensor) -> torch.Tensor:
        """The offline pass: float32 [B, T, n_mels] -> logits float32 [B, T // downsample]."""
        return self(feats)[0]


def set_backend(model: nn.Module, backend: str) -> nn.Module:
    """Make every attention layer of `model` call `backend`'s attention ("seqfast" or "torch"); returns model."""
    if backend not in ATTENTION:
        raise ValueError(f"backend must be one of {sorted(ATTENTION)}, got {backend!r}")
    for m in model.modules():
        if isinstance(m, CausalSelfAttention):
            m.attention = ATTENTION[backend]
    return model
