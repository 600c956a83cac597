"""CLIP-style image preprocessing (LLaVA-1.5): RGB, resize of the shortest edge, centre crop,
rescale, normalize. It gives the numbers the checkpoint's HF image processor gives, following the
op order and dtypes of whichever HF backend that processor uses:
- "torchvision" (transformers 5's `CLIPImageProcessor`, 4.x's `CLIPImageProcessorFast`): uint8 CHW
  tensor, antialiased torchvision resize, crop, float32 with rescale folded into mean and std;
- "pil" (transformers 5's `CLIPImageProcessorPil`, 4.x's slow `CLIPImageProcessor`): PIL resize,
  crop, rescale in float64 then float32, normalize in float32,
without HF's per-call argument handling, validation and batching (most of its time on small
images). On a GPU engine, `device_pixels` leaves the resize and the rest to the encoder's device
(torchvision backend; multimodal/device_pixels.py). `FastCLIPImageProcessor.from_hf` gives None for
settings it does not reproduce, and `__call__` gives None for an image it cannot take: the caller
then runs HF's processor."""
from __future__ import annotations

import functools
import warnings

import numpy as np
import torch
from PIL import Image

from vlmserve.multimodal.device_pixels import DeviceCopies, DevicePixels
from vlmserve.multimodal.image_utils import RGBReader, hf_backend

_PIL_BICUBIC, _PIL_BILINEAR = 3, 2


def _field(d, name):
    """A key of HF's size dicts (a dict in 4.x, a SizeDict in 5.x)."""
    if d is None:
        return None
    return d.get(name) if isinstance(d, dict) else getattr(d, name, None)


