"""Matrix-vector products for single-stream decode on the GPU, in Triton: y = x @ W^T (+ b).

Single-stream decode reads every weight once per step, so a step is as fast as its linear layers stream
their weights. Each program here streams BLOCK_N rows of W [N, K] across all of K in BLOCK_N x BLOCK_K
tiles and multiply-adds them with one row of x on the CUDA cores, in float32, reducing over K once at the
end: no split-K pass, no shared-memory staging. The kernel takes several rows of x (the programs of one
weight tile for the rows of x are neighbours in launch order), but for 2 and 4 rows cuBLAS streamed
faster (3.5 against 2.9 and 2.0 TB/s), so linear layers route inputs of one row (MAX_ROWS) here.

In a CUDA graph of Llama-2-7B's decode GEMVs (qkv, o, gate_up, down, 32 layers, each reading the last
one's output), 8 x 512 tiles with 4 warps and 3 stages streamed 3.85 TB/s on an H200 against cuBLAS's
3.53 (Qwen2-VL-7B's: 3.96 against 3.51; scripts/gpu_gemv_sweep.py, BENCHMARKS.md). With programmatic
dependent launch (`pdl`, Hopper and later) a GEMV is let onto the GPU while the kernel before it
finishes, and waits (griddepcontrol.wait) before it reads x or writes y: ~1% of that chain.

Linear layers on sm_90+ GPUs take it by default (`route_single_rows_through_triton_gemv`);
`VLMSERVE_TRITON_GEMV=0` keeps cuBLAS, `=1` uses it on other GPUs too. `reference_gemv` is the torch
computation it is tested against."""
from __future__ import annotations

import os

import torch

try:
    import triton
    import triton.language as tl
except ImportError:
    triton = None

from vlmserve.kernels import pdl as pdl_module
from vlmserve.kernels.pdl import gdc_wait

MAX_ROWS = 1  # inputs with more rows stay with cuBLAS (faster from 2 rows on, scripts/gpu_gemv_sweep.py)
BLOCK_N, BLOCK_K, NUM_WARPS, NUM_STAGES = 8, 512, 4, 3


def enabled(device: torch.device | str) -> bool:
    """Whether linear layers on `device` should take this GEMV for one-row inputs: by default on CUDA GPUs
    of compute capability 9.0 and above (measured faster than cuBLAS on an H200; other sm_90+ GPUs not yet)."""
    setting = os.environ.get("VLMSERVE_TRITON_GEMV")
    device = torch.device(device)
    if triton is None or setting == "0" or device.type != "cuda":
        return False
    return setting == "1" or torch.cuda.get_device_capability(device)[0] >= 9


def usable(x: torch.Tensor, weight: torch.Tensor, silu_and_mul: bool = False) -> bool:
    """Whether gemv(x, weight, silu_and_mul=...) takes these: x of at most MAX_ROWS rows (with
    silu_and_mul, x is [gate | up], twice weight's columns)."""
    return x.dim() == 2 and 0 < x.shape[0] <= MAX_ROWS and (x.is_cuda or os.environ.get("TRITON_INTERPRET") == "1") \
        and x.dtype == weight.dtype and weight.dim() == 2 and weight.stride(1) == 1 \
        and x.shape[1] == weight.shape[1] * (2 if silu_and_mul else 1)


if triton is not None:

    @triton.jit
    def _gemv_kernel(x_ptr, w_ptr, b_ptr, y_ptr, N, K, stride_xm, stride_wn, stride_ym, BLOCK_N: tl.constexpr,
                     BLOCK_K: tl.constexpr, HAS_BIAS: tl.constexpr, SILU_MUL: tl.constexpr, PDL: tl.constexpr):
        m = tl.program_id(0)  # the row of x: fastest in launch order, so a weight tile's readers run together
        rows = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        rm = rows < N
        ks = tl.arange(0, BLOCK_K)
        w_ptrs = w_ptr + rows.to(tl.int64)[:, None] * stride_wn + ks[None, :]
        x_ptrs = x_ptr + m * stride_xm + ks
        if PDL:  # launched before the kernel that writes x has finished: wait for it
            gdc_wait()
        acc = tl.zeros([BLOCK_N, BLOCK_K], tl.float32)
        for k0 in range(0, K, BLOCK_K):
            km = k0 + ks < K
            w = tl.load(w_ptrs + k0, mask=rm[:, None] & km[None, :], other=0.0)
            if SILU_MUL:  # x = silu(gate) * up, rounded as triton_fused.silu_and_mul rounds its output
                g = tl.load(x_ptrs + k0, mask=km, other=0.0).to(tl.float32)
                u = tl.load(x_ptrs + K + k0, mask=km, other=0.0).to(tl.float32)
                x = (g / (1.0 + tl.exp(-g)) * u).to(x_ptr.dtype.element_ty).to(tl.float32)
            else:
                x = tl.load(x_ptrs + k0, mask=km, other=0.0).to(tl.float32)
            acc += w.to(tl.float32) * x[None, :]
        y = tl.sum(acc, 1)
        if HAS_BIAS:
            y += tl.load(b_ptr + rows, mask=rm, other=0.0).to(tl.float32)
        tl.store(y_ptr + m * stride_ym + rows, y.to(y_ptr.dtype.element_ty), mask=rm)


def gemv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, block_n: int = BLOCK_N,
         block_k: int = BLOCK_K, num_warps: int = NUM_WARPS, num_stages: int = NUM_STAGES,
         pdl: bool | None = None, silu_and_mul: bool = False) -> torch.Tensor:
    """x [M, K] (rows may be strided, each contiguous), weight [N, K] with contiguous rows
    -> [M, N] in x's dtype. pdl: launch with programmatic dependent launch (default: kernels/pdl.py's choice).
    silu_and_mul: x is [M, 2K] = [gate | up], and the product is with silu(gate) * up (the input of a
    gated MLP's down projection, computed as the GEMV reads it: one kernel launch fewer)."""
    M = x.shape[0]
    N, K = weight.shape
    if x.stride(1) != 1:
        x = x.contiguous()
    if pdl is None:
        pdl = pdl_module.enabled(x)
    y = torch.empty((M, N), dtype=x.dtype, device=x.device)
    _gemv_kernel[(M, triton.cdiv(N, block_n))](
        x, weight, bias if bias is not None else weight, y, N, K, x.stride(0), weight.stride(0), y.stride(0),
        BLOCK_N=block_n, BLOCK_K=block_k, HAS_BIAS=bias is not None, SILU_MUL=silu_and_mul, PDL=bool(pdl),
        num_warps=num_warps, num_stages=num_stages, **pdl_module.launch_options(pdl))
    return y


def reference_gemv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                   silu_and_mul: bool = False) -> torch.Tensor:
    if silu_and_mul:
        gate, up = x.float().chunk(2, dim=-1)
        x = (torch.nn.functional.silu(gate) * up).to(x.dtype)
    y = x.float() @ weight.float().t()
    if bias is not None:
        y += bias.float()
    return y.to(x.dtype)
