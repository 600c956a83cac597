"""Paged decode attention on the CPU: a C++ kernel (csrc/paged_decode_cpu.cpp) built on first use
with torch's extension builder and cached per machine, and its torch reference. If the build fails
(no compiler, say), `available()` is False and callers use the torch path."""
from __future__ import annotations

import logging
import os
import threading

import torch

logger = logging.getLogger(__name__)
_SOURCE = os.path.join(os.path.dirname(__file__), "csrc", "paged_decode_cpu.cpp")
_lock = threading.Lock()
_module = None
_failed = False


def _load():
    global _module, _failed
    with _lock:
        if _module is not None or _failed:
            return _module
        if os.environ.get("VLMSERVE_DISABLE_CPU_KERNELS"):
            _failed = True
            return None
        try:
            from torch.utils.cpp_extension import load
            _module = load(name="vlmserve_paged_decode_cpu", sources=[_SOURCE],
                           extra_cflags=["-O3", "-march=native", "-fopenmp"], extra_ldflags=["-fopenmp"],
                           verbose=False)
        except Exception as e:  # no compiler or headers: fall back to torch
            _failed = True
            logger.warning("the CPU paged-attention kernel could not be built (%s); using the torch path", e)
        return _module


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
