"""Attention backends. Each owns the layout of a layer's KV cache tensor and implements attention
of a flat batch (decodes first, then prefill chunks) over it. `TorchSDPABackend` is the portable
reference; GPU kernels register here and are tested against it."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from vlmserve.kernels import paged_attention_cpu


class TorchSDPABackend:
    name = "torch_sdpa"

    def __init__(self):
        # Reused gather buffers: allocating ~100 MB per layer per step costs more than the copy.
        self._workspace: dict[tuple, torch.Tensor] = {}

    def _buffer(self, key: str, numel: int, like: torch.Tensor) -> torch.Tensor:
        k = (key, like.dtype, like.device)
        buf = self._workspace.get(k)
        if buf is None or buf.numel() < numel:
            buf = torch.empty(max(numel, int(buf.numel() * 1.5) if buf is not None else 0),
                              dtype=like.dtype, device=like.device)
            self._workspace[k] = buf
        return buf[:numel]

    @staticmethod
    def kv_cache_shape(num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int):
        return (2, num_blocks, block_size, num_kv_heads, head_dim)

    def forward(self, layer, q, k, v, kv_cache, meta):
        """q: [T, Hq, D]; k, v: [T, Hkv, D]; kv_cache as kv_cache_shape(); returns [T, Hq, D]."""
        k_cache, v_cache = kv_cache[0], kv_cache[1]
        _, bs, hkv, d = k_cache.shape
        k_cache.view(-1, hkv, d).index_copy_(0, meta.slot_mapping, k)
        v_cache.view(-1, hkv, d).index_copy_(0, meta.slot_mapping, v)
        gqa = layer.num_heads != hkv
        out = torch.empty_like(q)
        nd = meta.num_decodes
        if nd:
            out[:nd] = self._decode(layer, q[:nd], k_cache, v_cache, meta, gqa)
        qsl = meta.query_start_loc
        for i in range(nd, meta.num_seqs):
            s, e, L = qsl[i], qsl[i + 1], meta.seq_lens[i]
            out[s:e] = self._prefill(layer, q[s:e], k[s:e], v[s:e], k_cache, v_cache,
                                     meta.block_tables[i], L, gqa)
        return out

    def _gather(self, cache: torch.Tensor, block_tables: torch.Tensor, key: str) -> torch.Tensor:
        # [B, nb] block ids -> [B, Hkv, nb * bs, D], copied into a reused buffer
        b, nb = block_tables.shape
        _, bs, h, d = cache.shape
        out = self._buffer(key, b * nb * bs * h * d, cache).view(b * nb, bs, h, d)
        torch.index_select(cache, 0, block_tables.reshape(-1), out=out)
        return out.view(b, nb * bs, h, d).transpose(1, 2)

    def _decode(self, layer, q, k_cache, v_cache, meta, gqa):
        nd = q.shape[0]
        if q.device.type == "cpu" and q.dtype in (torch.float32, torch.bfloat16) and paged_attention_cpu.available():
            # reads the cache in place: no gathered copy
            return paged_attention_cpu.paged_decode_attention(
                q, k_cache, v_cache, meta.block_tables[:nd], meta.seq_lens_tensor[:nd], layer.scale,
                layer.sliding_window)
        bs = k_cache.shape[1]
        max_len = max(meta.seq_lens[:nd])
        nb = -(-max_len // bs)
        tables = meta.block_tables[:nd, :nb]
        kk, vv = self._gather(k_cache, tables, "k"), self._gather(v_cache, tables, "v")
        kpos = torch.arange(nb * bs, device=q.device)
        lens = meta.seq_lens_tensor[:nd, None]
        mask = kpos[None, :] < lens
        if layer.sliding_window:
            mask &= kpos[None, :] >= lens - layer.sliding_window
        o = F.scaled_dot_product_attention(q.unsqueeze(2), kk, vv, attn_mask=mask[:, None, None, :],
                                           scale=layer.scale, enable_gqa=gqa)
        return o.squeeze(2)

    def _prefill(self, layer, q, k, v, k_cache, v_cache, block_table, seq_len, gqa):
        n = q.shape[0]
        qq = q.transpose(0, 1).unsqueeze(0)
        if seq_len == n:  # nothing cached before this chunk: attend over the fresh k, v
            kk, vv = k.transpose(0, 1).unsqueeze(0), v.transpose(0, 1).unsqueeze(0)
        else:
            nb = -(-seq_len // k_cache.shape[1])
            kk = self._gather(k_cache, block_table[None, :nb], "k")[:, :, :seq_len]
            vv = self._gather(v_cache, block_table[None, :nb], "v")[:, :, :seq_len]
        if seq_len == n and not layer.sliding_window:
            o = F.scaled_dot_product_attention(qq, kk, vv, is_causal=True, scale=layer.scale, enable_gqa=gqa)
        else:
            qpos = torch.arange(seq_len - n, seq_len, device=q.device)[:, None]
            kpos = torch.arange(seq_len, device=q.device)[None, :]
            mask = kpos <= qpos
            if layer.sliding_window:
                mask &= kpos > qpos - layer.sliding_window
            o = F.scaled_dot_product_attention(qq, kk, vv, attn_mask=mask, scale=layer.scale, enable_gqa=gqa)
        return o.squeeze(0).transpose(0, 1)


_BACKEND = None
_CUDA_BACKENDS: dict = {}


def get_attention_backend(device: torch.device | str | None = None):
    """The backend for a device: on CUDA the Triton kernels (VLMSERVE_ATTENTION_BACKEND=torch_sdpa
    keeps the reference there), elsewhere TorchSDPABackend."""
    global _BACKEND
    import os

    dev = torch.device(device) if device is not None else None
    if dev is not None and dev.type == "cuda" and os.environ.get("VLMSERVE_ATTENTION_BACKEND") != "torch_sdpa":
        from vlmserve.kernels import triton_paged_attention

        if triton_paged_attention.available():
            from vlmserve.layers.attention.triton_backend import TritonPagedAttentionBackend

            if dev not in _CUDA_BACKENDS:
                _CUDA_BACKENDS[dev] = TritonPagedAttentionBackend(dev)
            return _CUDA_BACKENDS[dev]
    if _BACKEND is None:
        _BACKEND = TorchSDPABackend()
    return _BACKEND
