"""Content hashes of multimodal items: the same pixels (or embeddings) give the same hash, whatever
object carries them, so caches can recognise an image seen before."""
from __future__ import annotations

import dataclasses
import hashlib
import os
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from PIL import Image

from vlmserve.multimodal.image_utils import pil_bytes

_PARALLEL_BYTES = 1 << 20  # buffers from this size on are hashed in parallel parts
_PART_BYTES = 256 << 10
_WORKERS = min(8, len(os.sched_getaffinity(0)))
_pool: ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()


def _hash_pool() -> ThreadPoolExecutor:
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(_WORKERS, thread_name_prefix="vlmserve-hash")
        return _pool


def _update_bytes(h, data) -> None:
    """A large buffer (a 1024x1024 image: 3 MB, ~3 ms of sha256 on one core) goes in as the digests
    of its parts, hashed in parallel threads (hashlib releases the GIL): a tree hash, as stable as
    the plain one."""
    view = memoryview(data).cast("B")
    n = len(view)
    if n < _PARALLEL_BYTES or _WORKERS < 2:
        h.update(view)
        return
    parts = [view[i:i + _PART_BYTES] for i in range(0, n, _PART_BYTES)]
    h.update(f"parts:{len(parts)}:{n}".encode())
    for digest in _hash_pool().map(lambda p: hashlib.sha256(p).digest(), parts):
        h.update(digest)


def _update(h, obj) -> None:
    if isinstance(obj, Image.Image):
        h.update(f"pil:{obj.mode}:{obj.size}".encode())
        _update_bytes(h, pil_bytes(obj))
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
    h = hashlib.sha256()
    _update(h, obj)
    if extra:
        _update(h, extra)
    return h.hexdigest()
