"""What the fast image processors share: which HF backend an image processor runs, and a PIL image
as the RGB uint8 array HF's processors start from."""
from __future__ import annotations

import contextlib
import inspect
import threading

import numpy as np
from PIL import Image


def hf_backend(proc) -> str | None:
    """'torchvision' or 'pil': which of HF's implementations an image processor runs."""
    backend = getattr(proc, "backend", None)  # transformers 5
    if backend in ("torchvision", "pil"):
        return backend
    name = type(proc).__name__
    if name.endswith("Fast"):  # transformers 4.x fast processors run torchvision
        return "torchvision"
    if name == "CLIPImageProcessor":  # transformers 4.x slow processor: PIL and numpy
        return "pil"
    return None


def _hf_convert_to_rgb():
    """HF's own RGB conversion (alpha composited onto white; versions differ in detail), called
    only for images not already RGB."""
    from transformers.image_transforms import convert_to_rgb

    takes_numpy = "return_numpy" in inspect.signature(convert_to_rgb).parameters

    def convert(image: Image.Image) -> np.ndarray:
        out = convert_to_rgb(image, return_numpy=True) if takes_numpy else convert_to_rgb(image)
        return np.array(out)
    return convert


_shared = threading.local()


@contextlib.contextmanager
def shared_pil_bytes():
    """Within the block (one request's processing and hashing, in this thread), a PIL image's pixel
    bytes are read once: both need them, and reading a 1024x1024 image takes ~1.5 ms. Images are
    held until the block ends, so their ids stay theirs."""
    prev = getattr(_shared, "memo", None)
    _shared.memo = {}
    try:
        yield
    finally:
        _shared.memo = prev


def pil_bytes(image: Image.Image) -> bytes:
    """image.tobytes(), read once per image inside shared_pil_bytes()."""
    memo = getattr(_shared, "memo", None)
    if memo is None:
        return image.tobytes()
    hit = memo.get(id(image))
    if hit is None or hit[0] is not image:
        hit = memo[id(image)] = (image, image.tobytes())
    return hit[1]


def _rgb_array(image: Image.Image) -> np.ndarray:
    """[H, W, 3] uint8 of an RGB image: one copy (np.array(image) makes two)."""
    w, h = image.size
    return np.frombuffer(pil_bytes(image), dtype=np.uint8).reshape(h, w, 3)


class RGBReader:
    """A PIL image -> [H, W, 3] uint8 as HF's processors see it (`do_convert_rgb` as they do), or
    None where the result is not 3-channel uint8 (the caller then runs HF's processor)."""

    def __init__(self, convert_rgb: bool):
        self.convert_rgb = convert_rgb
        self._to_rgb = _hf_convert_to_rgb()

    def __call__(self, image) -> np.ndarray | None:
        if not isinstance(image, Image.Image):
            return None
        if self.convert_rgb:
            plain = image.mode == "RGB" and image.info.get("transparency") is None
            rgb = _rgb_array(image) if plain else self._to_rgb(image)
        else:
            rgb = _rgb_array(image) if image.mode == "RGB" else np.array(image)
        if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
            return None
        return rgb
