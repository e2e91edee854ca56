"""The Transformer encoder-decoder (Vaswani et al. 2017), on seqfast's layers or torch's.

The encoder is a stack of ``TransformerEncoderLayer``; the decoder a stack of ``TransformerDecoderLayer``
(``seqfast.nn``'s for ``backend="seqfast"``, ``torch.nn``'s for ``backend="torch"``). seqfast's layers
subclass torch's, so the two models have the same parameter names and ``state_dict`` loads either way.

Training and the uncached decoder run the layers' own ``forward`` over the whole target prefix with a
causal mask. That ``forward`` recomputes every earlier position at each new token, so incremental decoding
is :meth:`Seq2SeqTransformer.step`: the same layer computation written out on the layers' own parameters
(``self_attn.in_proj_weight``, ``multihead_attn.out_proj``, ``linear1``, ``norm1`` ...), with the
self-attention keys and values kept in one :class:`seqfast.nn.KVCache` per layer and the cross-attention
keys and values of the encoder output projected once per sequence.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention.bias import causal_lower_right

import seqfast
from seqfast.nn import KVCache

from ..common import sinusoidal_positions


@dataclass(frozen=True)
class ModelConfig:
    """Sizes; the defaults are the paper's base model."""

    vocab: int
    d_model: int = 512
    heads: int = 8
    encoder_layers: int = 6
    decoder_layers: int = 6
    d_ff: int = 2048
    dropout: float = 0.1
    share_embeddings: bool = False  # source, target embeddings and the output projection share one matrix
    max_len: int = 128


def small_config(vocab: int) -> ModelConfig:
    """CPU-friendly sizes that still learn the date task to the last character."""
    return ModelConfig(vocab, d_model=128, heads=4, encoder_layers=2, decoder_layers=2, d_ff=256)


def smoke_config(vocab: int) -> ModelConfig:
    return ModelConfig(vocab, d_model=32, heads=2, encoder_layers=1, decoder_layers=1, d_ff=64)


def base_config(vocab: int) -> ModelConfig:
    return ModelConfig(vocab)



