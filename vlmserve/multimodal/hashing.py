"""Content hashes of multimodal items: the same pixels (or embeddings) give the same hash, whatever
object carries them, so caches can recognise an image seen before."""
from __future__ import annotations

import dataclasses

import numpy as np
import torch
from blake3 import blake3
from PIL import Image

from vlmserve.multimodal.image_utils import pil_bytes


# Buffers from this size on (large images, videos) are hashed by blake3's thread pool on their
# own, and go in as that digest. On a 16-core GPU host (BENCHMARKS.md, calls 5 and 7) the pool took
# ~0.55 ms per buffer, 338 KB or 3 MB alike (waking it), and one thread 0.84 ms for 3 MB.
_THREADED_BYTES = 2 << 20


def _update_bytes(h, data) -> None:
    view = memoryview(data).cast("B")
    if len(view) >= _THREADED_BYTES:
        h.update(f"threaded:{len(view)}:".encode())
        h.update(blake3(view, max_threads=blake3.AUTO).digest())
    else:
        h.update(view)


def _update(h, obj) -> None:
    if isinstance(obj, Image.Image):
        data = pil_bytes(obj)  # 3 or 4 bytes per RGB pixel (see pil_bytes): the length says which
        h.update(f"pil:{obj.mode}:{obj.size}:{memoryview(data).nbytes}".encode())
        _update_bytes(h, data)
    elif isinstance(obj, torch.Tensor):
        t = obj.detach().cpu().contiguous()
        h.update(f"tensor:{t.dtype}:{tuple(t.shape)}".encode())
        if t.numel():
            _update_bytes(h, t.view(torch.uint8).numpy().reshape(-1))
    elif isinstance(obj, np.ndarray):
        a = np.ascontiguousarray(obj)
        h.update(f"ndarray:{a.dtype}:{a.shape}".encode())
        _update_bytes(h, a.reshape(-1).view(np.uint8) if a.size else b"")
    elif isinstance(obj, dict):
        for k in sorted(obj):
            h.update(f"key:{k}".encode())
            _update(h, obj[k])
    elif dataclasses.is_dataclass(obj) and not isinstance(obj, type):  # e.g. VideoFrames
        h.update(f"dataclass:{type(obj).__name__}".encode())
        for f in dataclasses.fields(obj):
            h.update(f"field:{f.name}".encode())
            _update(h, getattr(obj, f.name))
    elif isinstance(obj, (list, tuple)):
        h.update(f"seq:{len(obj)}".encode())
        for x in obj:
            _update(h, x)
    else:
        h.update(repr(obj).encode())


def hash_item(obj, **extra) -> str:
    """blake3 over the item's type tags and raw bytes: a cryptographic hash (a client can't make
    another's image collide in the caches), and fast: on one core of the 2-core CI machine, 3 MB take
    ~0.6 ms against ~2.4 ms of sha256 (scripts/cpu_media_bench.py)."""
    h = blake3()
    _update(h, obj)
    if extra:
        _update(h, extra)
    return h.hexdigest()
