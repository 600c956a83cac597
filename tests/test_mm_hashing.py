"""Content hashes of multimodal items (blake3, threaded for the largest buffers), and PIL pixels read
once per request for processing and hashing: stable hashes that tell content apart."""
import numpy as np
import torch
from PIL import Image

from vlmserve.multimodal.hashing import SeenMedia, fingerprint, hash_item
from vlmserve.multimodal.image_utils import pil_bytes, shared_pil_bytes


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
    with shared_pil_bytes():
        first = pil_bytes(img)
        assert pil_bytes(img) is first  # read once in the block
        assert hash_item(img) == outside
    img.putpixel((0, 0), (1, 2, 3))  # changed between requests: the next block reads it again
    with shared_pil_bytes():
        assert pil_bytes(img) is not first
        assert hash_item(img) != outside


def test_fingerprints_follow_hashes():
    """Equal hashes give equal fingerprints (the premise of hashing a new image after its encoder
    starts); what the hash tells apart by its header (mode, size, extra keys) the fingerprint does too."""
    rng = np.random.default_rng(2)
    arr = rng.integers(0, 256, (300, 200, 3), dtype=np.uint8)
    img = Image.fromarray(arr)
    key = fingerprint(img, modality="image")
    assert key is not None and fingerprint(img.copy(), modality="image") == key
    assert fingerprint(img, modality="image", max_pixels=100) != key
    assert fingerprint(Image.fromarray(arr[:, :100]), modality="image") != key
    assert fingerprint(img.convert("RGBA"), modality="image") != key
    assert fingerprint(arr) is None and fingerprint(torch.from_numpy(arr)) is None


def test_seen_media_keeps_the_most_recent():
    seen = SeenMedia(capacity=3)
    for k in (b"a", b"b", b"c"):
        seen.add(k)
    seen.add(b"a")  # seen again: the most recent now
    seen.add(b"d")
    assert b"b" not in seen and all(k in seen for k in (b"a", b"c", b"d"))
