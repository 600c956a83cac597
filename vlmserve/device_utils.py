"""Host data onto the device without waiting for the device.

A blocking host-to-device copy (`torch.tensor(values, device=...)`, `.to(device)` of pageable
memory) waits for everything queued on the stream. With async scheduling, the host prepares step
n+1 while the device runs step n, so one such copy makes it wait for step n instead."""
from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch


def copy_by_one_thread(dst: torch.Tensor, src: torch.Tensor) -> torch.Tensor:
    """dst.copy_(src) for host tensors of one shape and dtype, as one thread's memcpy. torch's copy_ goes
    through its intra-op thread pool from 32k elements on, and waking the pool cost a 16-core GPU host
    milliseconds (BENCHMARKS.md: 0.5-3.7 ms for a prefill step's ~0.5 MB of inputs, 5.2 ms a 336x336 image)."""
    if src.dtype == torch.bfloat16:  # numpy has no bfloat16
        return dst.copy_(src)
    np.copyto(dst.numpy(), src.numpy())
    return dst


_copy_pool: ThreadPoolExecutor | None = None
_copy_pool_lock = threading.Lock()


def copy_in_parallel(dst: torch.Tensor, src: torch.Tensor, threads: int = 4,
                     min_bytes_per_thread: int = 1 << 20) -> torch.Tensor:
    """copy_by_one_thread, split by rows over up to `threads` threads (this one among them), with at
    least min_bytes_per_thread each: numpy's copy releases the GIL, so the parts run at once. For
    copies that hold up a latency-bound request: a lone prompt's 4 MB image, before its encoder can
    start, took 0.52 ms to stage on one thread of an H200 host and 0.42 ms on four
    (scripts/gpu_staging_probe.py)."""
    global _copy_pool
    n = min(threads, src.shape[0] if src.dim() else 1, src.numel() * src.element_size() // min_bytes_per_thread)
    if n <= 1 or src.dtype == torch.bfloat16:
        return copy_by_one_thread(dst, src)
    with _copy_pool_lock:
        if _copy_pool is None:
            _copy_pool = ThreadPoolExecutor(max_workers=max(threads - 1, 1), thread_name_prefix="vlmserve-copy")
    d, s = dst.numpy(), src.numpy()
    bounds = [len(s) * i // n for i in range(n + 1)]
    parts = [_copy_pool.submit(np.copyto, d[a:b], s[a:b]) for a, b in zip(bounds[1:-1], bounds[2:])]
    np.copyto(d[:bounds[1]], s[:bounds[1]])
    for part in parts:
        part.result()
    return dst


def pinned(t: torch.Tensor) -> torch.Tensor:
    """A pinned copy of the host tensor t, in place of Tensor.pin_memory(), whose copy takes the thread pool."""
    return copy_by_one_thread(torch.empty(t.shape, dtype=t.dtype, pin_memory=True), t)


def to_device(values, device: torch.device, dtype: torch.dtype | None = None) -> torch.Tensor:
    """A host tensor or list on `device`: through pinned memory and an asynchronous copy on CUDA."""
    t = values if isinstance(values, torch.Tensor) else torch.tensor(values, dtype=dtype)
    if dtype is not None and t.dtype != dtype:
        t = t.to(dtype)
    if device.type == "cuda" and t.device.type == "cpu":
        return pinned(t).to(device, non_blocking=True)
    return t.to(device)
