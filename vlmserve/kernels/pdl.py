"""Programmatic dependent launch (PDL) for the Triton kernels of a decode step, on Hopper and later GPUs.

A kernel launched with PDL may be let onto the GPU while the kernel before it in the stream is finishing,
instead of after it has completed; it then waits (`griddepcontrol.wait`, `gdc_wait` in Triton) until that
kernel has completed and its writes are visible. Single-stream decode is a chain of ~350 small kernels per
step, so the launch latency hidden at each boundary adds up (the GEMV chain: ~1%, BENCHMARKS.md).

Rule for a kernel taking a PDL constexpr: when it is set, the kernel calls `gdc_wait()` before its first
load or store. A PDL kernel that skipped it could complete before the kernel it follows, and the kernel
after it would no longer be ordered after that one.

`VLMSERVE_PDL=0` launches every kernel the ordinary way."""
from __future__ import annotations

import os

import torch

try:
    from triton.language.extra.cuda import gdc_wait  # noqa: F401  (re-exported for the kernels)
except ImportError:  # a Triton without grid dependency control
    gdc_wait = None

_capable: dict[int, bool] = {}


def enabled(t: torch.Tensor) -> bool:
    """Whether kernels working on t (a CUDA tensor) launch with PDL: an sm_90+ GPU, a Triton that has it,
    not the interpreter, and VLMSERVE_PDL not 0."""
    if gdc_wait is None or not t.is_cuda or os.environ.get("VLMSERVE_PDL") == "0" \
            or os.environ.get("TRITON_INTERPRET") == "1":
        return False
    index = t.device.index if t.device.index is not None else torch.cuda.current_device()
    if index not in _capable:
        _capable[index] = torch.cuda.get_device_capability(index)[0] >= 9
    return _capable[index]


def launch_options(on: bool) -> dict:
    """The launch keyword for a kernel call: PDL on or off."""
    return {"launch_pdl": True} if on else {}
