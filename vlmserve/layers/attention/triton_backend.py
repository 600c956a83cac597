"""The CUDA attention backend: the Triton paged-attention kernels (vlmserve/kernels/
triton_paged_attention.py) over the same KV cache layout as TorchSDPABackend. Decode rows go
through the split-KV decode kernel, prefill chunks through the varlen prefill kernel, which reads
the cached context (earlier chunks, prefix-cache hits) from the paged cache.

Prefill chunks with no cached context (whole fresh prompts, the common case; those after the last
chunk that has some) take the fresh path: they attend over the step's own k, v, nothing read back
from the cache, through the packed causal Triton kernel (kernels/triton_packed_attention.py) for
head sizes it takes, else torch's FlashAttention varlen op. On an H200 the packed kernel takes 358
against FlashAttention's 539 us for a step of 27 LLaVA prompts, 443 against 594 for 11 Qwen2-VL
prompts; on an H100 FlashAttention was 1.2-1.6x faster than the paged kernel (BENCHMARKS.md). A step
with one such chunk in a prefill graph (a lone prompt: time to first token) takes torch's dense SDPA
instead, which picks cuDNN's kernel: 23 us against the packed kernel's 27 at 607 tokens on the H200.
Only in graphs: cuDNN builds an execution plan per shape (~70 ms on an H200, ~0.9 s for the first),
once per bucket there, but at nearly every new length in eager steps. VLMSERVE_FLASH_PREFILL=0 turns
the fresh path off (the paged kernel for all); VLMSERVE_PACKED_PREFILL=0 takes FlashAttention's op
where the packed kernel would run.

CUDA-graph safe for decode batches: nothing here reads a device tensor back to the host; the
number of KV splits comes from the host-side `meta.seq_lens` (the graph runner passes the longest
length it allows, so a captured graph keeps one split count)."""
from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from vlmserve.device_utils import to_device
from vlmserve.kernels import triton_packed_attention as tpk
from vlmserve.kernels import triton_paged_attention as tpa
from vlmserve.layers.attention.backends import TorchSDPABackend


def _flash_available(device: torch.device) -> bool:
    if os.environ.get("VLMSERVE_FLASH_PREFILL", "1") == "0" or device.type != "cuda":
        return False
    if not hasattr(torch.ops.aten, "_flash_attention_forward") or not torch.cuda.is_available():
        return False
    return torch.cuda.get_device_capability(device)[0] >= 8 and torch.backends.cuda.flash_sdp_enabled()


def fresh_prefill_usable(layer, q: torch.Tensor) -> bool:
    """Whether a layer's fresh prompts can leave the paged kernel: what FlashAttention takes (the
    packed kernel takes less, `packed_prefill_usable`): fp16/bf16, head_dim a multiple of 8 up to 256,
    whole-head groups, no sliding window (its window convention is not ours)."""
    return (q.dtype in (torch.float16, torch.bfloat16) and layer.head_dim % 8 == 0 and layer.head_dim <= 256
            and layer.sliding_window is None and layer.num_heads % layer.num_kv_heads == 0)


