"""The fast Qwen2-VL image path gives HF's image processor's pixel values (within 1e-5; in practice
bit for bit) and grids: sizes that shrink, grow and keep their grid, aspect ratios, every PIL mode
HF converts, per-request min/max pixels; other inputs go to HF's processor."""
import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoImageProcessor, Qwen2VLImageProcessor

from vlmserve.models.qwen2_vl_image_processing import FastQwen2VLImageProcessor

DEFAULT_PIXELS = (56 * 56, 28 * 28 * 1280)  # HF's defaults for Qwen2-VL


def noise(w, h, seed, mode="RGB"):
    channels = {"RGB": 3, "RGBA": 4, "L": 1, "LA": 2, "CMYK": 4}[mode]
    arr = np.random.default_rng(seed).integers(0, 256, (h, w, channels), dtype=np.uint8)
    return Image.fromarray(arr[..., 0] if channels == 1 else arr, mode=mode)


@pytest.fixture(scope="module")
def hf():
    return Qwen2VLImageProcessor()


@pytest.fixture(scope="module")
def fast(hf):
    proc = FastQwen2VLImageProcessor.from_hf(hf, patch_size=14, merge_size=2, temporal_patch_size=2)
    assert proc is not None
    return proc


def check(fast, hf, image, pixels=DEFAULT_PIXELS):
    ours = fast(image, *pixels)
    assert ours is not None
    ref = hf(images=[image], size={"shortest_edge": pixels[0], "longest_edge": pixels[1]}, return_tensors="pt")
    assert torch.equal(ours[1], ref["image_grid_thw"])
    assert ours[0].shape == ref["pixel_values"].shape and ours[0].dtype == torch.float32
    assert (ours[0] - ref["pixel_values"]).abs().max() <= 1e-5


@pytest.mark.parametrize("size", [(448, 448), (1024, 1024), (2048, 2048), (1280, 720), (720, 1280),
                                  (33, 47), (28, 28), (3000, 20), (560, 840), (601, 403)])
def test_sizes_and_aspect_ratios(fast, hf, size):
    check(fast, hf, noise(*size, seed=sum(size)))


@pytest.mark.parametrize("mode", ["RGBA", "L", "LA", "CMYK", "P"])
def test_modes_hf_converts(fast, hf, mode):
    img = noise(200, 150, 3, "RGB").convert("P") if mode == "P" else noise(200, 150, 3, mode)
    check(fast, hf, img)


def test_rgb_with_a_transparent_colour(fast, hf):
    img = noise(120, 90, 4)
    img.info["transparency"] = (0, 0, 0)
    check(fast, hf, img)


@pytest.mark.parametrize("pixels", [(28 * 28 * 4, 28 * 28 * 20), (28 * 28 * 300, 28 * 28 * 400), (3136, 12845056)])
def test_request_pixel_bounds(fast, hf, pixels):
    for size in ((640, 480), (90, 60), (2048, 1536)):
        check(fast, hf, noise(*size, seed=size[0]), pixels)


def test_what_it_does_not_take(fast, hf):
    assert fast(np.zeros((28, 28, 3), np.uint8), *DEFAULT_PIXELS) is None  # arrays: HF's processor
    assert FastQwen2VLImageProcessor.from_hf(hf, patch_size=16, merge_size=2, temporal_patch_size=2) is None
    assert FastQwen2VLImageProcessor.from_hf(Qwen2VLImageProcessor(do_normalize=False), 14, 2, 2) is None


def test_checkpoint_processor_uses_it_and_matches_hf(tmp_path):
    """Through vlmserve's Qwen2-VL processor: PIL images take the fast path, arrays HF's, in one list."""
    from types import SimpleNamespace

    from vlmserve.models.qwen2_vl import Qwen2VLMultiModalProcessor
    from vlmserve.testing.checkpoints import make_qwen2_vl_checkpoint

    d = make_qwen2_vl_checkpoint(str(tmp_path), min_pixels=3136, max_pixels=28 * 28 * 256)
    from transformers import AutoConfig
    config = SimpleNamespace(model=d, hf_config=AutoConfig.from_pretrained(d), max_model_len=1024)
    proc = Qwen2VLMultiModalProcessor(config, tokenizer=None)
    assert proc.fast_image_processor is not None
    images = [noise(500, 300, 1), np.asarray(noise(64, 200, 2)), noise(1000, 1000, 3, "RGBA")]
    ours = proc.process_raw("image", images, {})
    ref = AutoImageProcessor.from_pretrained(d)(images=images, return_tensors="pt")
    assert torch.equal(torch.stack([it.data["image_grid_thw"] for it in ours]), ref["image_grid_thw"])
    assert (torch.cat([it.data["pixel_values"] for it in ours]) - ref["pixel_values"]).abs().max() <= 1e-5
    assert [it.num_tokens for it in ours] == (ref["image_grid_thw"].prod(-1) // 4).tolist()
