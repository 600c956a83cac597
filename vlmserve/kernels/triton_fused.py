"""Fused elementwise kernels for the GPU, in Triton: (residual add +) RMSNorm or LayerNorm, rotary embedding
(neox layout) applied in place to q and k, SiLU-and-mul, and QuickGELU. Unfused, each is 3-10
small kernels per layer, which costs more than the layer's matmuls in a small decode step. Their references are
the torch layers they replace (layers/layernorm.py, layers/rotary.py, layers/activation.py), which
tests and scripts/gpu_check.py compare them with."""
from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:
    triton = None

from vlmserve.kernels import pdl
from vlmserve.kernels.pdl import gdc_wait, wait_if_early, wait_unless_early


def available() -> bool:
    return triton is not None


def _pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


if triton is not None:

    @triton.jit
    def _row_plus_residual(x_ptr, res_ptr, res_out_ptr, row, stride_x, stride_r, stride_ro, c, cm,
                           HAS_RES: tl.constexpr):
        # a row of x; with a residual, x + residual (rounded as torch's add), also stored to res_out
        x = tl.load(x_ptr + row * stride_x + c, mask=cm, other=0.0)
        if HAS_RES:
            x = x + tl.load(res_ptr + row * stride_r + c, mask=cm, other=0.0)
            tl.store(res_out_ptr + row * stride_ro + c, x, mask=cm)
        return x

    @triton.jit
    def _rmsnorm_kernel(x_ptr, res_ptr, w_ptr, out_ptr, res_out_ptr, stride_x, stride_r, stride_o, stride_ro,
                        n, eps, HAS_RES: tl.constexpr, BLOCK: tl.constexpr, PDL: tl.constexpr, EARLY: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        c = tl.arange(0, BLOCK)
        cm = c < n
        wait_unless_early(PDL, EARLY)  # EARLY (pdl.early("NORM")): the weight is read before the wait
        w = tl.load(w_ptr + c, mask=cm, other=0.0)
        wait_if_early(PDL, EARLY)
        x = _row_plus_residual(x_ptr, res_ptr, res_out_ptr, row, stride_x, stride_r, stride_ro, c, cm, HAS_RES)
        h = x.to(tl.float32)
        h = h * tl.rsqrt(tl.sum(h * h, 0) / n + eps)
        tl.store(out_ptr + row * stride_o + c, (w * h.to(x.dtype)).to(out_ptr.dtype.element_ty), mask=cm)

    @triton.jit
    def _layernorm_kernel(x_ptr, res_ptr, w_ptr, b_ptr, out_ptr, res_out_ptr, stride_x, stride_r, stride_o,
                          stride_ro, n, eps, HAS_RES: tl.constexpr, BLOCK: tl.constexpr, PDL: tl.constexpr,
                          EARLY: tl.constexpr):
        # as torch's layer_norm: float32 statistics (biased variance), one rounding at the end
        row = tl.program_id(0).to(tl.int64)
        c = tl.arange(0, BLOCK)
        cm = c < n
        wait_unless_early(PDL, EARLY)  # EARLY (pdl.early("NORM")): the weight and bias are read before the wait
        w = tl.load(w_ptr + c, mask=cm, other=0.0).to(tl.float32)
        b = tl.load(b_ptr + c, mask=cm, other=0.0).to(tl.float32)
        wait_if_early(PDL, EARLY)
        x = _row_plus_residual(x_ptr, res_ptr, res_out_ptr, row, stride_x, stride_r, stride_ro, c, cm, HAS_RES)
        h = x.to(tl.float32)
        d = tl.where(cm, h - tl.sum(h, 0) / n, 0.0)
        y = d * tl.rsqrt(tl.sum(d * d, 0) / n + eps)
        tl.store(out_ptr + row * stride_o + c, (y * w + b).to(out_ptr.dtype.element_ty), mask=cm)

    @triton.jit
    def _rotary_kernel(q_ptr, k_ptr, cos_ptr, sin_ptr, stride_qt, stride_qh, stride_kt, stride_kh,
                       stride_ct, num_q_heads, num_heads, HALF: tl.constexpr, BLOCK: tl.constexpr,
                       HEADS: tl.constexpr, PDL: tl.constexpr):
        # HEADS heads of one token per program (q's heads first, then k's): one head's 2 x HALF
        # values alone are too little work for a program to hide its memory latency
        if PDL:
            gdc_wait()
        t = tl.program_id(0)
        h = tl.program_id(1) * HEADS + tl.arange(0, HEADS)
        i = tl.arange(0, BLOCK)
        im = i < HALF
        m = (h < num_heads)[:, None] & im[None, :]
        base = tl.where(h < num_q_heads, q_ptr + t * stride_qt + h * stride_qh,
                        k_ptr + t * stride_kt + (h - num_q_heads) * stride_kh)[:, None] + i[None, :]
        cos = tl.load(cos_ptr + t * stride_ct + i, mask=im, other=0.0).to(tl.float32)[None, :]
        sin = tl.load(sin_ptr + t * stride_ct + i, mask=im, other=0.0).to(tl.float32)[None, :]
        x1 = tl.load(base, mask=m, other=0.0)
        x2 = tl.load(base + HALF, mask=m, other=0.0)
        a, b = x1.to(tl.float32), x2.to(tl.float32)
        tl.store(base, (a * cos - b * sin).to(x1.dtype), mask=m)
        tl.store(base + HALF, (b * cos + a * sin).to(x1.dtype), mask=m)

    @triton.jit
    def _silu_and_mul_kernel(x_ptr, out_ptr, stride_x, stride_o, n, BLOCK: tl.constexpr):
        row = tl.program_id(0)
        c = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        cm = c < n
        g = tl.load(x_ptr + row * stride_x + c, mask=cm, other=0.0).to(tl.float32)
        u = tl.load(x_ptr + row * stride_x + n + c, mask=cm, other=0.0).to(tl.float32)
        tl.store(out_ptr + row * stride_o + c, (g / (1.0 + tl.exp(-g)) * u).to(out_ptr.dtype.element_ty), mask=cm)

    @triton.jit
    def _quick_gelu_kernel(x_ptr, out_ptr, n, BLOCK: tl.constexpr):
        # HF's x * sigmoid(1.702 * x) as three torch ops, each rounded to the tensor's dtype
        i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        m = i < n
        x = tl.load(x_ptr + i, mask=m, other=0.0)
        dt = x.dtype
        xf = x.to(tl.float32)
        t = (xf * 1.702).to(dt).to(tl.float32)
        s = (1.0 / (1.0 + tl.exp(-t))).to(dt).to(tl.float32)
        tl.store(out_ptr + i, (xf * s).to(dt), mask=m)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None):
    """As layers.layernorm.RMSNorm: x [..., H]; with a residual, returns
    (normed(x + residual), x + residual)."""
    return _norm_rows(_rmsnorm_kernel, x, (weight,), eps, residual)


def layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float,
               residual: torch.Tensor | None = None):
    """As layers.layernorm.LayerNorm over the last dim; with a residual, returns
    (normed(x + residual), x + residual) from one pass instead of an add and a norm."""
    return _norm_rows(_layernorm_kernel, x, (weight, bias), eps, residual)


def _norm_rows(kernel, x: torch.Tensor, params: tuple, eps: float, residual: torch.Tensor | None):
    """One program per row of x [..., n] through a norm kernel above (params: its weight, bias)."""
    n = x.shape[-1]
    x2 = _unit_stride_rows(x.reshape(-1, n))
    T = x2.shape[0]
    out = torch.empty_like(x2)
    res_out = torch.empty_like(x2) if residual is not None else out
    res = _unit_stride_rows(residual.reshape(-1, n)) if residual is not None else x2
    if T:
        on = pdl.enabled(x2)
        kernel[(T,)](x2, res, *params, out, res_out, x2.stride(0), res.stride(0), out.stride(0), res_out.stride(0),
                     n, float(eps), HAS_RES=residual is not None, BLOCK=_pow2(n), PDL=on,
                     EARLY=on and pdl.early("NORM"),
                     num_warps=8 if n >= 4096 else 4, **pdl.launch_options(on))
    out = out.view(x.shape)
    return out if residual is None else (out, res_out.view(x.shape))


def _unit_stride_rows(x2: torch.Tensor) -> torch.Tensor:
    """The row kernels index columns with unit stride: a view without it is copied."""
    return x2 if x2.stride(-1) == 1 else x2.contiguous()


def rotary_inplace(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> None:
    """q [T, Hq, D], k [T, Hk, D] (last dim contiguous), rotated over all of D in place with
    cos, sin [T, 1, D] from RotaryEmbedding.lookup (the two halves repeat)."""
    T, Hq, D = q.shape
    if T == 0:
        return
    cos2, sin2 = cos.reshape(T, -1), sin.reshape(T, -1)
    heads = Hq + k.shape[1]
    per_program = min(16, _pow2(heads))
    on = pdl.enabled(q)
    _rotary_kernel[(T, triton.cdiv(heads, per_program))](
        q, k, cos2, sin2, q.stride(0), q.stride(1), k.stride(0), k.stride(1), cos2.stride(0), Hq, heads,
        HALF=D // 2, BLOCK=_pow2(D // 2), HEADS=per_program, PDL=on, **pdl.launch_options(on))


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """x [T, 2I] = [gate | up] -> silu(gate) * up, [T, I]."""
    x2 = x.reshape(-1, x.shape[-1])
    T, n = x2.shape[0], x2.shape[1] // 2
    out = torch.empty((T, n), dtype=x.dtype, device=x.device)
    if T:
        block = min(1024, _pow2(n))
        _silu_and_mul_kernel[(T, triton.cdiv(n, block))](x2, out, x2.stride(0), out.stride(0), n, BLOCK=block)
    return out.view(*x.shape[:-1], n)


def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    """x * sigmoid(1.702 * x) (CLIP's and Qwen2-VL's vision MLPs) in one pass instead of three."""
    x = x.contiguous()
    out = torch.empty_like(x)
    n = x.numel()
    if n:
        block = 2048
        _quick_gelu_kernel[(triton.cdiv(n, block),)](x, out, n, BLOCK=block, num_warps=8)
    return out
