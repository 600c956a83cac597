"""The CUDA attention backend: the Triton paged-attention kernels (vlmserve/kernels/
triton_paged_attention.py) over the same KV cache layout as TorchSDPABackend. Decode rows go
through the split-KV decode kernel, prefill chunks through the varlen prefill kernel, which reads
the cached context (earlier chunks, prefix-cache hits) from the paged cache. A step whose prefill
chunks have no cached context (whole fresh prompts, the common case) attends over its own k, v with
torch's FlashAttention varlen op instead: 1.2-1.6x faster than the Triton kernel at these shapes on
an H100 (scripts/gpu_alternatives.py; BENCHMARKS.md). VLMSERVE_FLASH_PREFILL=0 keeps the Triton kernel.

CUDA-graph safe for decode batches: nothing here reads a device tensor back to the host; the
number of KV splits comes from the host-side `meta.seq_lens` (the graph runner passes the longest
length it allows, so a captured graph keeps one split count)."""
from __future__ import annotations

import torch

import os

from vlmserve.kernels import triton_paged_attention as tpa
from vlmserve.layers.attention.backends import TorchSDPABackend


def _flash_available(device: torch.device) -> bool:
    if os.environ.get("VLMSERVE_FLASH_PREFILL", "1") == "0" or device.type != "cuda":
        return False
    if not hasattr(torch.ops.aten, "_flash_attention_forward") or not torch.cuda.is_available():
        return False
    return torch.cuda.get_device_capability(device)[0] >= 8 and torch.backends.cuda.flash_sdp_enabled()


def flash_prefill_usable(layer, q: torch.Tensor) -> bool:
    """What FlashAttention takes here: fp16/bf16, head_dim a multiple of 8 up to 256, whole-head
    groups, no sliding window (its window convention is not ours)."""
    return (q.dtype in (torch.float16, torch.bfloat16) and layer.head_dim % 8 == 0 and layer.head_dim <= 256
            and layer.sliding_window is None and layer.num_heads % layer.num_kv_heads == 0)


class TritonPagedAttentionBackend:
    name = "triton"
    kv_cache_shape = staticmethod(TorchSDPABackend.kv_cache_shape)

    def __init__(self, device: torch.device | None = None):
        dev = torch.device(device) if device is not None else torch.device("cuda")
        self.num_sms = torch.cuda.get_device_properties(dev).multi_processor_count \
            if dev.type == "cuda" and torch.cuda.is_available() else 132
        self._meta = None  # the step whose host-side summaries are below (one per step, not per layer)
        self._max_decode_len = 0
        self._qsl = None
        self._max_query_len = 0
        self.flash = _flash_available(dev)
        self._fresh = False  # this step's prefill chunks have no cached context
        self._fresh_cu = None  # their offsets from the first prefill token, on the device
        self.num_flash_prefill_steps = 0

    def _step_info(self, meta) -> None:
        if meta is self._meta:
            return
        nd = meta.num_decodes
        self._max_decode_len = max(meta.seq_lens[:nd]) if nd else 0
        if meta.num_seqs > nd:
            qsl = meta.query_start_loc
            if meta.query_start_loc_tensor is not None:
                self._qsl = meta.query_start_loc_tensor
            else:  # pinned: an asynchronous copy (from pageable memory it waits)
                self._qsl = torch.tensor(qsl, dtype=torch.int32, pin_memory=meta.slot_mapping.is_cuda).to(
                    meta.slot_mapping.device, non_blocking=True)
            # the launch grid covers the longest chunk the host-side offsets allow (in a prefill
            # graph: the bucket); the kernel reads the real lengths from the device
            self._max_query_len = max(qsl[i + 1] - qsl[i] for i in range(nd, meta.num_seqs))
            fresh = meta.prefill_without_context
            if fresh is None:
                fresh = all(meta.seq_lens[i] == qsl[i + 1] - qsl[i] for i in range(nd, meta.num_seqs))
            self._fresh = self.flash and fresh
            if self._fresh:
                self.num_flash_prefill_steps += 1
                self._fresh_cu = self._qsl[nd:] if qsl[nd] == 0 else self._qsl[nd:] - qsl[nd]
        self._meta = meta

    def forward(self, layer, q, k, v, kv_cache, meta):
        """q: [T, Hq, D]; k, v: [T, Hkv, D]; kv_cache as kv_cache_shape(); returns [T, Hq, D]."""
        k_cache, v_cache = kv_cache[0], kv_cache[1]
        tpa.store_kv(k, v, k_cache, v_cache, meta.slot_mapping)
        self._step_info(meta)
        nd = meta.num_decodes
        flash = meta.num_seqs > nd and self._fresh and flash_prefill_usable(layer, q)
        if flash and nd == 0:
            return self._flash_prefill(layer, q, k, v, 0)
        out = torch.empty_like(q)
        if nd:
            splits = tpa.decode_num_splits(nd, k_cache.shape[2], self._max_decode_len, self.num_sms)
            tpa.paged_decode_attention(q[:nd], k_cache, v_cache, meta.block_tables[:nd],
                                       meta.seq_lens_tensor[:nd], layer.scale, layer.sliding_window,
                                       num_splits=splits, out=out[:nd])
        if flash:
            p0 = meta.query_start_loc[nd]
            out[p0:] = self._flash_prefill(layer, q, k, v, p0)
        elif meta.num_seqs > nd:
            tpa.paged_prefill_attention(q, k_cache, v_cache, meta.block_tables, self._qsl,
                                        meta.seq_lens_tensor, layer.scale, layer.sliding_window,
                                        first_seq=nd, max_query_len=self._max_query_len, out=out)
        return out

    def _flash_prefill(self, layer, q, k, v, p0: int) -> torch.Tensor:
        """Causal attention of the prefill rows p0.. within their own chunks (no cached context)."""
        L = self._max_query_len
        return torch.ops.aten._flash_attention_forward(q[p0:], k[p0:], v[p0:], self._fresh_cu, self._fresh_cu,
                                                       L, L, 0.0, True, False, scale=layer.scale)[0]
