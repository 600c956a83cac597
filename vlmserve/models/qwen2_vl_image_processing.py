"""Qwen2-VL image preprocessing that gives, bit for bit, what the checkpoint's HF image processor
(transformers 5's torchvision backend, 4.x's `Qwen2VLImageProcessorFast`) gives, in about half
its time on large images:
- the grid from HF's own `smart_resize`;
- the antialiased resize of the uint8 image read in place from PIL's buffer: an HWC array seen as
  a channels-last CHW tensor, which torch's uint8 resize kernel takes without the two layout
  copies HF makes;
- rescale and normalize folded into one float32 subtract and divide (HF's ops, in its order),
  a strip of the image at a time, each strip copied straight into the patch layout (merge blocks
  of patches, the frame repeated for the temporal patch): the output is the only large fresh
  allocation, where HF makes a float copy of the whole image first (on large images the page
  faults of fresh memory cost more than the arithmetic).
On a GPU engine, `device_pixels` leaves the resize and the rest to the encoder's device
(multimodal/device_pixels.py).
`FastQwen2VLImageProcessor.from_hf` gives None for settings it does not reproduce, and `__call__`
gives None for an image it cannot take (not a PIL image): the caller then runs HF's processor."""
from __future__ import annotations

import functools
import warnings

import torch

from vlmserve.multimodal.device_pixels import DeviceCopies, DevicePixels
from vlmserve.multimodal.image_utils import RGBReader, hf_backend

_PIL_BICUBIC, _PIL_BILINEAR = 3, 2