class FastCLIPImageProcessor:
    def __init__(self, backend: str, shortest_edge: int | None, crop: tuple[int, int] | None, resample: int,
                 rescale_factor: float | None, mean: list[float] | None, std: list[float] | None,
                 convert_rgb: bool):
        self.backend = backend
        self.shortest_edge, self.crop, self.resample = shortest_edge, crop, resample
        self.rescale_factor, self.mean, self.std = rescale_factor, mean, std
        self._read_rgb = RGBReader(convert_rgb)
        if backend == "torchvision":
            import torchvision.transforms.v2.functional as tvF
            self._tvF = tvF
            self._interp = {_PIL_BICUBIC: tvF.InterpolationMode.BICUBIC,
                            _PIL_BILINEAR: tvF.InterpolationMode.BILINEAR}[resample]
            if mean is not None:  # HF folds the rescale into these
                mean_t, std_t = torch.tensor(mean).view(-1, 1, 1), torch.tensor(std).view(-1, 1, 1)
                if rescale_factor is not None:
                    mean_t, std_t = mean_t * (1.0 / rescale_factor), std_t * (1.0 / rescale_factor)
                self._norm = DeviceCopies(mean_t, std_t)
        else:
            self._mean_np = np.array(mean, dtype=np.float32)[:, None, None] if mean is not None else None
            self._std_np = np.array(std, dtype=np.float32)[:, None, None] if std is not None else None

    @classmethod
    def from_hf(cls, proc) -> FastCLIPImageProcessor | None:
        backend = hf_backend(proc)
        if backend is None or getattr(proc, "do_pad", False):
            return None
        if backend == "torchvision":
            try:
                import torchvision  # noqa: F401
            except ImportError:
                return None
        shortest = crop = None
        if getattr(proc, "do_resize", False):
            size = proc.size
            shortest = _field(size, "shortest_edge")
            if not shortest or any(_field(size, k) for k in ("longest_edge", "height", "width")):
                return None
        if getattr(proc, "do_center_crop", False):
            h, w = _field(proc.crop_size, "height"), _field(proc.crop_size, "width")
            if not h or not w:
                return None
            crop = (int(h), int(w))
        resample = int(proc.resample) if getattr(proc, "resample", None) is not None else _PIL_BILINEAR
        if resample not in (_PIL_BICUBIC, _PIL_BILINEAR):
            return None
        rescale = float(proc.rescale_factor) if getattr(proc, "do_rescale", False) else None
        mean = std = None
        if getattr(proc, "do_normalize", False):
            mean, std = proc.image_mean, proc.image_std
            mean = [float(mean)] * 3 if isinstance(mean, (int, float)) else [float(m) for m in mean]
            std = [float(std)] * 3 if isinstance(std, (int, float)) else [float(s) for s in std]
            if len(mean) != 3 or len(std) != 3:
                return None
        return cls(backend, int(shortest) if shortest else None, crop, resample, rescale, mean, std,
                   bool(getattr(proc, "do_convert_rgb", True)))

    def _resized_hw(self, h: int, w: int) -> tuple[int, int]:
        # HF's get_resize_output_image_size(default_to_square=False): the short edge to the size,
        # the long one scaled and truncated
        s = self.shortest_edge
        if w <= h:
            return int(s * h / w), s
        return s, int(s * w / h)

    def _crop_box(self, h: int, w: int) -> tuple[int, int, int, int] | None:
        ch, cw = self.crop
        if ch > h or cw > w:  # HF pads here; rare for CLIP settings: left to HF
            return None
        return int((h - ch) / 2.0), int((w - cw) / 2.0), ch, cw

    def _center_crop(self, x):
        """x [C, H, W] (tensor or array) -> its centre crop, or None where HF would pad instead."""
        box = self._crop_box(*x.shape[-2:])
        if box is None:
            return None
        top, left, ch, cw = box
        return x[:, top:top + ch, left:left + cw]

    def __call__(self, image) -> torch.Tensor | None:
        """A PIL image -> pixel values [3, H, W] float32, or None (then use HF's processor)."""
        rgb = self._read_rgb(image)
        if rgb is None:
            return None
        rgb = rgb[..., :3]  # without Pillow's padding byte, if any
        if self.backend == "torchvision":
            return self._torchvision(rgb)
        return self._pil(rgb)

    def _torchvision(self, rgb: np.ndarray) -> torch.Tensor | None:
        x = torch.from_numpy(np.ascontiguousarray(rgb.transpose(2, 0, 1)))  # a writable CHW copy
        if self.shortest_edge:
            hw = self._resized_hw(*x.shape[-2:])
            x = self._tvF.resize(x, list(hw), interpolation=self._interp, antialias=True)
        if self.crop:
            x = self._center_crop(x)
            if x is None:
                return None
        return self._rescale_normalize(x)

    def _rescale_normalize(self, x: torch.Tensor) -> torch.Tensor:
        if self.mean is not None:  # the same two float32 ops as HF's normalize (the first reads uint8 as is)
            mean, std = self._norm.on(x.device)
            return torch.sub(x, mean).div_(std) if x.dtype == torch.uint8 else x.to(torch.float32).sub_(mean).div_(std)
        if self.rescale_factor is not None:
            return x * self.rescale_factor
        return x.contiguous()

    def device_pixels(self, image, device: torch.device) -> DevicePixels | None:
        """Like __call__ (torchvision backend only), with the resize and the rest left to the
        encoder's device (multimodal/device_pixels.py); None: use __call__."""
        if self.backend != "torchvision":
            return None
        rgb = self._read_rgb(image)
        if rgb is None:
            return None
        h, w = rgb.shape[:2]
        hw = self._resized_hw(h, w) if self.shortest_edge else (h, w)
        if self.crop and self._crop_box(*hw) is None:
            return None
        with warnings.catch_warnings():  # PIL's buffer is read-only; nothing here writes to it
            warnings.simplefilter("ignore", UserWarning)
            x = torch.from_numpy(rgb)  # with Pillow's padding byte, if any: staged whole, dropped there
        return DevicePixels.view(x, functools.partial(self.finish_on_device, size=hw), device)

    def finish_on_device(self, rgb: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """uint8 [H, W, 3 or 4] (RGB, then any padding byte) on any device -> pixel values [3, H', W']
        there, as _torchvision gives."""
        x = rgb[..., :3].permute(2, 0, 1)
        if self.shortest_edge and tuple(size) != tuple(x.shape[-2:]):  # (torchvision returns a same-size input)
            x = self._tvF.resize(x.contiguous(), list(size), interpolation=self._interp, antialias=True)
        if self.crop:
            x = self._center_crop(x)
        return self._rescale_normalize(x)

    def _pil(self, rgb: np.ndarray) -> torch.Tensor | None:
        if self.shortest_edge:
            h, w = rgb.shape[:2]
            nh, nw = self._resized_hw(h, w)
            rgb = np.array(Image.fromarray(rgb).resize((nw, nh), resample=self.resample, reducing_gap=None))
        x = rgb.transpose(2, 0, 1)
        if self.crop:
            x = self._center_crop(x)
            if x is None:
                return None
        if self.rescale_factor is not None:
            x = (x.astype(np.float64) * self.rescale_factor).astype(np.float32)
        if self.mean is not None:
            if x.dtype != np.float32 and not np.issubdtype(x.dtype, np.floating):
                x = x.astype(np.float32)
            x = (x - self._mean_np.astype(x.dtype)) / self._std_np.astype(x.dtype)
        return torch.from_numpy(np.ascontiguousarray(x))
