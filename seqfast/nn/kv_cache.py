"""Keys and values kept across decoding steps, attended with the lower-right causal alignment.

Incremental (token by token, or chunk by chunk) decoding computes keys and values once per position and keeps
them: each step's new queries attend to everything cached so far plus themselves. With ``Lq`` new queries and
``Lk`` keys in all, query ``i`` of the step sits at position ``Lk - Lq + i`` and may see keys ``j <= i + Lk - Lq``:
torch's ``causal_lower_right(Lq, Lk)``, which seqfast runs as a kernel mode (no mask tensor).
"""

from __future__ import annotations

import torch

from seqfast.functional import scaled_dot_product_attention


class KVCache:
    """Preallocated (B, H, capacity, D) key and value buffers that grow along the sequence.

    >>> cache = KVCache(batch=2, heads=8, capacity=512, head_dim=64, dtype=torch.float32)
    >>> out = cache.attend(q, k, v)   # q, k, v (2, 8, Lstep, 64): this step's queries, keys, values

    ``attend`` appends ``k`` / ``v`` and returns attention of ``q`` over every cached position, causally aligned
    at the bottom right (the same result as the full causal pass restricted to these rows). Buffers are allocated
    once; the cached keys are views into them (last dim contiguous, as the kernels read them).
    """

    def __init__(self, batch: int, heads: int, capacity: int, head_dim: int, value_dim: int | None = None,
                 dtype: torch.dtype = torch.float32, device: torch.device | str | None = None) -> None:
        if min(batch, heads, capacity, head_dim) <= 0:
            raise ValueError(f"KVCache sizes must be positive, got batch={batch}, heads={heads}, "
                             f"capacity={capacity}, head_dim={head_dim}")
        self.keys = torch.empty((batch, heads, capacity, head_dim), dtype=dtype, device=device)
        self.values = torch.empty((batch, heads, capacity, value_dim or head_dim), dtype=dtype, device=device)
        self.length = 0

    @property
    def capacity(self) -> int:
        return self.keys.shape[2]

    def reset(self) -> None:
        """Forget every cached position (the buffers are kept)."""
        self.length = 0

    def append(self, key: torch.Tensor, value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store (B, H, L, D) ``key`` and (B, H, L, Dv) ``value`` after the cached positions; returns the cached
        keys and values so far, (B, H, length, D) and (B, H, length, Dv) views."""
        steps = key.shape[2]
        if key.shape[:2] != self.keys.shape[:2] or value.shape[2] != steps:
            raise ValueError(f"key {tuple(key.shape)} and value {tuple(value.shape)} do not fit a cache of "
                             f"{tuple(self.keys.shape)}")
        end = self.length + steps
        if end > self.capacity:
            raise ValueError(f"KVCache is full: {self.length} cached + {steps} new > capacity {self.capacity}")
        # Detached: a cache serves inference; gradients through earlier steps would need their graphs kept.
        self.keys[:, :, self.length:end] = key.detach()
        self.values[:, :, self.length:end] = value.detach()
        self.length = end
        return self.keys[:, :, :end], self.values[:, :, :end]

    def attend(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scale: float | None = None,
               enable_gqa: bool = False) -> torch.Tensor:
        """Append this step's ``key`` / ``value`` and attend ``query`` (B, Hq, Lstep, D) over the whole cache with
        lower-right causal alignment; returns (B, Hq, Lstep, Dv)."""
        # Imported here: torch.nn.attention.bias loads torch._dynamo (about 2 s), which importing seqfast should not.
        from torch.nn.attention.bias import causal_lower_right

        keys, values = self.append(key, value)
        bias = causal_lower_right(query.shape[2], keys.shape[2])
        return scaled_dot_product_attention(query, keys, values, attn_mask=bias, scale=scale, enable_gqa=enable_gqa)

    def reorder(self, index: torch.Tensor) -> None:
        """Row ``i`` of the cached positions becomes row ``index[i]`` of before, in place: (batch,) int64
        ``index``. Beam search calls it after each step so every surviving hypothesis keeps its parent's
        keys and values."""
        if index.shape != (self.keys.shape[0],):
            raise ValueError(f"reorder index must have shape ({self.keys.shape[0]},), got {tuple(index.shape)}")
        n = self.length
        self.keys[:, :, :n] = self.keys[index, :, :n]
        self.values[:, :, :n] = self.values[index, :, :n]
