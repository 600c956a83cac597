"""Preprocessing finished on the encoder's device (multimodal/device_pixels.py): on the CPU, the
DevicePixels of the fast Qwen2-VL and CLIP processors give the host path's pixel values bit for
bit, and an engine whose processor hands them over generates the same tokens and logprobs as one
that does not; on a GPU, they give what HF's processor gives with device="cuda"."""
import numpy as np
import pytest
import torch
from PIL import Image

from vlmserve import LLM, SamplingParams
from vlmserve.models.clip_image_processing import FastCLIPImageProcessor
from vlmserve.models.qwen2_vl_image_processing import FastQwen2VLImageProcessor
from vlmserve.multimodal.device_pixels import DevicePixels, device_preprocess_enabled
from vlmserve.testing.checkpoints import make_qwen2_vl_checkpoint

GREEDY = SamplingParams(temperature=0.0, max_tokens=6, logprobs=5, ignore_eos=True)
CUDA = torch.cuda.is_available()
QWEN_PIXELS = (56 * 56, 28 * 28 * 1280)
CLIP_MEAN, CLIP_STD = [0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711]


def noise(w, h, seed, mode="RGB"):
    arr = np.random.default_rng(seed).integers(0, 256, (h, w, 4 if mode == "RGBA" else 3), dtype=np.uint8)
    return Image.fromarray(arr, mode)


def qwen_fast():
    from transformers import Qwen2VLImageProcessor
    hf = Qwen2VLImageProcessor()
    return hf, FastQwen2VLImageProcessor.from_hf(hf, patch_size=14, merge_size=2, temporal_patch_size=2)


def clip_fast(**kw):
    from transformers import CLIPImageProcessor
    hf = CLIPImageProcessor(**{"size": {"shortest_edge": 336}, "crop_size": {"height": 336, "width": 336},
                               "image_mean": CLIP_MEAN, "image_std": CLIP_STD, **kw})
    fast = FastCLIPImageProcessor.from_hf(hf)
    assert fast is not None and fast.backend == "torchvision"
    return hf, fast


@pytest.mark.parametrize("size", [(1024, 1024), (1280, 720), (33, 47), (601, 403), (3000, 20)])
def test_qwen2_vl_device_path_on_cpu_is_the_host_path(size):
    _, fast = qwen_fast()
    image = noise(*size, seed=sum(size))
    pixels, grid = fast(image, *QWEN_PIXELS)
    deferred, grid2 = fast.device_pixels(image, *QWEN_PIXELS, device=torch.device("cpu"))
    assert isinstance(deferred, DevicePixels) and deferred.nbytes == size[0] * size[1] * deferred.image.shape[-1]
    assert torch.equal(grid, grid2)
    assert torch.equal(deferred.to("cpu"), pixels)


@pytest.mark.parametrize("size", [(336, 336), (640, 480), (333, 517), (31, 45)])
@pytest.mark.parametrize("setting", [{}, {"resample": 2}, {"do_normalize": False}])
def test_clip_device_path_on_cpu_is_the_host_path(size, setting):
    _, fast = clip_fast(**setting)
    image = noise(*size, seed=sum(size), mode="RGBA" if size[0] == 31 else "RGB")
    deferred = fast.device_pixels(image, torch.device("cpu"))
    assert torch.equal(deferred.to("cpu"), fast(image))


@pytest.mark.parametrize("mode", ["bicubic", "bilinear"])
@pytest.mark.parametrize("channels", [3, 4])
def test_cuda_resize_is_torchvisions_float_path(monkeypatch, mode, channels):
    """resize_as_torchvision_on_cuda against torchvision's own code for the path it takes on CUDA (its
    float path, forced on the CPU here), on RGB and RGBX views as the device pixels hand them over."""
    import torchvision.transforms.v2.functional as tvF
    from torchvision.transforms.v2.functional import _geometry

    from vlmserve.models.qwen2_vl_image_processing import resize_as_torchvision_on_cuda

    monkeypatch.setattr(_geometry, "_do_native_uint8_resize_on_cpu", lambda interpolation: False)
    rgbx = torch.from_numpy(np.random.default_rng(channels).integers(0, 256, (61, 45, channels), dtype=np.uint8))
    image = rgbx[..., :3].permute(2, 0, 1)
    for size in ((84, 56), (28, 28), (61, 45)):
        ref = tvF.resize(image, list(size), interpolation=tvF.InterpolationMode(mode), antialias=True)
        out = resize_as_torchvision_on_cuda(image, size, mode)
        assert out.dtype == torch.float32 and out.shape == (3, *size)
        assert torch.equal(out, ref.to(torch.float32))


def test_clip_device_path_leaves_padding_to_hf():
    _, fast = clip_fast(size={"shortest_edge": 32}, crop_size={"height": 48, "width": 48})
    assert fast.device_pixels(Image.new("RGB", (40, 30)), torch.device("cpu")) is None


def test_enabled_only_on_cuda(monkeypatch):
    assert not device_preprocess_enabled(torch.device("cpu"))
    assert not device_preprocess_enabled(None)
    assert device_preprocess_enabled("cuda")
    monkeypatch.setenv("VLMSERVE_DEVICE_PREPROCESS", "0")
    assert not device_preprocess_enabled("cuda")


