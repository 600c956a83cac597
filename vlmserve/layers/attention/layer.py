from __future__ import annotations

import torch
from torch import nn

from vlmserve.layers.attention.backends import get_attention_backend
from vlmserve.layers.attention.metadata import AttentionMetadata


class Attention(nn.Module):
    """Multi-head attention of one layer over the paged KV cache. Holds no weights: the model
    projects q, k, v (and applies rotary), this layer caches k, v and attends."""

    def __init__(self, num_heads: int, head_dim: int, num_kv_heads: int, scale: float,
                 sliding_window: int | None = None):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = head_dim
        self.num_kv_heads = num_kv_heads
        self.scale = scale
        self.sliding_window = sliding_window
        self.kv_cache: torch.Tensor | None = None  # bound by the model runner
        self.backend = get_attention_backend()

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                meta: AttentionMetadata) -> torch.Tensor:
        """q: [T, Hq*D], k, v: [T, Hkv*D] -> [T, Hq*D]."""
        T = q.shape[0]
        q = q.view(T, self.num_heads, self.head_dim)
        k = k.view(T, self.num_kv_heads, self.head_dim)
        v = v.view(T, self.num_kv_heads, self.head_dim)
        out = self.backend.forward(self, q, k, v, self.kv_cache, meta)
        return out.reshape(T, self.num_heads * self.head_dim)
