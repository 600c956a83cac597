"""Bidirectional attention over the packed segments of a vision encoder's batch, in Triton, for
head sizes that are not a power of two. Qwen2-VL's ViT has head_dim 80: the H200 profiles in
BENCHMARKS.md show cuDNN's SDPA kernel for it tiled for head_dim 128, so 3/8 of its tensor-core work
is padding (~15 ms of a 1024x1024 image's ~57 ms time to first token). Here a head of D = DA + DB
(80 = 64 + 16, both powers of two) takes two dots for QK^T and two for PV, with no padding.

Opt-in (`VLMSERVE_TRITON_VISION_ATTENTION=1`): on the H200 its fastest tiles (the defaults below)
still ran 7-10% slower than cuDNN's padded kernel at that shape (BENCHMARKS.md;
`scripts/gpu_alternatives.py --parts vision` sweeps the tiles). `reference_vision_attention` is the
torch computation it is tested against (on the CPU through Triton's interpreter)."""
from __future__ import annotations

import os

import torch

try:
    import triton
    import triton.language as tl
except ImportError:
    triton = None

LOG2E = 1.4426950408889634


def split_head_dim(d: int) -> tuple[int, int] | None:
    """(DA, DB) with DA the largest power of two <= d and DB = d - DA a power of two of at least 16
    (the least K of a tensor-core dot) or 0; None where d does not split so."""
    if d < 16:
        return None
    da = 1 << (d.bit_length() - 1)
    db = d - da
    if db == 0 or (db >= 16 and db & (db - 1) == 0):
        return da, db
    return None


def enabled() -> bool:
    return triton is not None and os.environ.get("VLMSERVE_TRITON_VISION_ATTENTION") == "1"


def usable(q: torch.Tensor) -> bool:
    return (q.is_cuda or os.environ.get("TRITON_INTERPRET") == "1") and q.dim() == 3 \
        and q.stride(-1) == 1 and split_head_dim(q.shape[-1]) is not None


if triton is not None:

    @triton.jit
    def _load(ptrs, mask, MASKED: tl.constexpr):
        if MASKED:
            return tl.load(ptrs, mask=mask, other=0.0)
        return tl.load(ptrs)

    @triton.jit
    def _kv_tile(qa, qb, k_ptr, v_ptr, start, n0, length, h, stride_kt, stride_kh, stride_vt, stride_vh,
                 qk_scale, m, l, acc_a, acc_b, DA: tl.constexpr, DB: tl.constexpr, BLOCK_N: tl.constexpr,
                 TAIL: tl.constexpr, MASK_LOADS: tl.constexpr, K_T: tl.constexpr, S_CHAIN: tl.constexpr,
                 PV_CHAIN: tl.constexpr, PREC: tl.constexpr):
        """Keys and values n0 .. n0 + BLOCK_N into the running softmax (m, l, in log2 units) and the
        output accumulators: FlashAttention's online softmax. Only the segment's last, partial tile
        (TAIL) masks its scores. MASK_LOADS: loads masked past the segment's end; else column indices
        are clamped to the segment, so every address is inside it. K_T: keys loaded as [D, BLOCK_N]
        by their addresses; else as [BLOCK_N, D] and transposed."""
        cols = n0 + tl.arange(0, BLOCK_N)
        cm = cols < length
        if MASK_LOADS:
            tok = start + cols
        else:
            tok = start + tl.minimum(cols, length - 1)
        da = tl.arange(0, DA)
        db = DA + tl.arange(0, DB if DB > 0 else 16)  # DB == 0: never read
        if K_T:
            k_cols = k_ptr + tok[None, :] * stride_kt + h * stride_kh
            ka = _load(k_cols + da[:, None], cm[None, :], MASK_LOADS)
        else:
            k_rows = k_ptr + tok[:, None] * stride_kt + h * stride_kh
            ka = tl.trans(_load(k_rows + da[None, :], cm[:, None], MASK_LOADS))
        s = tl.dot(qa, ka, input_precision=PREC)
        if DB > 0:
            if K_T:
                kb = _load(k_cols + db[:, None], cm[None, :], MASK_LOADS)
            else:
                kb = tl.trans(_load(k_rows + db[None, :], cm[:, None], MASK_LOADS))
            if S_CHAIN:
                s = tl.dot(qb, kb, s, input_precision=PREC)
            else:
                s += tl.dot(qb, kb, input_precision=PREC)
        if TAIL:
            s = tl.where(cm[None, :], s, -float("inf"))
        m_new = tl.maximum(m, tl.max(s, 1) * qk_scale)
        p = tl.exp2(s * qk_scale - m_new[:, None])
        alpha = tl.exp2(m - m_new)
        l = l * alpha + tl.sum(p, 1)
        p = p.to(v_ptr.dtype.element_ty)
        v_rows = v_ptr + tok[:, None] * stride_vt + h * stride_vh
        va = _load(v_rows + da[None, :], cm[:, None], MASK_LOADS)
        if PV_CHAIN:
            acc_a = tl.dot(p, va, acc_a * alpha[:, None], input_precision=PREC)
        else:
            acc_a = acc_a * alpha[:, None] + tl.dot(p, va, input_precision=PREC)
        if DB > 0:
            vb = _load(v_rows + db[None, :], cm[:, None], MASK_LOADS)
            if PV_CHAIN:
                acc_b = tl.dot(p, vb, acc_b * alpha[:, None], input_precision=PREC)
            else:
                acc_b = acc_b * alpha[:, None] + tl.dot(p, vb, input_precision=PREC)
        return m_new, l, acc_a, acc_b

    @triton.jit(do_not_specialize_on_alignment=["cu_ptr"])
    def _vision_attention_kernel(q_ptr, k_ptr, v_ptr, o_ptr, cu_ptr, qk_scale,
                                 stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,
                                 stride_ot, stride_oh,
                                 DA: tl.constexpr, DB: tl.constexpr, BLOCK_M: tl.constexpr,
                                 BLOCK_N: tl.constexpr, MASK_LOADS: tl.constexpr, K_T: tl.constexpr,
                                 S_CHAIN: tl.constexpr, PV_CHAIN: tl.constexpr, PREC: tl.constexpr):
        tile = tl.program_id(0)
        h = tl.program_id(1)
        seg = tl.program_id(2)
        start = tl.load(cu_ptr + seg).to(tl.int64)  # row offsets in 64 bits: long videos pass 2^31 elements
        length = (tl.load(cu_ptr + seg + 1) - start).to(tl.int32)
        if tile * BLOCK_M < length:
            rows = tile * BLOCK_M + tl.arange(0, BLOCK_M)
            rm = rows < length
            da = tl.arange(0, DA)
            db = DA + tl.arange(0, DB if DB > 0 else 16)  # DB == 0: placeholders, never read
            q_rows = q_ptr + (start + tl.minimum(rows, length - 1))[:, None] * stride_qt + h * stride_qh
            qa = tl.load(q_rows + da[None, :])
            if DB > 0:
                qb = tl.load(q_rows + db[None, :])
            else:
                qb = tl.zeros([BLOCK_M, 16], qa.dtype)
            m = tl.full([BLOCK_M], -float("inf"), tl.float32)
            l = tl.zeros([BLOCK_M], tl.float32)
            acc_a = tl.zeros([BLOCK_M, DA], tl.float32)
            acc_b = tl.zeros([BLOCK_M, DB if DB > 0 else 16], tl.float32)
            full = length - length % BLOCK_N
            for n0 in range(0, full, BLOCK_N):
                m, l, acc_a, acc_b = _kv_tile(qa, qb, k_ptr, v_ptr, start, n0, length, h, stride_kt, stride_kh,
                                              stride_vt, stride_vh, qk_scale, m, l, acc_a, acc_b,
                                              DA, DB, BLOCK_N, False, MASK_LOADS, K_T, S_CHAIN, PV_CHAIN, PREC)
            if full < length:
                m, l, acc_a, acc_b = _kv_tile(qa, qb, k_ptr, v_ptr, start, full, length, h, stride_kt, stride_kh,
                                              stride_vt, stride_vh, qk_scale, m, l, acc_a, acc_b,
                                              DA, DB, BLOCK_N, True, MASK_LOADS, K_T, S_CHAIN, PV_CHAIN, PREC)
            o_rows = o_ptr + (start + rows)[:, None] * stride_ot + h * stride_oh
            tl.store(o_rows + da[None, :], (acc_a / l[:, None]).to(o_ptr.dtype.element_ty), mask=rm[:, None])
            if DB > 0:
                tl.store(o_rows + db[None, :], (acc_b / l[:, None]).to(o_ptr.dtype.element_ty), mask=rm[:, None])


