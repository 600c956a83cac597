"""Programmatic dependent launch (PDL) for the Triton kernels of a decode step, on Hopper and later GPUs.

A kernel launched with PDL may be let onto the GPU while the kernel before it in the stream is finishing,
instead of after it has completed; it then waits (`griddepcontrol.wait`, `gdc_wait` in Triton) until that
kernel has completed and its writes are visible. Single-stream decode is a chain of ~350 small kernels per
step, so the launch latency hidden at each boundary adds up (the GEMV chain: ~1%, BENCHMARKS.md).

Rule for a kernel taking a PDL constexpr: when it is set, the kernel calls `gdc_wait()` before its first
store, and before its first load of anything the kernel before it may write. A PDL kernel that skipped it
could complete before the kernel it follows, and the kernel after it would no longer be ordered after that one.

Starting early (`early`: the norms and the GEMV, by default): a kernel lets the next one in
(`gdc_launch_dependents`) right after its own wait returns, instead of at its end, and reads before its wait what
the kernel before does not write (a norm's weight, the GEMV's first tile of W). Those loads, and the next kernel's
launch, then overlap the kernel before. When a kernel runs its code before its wait, every kernel but the one
just before it has completed (each lets the next in only after its own wait). H200 (BENCHMARKS.md): LLaVA-1.5-7B's
single-stream decode 264.5 -> 272.2 tok/s, Qwen2-VL-7B's 258.9 -> 263.0.

`VLMSERVE_PDL=0` launches every kernel the ordinary way."""
from __future__ import annotations

import os

import torch

try:
    import triton
    import triton.language as tl
except ImportError:
    triton = None
try:  # re-exported for the kernels
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait  # noqa: F401
except ImportError:  # a Triton without grid dependency control: kernels launch with PDL off
    gdc_wait = gdc_launch_dependents = None

if triton is not None:

    @triton.jit
    def wait_unless_early(PDL: tl.constexpr, EARLY: tl.constexpr):
        """A PDL kernel's first line: wait for the kernel before, unless it starts early."""
        if PDL and not EARLY:
            gdc_wait()

    @triton.jit
    def wait_if_early(PDL: tl.constexpr, EARLY: tl.constexpr):
        """An early kernel's line after its prefetches: wait for the kernel before, then let the next one in."""
        if PDL and EARLY:
            gdc_wait()
            gdc_launch_dependents()
else:
    wait_unless_early = wait_if_early = None

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


def early(part: str) -> bool:
    """Whether a part's kernels start early (module docstring), where they launch with PDL: NORM (RMSNorm and
    LayerNorm read their weights, then let the next kernel in), GEMV (the first tile of W, likewise).
    VLMSERVE_PDL_EARLY_<part>=0 turns a part off."""
    return os.environ.get(f"VLMSERVE_PDL_EARLY_{part}", "1") != "0"
