"""Host data onto the device without waiting for the device.

A blocking host-to-device copy (`torch.tensor(values, device=...)`, `.to(device)` of pageable
memory) waits for everything queued on the stream. With async scheduling, the host prepares step
n+1 while the device runs step n, so one such copy makes it wait for step n instead."""
from __future__ import annotations

import torch


def to_device(values, device: torch.device, dtype: torch.dtype | None = None) -> torch.Tensor:
    """A host tensor or list on `device`: through pinned memory and an asynchronous copy on CUDA."""
    t = values if isinstance(values, torch.Tensor) else torch.tensor(values, dtype=dtype)
    if dtype is not None and t.dtype != dtype:
        t = t.to(dtype)
    if device.type == "cuda" and t.device.type == "cpu":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)