def vision_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor,
                     max_len: int, scale: float, block_m: int = 64, block_n: int = 64,
                     num_warps: int = 4, num_stages: int = 3, mask_loads: bool = True,
                     k_t: bool = True, s_chain: bool = True, pv_chain: bool = True) -> torch.Tensor:
    """q, k, v: [N, H, D] (last dim contiguous; rows may be strided, as views of a fused qkv);
    cu_seqlens: [S + 1] int32 on q's device, segment i spanning rows cu_seqlens[i]:cu_seqlens[i + 1];
    max_len: the longest segment (sizes the launch grid). -> [N, H, D], each token attending to its
    own segment only."""
    N, H, D = q.shape
    split = split_head_dim(D)
    if split is None:
        raise ValueError(f"head_dim {D} does not split into powers of two of at least 16")
    out = torch.empty((N, H, D), dtype=q.dtype, device=q.device)
    S = cu_seqlens.shape[0] - 1
    if N == 0 or S == 0:
        return out
    grid = (triton.cdiv(max_len, block_m), H, S)
    _vision_attention_kernel[grid](
        q, k, v, out, cu_seqlens, float(scale) * LOG2E,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), out.stride(0), out.stride(1),
        DA=split[0], DB=split[1], BLOCK_M=block_m, BLOCK_N=block_n, MASK_LOADS=mask_loads, K_T=k_t,
        S_CHAIN=s_chain, PV_CHAIN=pv_chain,
        PREC="ieee" if q.dtype == torch.float32 else "tf32", num_warps=num_warps, num_stages=num_stages)
    return out


def reference_vision_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: list[int],
                               scale: float) -> torch.Tensor:
    """The kernel's computation in torch, one segment at a time, in float32."""
    out = torch.empty_like(q)
    for a, b in zip(cu_seqlens[:-1], cu_seqlens[1:]):
        if b > a:
            qs, ks, vs = (x[a:b].float().transpose(0, 1) for x in (q, k, v))
            att = torch.softmax(qs @ ks.transpose(1, 2) * scale, dim=-1)
            out[a:b] = (att @ vs).transpose(0, 1).to(q.dtype)
    return out