class FastQwen2VLImageProcessor:
    def __init__(self, patch_size: int, merge_size: int, temporal_patch_size: int, resample: int,
                 mean: torch.Tensor, std: torch.Tensor, convert_rgb: bool):
        import torchvision.transforms.v2.functional as tvF
        from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize

        self.patch, self.merge, self.temporal = patch_size, merge_size, temporal_patch_size
        self.mean, self.std = mean.view(3, 1, 1), std.view(3, 1, 1)  # rescale folded in, as HF folds it
        self._resize, self._smart_resize = tvF.resize, smart_resize
        self._interp = {_PIL_BICUBIC: tvF.InterpolationMode.BICUBIC,
                        _PIL_BILINEAR: tvF.InterpolationMode.BILINEAR}[resample]
        self._read_rgb = RGBReader(convert_rgb)
        self._norm = DeviceCopies(self.mean, self.std)

    @classmethod
    def from_hf(cls, proc, patch_size: int, merge_size: int,
                temporal_patch_size: int) -> FastQwen2VLImageProcessor | None:
        """patch/merge/temporal sizes come from the model's vision config; the processor's must agree."""
        if hf_backend(proc) != "torchvision":
            return None
        try:
            import torchvision  # noqa: F401
            from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize  # noqa: F401
        except ImportError:
            return None
        if (getattr(proc, "patch_size", None), getattr(proc, "merge_size", None),
                getattr(proc, "temporal_patch_size", None)) != (patch_size, merge_size, temporal_patch_size):
            return None
        if not all(getattr(proc, flag, False) for flag in ("do_resize", "do_rescale", "do_normalize")):
            return None
        resample = int(proc.resample) if getattr(proc, "resample", None) is not None else _PIL_BICUBIC
        mean, std = proc.image_mean, proc.image_std
        mean = [float(mean)] * 3 if isinstance(mean, (int, float)) else [float(m) for m in mean]
        std = [float(std)] * 3 if isinstance(std, (int, float)) else [float(s) for s in std]
        if resample not in (_PIL_BICUBIC, _PIL_BILINEAR) or len(mean) != 3 or len(std) != 3:
            return None
        scale = 1.0 / float(proc.rescale_factor)  # HF: torch.tensor(mean) * (1.0 / rescale_factor)
        return cls(patch_size, merge_size, temporal_patch_size, resample, torch.tensor(mean) * scale,
                   torch.tensor(std) * scale, bool(getattr(proc, "do_convert_rgb", True)))

    def resized_hw(self, height: int, width: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
        return self._smart_resize(height, width, factor=self.patch * self.merge,
                                  min_pixels=min_pixels, max_pixels=max_pixels)

    def __call__(self, image, min_pixels: int, max_pixels: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """A PIL image -> (pixel values [patches, 3 * temporal * patch^2] float32, grid [1, h, w]),
        or None (then use HF's processor)."""
        rgb = self._read_rgb(image)
        if rgb is None:
            return None
        height, width = rgb.shape[:2]
        h, w = self.resized_hw(height, width, min_pixels, max_pixels)
        with warnings.catch_warnings():  # PIL's buffer is read-only; nothing here writes to it
            warnings.simplefilter("ignore", UserWarning)
            x = torch.from_numpy(rgb[..., :3]).permute(2, 0, 1)  # channels-last view, no copy
        x = self._resize(x, [h, w], interpolation=self._interp, antialias=True)
        return self._normalize_into_patches(x), torch.tensor([[1, h // self.patch, w // self.patch]])

    def device_pixels(self, image, min_pixels: int, max_pixels: int,
                      device: torch.device) -> tuple[DevicePixels, torch.Tensor] | None:
        """Like __call__, with the resize and the rest left to the encoder's device: (DevicePixels
        that give the pixel values there, grid [1, h, w]), or None (then use __call__)."""
        rgb = self._read_rgb(image)
        if rgb is None:
            return None
        h, w = self.resized_hw(rgb.shape[0], rgb.shape[1], min_pixels, max_pixels)
        with warnings.catch_warnings():  # PIL's buffer is read-only; nothing here writes to it
            warnings.simplefilter("ignore", UserWarning)
            x = torch.from_numpy(rgb)  # with Pillow's padding byte, if any: staged whole, dropped there
        return (DevicePixels.view(x, functools.partial(self.finish_on_device, size=(h, w)), device),
                torch.tensor([[1, h // self.patch, w // self.patch]]))

    def finish_on_device(self, rgb: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """uint8 [H, W, 3 or 4] (RGB, then any padding byte) on any device -> the pixel values there:
        HF's resize, rescale and normalize, and patch layout, as whole-image ops (on the CPU:
        __call__'s numbers)."""
        x = rgb[..., :3].permute(2, 0, 1)
        mean, std = self._norm.on(x.device)
        if x.is_cuda:
            x = resize_as_torchvision_on_cuda(x, size, self._interp.value).sub_(mean).div_(std)
        else:  # torchvision's native uint8 kernel: other numbers than the float path
            x = self._resize(x, list(size), interpolation=self._interp, antialias=True)
            x = (x.to(torch.float32) - mean) / std
        p, m, t = self.patch, self.merge, self.temporal
        gh, gw = size[0] // p, size[1] // p
        x = x.view(1, 3, gh // m, m, p, gw // m, m, p).permute(2, 5, 3, 6, 1, 0, 4, 7)
        return x.expand(gh // m, gw // m, m, m, 3, t, p, p).reshape(gh * gw, 3 * t * p * p)

    def _normalize_into_patches(self, x: torch.Tensor) -> torch.Tensor:
        """uint8 [3, H, W] (any layout) -> float32 [patches, 3 * temporal * patch^2] in HF's order:
        merge x merge blocks row by row, each block's patches row by row; per patch the channels,
        then the frame repeated, then the pixels. One strip of merge blocks at a time, so that the
        float copy being normalized stays in cache and the only large fresh memory (whose page
        faults cost more than the arithmetic) is the output."""
        p, m, t = self.patch, self.merge, self.temporal
        gh, gw = x.shape[1] // p, x.shape[2] // p
        out = torch.empty(gh // m, gw // m, m, m, 3, t, p, p)
        strip = m * p
        for i in range(gh // m):
            f = x[:, i * strip:(i + 1) * strip].to(dtype=torch.float32, memory_format=torch.contiguous_format)
            f.sub_(self.mean).div_(self.std)  # HF's fused rescale + normalize, the same float32 ops
            dst = out[i, :, :, :, :]
            dst[..., 0, :, :].copy_(f.view(3, m, p, gw // m, m, p).permute(3, 1, 4, 0, 2, 5))
            for k in range(1, t):  # a still image is every frame of its temporal patch
                dst[..., k, :, :].copy_(dst[..., 0, :, :])
        return out.view(gh * gw, 3 * t * p * p)


def resize_as_torchvision_on_cuda(image: torch.Tensor, size: tuple[int, int], mode: str) -> torch.Tensor:
    """uint8 [3, H, W] (any strides) -> float32 [3, h, w]: the values of torchvision's antialiased
    `resize` (bilinear or bicubic) where it takes the float path, as it does on CUDA: the same float
    copy, interpolation, clamp (bicubic) and rounding, without its cast back to uint8 and the
    caller's cast to float again (identities on whole values in 0..255). Fewer launches and no
    torchvision Python before a lone image's encoder: the host queues them while the GPU waits."""
    C, H, W = image.shape
    if (H, W) == tuple(size):
        return image.to(torch.float32)
    x = image.reshape(1, C, H, W)
    strides = x.stride()
    if x.is_contiguous(memory_format=torch.channels_last) and x.numel() != strides[0]:
        x = x.as_strided(x.shape, (x.numel(), *strides[1:]))  # as torchvision restrides, for the same layout
    x = torch.nn.functional.interpolate(x.to(torch.float32), size=list(size), mode=mode, align_corners=False,
                                        antialias=True)
    if mode == "bicubic":
        x = x.clamp_(min=0, max=255)
    return x.round_().reshape(C, *size)
