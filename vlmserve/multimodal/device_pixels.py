"""Image preprocessing finished on the device that runs the vision encoder.

On a GPU, resizing and normalizing a large image on the host costs more than encoding it (a
1024x1024 image for Qwen2-VL: ~25 ms on the CPU, ~0.3 ms on an H100), and the float32 pixel values
it gives are 8x the bytes of the uint8 image to copy to the device. So where the engine runs on
CUDA, a processor may hand over `DevicePixels` in an item's data instead of pixel values: the
decoded uint8 image and the function that finishes it. The image is staged (copied into pinned
memory, so that the copy to the device is asynchronous) once the processing is done. The model
runner moves item data with `.to(device)`, which here copies the image and runs the function
there; models see ordinary pixel tensors.

The function is the processor's own torch/torchvision code, so on the CPU it gives the host path's
numbers bit for bit, and on the GPU HF's processor's numbers for `device="cuda"` (GPU resampling
rounds differently from the CPU's uint8 kernels: values differ by one uint8 step in places).
`VLMSERVE_DEVICE_PREPROCESS=0` keeps all preprocessing on the host."""
from __future__ import annotations

import os
import threading
import weakref
from collections.abc import Callable

import torch

from vlmserve.device_utils import copy_by_one_thread, copy_in_parallel


def device_preprocess_enabled(device: torch.device | str | None) -> bool:
    """Whether processors should hand over DevicePixels for an engine on `device`."""
    if device is None or torch.device(device).type != "cuda":
        return False
    return os.environ.get("VLMSERVE_DEVICE_PREPROCESS", "1") != "0"


class PinnedBudget:
    """Bytes of staged images held in pinned memory at once. The prompt pipeline stages images well
    ahead of their step (a throughput run: all of them), and each live pinned buffer is a fresh
    cudaHostAlloc, which holds the driver's lock: on an H200 host, 86 of them (12.6 ms each for
    Qwen2-VL's 1024x1024 images) made the engine thread's kernel launches take 0.5 ms and a step
    0.24 s longer (scripts/gpu_step_trace.py --profile-prefill-step 0). Within the budget, freed
    buffers come back through torch's pinned-memory cache instead; images past it stay in pageable
    memory, which the runner's copy reads synchronously (~0.3 ms for 3 MB). It also bounds the
    pinned memory a long queue of requests holds. VLMSERVE_PINNED_STAGING_MB sets it (64)."""

    def __init__(self, limit_bytes: int):
        self.limit = limit_bytes
        self.used = 0
        self._lock = threading.Lock()

    def take(self, nbytes: int) -> bool:
        with self._lock:
            if self.used + nbytes > self.limit:
                return False
            self.used += nbytes
            return True

    def give_back(self, nbytes: int) -> None:
        with self._lock:
            self.used -= nbytes


PINNED_BUDGET = PinnedBudget(int(float(os.environ.get("VLMSERVE_PINNED_STAGING_MB", "64")) * (1 << 20)))


class DevicePixels:
    def __init__(self, image: torch.Tensor, finish: Callable[[torch.Tensor], torch.Tensor],
                 stage_for: torch.device | str | None = None):
        """image: the uint8 image as the processor's `finish` takes it; finish(image on a device)
        -> the pixel values the model takes, on that device. stage_for: the image is still a view
        of the caller's memory (such as a PIL image's), to be copied by `stage` for that device."""
        self.image = image
        self.finish = finish
        self.stage_for = stage_for
        self.is_staged = stage_for is None

    @classmethod
    def view(cls, image: torch.Tensor, finish: Callable[[torch.Tensor], torch.Tensor],
             device: torch.device | str | None) -> DevicePixels:
        """Pixels that still read the caller's memory, until `stage` copies them (the processor's
        caller says with how many threads)."""
        return cls(image, finish, stage_for=device if device is not None else "cpu")

    @classmethod
    def staged(cls, image: torch.Tensor, finish: Callable[[torch.Tensor], torch.Tensor],
               device: torch.device | str | None) -> DevicePixels:
        return cls.view(image, finish, device).stage()

    def stage(self, threads: int = 1) -> DevicePixels:
        """Replace the view by a copy of the image, pinned for a CUDA device within PINNED_BUDGET (the
        runner's copy then does not wait), else pageable; made by up to `threads` threads. Once;
        returns self."""
        if self.is_staged:
            return self
        image, device = self.image, self.stage_for
        nbytes = image.numel() * image.element_size()
        if torch.device(device).type == "cuda" and torch.cuda.is_available() and PINNED_BUDGET.take(nbytes):
            try:
                copy = torch.empty(image.shape, dtype=image.dtype, pin_memory=True)
            except BaseException:
                PINNED_BUDGET.give_back(nbytes)
                raise
            weakref.finalize(copy, PINNED_BUDGET.give_back, nbytes)
        else:
            copy = torch.empty(image.shape, dtype=image.dtype)
        # a media worker thread each; several for a lone prompt's images, which hold up its encoder
        self.image = copy_by_one_thread(copy, image) if threads <= 1 else copy_in_parallel(copy, image, threads)
        self.is_staged, self.stage_for = True, None
        return self

    def to(self, device: torch.device | str, non_blocking: bool = True) -> torch.Tensor:
        return self.finish(self.image.to(device, non_blocking=non_blocking))

    @property
    def nbytes(self) -> int:
        return self.image.numel() * self.image.element_size()

    def __repr__(self) -> str:
        state = "staged" if self.is_staged else "a view"
        return f"DevicePixels(uint8 image {tuple(self.image.shape)}, {state})"


def stage_all(data: dict, threads: int = 1) -> None:
    """Stage the DevicePixels among an item's data (views of the caller's memory until then)."""
    for v in data.values():
        if isinstance(v, DevicePixels):
            v.stage(threads)


class DeviceCopies:
    """Small constant tensors (a processor's mean and std) and their copies on each device asked for,
    made once per device."""

    def __init__(self, *tensors: torch.Tensor):
        self.tensors = tensors
        self._copies: dict[torch.device, tuple[torch.Tensor, ...]] = {}

    def on(self, device: torch.device) -> tuple[torch.Tensor, ...]:
        if device not in self._copies:
            self._copies[device] = tuple(t.to(device) for t in self.tensors)
        return self._copies[device]
