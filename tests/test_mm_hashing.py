"""Content hashes of multimodal items (blake3, threaded for the largest buffers), and PIL pixels read
once per request for processing and hashing: stable hashes that tell content apart, and the
pixel reader gives tobytes()' bytes for every mode."""
import pytest
import numpy as np
import torch
from PIL import Image

from vlmserve.multimodal.hashing import hash_item
from vlmserve.multimodal.image_utils import pil_pixels, read_pil_pixels, shared_pil_pixels


def test_large_buffers_hash_by_content():
    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, (1024, 1024, 3), dtype=np.uint8)  # 3 MB: by blake3's threads
    assert hash_item(a) == hash_item(a.copy())
    assert hash_item(torch.from_numpy(a)) == hash_item(torch.from_numpy(a.copy()))
    for where in (0, a.size // 2, a.size - 1):  # a change in any part changes the hash
        b = a.copy()
        b.reshape(-1)[where] ^= 1
        assert hash_item(b) != hash_item(a)
    assert hash_item(a[:, :, ::-1]) != hash_item(a)  # a strided view hashes its own content
    big = rng.integers(0, 256, (3, 1024, 1024, 3), dtype=np.uint8)  # 9 MB: by blake3's threads
    assert hash_item(big) == hash_item(big.copy())
    big2 = big.copy()
    big2[2, 1023, 1023, 2] ^= 1
    assert hash_item(big2) != hash_item(big)
    small = rng.standard_normal((4, 7)).astype(np.float32)
    assert hash_item(small) == hash_item(small.copy()) != hash_item(small + 1)


def test_pil_pixels_read_once_per_block_and_never_stale():
    img = Image.fromarray(np.random.default_rng(1).integers(0, 256, (700, 600, 3), dtype=np.uint8))
    outside = hash_item(img)
    with shared_pil_pixels():
        first = pil_pixels(img)
        assert pil_pixels(img) is first  # read once in the block
        assert hash_item(img) == outside
    img.putpixel((0, 0), (1, 2, 3))  # changed between requests: the next block reads it again
    with shared_pil_pixels():
        assert pil_pixels(img) is not first
        assert hash_item(img) != outside


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "RGBX", "CMYK", "YCbCr", "LAB", "HSV", "L", "P", "LA", "PA",
                                  "I", "F", "1", "I;16"])
@pytest.mark.parametrize("size", [(1, 1), (3, 5), (333, 217), (1024, 1024)])
def test_read_pil_pixels_equals_tobytes(mode, size):
    rng = np.random.default_rng(sum(size))
    rgba = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 4), dtype=np.uint8), "RGBA")
    img = rgba.convert(mode) if mode not in ("LAB", "HSV", "PA") else \
        Image.merge(mode, [rgba.getchannel(i).convert("L") for i in range(len(mode) if mode != "PA" else 2)])
    got = read_pil_pixels(img)
    assert got.dtype == np.uint8 and got.ndim == 1
    assert got.tobytes() == img.tobytes()
    assert read_pil_pixels(Image.new(mode, (0, 3))).size == 0
