"""Matrix-vector products for single-stream decode on the GPU, in Triton: y = x @ W^T (+ b).

Single-stream decode reads every weight once per step, so a step is as fast as its linear layers stream
their weights. Each program here streams BLOCK_N rows of W [N, K] across all of K in BLOCK_N x BLOCK_K
tiles and multiply-adds them with one row of x on the CUDA cores, in float32: no split-K pass, no
shared-memory staging of W. A tile's columns are laid out as [BLOCK_K / VEC, VEC], VEC elements being 16
bytes, one load: each step sums a thread's VEC products in its registers, so the running sums take
BLOCK_N x BLOCK_K / VEC floats. The loop is not software-pipelined (Triton pipelines loads feeding tensor-core
dots only), so the bytes in flight are the tiles of the programs resident on an SM, and those are set by the
registers a program takes: 40 at 2-4 rows against 80 when the sums were BLOCK_N x BLOCK_K floats (8 x 512).

Tiles (`tiles_for`, chosen in scripts/gpu_gemv_shapes.py on an H200, each shape in a CUDA-graph chain of its
own, BENCHMARKS.md): 2 rows x 2048 columns with 4 warps; 2 x 1024 with 2 warps for K over 8192 (the down
projections). Llama-2-7B's gate_up streamed at 4.41 TB/s (cuBLAS 4.10, the 8 x 512 tiles before 4.06), its
down projection at 4.15 (3.38, 3.80), Qwen2-VL-7B's gate_up at 4.51 (3.97, 4.31). Wider tiles of this layout
were slower (8 x 1024: 3.44 TB/s for Llama's gate_up). With programmatic dependent launch (`pdl`, Hopper and
later) a GEMV is let onto the GPU while the kernel before it finishes, and waits (griddepcontrol.wait) before
it reads x or writes y. Starting early (pdl.early("GEMV")), it reads its first tile of W before that wait and lets
the next kernel in right after it: behind a one-program RMSNorm (which starts early too), the GEMV's programs stream
their first tiles while the norm runs (single-stream decode on an H200: LLaVA-1.5-7B 266.3 -> 272.3 tok/s).

The kernel takes several rows of x, but for 2 and 4 rows cuBLAS streamed faster (measured with the 8 x 512
tiles), so linear layers route inputs of one row (MAX_ROWS) here: by default on sm_90+ GPUs
(`route_single_rows_through_triton_gemv`); `VLMSERVE_TRITON_GEMV=0` keeps cuBLAS, `=1` uses it on other GPUs
too. `reference_gemv` is the torch computation it is tested against.

A gated MLP's gate_up projection can write silu(gate) * up itself (`silu_and_mul`): its tiles pair gate row j
with up row j, so the activation costs the GEMV nothing and saves the SiLU-and-mul kernel after it.

Measured and not taken (BENCHMARKS.md): computing an RMSNorm or SiLU-and-mul of x inside the GEMV, as it reads
x, was slower than their own kernels (every program reads x, so each extra vector read per tile costs L2
traffic and registers): RMSNorm +2.8-4.7 us on a 25-45 us GEMV, SiLU-and-mul +1.8-2.6 us, against ~1.3-2.3 us
for the kernels themselves."""
from __future__ import annotations

import os

import torch

try:
    import triton
    import triton.language as tl
except ImportError:
    triton = None

from vlmserve.kernels import pdl as pdl_module
from vlmserve.kernels.pdl import wait_if_early, wait_unless_early

MAX_ROWS = 1  # inputs with more rows stay with cuBLAS (faster from 2 rows on, scripts/gpu_gemv_sweep.py)


def tiles_for(K: int) -> tuple[int, int, int]:
    """(BLOCK_N, BLOCK_K, warps) for a weight of K columns (module docstring)."""
    return (2, 1024, 2) if K > 8192 else (2, 2048, 4)


def enabled(device: torch.device | str) -> bool:
    """Whether linear layers on `device` should take this GEMV for one-row inputs: by default on CUDA GPUs
    of compute capability 9.0 and above (measured faster than cuBLAS on an H200; other sm_90+ GPUs not yet)."""
    setting = os.environ.get("VLMSERVE_TRITON_GEMV")
    device = torch.device(device)
    if triton is None or setting == "0" or device.type != "cuda":
        return False
    return setting == "1" or torch.cuda.get_device_capability(device)[0] >= 9