def _torch_cached_attention(cache: KVCache, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    keys, values = cache.append(k, v)
    return F.scaled_dot_product_attention(q, keys, values, attn_mask=causal_lower_right(q.shape[2], keys.shape[2]))


@dataclass
class DecoderState:
    """What incremental decoding keeps between steps, for a batch of B rows.

    ``caches``: one self-attention :class:`KVCache` per decoder layer. ``cross``: per layer the encoder
    output's projected keys and values, each (B, H, S, head_dim). ``memory_mask``: (B, 1, 1, S) bool, True
    where a source position may be attended (seqfast's and torch SDPA's convention), or None.
    ``position``: how many target tokens were fed so far. ``attention``: when a list, each step appends
    the cross-attention probabilities of every layer, a list of (B, H, 1, S) tensors.
    """

    caches: list[KVCache]
    cross: list[tuple[torch.Tensor, torch.Tensor]]
    memory_mask: torch.Tensor | None
    position: int = 0
    attention: list[list[torch.Tensor]] | None = None

    def reorder(self, index: torch.Tensor) -> None:
        """Rows follow ``index`` (beam search); the cross keys/values are only reordered among rows of the same
        source, which hold equal values, so they are left as they are."""
        for cache in self.caches:
            cache.reorder(index)


class Seq2SeqTransformer(nn.Module):
    """Encoder-decoder over one shared character vocabulary (ids from :class:`dates.Vocabulary`).

    ``forward(src, src_padding, tgt_in)`` -> (N, T, vocab) float32 logits (teacher forcing): ``src`` (N, S)
    and ``tgt_in`` (N, T) int64 ids, ``src_padding`` (N, S) bool, True at padding.
    """

    def __init__(self, config: ModelConfig, backend: str = "seqfast", pad_id: int = 0) -> None:
        super().__init__()
        if backend not in ("seqfast", "torch"):
            raise ValueError(f"backend must be 'seqfast' or 'torch', got {backend!r}")
        self.config, self.backend = config, backend
        c = config
        self.src_embed = nn.Embedding(c.vocab, c.d_model, padding_idx=pad_id)
        self.tgt_embed = self.src_embed if c.share_embeddings else nn.Embedding(c.vocab, c.d_model)
        self.register_buffer("positions", sinusoidal_positions(c.max_len, c.d_model), persistent=False)
        self.embed_dropout = nn.Dropout(c.dropout)
        lib = seqfast.nn if backend == "seqfast" else torch.nn
        self.encoder_layers = nn.ModuleList(
            lib.TransformerEncoderLayer(c.d_model, c.heads, c.d_ff, c.dropout, batch_first=True)
            for _ in range(c.encoder_layers))
        self.decoder_layers = nn.ModuleList(
            lib.TransformerDecoderLayer(c.d_model, c.heads, c.d_ff, c.dropout, batch_first=True)
            for _ in range(c.decoder_layers))
        self.generator = nn.Linear(c.d_model, c.vocab)
        # Scaled by sqrt(d_model) when used (as the paper), so start them at unit size after scaling.
        for emb in {self.src_embed, self.tgt_embed}:
            nn.init.normal_(emb.weight, std=c.d_model ** -0.5)
            with torch.no_grad():
                emb.weight[pad_id].zero_()
        if c.share_embeddings:
            self.generator.weight = self.src_embed.weight

    def _embed(self, table: nn.Embedding, ids: torch.Tensor, start: int = 0) -> torch.Tensor:
        x = table(ids) * math.sqrt(self.config.d_model) + self.positions[start:start + ids.shape[1]]
        return self.embed_dropout(x)

    def encode(self, src: torch.Tensor, src_padding: torch.Tensor) -> torch.Tensor:
        """(N, S) ids, (N, S) bool padding -> (N, S, d_model) memory."""
        x = self._embed(self.src_embed, src)
        for layer in self.encoder_layers:
            x = layer(x, src_key_padding_mask=src_padding)
        return x

    def decode(self, tgt_in: torch.Tensor, memory: torch.Tensor, src_padding: torch.Tensor) -> torch.Tensor:
        """Every position at once, causally: (N, T) ids -> (N, T, vocab) logits."""
        T = tgt_in.shape[1]
        mask = nn.Transformer.generate_square_subsequent_mask(T, device=tgt_in.device)
        y = self._embed(self.tgt_embed, tgt_in)
        for layer in self.decoder_layers:
            y = layer(y, memory, tgt_mask=mask, memory_key_padding_mask=src_padding, tgt_is_causal=True)
        return self.generator(y)

    def forward(self, src: torch.Tensor, src_padding: torch.Tensor, tgt_in: torch.Tensor) -> torch.Tensor:
        return self.decode(tgt_in, self.encode(src, src_padding), src_padding)

    # Incremental decoding ------------------------------------------------------------------------------

    def _attention(self, q, k, v, mask):
        if self.backend == "seqfast":
            return seqfast.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        """(B, L, E) -> (B, H, L, E / H)."""
        return x.unflatten(-1, (self.config.heads, -1)).transpose(1, 2)

    def start(self, memory: torch.Tensor, src_padding: torch.Tensor, capacity: int,
              record_attention: bool = False) -> DecoderState:
        """A fresh decoding state for (B, S, d_model) ``memory``: empty caches of ``capacity`` positions and the
        cross-attention keys/values of every layer, projected once here."""
        B, S, E = memory.shape
        cross = []
        for layer in self.decoder_layers:
            w, b = layer.multihead_attn.in_proj_weight, layer.multihead_attn.in_proj_bias
            k, v = F.linear(memory, w[E:], b[E:]).chunk(2, dim=-1)
            cross.append((self._heads(k).contiguous(), self._heads(v).contiguous()))
        caches = [KVCache(B, self.config.heads, capacity, E // self.config.heads, dtype=memory.dtype,
                          device=memory.device) for _ in self.decoder_layers]
        mask = None if src_padding is None else ~src_padding[:, None, None, :]
        return DecoderState(caches, cross, mask, 0, [] if record_attention else None)

    def step(self, tokens: torch.Tensor, state: DecoderState) -> torch.Tensor:
        """Feed (B, L) new target ids (usually L = 1) after ``state.position`` earlier ones; returns their
        (B, L, vocab) logits, equal to :meth:`decode`'s rows for these positions. Inference only (no dropout)."""
        y = self._embed(self.tgt_embed, tokens, state.position)
        recorded: list[torch.Tensor] | None = None if state.attention is None else []
        for layer, cache, (ck, cv) in zip(self.decoder_layers, state.caches, state.cross, strict=True):
            y = self._layer_step(layer, y, cache, ck, cv, state.memory_mask, recorded)
        state.position += tokens.shape[1]
        if recorded is not None:
            state.attention.append(recorded)
        return self.generator(y)

    def _layer_step(self, layer, x, cache, ck, cv, memory_mask, recorded):
        E = x.shape[-1]
        sa, ca = layer.self_attn, layer.multihead_attn

        def self_block(h):
            q, k, v = (self._heads(t) for t in F.linear(h, sa.in_proj_weight, sa.in_proj_bias).chunk(3, dim=-1))
            if self.backend == "seqfast":
                o = cache.attend(q, k, v)
            else:
                o = _torch_cached_attention(cache, q, k, v)
            return sa.out_proj(o.transpose(1, 2).flatten(2))

        def cross_block(h):
            q = self._heads(F.linear(h, ca.in_proj_weight[:E], ca.in_proj_bias[:E]))
            o = self._attention(q, ck, cv, memory_mask)
            if recorded is not None:  # the probabilities, for the heat maps (the fused kernel keeps none)
                scores = q @ ck.transpose(-1, -2) / math.sqrt(q.shape[-1])
                if memory_mask is not None:
                    scores = scores.masked_fill(~memory_mask, float("-inf"))
                recorded.append(scores.softmax(-1))
            return ca.out_proj(o.transpose(1, 2).flatten(2))

        def ff_block(h):
            return layer.linear2(layer.activation(layer.linear1(h)))

        if layer.norm_first:
            x = x + self_block(layer.norm1(x))
            x = x + cross_block(layer.norm2(x))
            return x + ff_block(layer.norm3(x))
        x = layer.norm1(x + self_block(x))
        x = layer.norm2(x + cross_block(x))
        return layer.norm3(x + ff_block(x))


def twin(model: Seq2SeqTransformer, backend: str) -> Seq2SeqTransformer:
    """The same model (same weights, through ``state_dict``) on the other library's layers."""
    other = Seq2SeqTransformer(replace(model.config), backend)
    other.load_state_dict(model.state_dict())
    return other.train(model.training)
