"""Host data onto the device without waiting for the device.

A blocking host-to-device copy (`torch.tensor(values, device=...)`, `.to(device)` of pageable
memory) waits for everything queued on the stream. With async scheduling, the host prepares step
n+1 while the device runs step n, so one such copy makes it wait for step n instead."""
from __future__ import annotations

import numpy as np
import torch


def pinned(t: torch.Tensor) -> torch.Tensor:
    """A pinned copy of the host tensor t, copied by one thread. Tensor.pin_memory() copies through torch's
    intra-op thread pool from 32k elements on: in profiled prefill steps on the H200's 16-core host its copy of
    the step's inputs (~0.5 MB) took 0.5-3.7 ms (BENCHMARKS.md), a memcpy of that size well under 0.1 ms."""
    out = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
    if t.dtype == torch.bfloat16 or not t.is_contiguous():  # no numpy view of these
        return out.copy_(t)
    np.copyto(out.numpy(), t.numpy())
    return out


def to_device(values, device: torch.device, dtype: torch.dtype | None = None) -> torch.Tensor:
    """A host tensor or list on `device`: through pinned memory and an asynchronous copy on CUDA."""
    t = values if isinstance(values, torch.Tensor) else torch.tensor(values, dtype=dtype)
    if dtype is not None and t.dtype != dtype:
        t = t.to(dtype)
    if device.type == "cuda" and t.device.type == "cpu":
        return pinned(t).to(device, non_blocking=True)
    return t.to(device)
