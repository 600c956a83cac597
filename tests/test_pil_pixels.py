"""PIL pixels read without a copy (multimodal/image_utils.py): where Pillow exports its own memory
(Arrow, Pillow >= 11.2), an RGB image is read as a view with Pillow's padding byte, whose first three
channels are exactly the image's pixels, which outlives the image object, and which processors and
hashes treat as they do the packed copy that tobytes() gives otherwise."""
import gc
import io

import numpy as np
import pytest
import torch
from PIL import Image

from vlmserve.multimodal.device_pixels import DevicePixels
from vlmserve.multimodal.hashing import hash_item
from vlmserve.multimodal.image_utils import RGBReader, _pillow_memory, pil_bytes

ARROW = hasattr(Image.Image, "__arrow_c_array__")


def noise(h, w, seed=0, channels=3):
    return np.random.default_rng(seed).integers(0, 256, (h, w, channels), dtype=np.uint8)


def jpeg_roundtrip(arr):
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "JPEG")
    buf.seek(0)
    return Image.open(buf)  # not loaded yet: reading it loads it


@pytest.mark.skipif(not ARROW, reason="this Pillow has no Arrow export")
@pytest.mark.parametrize("make", [lambda a: Image.fromarray(a), jpeg_roundtrip,
                                  lambda a: Image.fromarray(a).crop((3, 5, 250, 190)),
                                  lambda a: Image.fromarray(a).convert("L").convert("RGB")])
def test_rgb_view_is_the_image_without_a_copy(make):
    image = make(noise(200, 300))
    view = _pillow_memory(image)
    assert view is not None and view.shape == (image.height, image.width, 4) and not view.flags.writeable
    assert np.array_equal(view[..., :3], np.asarray(image))
    assert (view[..., 3] == 255).all()  # the padding byte is set, so equal images hash equal
    rgb = RGBReader(convert_rgb=True)(image)
    assert rgb.shape[-1] == 4 and np.array_equal(rgb[..., :3], np.asarray(image))


@pytest.mark.skipif(not ARROW, reason="this Pillow has no Arrow export")
def test_view_outlives_the_image():
    arr = noise(64, 80, seed=1)
    image = Image.fromarray(arr)
    view = _pillow_memory(image)
    del image
    gc.collect()
    Image.fromarray(noise(64, 80, seed=2)).tobytes()  # memory freed too early would be reused here
    assert np.array_equal(view[..., :3], arr)


def test_fallbacks_give_packed_rgb():
    arr = noise(2100, 2100, seed=3)  # 17.6 MB in Pillow's memory: rows in more than one block
    image = Image.fromarray(arr)
    assert _pillow_memory(image) is None
    assert np.array_equal(RGBReader(convert_rgb=True)(image), arr)
    assert _pillow_memory(Image.fromarray(arr[:10, :10, 0])) is None  # 1 byte per pixel: not exported
    rgba = Image.fromarray(noise(10, 12, channels=4), "RGBA")
    assert RGBReader(convert_rgb=False)(rgba) is None  # 4 real channels: HF's processor decides
    assert RGBReader(convert_rgb=True)(rgba).shape == (10, 12, 3)


def test_hash_is_by_content_whatever_the_image_object():
    arr = noise(700, 600, seed=4)
    first, second = Image.fromarray(arr), Image.fromarray(arr.copy())
    assert hash_item(first) == hash_item(second)
    changed = arr.copy()
    changed[699, 599, 2] ^= 1  # the last byte of the last pixel
    assert hash_item(Image.fromarray(changed)) != hash_item(first)
    assert hash_item(first) != hash_item(arr)  # a PIL image and an array are different items
    big = noise(1024, 1024, seed=5)  # hashed by blake3's threads
    assert hash_item(Image.fromarray(big)) == hash_item(Image.fromarray(big.copy()))


@pytest.mark.filterwarnings("ignore:The given NumPy array is not writable")
def test_staged_pixels_are_a_copy_of_the_image():
    arr = noise(40, 50, seed=6)
    image = Image.fromarray(arr)
    data = np.frombuffer(pil_bytes(image), dtype=np.uint8).reshape(40, 50, -1)
    staged = DevicePixels.staged(torch.from_numpy(data), lambda t: t[..., :3], "cpu")
    image.paste((0, 0, 0), (0, 0, 50, 40))  # the caller changes the image after handing it over
    assert np.array_equal(staged.to("cpu").numpy(), arr)