def usable(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether gemv(x, weight) takes these: x of at most MAX_ROWS rows."""
    return x.dim() == 2 and 0 < x.shape[0] <= MAX_ROWS and (x.is_cuda or os.environ.get("TRITON_INTERPRET") == "1") \
        and x.dtype == weight.dtype and weight.dim() == 2 and weight.stride(1) == 1 and x.shape[1] == weight.shape[1]


if triton is not None:

    @triton.jit
    def _gemv_kernel(x_ptr, w_ptr, b_ptr, y_ptr, N, K, stride_xm, stride_wn, stride_ym, BLOCK_N: tl.constexpr,
                     BLOCK_K: tl.constexpr, VEC: tl.constexpr, HAS_BIAS: tl.constexpr, SILU_MUL: tl.constexpr,
                     PDL: tl.constexpr, EARLY: tl.constexpr):
        t = tl.arange(0, BLOCK_N)
        if SILU_MUL:  # W = [gate; up]: a tile pairs gate row j with up row j, and writes silu(gate) * up at j
            outs = tl.program_id(0) * (BLOCK_N // 2) + t // 2
            rows = outs + (t % 2) * (N // 2)
            rm = outs < N // 2
        else:
            rows = tl.program_id(0) * BLOCK_N + t  # axis 0: up to 2^31 - 1 tiles (a 152k vocab)
            rm = rows < N
        m = tl.program_id(1)  # the row of x
        ks = tl.arange(0, BLOCK_K // VEC)[:, None] * VEC + tl.arange(0, VEC)[None, :]  # [BLOCK_K / VEC, VEC]
        w_ptrs = w_ptr + rows.to(tl.int64)[:, None, None] * stride_wn + ks[None, :, :]
        x_ptrs = x_ptr + m * stride_xm + ks
        acc = tl.zeros([BLOCK_N, BLOCK_K // VEC], tl.float32)
        k_first = 0
        if EARLY:  # pdl.early("GEMV"): the first tile of W is read before waiting for the kernel that writes x
            w = tl.load(w_ptrs, mask=rm[:, None, None] & (ks < K)[None, :, :], other=0.0)
            wait_if_early(PDL, EARLY)
            x = tl.load(x_ptrs, mask=ks < K, other=0.0).to(tl.float32)
            acc += tl.sum(w.to(tl.float32) * x[None, :, :], 2)
            k_first = BLOCK_K
        else:  # launched before the kernel that writes x has finished: wait for it
            wait_unless_early(PDL, EARLY)
        for k0 in range(k_first, K, BLOCK_K):
            km = k0 + ks < K
            w = tl.load(w_ptrs + k0, mask=rm[:, None, None] & km[None, :, :], other=0.0)
            x = tl.load(x_ptrs + k0, mask=km, other=0.0).to(tl.float32)
            acc += tl.sum(w.to(tl.float32) * x[None, :, :], 2)  # a thread's VEC neighbours: in its registers
        y = tl.sum(acc, 1)
        if HAS_BIAS:
            y += tl.load(b_ptr + rows, mask=rm, other=0.0).to(tl.float32)
        if SILU_MUL:  # rounded to the dtype first, as triton_fused.silu_and_mul reads the projection's output
            gate, up = tl.split(tl.reshape(y.to(y_ptr.dtype.element_ty).to(tl.float32), [BLOCK_N // 2, 2]))
            cols = tl.program_id(0) * (BLOCK_N // 2) + tl.arange(0, BLOCK_N // 2)  # the tile's outs, once each
            tl.store(y_ptr + m * stride_ym + cols, (gate / (1.0 + tl.exp(-gate)) * up).to(y_ptr.dtype.element_ty),
                     mask=cols < N // 2)
        else:
            tl.store(y_ptr + m * stride_ym + rows, y.to(y_ptr.dtype.element_ty), mask=rm)


def gemv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, block_n: int | None = None,
         block_k: int | None = None, num_warps: int | None = None, pdl: bool | None = None,
         silu_and_mul: bool = False, early: bool | None = None) -> torch.Tensor:
    """x [M, K] (rows may be strided, each contiguous), weight [N, K] with contiguous rows
    -> [M, N] in x's dtype. Tiles: tiles_for(K) where not given. pdl: launch with programmatic dependent
    launch (default: kernels/pdl.py's choice). silu_and_mul: weight is a gated MLP's [gate; up] (N even), and
    the result is silu(gate) * up, [M, N / 2], computed as the GEMV writes (a launch fewer per layer of
    single-stream decode, the same rounding as the SiLU-and-mul kernel after the GEMV). early: read the first
    tile of W before waiting for the kernel before, and let the next one in after (default: with PDL, unless
    pdl.early("GEMV") is off); the same sums either way."""
    M = x.shape[0]
    N, K = weight.shape
    if x.stride(1) != 1:
        x = x.contiguous()
    if pdl is None:
        pdl = pdl_module.enabled(x)
    if early is None:
        early = bool(pdl) and pdl_module.early("GEMV")
    tiles = tiles_for(K)
    block_n, block_k, num_warps = block_n or tiles[0], block_k or tiles[1], num_warps or tiles[2]
    if silu_and_mul and (N % 2 or block_n % 2):
        raise ValueError(f"silu_and_mul: [gate; up] of {N} rows in tiles of {block_n} rows (both must be even)")
    y = torch.empty((M, N // 2 if silu_and_mul else N), dtype=x.dtype, device=x.device)
    _gemv_kernel[(triton.cdiv(y.shape[1], block_n // 2 if silu_and_mul else block_n), M)](
        x, weight, bias if bias is not None else weight, y, N, K, x.stride(0), weight.stride(0), y.stride(0),
        BLOCK_N=block_n, BLOCK_K=block_k, VEC=min(block_k, 16 // weight.element_size()), HAS_BIAS=bias is not None,
        SILU_MUL=silu_and_mul, PDL=bool(pdl), EARLY=bool(early), num_warps=num_warps,
        **pdl_module.launch_options(pdl))
    return y


def reference_gemv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                   silu_and_mul: bool = False) -> torch.Tensor:
    y = x.float() @ weight.float().t()
    if bias is not None:
        y += bias.float()
    if silu_and_mul:  # on the projection rounded to x's dtype, as the SiLU-and-mul kernel reads it
        gate, up = y.to(x.dtype).float().chunk(2, dim=-1)
        y = torch.nn.functional.silu(gate) * up
    return y.to(x.dtype)