def _same_outputs(a, b):
    for x, y in zip(a, b):
        assert x.outputs[0].token_ids == y.outputs[0].token_ids
        for pa, pb in zip(x.outputs[0].logprobs, y.outputs[0].logprobs):
            assert pa.keys() == pb.keys()
            assert all(abs(pa[t].logprob - pb[t].logprob) < 1e-5 for t in pa)


def _generate_both_ways(llm, prompts):
    proc = llm.llm_engine.mm_processor
    host = llm.generate(prompts, GREEDY, use_tqdm=False)
    runner = llm.llm_engine.runner
    runner.encoder_cache.entries.clear()  # the same images again: encode them again
    runner.encoder_cache.num_tokens = 0
    llm.llm_engine.block_manager.reset_prefix_cache()
    proc.media_device = torch.device("cpu")
    try:
        items = proc.apply(*proc.dummy_request({"image": 1}), {"image": 1})[1]
        assert isinstance(items[0].data["pixel_values"], DevicePixels)
        deferred = llm.generate(prompts, GREEDY, use_tqdm=False)
    finally:
        proc.media_device = None
    return host, deferred


def test_qwen2_vl_engine_with_device_pixels_generates_the_same(tmp_path):
    d = make_qwen2_vl_checkpoint(str(tmp_path / "qwen"))
    llm = LLM(d, dtype="float32", max_model_len=256, limit_mm_per_prompt={"image": 2})
    image = "<|vision_start|><|image_pad|><|vision_end|>"
    two = [noise(300, 70, 2), noise(60, 200, 3)]
    prompts = [{"prompt": f"{image} what is it", "multi_modal_data": {"image": noise(120, 90, 1)}},
               {"prompt": f"{image} and {image}", "multi_modal_data": {"image": two}}]
    _same_outputs(*_generate_both_ways(llm, prompts))


def test_llava_engine_with_device_pixels_generates_the_same(llava_dir):
    llm = LLM(llava_dir, dtype="float32", max_model_len=256)
    prompts = [{"prompt": f"USER: <image>\nwhat is it {i} ASSISTANT:",
                "multi_modal_data": {"image": noise(70 + 9 * i, 50, i)}} for i in range(3)]
    _same_outputs(*_generate_both_ways(llm, prompts))


@pytest.mark.skipif(not CUDA, reason="needs a GPU")
def test_gpu_device_path_is_hf_on_the_gpu():
    hf, fast = qwen_fast()
    for size in ((1024, 1024), (1280, 720), (601, 403)):
        image = noise(*size, seed=sum(size))
        deferred, grid = fast.device_pixels(image, *QWEN_PIXELS, device=torch.device("cuda"))
        ref = hf(images=[image], size={"shortest_edge": QWEN_PIXELS[0], "longest_edge": QWEN_PIXELS[1]},
                 return_tensors="pt", device="cuda")
        assert torch.equal(grid, ref["image_grid_thw"].cpu())
        assert not deferred.is_staged and deferred.stage(threads=4).image.is_pinned()
        assert torch.equal(deferred.to("cuda"), ref["pixel_values"].to("cuda"))
    hf, fast = clip_fast()
    for size in ((336, 336), (640, 480), (333, 517)):
        image = noise(*size, seed=sum(size))
        ref = hf(images=[image], return_tensors="pt", device="cuda")["pixel_values"][0]
        assert torch.equal(fast.device_pixels(image, torch.device("cuda")).to("cuda"), ref.to("cuda"))


def test_pinned_budget_counts_bytes_across_threads():
    import threading

    from vlmserve.multimodal.device_pixels import PinnedBudget

    budget = PinnedBudget(1000)
    taken = []

    def worker():
        for _ in range(100):
            taken.append(budget.take(7))

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sum(taken) == 1000 // 7 and budget.used == 7 * (1000 // 7)
    assert not budget.take(7)
    budget.give_back(7)
    assert budget.take(7) and not budget.take(1000)


@pytest.mark.skipif(not CUDA, reason="needs a GPU")
def test_staging_pins_within_the_budget_only(monkeypatch):
    """Past the budget an image stays in pageable memory (and still reaches the device); a pinned
    image gives its bytes back once it is gone."""
    import gc

    from vlmserve.multimodal import device_pixels as dp

    monkeypatch.setattr(dp, "PINNED_BUDGET", dp.PinnedBudget(3 << 20))
    images = [torch.full((1024, 1024, 3), i, dtype=torch.uint8) for i in range(2)]
    first = DevicePixels.staged(images[0], lambda t: t, "cuda")
    second = DevicePixels.staged(images[1], lambda t: t, "cuda")
    assert first.image.is_pinned() and not second.image.is_pinned()
    assert dp.PINNED_BUDGET.used == 3 << 20
    assert torch.equal(second.to("cuda").cpu(), images[1]) and torch.equal(first.to("cuda").cpu(), images[0])
    del first
    gc.collect()
    assert dp.PINNED_BUDGET.used == 0
    assert DevicePixels.staged(images[1], lambda t: t, "cuda").image.is_pinned()