def packed_prefill_usable(layer, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """What the packed causal kernel takes here: head sizes that split into powers of two up to 128
    (64, 80, 96, 128: larger ones are untried on a GPU), last dims contiguous."""
    return os.environ.get("VLMSERVE_PACKED_PREFILL", "1") != "0" and tpk.triton is not None \
        and layer.head_dim <= 128 and tpk.split_head_dim(layer.head_dim) is not None \
        and q.stride(-1) == 1 and k.stride(-1) == 1 and v.stride(-1) == 1


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
        self.fresh_path = _flash_available(dev)
        self._fresh_from = 0  # this step's prefill sequences from here on have no cached context
        self._fresh_cu = None  # their offsets from the first of their tokens, on the device
        self._fresh_max_len = 0
        self._one_fresh = False  # one fresh sequence: the dense kernel, over rows p0.. to the end
        self._paged_max_len = self._prefill_max_len = 0
        self.num_fresh_prefill_steps = 0

    def warm_up(self, layers) -> None:
        """Compile now every decode-kernel variant a step can pick, one per KV split count (1-16:
        decode_num_splits chooses by batch and context length) and tile (decode_tiles), and the prefill
        kernel over cached context, for each kind of attention layer. Otherwise the first mixed step of a new batch
        size, or the first chunk after a cached one, compiles a kernel in the middle of a run: a
        Triton compile took ~0.5 s on the H200 (BENCHMARKS.md). Triton's cache on disk makes this
        quick from the second start on. Where fresh prompts take the packed causal kernel, it is
        compiled here too, for the first step that holds several."""
        seen = set()
        for layer in layers:
            if layer.kv_cache is None:
                continue
            k_cache, v_cache = layer.kv_cache[0], layer.kv_cache[1]
            key = (layer.num_heads, layer.head_dim, k_cache.shape[1:], k_cache.dtype)
            if key in seen:
                continue
            seen.add(key)
            q = torch.zeros((1, layer.num_heads, layer.head_dim), dtype=k_cache.dtype, device=k_cache.device)
            tables = torch.zeros((1, 1), dtype=torch.long, device=k_cache.device)  # block 0, slot 0: read only
            seq_lens = torch.ones(1, dtype=torch.long, device=k_cache.device)
            for splits in (1, 2, 4, 8, 16):
                for block_n, warps in {tpa.default_decode_tiles(k_cache), tpa.decode_tiles(k_cache, 1)}:
                    tpa.paged_decode_attention(q, k_cache, v_cache, tables, seq_lens, layer.scale,
                                               layer.sliding_window, num_splits=splits, block_n=block_n,
                                               num_warps=warps)
            qsl = torch.tensor([0, 1], dtype=torch.int32, device=k_cache.device)
            tpa.paged_prefill_attention(q, k_cache, v_cache, tables, qsl, seq_lens, layer.scale,
                                        layer.sliding_window, max_query_len=1)
            kv = torch.zeros((1, 2, *k_cache.shape[2:]), dtype=k_cache.dtype, device=k_cache.device)
            k, v = kv.unbind(1)
            if self.fresh_path and fresh_prefill_usable(layer, q) and packed_prefill_usable(layer, q, k, v):
                tpk.packed_attention(q, k, v, qsl, 1, layer.scale, causal=True)

    def _step_info(self, meta) -> None:
        if meta is self._meta:
            return
        nd = meta.num_decodes
        self._max_decode_len = max(meta.seq_lens[:nd]) if nd else 0
        if meta.num_seqs > nd:
            qsl = meta.query_start_loc
            if meta.query_start_loc_tensor is not None:
                self._qsl = meta.query_start_loc_tensor
            else:
                self._qsl = to_device(qsl, meta.slot_mapping.device, torch.int32)
            B = meta.num_seqs
            # The prefill sequences from _fresh_from on start at their first token (nothing cached
            # before them): the fresh path takes those, the paged kernel the ones before.
            fresh_from = B
            if self.fresh_path:
                if meta.prefill_without_context is not None:
                    fresh_from = nd if meta.prefill_without_context else B
                else:
                    while fresh_from > nd and meta.seq_lens[fresh_from - 1] == qsl[fresh_from] - qsl[fresh_from - 1]:
                        fresh_from -= 1
            self._fresh_from = fresh_from
            # Launch grids cover the longest chunk the host-side offsets allow (in a prefill graph:
            # the bucket); the kernels read the real lengths from the device. The paged kernel
            # takes all prefill sequences in layers that the fresh path cannot serve.
            self._prefill_max_len = max(qsl[i + 1] - qsl[i] for i in range(nd, B))
            self._paged_max_len = self._prefill_max_len
            if fresh_from < B:
                self.num_fresh_prefill_steps += 1
                p0 = qsl[fresh_from]
                self._fresh_cu = self._qsl[fresh_from:] if p0 == 0 else self._qsl[fresh_from:] - p0
                self._fresh_max_len = max(qsl[i + 1] - qsl[i] for i in range(fresh_from, B))
                # dense SDPA (cuDNN) in prefill graphs only: eagerly, its plan per new length costs
                # ~70 ms, more than it saves (scripts/gpu_alternatives.py --parts sdpa_first)
                self._one_fresh = fresh_from == B - 1 and meta.padded_to_bucket
                if fresh_from > nd:
                    self._paged_max_len = max(qsl[i + 1] - qsl[i] for i in range(nd, fresh_from))
        self._meta = meta

    rotates_in_kv_store = True  # forward's cos_sin: store_kv rotates q and k in the same kernel

    def forward(self, layer, q, k, v, kv_cache, meta, cos_sin=None):
        """q: [T, Hq, D]; k, v: [T, Hkv, D]; kv_cache as kv_cache_shape(); returns [T, Hq, D].
        cos_sin: [T, 1, D] each, to rotate q and k by (in place) before anything else."""
        k_cache, v_cache = kv_cache[0], kv_cache[1]
        tpa.store_kv(k, v, k_cache, v_cache, meta.slot_mapping, rotary=None if cos_sin is None else (q, *cos_sin))
        self._step_info(meta)
        nd, B = meta.num_decodes, meta.num_seqs
        fresh_from = self._fresh_from if B > nd and fresh_prefill_usable(layer, q) else B
        if fresh_from == 0:
            return self._fresh_prefill(layer, q, k, v, 0)
        out = torch.empty_like(q)
        if nd:
            splits = tpa.decode_num_splits(nd, k_cache.shape[2], self._max_decode_len, self.num_sms)
            block_n, warps = tpa.decode_tiles(k_cache, nd)
            tpa.paged_decode_attention(q[:nd], k_cache, v_cache, meta.block_tables[:nd],
                                       meta.seq_lens_tensor[:nd], layer.scale, layer.sliding_window,
                                       num_splits=splits, out=out[:nd], block_n=block_n, num_warps=warps)
        if fresh_from > nd:
            max_len = self._paged_max_len if fresh_from < B else self._prefill_max_len
            tpa.paged_prefill_attention(q, k_cache, v_cache, meta.block_tables, self._qsl,
                                        meta.seq_lens_tensor, layer.scale, layer.sliding_window, first_seq=nd,
                                        max_query_len=max_len, out=out, num_seqs=fresh_from - nd)
        if fresh_from < B:
            p0 = meta.query_start_loc[fresh_from]
            self._fresh_prefill(layer, q, k, v, p0, out=out[p0:])
        return out

    def _fresh_prefill(self, layer, q, k, v, p0: int, out: torch.Tensor | None = None) -> torch.Tensor:
        """Causal attention of the prefill rows p0.. within their own chunks (no cached context),
        into `out` where given (the packed kernel writes there; the others' result is copied)."""
        L = self._fresh_max_len
        if self._one_fresh:  # rows p0.. are one sequence (in a prefill graph, with padding rows after
            # it, which real rows never attend to under the causal mask)
            qt, kt, vt = (x[p0:].transpose(0, 1)[None] for x in (q, k, v))
            o = F.scaled_dot_product_attention(qt, kt, vt, is_causal=True, scale=layer.scale,
                                               enable_gqa=layer.num_heads != layer.num_kv_heads)[0].transpose(0, 1)
        elif packed_prefill_usable(layer, q, k, v):
            return tpk.packed_attention(q[p0:], k[p0:], v[p0:], self._fresh_cu, L, layer.scale, causal=True, out=out)
        else:
            o = torch.ops.aten._flash_attention_forward(q[p0:], k[p0:], v[p0:], self._fresh_cu, self._fresh_cu,
                                                        L, L, 0.0, True, False, scale=layer.scale)[0]
        return o if out is None else out.copy_(o)
