"""Split-K matrix-vector products for small-batch decode on the GPU, in Triton: y = x @ W^T (+ b)
for x [M, K] with M <= 8 rows. Single-stream decode reads every weight once per step, so a step is
as fast as the linear layers stream their weights; the H100 profiles in BENCHMARKS.md show cuBLAS's
GEMV at ~2.6 TB/s of a 3.0 TB/s copy ceiling. Here each program streams a [BLOCK_N, BLOCK_K] tile of
W over one slice of K and writes float32 partial sums; a second tiny pass adds the slices (a fixed
order, so results do not depend on scheduling, unlike atomic adds).

Opt-in (`VLMSERVE_TRITON_GEMV=1`) until measured faster than cuBLAS on the target GPU;
`reference_gemv` is the torch computation it is tested against."""
from __future__ import annotations

import os

import torch

try:
    import triton
    import triton.language as tl
except ImportError:
    triton = None

MAX_ROWS = 8


def enabled() -> bool:
    return triton is not None and os.environ.get("VLMSERVE_TRITON_GEMV") == "1"


def usable(x: torch.Tensor, weight: torch.Tensor) -> bool:
    return (x.is_cuda or os.environ.get("TRITON_INTERPRET") == "1") and x.dim() == 2 \
        and 0 < x.shape[0] <= MAX_ROWS and x.dtype == weight.dtype and weight.is_contiguous()


if triton is not None:

    @triton.jit
    def _gemv_partial_kernel(x_ptr, w_ptr, part_ptr, M, N, K, k_per_split, stride_xm, stride_wn,
                             stride_ps, stride_pm, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                             BLOCK_K: tl.constexpr, PREC: tl.constexpr):
        pid_n = tl.program_id(0)
        split = tl.program_id(1)
        rows = tl.arange(0, BLOCK_M)
        cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        rm, cm = rows < M, cols < N
        k_lo = split * k_per_split
        k_hi = tl.minimum(k_lo + k_per_split, K)
        acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        for k0 in range(k_lo, k_hi, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            km = ks < k_hi
            x = tl.load(x_ptr + rows[:, None] * stride_xm + ks[None, :], mask=rm[:, None] & km[None, :], other=0.0)
            w = tl.load(w_ptr + cols[:, None] * stride_wn + ks[None, :], mask=cm[:, None] & km[None, :], other=0.0)
            acc += tl.dot(x, tl.trans(w), input_precision=PREC)
        tl.store(part_ptr + split * stride_ps + rows[:, None] * stride_pm + cols[None, :], acc,
                 mask=rm[:, None] & cm[None, :])


    @triton.jit
    def _gemv_fma_partial_kernel(x_ptr, w_ptr, part_ptr, M, N, K, k_per_split, stride_xm, stride_wn,
                                 stride_ps, stride_pm, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        # one row of x at a time on the CUDA cores: the weight tile goes from registers into an
        # elementwise accumulator, reduced over K once at the end (no shared-memory staging)
        pid_n = tl.program_id(0)
        split = tl.program_id(1)
        m = tl.program_id(2)
        cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        cm = cols < N
        k_lo = split * k_per_split
        k_hi = tl.minimum(k_lo + k_per_split, K)
        acc = tl.zeros([BLOCK_N, BLOCK_K], tl.float32)
        for k0 in range(k_lo, k_hi, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            km = ks < k_hi
            x = tl.load(x_ptr + m * stride_xm + ks, mask=km, other=0.0).to(tl.float32)
            w = tl.load(w_ptr + cols[:, None] * stride_wn + ks[None, :], mask=cm[:, None] & km[None, :], other=0.0)
            acc += w.to(tl.float32) * x[None, :]
        tl.store(part_ptr + split * stride_ps + m * stride_pm + cols, tl.sum(acc, 1), mask=cm)


def gemv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, split_k: int | None = None,
         block_n: int = 64, block_k: int = 128, fma: bool = False, num_warps: int = 4) -> torch.Tensor:
    """x [M, K] (M <= 8, rows contiguous), weight [N, K] contiguous -> [M, N] in x's dtype."""
    M, K = x.shape
    N = weight.shape[0]
    if x.stride(1) != 1:
        x = x.contiguous()
    n_tiles = triton.cdiv(N, block_n)
    if split_k is None:  # enough programs to keep every SM streaming: ~4 per SM of an H100
        split_k = max(1, min(triton.cdiv(K, block_k), triton.cdiv(528, n_tiles)))
    k_per_split = triton.cdiv(triton.cdiv(K, split_k), block_k) * block_k
    split_k = triton.cdiv(K, k_per_split)
    part = torch.empty((split_k, M, N), dtype=torch.float32, device=x.device)
    if fma:
        _gemv_fma_partial_kernel[(n_tiles, split_k, M)](
            x, weight, part, M, N, K, k_per_split, x.stride(0), weight.stride(0), part.stride(0), part.stride(1),
            BLOCK_N=block_n, BLOCK_K=block_k, num_warps=num_warps)
    else:
        _gemv_partial_kernel[(n_tiles, split_k)](
            x, weight, part, M, N, K, k_per_split, x.stride(0), weight.stride(0), part.stride(0), part.stride(1),
            BLOCK_M=16, BLOCK_N=block_n, BLOCK_K=block_k, PREC="ieee" if x.dtype == torch.float32 else "tf32",
            num_warps=num_warps)
    y = part.sum(0)
    if bias is not None:
        y += bias.float()
    return y.to(x.dtype)


def reference_gemv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    y = x.float() @ weight.float().t()
    if bias is not None:
        y += bias.float()
    return y.to(x.dtype)
