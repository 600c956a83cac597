"""Content hashes of multimodal items: the same pixels (or embeddings) give the same hash, whatever
object carries them, so caches can recognise an image seen before."""
from __future__ import annotations

import dataclasses
import hashlib

import numpy as np
import torch
from PIL import Image


def _update(h, obj) -> None:
    if isinstance(obj, Image.Image):
        h.update(f"pil:{obj.mode}:{obj.size}".encode())
        h.update(obj.tobytes())
    elif isinstance(obj, torch.Tensor):
        t = obj.detach().cpu().contiguous()
        h.update(f"tensor:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    elif isinstance(obj, np.ndarray):
        a = np.ascontiguousarray(obj)
        h.update(f"ndarray:{a.dtype}:{a.shape}".encode())
        h.update(a.tobytes())
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
