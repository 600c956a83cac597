"""The fast CLIP image preprocessing gives what HF's CLIP image processor gives (within 1e-6), for
HF's torchvision backend and its PIL backend, on images of several sizes, aspect ratios and modes;
LlavaProcessor uses it for PIL images and HF's processor otherwise."""
import numpy as np
import pytest
import torch
from PIL import Image

from vlmserve.models.clip_image_processing import FastCLIPImageProcessor
from vlmserve.multimodal.image_utils import hf_backend

MEAN, STD = [0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711]


def _hf_processors(**kw):
    """HF's CLIP image processors of both backends that this transformers has."""
    import transformers
    out = [transformers.CLIPImageProcessor(**kw)]
    pil_cls = getattr(transformers, "CLIPImageProcessorPil", None)  # transformers 5
    if pil_cls is not None:
        out.append(pil_cls(**kw))
    else:  # transformers 4.x: the slow one is CLIPImageProcessor, the fast one has its own class
        fast_cls = getattr(transformers, "CLIPImageProcessorFast", None)
        if fast_cls is not None:
            out.append(fast_cls(**kw))
    return out


def _images():
    rng = np.random.default_rng(0)

    def noise(w, h, c=3):
        shape = (h, w) if c == 1 else (h, w, c)
        return rng.integers(0, 256, shape, dtype=np.uint8)

    smooth = np.linspace(0, 255, 400 * 300 * 3).reshape(300, 400, 3).astype(np.uint8)
    palette = Image.fromarray(noise(97, 61)).convert("P", palette=Image.Palette.ADAPTIVE)
    palette.info["transparency"] = 3
    keyed = Image.fromarray(noise(50, 70))
    keyed.info["transparency"] = (10, 20, 30)
    return {
        "rgb_square_336": Image.fromarray(noise(336, 336)),
        "rgb_landscape": Image.fromarray(noise(640, 480)),
        "rgb_portrait_odd": Image.fromarray(noise(333, 517)),
        "rgb_small_upscaled": Image.fromarray(noise(31, 45)),
        "rgb_smooth": Image.fromarray(smooth),
        "rgba": Image.fromarray(noise(401, 299, 4), "RGBA"),
        "l": Image.fromarray(noise(257, 129, 1), "L"),
        "la": Image.fromarray(noise(120, 90, 4), "RGBA").convert("LA"),
        "p_transparent": palette,
        "rgb_keyed_transparency": keyed,
    }


SETTINGS = {
    "llava_336": dict(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336},
                      image_mean=MEAN, image_std=STD),
    "clip_224_bilinear": dict(size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224},
                              resample=2, image_mean=MEAN, image_std=STD),
    "no_crop": dict(size={"shortest_edge": 64}, do_center_crop=False, image_mean=MEAN, image_std=STD),
    "rescale_only": dict(size={"shortest_edge": 48}, crop_size={"height": 40, "width": 40}, do_normalize=False),
}


@pytest.mark.parametrize("setting", list(SETTINGS))
def test_matches_hf(setting):
    images = _images()
    for hf in _hf_processors(**SETTINGS[setting]):
        fast = FastCLIPImageProcessor.from_hf(hf)
        assert fast is not None, type(hf).__name__
        assert fast.backend == hf_backend(hf)
        for name, image in images.items():
            ref = hf(images=[image], return_tensors="pt")["pixel_values"][0]
            out = fast(image)
            assert out is not None and out.dtype == ref.dtype == torch.float32, name
            assert out.shape == ref.shape, (name, fast.backend)
            err = (out.double() - ref.double()).abs().max().item()
            assert err <= 1e-6, (setting, fast.backend, name, err)


def test_unsupported_settings_and_inputs_fall_back():
    import transformers
    hf = transformers.CLIPImageProcessor(size={"height": 64, "width": 64}, crop_size={"height": 64, "width": 64})
    assert FastCLIPImageProcessor.from_hf(hf) is None  # a square resize is not the shortest-edge one
    hf = transformers.CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 48, "width": 48})
    fast = FastCLIPImageProcessor.from_hf(hf)
    assert fast(Image.new("RGB", (40, 30))) is None  # a crop larger than the image: HF pads
    assert fast(np.zeros((30, 40, 3), dtype=np.uint8)) is None  # arrays: HF infers their layout


def test_llava_processor_uses_fast_path(llava_dir):
    from transformers import AutoImageProcessor

    from vlmserve.config import ModelConfig
    from vlmserve.engine.llm_engine import load_tokenizer
    from vlmserve.models.llava import LlavaProcessor

    cfg = ModelConfig.create(llava_dir, "float32", None, 0, False, torch.device("cpu"))
    proc = LlavaProcessor(cfg, load_tokenizer(llava_dir))
    assert proc.fast_image_processor is not None
    hf = AutoImageProcessor.from_pretrained(llava_dir)
    rgba = Image.fromarray(np.random.default_rng(1).integers(0, 256, (50, 70, 4), dtype=np.uint8), "RGBA")
    array = np.random.default_rng(2).integers(0, 256, (40, 60, 3), dtype=np.uint8)
    items = proc.process_raw("image", [rgba, array], {})
    for item, image in zip(items, [rgba, array]):
        ref = hf(images=[image], return_tensors="pt")["pixel_values"][0]
        assert (item.data["pixel_values"] - ref).abs().max().item() <= 1e-6
        assert item.num_tokens == proc.num_image_tokens
