"""Weights pulled into the GPU's L2 cache ahead of the matmul that reads them, on Hopper.

Single-stream decode is a chain of GEMVs that stream the weights from memory, with small kernels between
them (norms, rotary, the attention over a few hundred cached tokens) during which memory sits idle: ~0.8 ms
of a ~4.5 ms LLaVA step on an H200. A prefetch issued before such a kernel lets the next GEMV's weights
(or their first megabytes) arrive in L2 meanwhile, so the GEMV reads them from there.

The kernel issues Hopper's bulk L2 prefetches (`cp.async.bulk.prefetch.L2`, sm_90+): each program
asks for PER_PROG chunks of CHUNK bytes and exits; the copy engine fetches them in the background, and
nothing waits for them. A prefetch changes no value, only where the next read finds its data."""
from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:
    triton = None

CHUNK = 8192
PER_PROG = 32


def usable(t: torch.Tensor) -> bool:
    """Whether prefetch(t) does anything: a CUDA tensor on a GPU of compute capability 9.0 or above."""
    return triton is not None and t.is_cuda and torch.cuda.get_device_capability(t.device)[0] >= 9


if triton is not None:

    @triton.jit
    def _l2_prefetch_kernel(ptr, nbytes, CHUNK: tl.constexpr, PER_PROG: tl.constexpr, EVICT_LAST: tl.constexpr):
        offs = (tl.program_id(0) * PER_PROG + tl.arange(0, PER_PROG)).to(tl.int64) * CHUNK
        size = tl.minimum(nbytes - offs, CHUNK).to(tl.int32)
        if EVICT_LAST:  # keep these lines over normal ones until read
            tl.inline_asm_elementwise(
                "{ .reg .pred p; .reg .b64 pol; setp.gt.s32 p, $2, 0;"
                " createpolicy.fractional.L2::evict_last.b64 pol, 1.0;"
                " @p cp.async.bulk.prefetch.L2.global.L2::cache_hint [$1], $2, pol; mov.u32 $0, 0; }",
                "=r,l,r", [ptr + offs, size], dtype=tl.int32, is_pure=False, pack=1)
        else:
            tl.inline_asm_elementwise(
                "{ .reg .pred p; setp.gt.s32 p, $2, 0; @p cp.async.bulk.prefetch.L2.global [$1], $2; mov.u32 $0, 0; }",
                "=r,l,r", [ptr + offs, size], dtype=tl.int32, is_pure=False, pack=1)


def prefetch(t: torch.Tensor, nbytes: int | None = None, evict_last: bool = False) -> None:
    """Ask for the first `nbytes` of t's memory (all of it by default) to be brought into L2.
    t: a contiguous CUDA tensor; a no-op where `usable(t)` is false."""
    if not usable(t):
        return
    total = t.numel() * t.element_size()
    nbytes = total if nbytes is None else min(nbytes, total)
    nbytes -= nbytes % 16  # bulk copies move whole 16-byte units
    if nbytes <= 0:
        return
    grid = (triton.cdiv(nbytes, CHUNK * PER_PROG),)
    _l2_prefetch_kernel[grid](t.view(torch.uint8) if t.dtype != torch.uint8 else t, nbytes, CHUNK=CHUNK,
                              PER_PROG=PER_PROG, EVICT_LAST=evict_last, num_warps=1)
