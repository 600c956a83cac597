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
BLOCK_N, BLOCK_K, NUM_WARPS, NUM_STAGES = 8, 1024, 4, 3


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
    def _gemv_kernel(x_ptr, w_ptr, b_ptr, g_ptr, r_ptr, y_ptr, N, K, eps, stride_xm, stride_wn, stride_rm, stride_ym,
                     BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, VEC: tl.constexpr, HAS_BIAS: tl.constexpr,
                     SILU_MUL: tl.constexpr, RMS_NORM: tl.constexpr, RESIDUAL: tl.constexpr, PDL: tl.constexpr):
        m = tl.program_id(0)  # the row of x: fastest in launch order, so a weight tile's readers run together
        rows = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        rm = rows < N
        # a tile's columns as [BLOCK_K / VEC, VEC]: a thread's VEC neighbours (16 bytes, one load) are summed in
        # its registers each step, so the running sums take BLOCK_N x BLOCK_K / VEC floats, not BLOCK_N x BLOCK_K
        ks = tl.arange(0, BLOCK_K // VEC)[:, None] * VEC + tl.arange(0, VEC)[None, :]
        w_ptrs = w_ptr + rows.to(tl.int64)[:, None, None] * stride_wn + ks[None, :, :]
        x_ptrs = x_ptr + m * stride_xm + ks
        if PDL:  # launched before the kernel that writes x has finished: wait for it
            gdc_wait()
        acc = tl.zeros([BLOCK_N, BLOCK_K // VEC], tl.float32)
        sq = tl.zeros([BLOCK_K // VEC, VEC], tl.float32)
        for k0 in range(0, K, BLOCK_K):
            km = k0 + ks < K
            w = tl.load(w_ptrs + k0, mask=rm[:, None, None] & km[None, :, :], other=0.0)
            if SILU_MUL:  # x = silu(gate) * up, rounded as triton_fused.silu_and_mul rounds its output
                g = tl.load(x_ptrs + k0, mask=km, other=0.0).to(tl.float32)
                u = tl.load(x_ptrs + K + k0, mask=km, other=0.0).to(tl.float32)
                x = (g / (1.0 + tl.exp(-g)) * u).to(x_ptr.dtype.element_ty).to(tl.float32)
            else:
                x = tl.load(x_ptrs + k0, mask=km, other=0.0).to(tl.float32)
            if RMS_NORM:  # W (g * x) now, the 1 / rms(x) factor once x's squares are all summed
                sq += x * x
                x = x * tl.load(g_ptr + k0 + ks, mask=km, other=0.0).to(tl.float32)
            acc += tl.sum(w.to(tl.float32) * x[None, :, :], 2)
        y = tl.sum(acc, 1)
        if RMS_NORM:
            y = y * tl.rsqrt(tl.sum(tl.sum(sq, 1), 0) / K + eps)
        if HAS_BIAS:
            y += tl.load(b_ptr + rows, mask=rm, other=0.0).to(tl.float32)
        if RESIDUAL:  # rounded as the product then torch's add of the residual would be
            y = y.to(y_ptr.dtype.element_ty).to(tl.float32) \
                + tl.load(r_ptr + m * stride_rm + rows, mask=rm, other=0.0).to(tl.float32)
        tl.store(y_ptr + m * stride_ym + rows, y.to(y_ptr.dtype.element_ty), mask=rm)


def gemv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, block_n: int = BLOCK_N,
         block_k: int = BLOCK_K, num_warps: int = NUM_WARPS, num_stages: int = NUM_STAGES,
         pdl: bool | None = None, silu_and_mul: bool = False, norm_weight: torch.Tensor | None = None,
         eps: float = 1e-6, residual: torch.Tensor | None = None) -> torch.Tensor:
    """x [M, K] (rows may be strided, each contiguous), weight [N, K] with contiguous rows
    -> [M, N] in x's dtype. pdl: launch with programmatic dependent launch (default: kernels/pdl.py's choice).
    Work fused into the GEMV, each a kernel launch fewer in a decode layer:
    - silu_and_mul: x is [M, 2K] = [gate | up], and the product is with silu(gate) * up (a gated MLP's down
      projection);
    - norm_weight: the product is with RMSNorm(x) (weight norm_weight, eps), computed as W (norm_weight * x) / rms(x),
      the sum of squares gathered in the same pass; not rounded to x's dtype between norm and product as the
      norm kernel rounds, so equal to norm-then-GEMV to within that rounding (no extra pass over x);
    - residual [M, N]: returns the product plus residual, rounded as the GEMV then torch's add round."""
    M = x.shape[0]
    N, K = weight.shape
    if x.stride(1) != 1:
        x = x.contiguous()
    if pdl is None:
        pdl = pdl_module.enabled(x)
    if residual is not None and residual.stride(1) != 1:
        residual = residual.contiguous()
    y = torch.empty((M, N), dtype=x.dtype, device=x.device)
    _gemv_kernel[(M, triton.cdiv(N, block_n))](
        x, weight, bias if bias is not None else weight, norm_weight if norm_weight is not None else weight,
        residual if residual is not None else y, y, N, K, float(eps), x.stride(0), weight.stride(0),
        residual.stride(0) if residual is not None else 0, y.stride(0),
        BLOCK_N=block_n, BLOCK_K=block_k, VEC=min(block_k, 16 // weight.element_size()), HAS_BIAS=bias is not None,
        SILU_MUL=silu_and_mul,
        RMS_NORM=norm_weight is not None, RESIDUAL=residual is not None, PDL=bool(pdl),
        num_warps=num_warps, num_stages=num_stages, **pdl_module.launch_options(pdl))
    return y


def reference_gemv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                   silu_and_mul: bool = False, norm_weight: torch.Tensor | None = None, eps: float = 1e-6,
                   residual: torch.Tensor | None = None) -> torch.Tensor:
    """gemv's computation in float32 torch ops, rounded where the kernel rounds."""
    if silu_and_mul:
        gate, up = x.float().chunk(2, dim=-1)
        x = (torch.nn.functional.silu(gate) * up).to(x.dtype)
    xf = x.float()
    if norm_weight is not None:
        xf = xf * norm_weight.float() * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    y = xf @ weight.float().t()
    if bias is not None:
        y += bias.float()
    if residual is not None:
        y = y.to(x.dtype).float() + residual.float()
    return y.to(x.dtype)
