"""Paged decode attention on the CPU: a C++ kernel (csrc/paged_decode_cpu.cpp, built on first use by
cpu_build) and its torch reference. Where the build fails, `available()` is False and callers use
the torch path."""
from __future__ import annotations

import torch

from vlmserve.kernels.cpu_build import load_cpu_extension


def _load():
    return load_cpu_extension("vlmserve_paged_decode_cpu", "paged_decode_cpu.cpp")


def available() -> bool:
    return _load() is not None


def paged_decode_attention(q, k_cache, v_cache, block_tables, seq_lens, scale: float,
                           sliding_window: int | None = None) -> torch.Tensor:
    """q: [B, Hq, D]; k_cache, v_cache: [num_blocks, block_size, Hkv, D]; block_tables [B, max_blocks];
    seq_lens [B] (the query is the token at seq_len - 1). Returns [B, Hq, D]."""
    return _load().paged_decode_attention(q, k_cache, v_cache, block_tables, seq_lens, float(scale),
                                          int(sliding_window or 0))


def reference_paged_decode_attention(q, k_cache, v_cache, block_tables, seq_lens, scale: float,
                                     sliding_window: int | None = None) -> torch.Tensor:
    B, Hq, D = q.shape
    _, bs, Hkv, _ = k_cache.shape
    out = torch.empty_like(q)
    for b in range(B):
        L = int(seq_lens[b])
        nb = -(-L // bs)
        k = k_cache[block_tables[b, :nb].long()].reshape(-1, Hkv, D)[:L].float()
        v = v_cache[block_tables[b, :nb].long()].reshape(-1, Hkv, D)[:L].float()
        start = max(0, L - sliding_window) if sliding_window else 0
        k, v = k[start:], v[start:]
        k = k.repeat_interleave(Hq // Hkv, dim=1)
        v = v.repeat_interleave(Hq // Hkv, dim=1)
        scores = torch.einsum("hd,thd->ht", q[b].float(), k) * scale
        out[b] = torch.einsum("ht,thd->hd", scores.softmax(-1), v).to(q.dtype)
    return out
