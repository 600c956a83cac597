from __future__ import annotations

import os

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

    def rotates_in_kv_store(self, q: torch.Tensor, rotary) -> bool:
        """Whether forward(..., cos_sin=) can rotate q and k for `rotary` (a RotaryEmbedding) as the
        backend stores k and v: the Triton backend's store kernel does both in one launch, for rotary over
        the whole head. VLMSERVE_ROTARY_IN_KV_STORE=0: never (the rotary kernel, then the store)."""
        if not getattr(self.backend, "rotates_in_kv_store", False) or not q.is_cuda \
                or rotary.rotary_dim != self.head_dim or os.environ.get("VLMSERVE_ROTARY_IN_KV_STORE") == "0":
            return False
        from vlmserve.layers.layernorm import fused_kernels_enabled
        return fused_kernels_enabled()

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                meta: AttentionMetadata, cos_sin: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """q: [T, Hq*D], k, v: [T, Hkv*D] -> [T, Hq*D]. cos_sin: from RotaryEmbedding.lookup, to rotate q and k
        by first (in place), where rotates_in_kv_store says so."""
        T = q.shape[0]
        q = q.view(T, self.num_heads, self.head_dim)
        k = k.view(T, self.num_kv_heads, self.head_dim)
        v = v.view(T, self.num_kv_heads, self.head_dim)
        if cos_sin is None:
            out = self.backend.forward(self, q, k, v, self.kv_cache, meta)
        else:
            out = self.backend.forward(self, q, k, v, self.kv_cache, meta, cos_sin=cos_sin)
        return out.reshape(T, self.num_heads * self.head_dim)
