"""What the fast image processors share: which HF backend an image processor runs, and a PIL image
as the RGB uint8 array HF's processors start from."""
from __future__ import annotations

import contextlib
import ctypes
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


class _ArrowSchema(ctypes.Structure):
    pass


_ArrowSchema._fields_ = [  # the Arrow C data interface's ArrowSchema (a stable ABI)
    ("format", ctypes.c_char_p), ("name", ctypes.c_char_p), ("metadata", ctypes.c_char_p),
    ("flags", ctypes.c_int64), ("n_children", ctypes.c_int64),
    ("children", ctypes.POINTER(ctypes.POINTER(_ArrowSchema))), ("dictionary", ctypes.c_void_p),
    ("release", ctypes.c_void_p), ("private_data", ctypes.c_void_p)]


class _ArrowArray(ctypes.Structure):
    pass


_ArrowArray._fields_ = [  # ArrowArray, as above
    ("length", ctypes.c_int64), ("null_count", ctypes.c_int64), ("offset", ctypes.c_int64),
    ("n_buffers", ctypes.c_int64), ("n_children", ctypes.c_int64),
    ("buffers", ctypes.POINTER(ctypes.c_void_p)), ("children", ctypes.POINTER(ctypes.POINTER(_ArrowArray))),
    ("dictionary", ctypes.c_void_p), ("release", ctypes.c_void_p), ("private_data", ctypes.c_void_p)]

_capsule_pointer = ctypes.pythonapi.PyCapsule_GetPointer
_capsule_pointer.restype = ctypes.c_void_p
_capsule_pointer.argtypes = [ctypes.py_object, ctypes.c_char_p]


def _pillow_memory(image: Image.Image) -> np.ndarray | None:
    """A read-only uint8 [H, W, 4] view of the pixels in Pillow's own memory, for images whose
    pixels are 4 bytes there (RGB is stored as RGB + a padding byte), through the Arrow export that
    Pillow >= 11.2 offers: no copy, where image.tobytes() packs the pixels in 64 KB chunks (~1.6 ms
    for a 1024x1024 image on a GPU host, before anything else of the request can start). None where
    Pillow can't export (older Pillow; rows not in one block: images over ~16 MB) or the pixels are
    laid out otherwise."""
    export = getattr(image, "__arrow_c_array__", None)
    if export is None or image.mode not in ("RGB", "RGBA", "RGBX"):
        return None
    try:
        schema_capsule, array_capsule = export()
    except ValueError:  # "Image rows are not contiguous in memory."
        return None
    schema = _ArrowSchema.from_address(_capsule_pointer(schema_capsule, b"arrow_schema"))
    array = _ArrowArray.from_address(_capsule_pointer(array_capsule, b"arrow_array"))
    if schema.format != b"+w:4" or schema.n_children != 1 or schema.children[0].contents.format != b"C":
        return None
    w, h = image.size
    child = array.children[0].contents
    if array.length != w * h or child.length < 4 * (array.offset + w * h) or not child.buffers[1]:
        return None
    start = child.buffers[1] + child.offset + 4 * array.offset
    buffer = (ctypes.c_uint8 * (4 * w * h)).from_address(start)
    buffer._arrow = array_capsule  # the capsule releases Pillow's reference to the memory when it goes
    view = np.frombuffer(buffer, dtype=np.uint8).reshape(h, w, 4)
    view.flags.writeable = False
    return view


_shared = threading.local()


@contextlib.contextmanager
def shared_pil_bytes(known: list | None = None):
    """Within the block (one request's processing and hashing, in this thread), a PIL image's pixel
    bytes are read once: both need them. Images are held until the block ends, so their ids stay
    theirs. known: (image, pil_bytes(image)) pairs read before (in an earlier block)."""
    prev = getattr(_shared, "memo", None)
    _shared.memo = {id(image): (image, data) for image, data in known or ()}
    try:
        yield
    finally:
        _shared.memo = prev


def _read_pil(image: Image.Image):
    view = _pillow_memory(image)
    return view if view is not None else image.tobytes()


def pil_bytes(image: Image.Image):
    """The image's pixel bytes (a bytes-like object): Pillow's own memory where it can be read
    without a copy (4 bytes per pixel for RGB), else image.tobytes(); read once per image inside
    shared_pil_bytes()."""
    memo = getattr(_shared, "memo", None)
    if memo is None:
        return _read_pil(image)
    hit = memo.get(id(image))
    if hit is None or hit[0] is not image:
        hit = memo[id(image)] = (image, _read_pil(image))
    return hit[1]


def _rgb_array(image: Image.Image) -> np.ndarray:
    """[H, W, C] uint8 of an RGB image, C 3 or 4: the pixels as Pillow holds them (a 4th byte of
    padding) where they can be read without a copy, else one packed copy."""
    w, h = image.size
    data = np.frombuffer(pil_bytes(image), dtype=np.uint8)
    return data.reshape(h, w, data.size // (h * w))


class RGBReader:
    """A PIL image -> [H, W, C] uint8 whose first 3 channels are the RGB that HF's processors see
    (`do_convert_rgb` as they do), or None where that is not 3-channel uint8 (the caller then runs
    HF's processor). C is 3, or 4 where the array is Pillow's own memory with its padding byte:
    callers take [..., :3], after copying the whole (a memcpy) where they copy it at all."""

    def __init__(self, convert_rgb: bool):
        self.convert_rgb = convert_rgb
        self._to_rgb = _hf_convert_to_rgb()

    def __call__(self, image) -> np.ndarray | None:
        if not isinstance(image, Image.Image):
            return None
        plain = image.mode == "RGB" and (not self.convert_rgb or image.info.get("transparency") is None)
        if plain:
            return _rgb_array(image)
        rgb = self._to_rgb(image) if self.convert_rgb else np.array(image)
        if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
            return None
        return rgb
