"""Modules built on seqfast's kernels, with torch.nn's constructors and forward signatures."""

from seqfast.nn.ctc_loss import CTCLoss
from seqfast.nn.kv_cache import KVCache
from seqfast.nn.multihead_attention import MultiheadAttention
from seqfast.nn.transformer import (
    TransformerDecoderLayer,
    TransformerEncoderLayer,
    replace_attention,
    restore_attention,
)

__all__ = [
    "CTCLoss",
    "KVCache",
    "MultiheadAttention",
    "TransformerDecoderLayer",
    "TransformerEncoderLayer",
    "replace_attention",
    "restore_attention",
]
