"""Content hashes of multimodal items: the same pixels (or embeddings) give the same hash, whatever
object carries them, so caches can recognise an image seen before."""
from __future__ import annotations

import dataclasses
import threading
from collections import OrderedDict

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


def fingerprint(obj, **extra) -> bytes | None:
    """A cheap key of a PIL image whose pixels are read in Pillow's own memory (~0.05 ms for a
    1024x1024 image on the 2-core CI machine, against ~0.8 ms for its hash): its mode, size and
    `extra`, and 16 of its rows. Equal content hashes (hash_item with the same extra) give equal
    fingerprints, so an image whose fingerprint was never seen has a hash that no cache holds.
    None for other items."""
    if not isinstance(obj, Image.Image):
        return None
    data = pil_bytes(obj)
    if not isinstance(data, np.ndarray):  # packed by tobytes(): hashed at once from that copy
        return None
    h = blake3(f"pil:{obj.mode}:{obj.size}:{data.shape}:{sorted(extra.items())!r}".encode())
    h.update(np.ascontiguousarray(data[::max(1, data.shape[0] // 16)]))
    return h.digest(16)


class SeenMedia:
    """Fingerprints of the items hashed lately (the most recent `capacity`; thread-safe). One that is
    not here has content that no cache holds, unless it was pushed out by `capacity` newer ones while
    its blocks stayed in the prefix cache: then an encoder runs for it needlessly, and its tokens still
    come from the cache."""

    def __init__(self, capacity: int = 1 << 16):
        self.capacity = capacity
        self._keys: OrderedDict[bytes, None] = OrderedDict()
        self._lock = threading.Lock()

    def add(self, key: bytes) -> None:
        with self._lock:
            self._keys[key] = None
            self._keys.move_to_end(key)
            if len(self._keys) > self.capacity:
                self._keys.popitem(last=False)

    def __contains__(self, key: bytes) -> bool:
        with self._lock:
            return key in self._keys
