"""Bidirectional attention over packed variable-length segments (the images, frames or windows of
a vision encoder's batch), without padding. Vision towers call `varlen_attention`: one Triton kernel
for all segments at head sizes cuDNN pads, else torch's SDPA by segment length."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from vlmserve.device_utils import to_device
from vlmserve.kernels import triton_packed_attention as tpk


class Segments:
    """The packed segments (frames or windows) of one encoder call, made once per call rather than
    once per block: their bounds on the host, and on the device too where the Triton kernel will
    read them. Made outside a CUDA graph's capture and kept with the graph, the device copy is no
    host data in its replays."""

    def __init__(self, bounds: list[int], device: torch.device, dtype: torch.dtype, head_dim: int):
        self.bounds = list(bounds)
        self.max_len = max((b - a for a, b in zip(self.bounds[:-1], self.bounds[1:])), default=0)
        self.on_device = None
        if tpk.preferred_for_vision(head_dim, dtype, device.type == "cuda"):
            self.on_device = to_device(self.bounds, device, torch.int32)


def varlen_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: list[int] | Segments,
                     scale: float) -> torch.Tensor:
    """q, k, v: [N, heads, head_dim], segment i spanning rows cu_seqlens[i]:cu_seqlens[i + 1].
    Each token attends to every token of its own segment only. -> [N, heads, head_dim]

    Head sizes that cuDNN pads (80) go through one Triton kernel for all segments
    (kernels/triton_packed_attention.py). Otherwise segments of equal length go through batched SDPA
    calls (windows and frames of one image mostly share a length), so the loop runs over distinct
    lengths and a few batches each, not segments."""
    segments = cu_seqlens if isinstance(cu_seqlens, Segments) else None
    cu_seqlens = segments.bounds if segments is not None else cu_seqlens
    if cu_seqlens[0] != 0 or cu_seqlens[-1] != q.shape[0]:
        raise ValueError(f"cu_seqlens {cu_seqlens[:3]}...{cu_seqlens[-1:]} do not cover {q.shape[0]} tokens")
    if tpk.usable(q) and tpk.preferred_for_vision(q.shape[-1], q.dtype, q.is_cuda):
        if segments is not None and segments.on_device is not None:
            return tpk.packed_attention(q, k, v, segments.on_device, segments.max_len, scale)
        max_len = max(b - a for a, b in zip(cu_seqlens[:-1], cu_seqlens[1:]))
        return tpk.packed_attention(q, k, v, to_device(cu_seqlens, q.device, torch.int32), max_len, scale)
    by_length: dict[int, list[int]] = {}
    for start, end in zip(cu_seqlens[:-1], cu_seqlens[1:]):
        if end > start:
            by_length.setdefault(end - start, []).append(start)
    out = None
    for length, starts in by_length.items():
        back_to_back = starts == list(range(starts[0], starts[0] + len(starts) * length, length))
        done = 0
        for n in power_of_two_counts(len(starts)):
            piece, done = starts[done:done + n], done + n
            shape = (n, length) + q.shape[1:]
            if back_to_back:  # images of one size: a view, no gather or scatter
                rows = slice(piece[0], piece[0] + n * length)
                if n * length == q.shape[0]:
                    return _sdpa(q.view(shape), k.view(shape), v.view(shape), scale).reshape(q.shape)
            else:
                rows = (to_device(piece, q.device, torch.long)[:, None]
                        + torch.arange(length, device=q.device)[None, :]).flatten()
            o = _sdpa(q[rows].view(shape), k[rows].view(shape), v[rows].view(shape), scale)
            if out is None:
                out = torch.empty_like(q)
            out[rows] = o.reshape(n * length, *q.shape[1:])
    return torch.empty_like(q) if out is None else out  # None: no tokens at all


def copies_host_data(segments: list[int] | Segments) -> bool:
    """Whether varlen_attention over these segments copies host data to the device, which a CUDA
    graph would replay stale: for SDPA, the row indices of equal-length segments that are not back
    to back (a plain list: the SDPA path's rule); for the Triton kernel, its bounds, unless the
    Segments hold them on the device."""
    if isinstance(segments, Segments):
        if segments.on_device is not None:
            return False
        segments = segments.bounds
    last_end: dict[int, int] = {}
    for start, end in zip(segments[:-1], segments[1:]):
        if end > start:
            if last_end.get(end - start, start) != start:
                return True
            last_end[end - start] = end
    return False


def graph_safe_segments(bounds: list[int], dtype: torch.dtype, head_dim: int) -> bool:
    """Whether varlen_attention over these segments, passed as Segments made on a CUDA device, queues
    device work only, so that a CUDA graph of it replays right: the Triton kernel reads the bounds
    the Segments hold; SDPA's path must not gather rows by index (copies_host_data)."""
    return tpk.preferred_for_vision(head_dim, dtype, on_cuda=True) or not copies_host_data(bounds)


def power_of_two_counts(n: int, largest: int = 16) -> list[int]:
    """n segments of one length as batches of power-of-two counts, largest first (13 -> 8, 4, 1).
    cuDNN builds an execution plan for each batch shape it meets (~70 ms on an H200), so batches of
    any count kept paying it through a run; these counts are few. A split costs next to nothing,
    since the time per image hardly depends on the batch (1024x1024 images on an H200: 442 us for
    one, 419 us each for six, 427 each for eleven)."""
    counts = []
    while n > 0:
        counts.append(min(largest, 1 << (n.bit_length() - 1)))
        n -= counts[-1]
    return counts


def _sdpa(q, k, v, scale):
    """[B, L, H, D] -> [B, L, H, D]."""
    o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), scale=scale)
    return o.transpose(1, 2)
