"""Paged attention on the GPU in Triton, over the KV cache layout of the attention backends:
k_cache, v_cache [num_blocks, block_size, Hkv, D], a block table per sequence.

Three kernels, each with its torch reference below (tests run the kernels on the CPU through
Triton's interpreter, TRITON_INTERPRET=1; scripts/gpu_check.py compares them on the GPU):
- `store_kv`: writes a step's k, v at their slots; a negative slot (a padded row of a CUDA graph
  batch) is skipped. It can rotate q and k (rotary embedding) first, in the same kernel.
- `paged_decode_attention`: one query token per sequence. Programs split over (sequence, KV head,
  part of the context); each handles all query heads of its KV head (GQA group), so K and V are read
  once per group. With more than one split, a second kernel merges the parts by their log-sum-exp.
- `paged_prefill_attention`: query tiles of prefill chunks attending over the paged context and
  causally within the chunk (chunked prefill and prefix-cache hits read what the cache holds).
Sliding windows are supported in both."""
from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # a torch build without Triton: callers use the torch backend
    triton = None

from vlmserve.kernels import pdl
from vlmserve.kernels.pdl import gdc_wait


def available() -> bool:
    return triton is not None


def _next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


if triton is not None:
    # Step metadata (slots, lengths, block tables, query offsets) are slices of one per-step
    # buffer, so their alignment and the block tables' row stride change from step to step, as
    # does the number of decode rows: specializing on them would compile a new variant of a kernel
    # in the middle of a run (seconds each). They are plain runtime values instead.

    @triton.jit(do_not_specialize_on_alignment=["slot_ptr"])
    def _store_kv_kernel(q_ptr, k_ptr, v_ptr, kc_ptr, vc_ptr, slot_ptr, cos_ptr, sin_ptr,
                         stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_ct,
                         stride_cb, stride_cs, stride_ch, block_size, num_q_heads, num_heads, D,
                         HALF: tl.constexpr, BLOCK: tl.constexpr, HEADS: tl.constexpr, ROTARY: tl.constexpr,
                         PDL: tl.constexpr):
        # HEADS heads of one token per program, each head as its two halves (the neox rotary layout). Heads
        # 0..num_q_heads-1 are q's (ROTARY only: rotated in place), the rest k's (rotated in place where ROTARY,
        # then cached, with v's head of the same index).
        if PDL:  # launched early (kernels/pdl.py): wait for the kernel before
            gdc_wait()
        t = tl.program_id(0)
        h = tl.program_id(1) * HEADS + tl.arange(0, HEADS)
        i = tl.arange(0, BLOCK)
        is_k = (h >= num_q_heads) & (h < num_heads)
        kvh = tl.where(is_k, h - num_q_heads, 0)
        m1 = (h < num_heads)[:, None] & (i < HALF)[None, :]
        m2 = m1 & (i + HALF < D)[None, :]  # an odd D (no rotary then) has one more element in the first half
        base = tl.where(is_k, k_ptr + t * stride_kt + kvh * stride_kh, q_ptr + t * stride_qt + h * stride_qh)
        base = base[:, None] + i[None, :]
        x1 = tl.load(base, mask=m1, other=0.0)
        x2 = tl.load(base + HALF, mask=m2, other=0.0)
        if ROTARY:  # as triton_fused.rotary_inplace: float32, rounded to the tensors' dtype
            cos = tl.load(cos_ptr + t * stride_ct + i, mask=i < HALF, other=0.0).to(tl.float32)[None, :]
            sin = tl.load(sin_ptr + t * stride_ct + i, mask=i < HALF, other=0.0).to(tl.float32)[None, :]
            a, b = x1.to(tl.float32), x2.to(tl.float32)
            x1, x2 = (a * cos - b * sin).to(x1.dtype), (b * cos + a * sin).to(x1.dtype)
            tl.store(base, x1, mask=m1)
            tl.store(base + HALF, x2, mask=m2)
        slot = tl.load(slot_ptr + t)
        if slot >= 0:
            ck = is_k[:, None] & m1
            dst = (slot // block_size) * stride_cb + (slot % block_size) * stride_cs \
                + kvh[:, None] * stride_ch + i[None, :]
            tl.store(kc_ptr + dst, x1, mask=ck)
            tl.store(kc_ptr + dst + HALF, x2, mask=ck & m2)
            v = v_ptr + t * stride_vt + kvh[:, None] * stride_vh + i[None, :]
            tl.store(vc_ptr + dst, tl.load(v, mask=ck, other=0.0), mask=ck)
            tl.store(vc_ptr + dst + HALF, tl.load(v + HALF, mask=ck & m2, other=0.0), mask=ck & m2)

    @triton.jit
    def _attend_tile(q, kc_ptr, vc_ptr, table_ptr, toks, tm, keep, kvh, block_size, stride_cb, stride_cs,
                     stride_ch, d, dm, m, l, acc, PREC: tl.constexpr, MASKED: tl.constexpr = True):
        """One tile of the online softmax shared by both attention kernels: gather the K and V rows
        of tokens `toks` (valid where `tm`) through the sequence's block table, score them against
        q, drop the scores outside `keep`, and fold the tile into the running max m, sum l and acc.
        MASKED=False: every token is valid and kept (tm and keep are not read): no masks but the head
        dim's."""
        if MASKED:
            blk = tl.load(table_ptr + toks // block_size, mask=tm, other=0)
        else:
            blk = tl.load(table_ptr + toks // block_size)
        off = blk.to(tl.int64) * stride_cb + (toks % block_size) * stride_cs + kvh * stride_ch
        if MASKED:
            k = tl.load(kc_ptr + off[:, None] + d[None, :], mask=tm[:, None] & dm[None, :], other=0.0)
            v = tl.load(vc_ptr + off[:, None] + d[None, :], mask=tm[:, None] & dm[None, :], other=0.0)
        else:
            k = tl.load(kc_ptr + off[:, None] + d[None, :], mask=dm[None, :], other=0.0)
            v = tl.load(vc_ptr + off[:, None] + d[None, :], mask=dm[None, :], other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=PREC)
        if MASKED:
            s = tl.where(keep, s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, 1))
        p = tl.exp(s - m_new[:, None])
        alpha = tl.exp(m - m_new)
        l = l * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PREC)
        return m_new, l, acc

    @triton.jit(do_not_specialize=["stride_tb"], do_not_specialize_on_alignment=["tables_ptr", "seq_lens_ptr"])
    def _decode_kernel(q_ptr, kc_ptr, vc_ptr, tables_ptr, seq_lens_ptr, out_ptr, part_out_ptr, part_lse_ptr,
                       scale, window, block_size,
                       stride_qt, stride_qh, stride_cb, stride_cs, stride_ch, stride_tb,
                       stride_ot, stride_oh,
                       NUM_SPLITS: tl.constexpr, GROUP: tl.constexpr, BLOCK_G: tl.constexpr,
                       D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
                       PREC: tl.constexpr, PDL: tl.constexpr):
        if PDL:
            gdc_wait()
        b = tl.program_id(0)
        kvh = tl.program_id(1)
        split = tl.program_id(2)
        seq_len = tl.load(seq_lens_ptr + b).to(tl.int32)
        start = 0
        if window > 0:
            start = tl.maximum(seq_len - window, 0)
        # this split's share of the context, in whole tiles
        tiles = tl.cdiv(seq_len - start, BLOCK_N)
        per_split = tl.cdiv(tiles, NUM_SPLITS) * BLOCK_N
        lo = start + split * per_split
        hi = tl.minimum(lo + per_split, seq_len)

        g = tl.arange(0, BLOCK_G)
        d = tl.arange(0, BLOCK_D)
        gm = g < GROUP
        dm = d < D
        heads = kvh * GROUP + g
        q = tl.load(q_ptr + b * stride_qt + heads[:, None] * stride_qh + d[None, :],
                    mask=gm[:, None] & dm[None, :], other=0.0)
        q = (q * scale).to(kc_ptr.dtype.element_ty)
        m = tl.full([BLOCK_G], -1.0e30, tl.float32)
        l = tl.zeros([BLOCK_G], tl.float32)
        acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
        for n0 in range(lo, hi, BLOCK_N):
            toks = n0 + tl.arange(0, BLOCK_N)
            tm = toks < hi
            m, l, acc = _attend_tile(q, kc_ptr, vc_ptr, tables_ptr + b * stride_tb, toks, tm, tm[None, :], kvh,
                                     block_size, stride_cb, stride_cs, stride_ch, d, dm, m, l, acc, PREC)
        safe_l = tl.where(l > 0, l, 1.0)
        if NUM_SPLITS == 1:
            o = acc / safe_l[:, None]
            tl.store(out_ptr + b * stride_ot + heads[:, None] * stride_oh + d[None, :],
                     o.to(out_ptr.dtype.element_ty), mask=gm[:, None] & dm[None, :])
        else:
            # parts: [B, Hq, NUM_SPLITS, BLOCK_D] and [B, Hq, NUM_SPLITS], contiguous
            row = (b * (tl.num_programs(1) * GROUP) + heads) * NUM_SPLITS + split
            tl.store(part_out_ptr + row[:, None] * BLOCK_D + d[None, :], acc / safe_l[:, None],
                     mask=gm[:, None])
            lse = tl.where(l > 0, m + tl.log(safe_l), float("-inf"))
            tl.store(part_lse_ptr + row, lse, mask=gm)

    @triton.jit
    def _merge_splits_kernel(part_out_ptr, part_lse_ptr, out_ptr, stride_ot, stride_oh, num_heads,
                             NUM_SPLITS: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr, PDL: tl.constexpr):
        if PDL:
            gdc_wait()
        b = tl.program_id(0)
        h = tl.program_id(1)
        row = b * num_heads + h
        s = tl.arange(0, NUM_SPLITS)
        d = tl.arange(0, BLOCK_D)
        lse = tl.load(part_lse_ptr + row * NUM_SPLITS + s)
        top = tl.max(lse, 0)
        top = tl.where(top == float("-inf"), 0.0, top)
        w = tl.exp(lse - top)
        parts = tl.load(part_out_ptr + (row * NUM_SPLITS + s)[:, None] * BLOCK_D + d[None, :])
        o = tl.sum(parts * w[:, None], 0) / tl.maximum(tl.sum(w, 0), 1e-30)
        tl.store(out_ptr + b * stride_ot + h * stride_oh + d, o.to(out_ptr.dtype.element_ty), mask=d < D)

    @triton.jit(do_not_specialize=["first_seq", "stride_tb"],
                do_not_specialize_on_alignment=["tables_ptr", "qsl_ptr", "seq_lens_ptr"])
    def _prefill_kernel(q_ptr, kc_ptr, vc_ptr, out_ptr, tables_ptr, qsl_ptr, seq_lens_ptr,
                        first_seq, scale, window, block_size,
                        stride_qt, stride_qh, stride_cb, stride_cs, stride_ch, stride_tb,
                        stride_ot, stride_oh,
                        GROUP: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PREC: tl.constexpr):
        tile = tl.program_id(0)
        seq = first_seq + tl.program_id(1)
        h = tl.program_id(2)
        q_start = tl.load(qsl_ptr + seq).to(tl.int32)
        q_len = tl.load(qsl_ptr + seq + 1).to(tl.int32) - q_start
        if tile * BLOCK_M < q_len:
            seq_len = tl.load(seq_lens_ptr + seq).to(tl.int32)
            ctx = seq_len - q_len  # tokens cached before this chunk
            kvh = h // GROUP
            rows = tile * BLOCK_M + tl.arange(0, BLOCK_M)
            rm = rows < q_len
            qpos = ctx + rows
            d = tl.arange(0, BLOCK_D)
            dm = d < D
            q = tl.load(q_ptr + (q_start + rows)[:, None] * stride_qt + h * stride_qh + d[None, :],
                        mask=rm[:, None] & dm[None, :], other=0.0)
            q = (q * scale).to(kc_ptr.dtype.element_ty)
            m = tl.full([BLOCK_M], -1.0e30, tl.float32)
            l = tl.zeros([BLOCK_M], tl.float32)
            acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
            hi = tl.minimum(seq_len, ctx + (tile + 1) * BLOCK_M)  # causal: nothing past the tile's last row
            lo = 0
            if window > 0:
                lo = tl.maximum(ctx + tile * BLOCK_M - window + 1, 0)
            else:  # the key tiles wholly before the block's first row need no mask: their own loop
                full_end = ((ctx + tile * BLOCK_M) // BLOCK_N) * BLOCK_N
                for n0 in range(0, full_end, BLOCK_N):
                    m, l, acc = _attend_tile(q, kc_ptr, vc_ptr, tables_ptr + seq * stride_tb,
                                             n0 + tl.arange(0, BLOCK_N), rm, rm, kvh, block_size, stride_cb,
                                             stride_cs, stride_ch, d, dm, m, l, acc, PREC, False)
                lo = full_end
            for n0 in range(lo, hi, BLOCK_N):
                toks = n0 + tl.arange(0, BLOCK_N)
                tm = toks < hi
                keep = tm[None, :] & (toks[None, :] <= qpos[:, None])
                if window > 0:
                    keep = keep & (toks[None, :] > qpos[:, None] - window)
                m, l, acc = _attend_tile(q, kc_ptr, vc_ptr, tables_ptr + seq * stride_tb, toks, tm, keep, kvh,
                                         block_size, stride_cb, stride_cs, stride_ch, d, dm, m, l, acc, PREC)
            o = acc / tl.where(l > 0, l, 1.0)[:, None]
            tl.store(out_ptr + (q_start + rows)[:, None] * stride_ot + h * stride_oh + d[None, :],
                     o.to(out_ptr.dtype.element_ty), mask=rm[:, None] & dm[None, :])


# ---- launchers -----------------------------------------------------------------------------------
def store_kv(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
             slot_mapping: torch.Tensor, rotary: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None) -> None:
    """k, v: [T, Hkv, D] (last dim contiguous); k_cache, v_cache [num_blocks, block_size, Hkv, D]
    with equal strides; slot_mapping [T], negative for rows to skip. rotary = (q [T, Hq, D], cos, sin [T, 1, D]
    from RotaryEmbedding.lookup): first rotate q and k in place over all of D, as triton_fused.rotary_inplace
    does, in the same kernel (a launch fewer per layer)."""
    T, H, D = k.shape
    if T == 0:
        return
    q = k
    Hq = stride_ct = 0
    cos = sin = slot_mapping  # not read without rotary
    if rotary is not None:
        q, cos, sin = rotary
        cos, sin = cos.reshape(T, -1), sin.reshape(T, -1)
        Hq, stride_ct = q.shape[1], cos.stride(0)
        if D % 2 or q.stride(-1) != 1 or cos.stride(-1) != 1 or sin.stride(0) != stride_ct:
            raise ValueError("rotary in store_kv: even head size, contiguous heads and cos/sin rows")
    heads = Hq + H
    per_program = min(16, _next_pow2(heads))
    on = pdl.enabled(k)
    _store_kv_kernel[(T, triton.cdiv(heads, per_program))](
        q, k, v, k_cache, v_cache, slot_mapping, cos, sin, q.stride(0), q.stride(1), k.stride(0), k.stride(1),
        v.stride(0), v.stride(1), stride_ct, k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        k_cache.shape[1], Hq, heads, D, HALF=(D + 1) // 2, BLOCK=_next_pow2((D + 1) // 2), HEADS=per_program,
        ROTARY=rotary is not None, PDL=on, **pdl.launch_options(on))


def decode_num_splits(num_seqs: int, num_kv_heads: int, max_seq_len: int, num_sms: int) -> int:
    """Enough programs to fill the GPU once, at least 256 tokens per split, at most 16 splits. On
    the H200 with the default tiles (`gpu_check.py --tiles`, in CUDA graphs) that is the best or
    within 5% of it at every batch measured: Qwen2-VL-7B (4 KV heads) at 1, 16, 64 and 128
    sequences of ~1400-1530 tokens (128: 1 split 100 us, 2 splits 108), LLaVA (32 heads) at 1, 64
    and 256. Filling it four times over, as before, split too often at middle batches (64: 4 splits
    65 us against 54 with 1).
    One sequence (single-stream decode) takes up to 16 splits of at least 64 tokens: `gpu_check.py --single` on
    the H200, in CUDA graphs with the merge, Qwen2-VL at 1500 tokens 5.8 us with 16 splits against 7.5 with 8;
    LLaVA at 700 tokens 7.3 us (16 splits, decode_tiles' 64-token tiles) against 7.9 (8 splits of 128)."""
    if num_seqs == 1:
        return max(1, min(16, _next_pow2(-(-max_seq_len // 64))))
    want = -(-num_sms // max(1, num_seqs * num_kv_heads))
    return max(1, min(16, _next_pow2(want), _next_pow2(-(-max_seq_len // 256))))


def default_decode_tiles(cache: torch.Tensor) -> tuple[int, int]:
    """(tokens per tile, warps): 128 and 4 for 16-bit caches, the fastest or within 4% of it at
    every batch of the sweep above (Qwen2-VL at 128 sequences: 100 us against 116-132 with 64-token
    tiles; LLaVA at 256: 656 against 677); 64 for float32, whose 128-token tiles, three stages
    deep, would not fit in shared memory."""
    return (128, 4) if cache.element_size() <= 2 else (64, 4)


def decode_tiles(cache: torch.Tensor, num_seqs: int) -> tuple[int, int]:
    """(tokens per tile, warps) for a decode step: default_decode_tiles, but 64-token tiles with 2 warps for one
    sequence with 16 or more KV heads in a 16-bit cache. A split is whole tiles, so small ones leave fewer splits
    empty; with many heads each split still has programs enough. `gpu_check.py --single`, 16 splits: LLaVA (32
    heads, 700 tokens) 7.3 us against 8.7 with 128-token tiles; Qwen2-VL (4 KV heads, 1500) 7.4 against 5.8, so
    it keeps them."""
    if cache.element_size() <= 2 and num_seqs == 1 and cache.shape[2] >= 16:
        return 64, 2
    return default_decode_tiles(cache)


def decode_stages(group: int, block_n: int) -> int:
    """Pipeline stages of the decode kernel's loads: 2 for 128-token tiles where each KV head serves one query
    head (MHA: LLaVA-1.5's Llama-2), else Triton's 3. H200, in CUDA graphs, LLaVA's shapes (BENCHMARKS.md):
    244 sequences of 608-736 tokens 603-618 us against 610-626 with 3 stages, in three calls; 64 sequences 172-173
    against 177-178. With a GQA group (Qwen2-VL's 7 query heads a KV head), 2 stages were 10% slower."""
    return 2 if group == 1 and block_n == 128 else 3


def paged_decode_attention(q, k_cache, v_cache, block_tables, seq_lens, scale: float,
                           sliding_window: int | None = None, num_splits: int = 1,
                           out: torch.Tensor | None = None, block_n: int | None = None,
                           num_warps: int | None = None, num_stages: int | None = None) -> torch.Tensor:
    """q: [B, Hq, D]; caches [num_blocks, block_size, Hkv, D]; block_tables [B, >= blocks of the
    longest sequence]; seq_lens [B] (the query is the token at seq_len - 1; 0: a padded row, output
    zeros). Returns [B, Hq, D]. Tiles and stages: default_decode_tiles and decode_stages where not given."""
    B, Hq, D = q.shape
    Hkv = k_cache.shape[2]
    group = Hq // Hkv
    tiles = default_decode_tiles(k_cache)
    block_n, num_warps = block_n or tiles[0], num_warps or tiles[1]
    num_stages = num_stages or decode_stages(group, block_n)
    block_d = _next_pow2(D)
    if out is None:
        out = torch.empty_like(q)
    if B == 0:
        return out
    num_splits = _next_pow2(num_splits)
    if num_splits > 1:
        part_out = torch.empty((B, Hq, num_splits, block_d), dtype=torch.float32, device=q.device)
        part_lse = torch.empty((B, Hq, num_splits), dtype=torch.float32, device=q.device)
    else:
        part_out = part_lse = out  # unused
    on = pdl.enabled(q)
    _decode_kernel[(B, Hkv, num_splits)](
        q, k_cache, v_cache, block_tables, seq_lens, out, part_out, part_lse,
        float(scale), int(sliding_window or 0), k_cache.shape[1],
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        block_tables.stride(0), out.stride(0), out.stride(1),
        NUM_SPLITS=num_splits, GROUP=group, BLOCK_G=max(16, _next_pow2(group)), D=D, BLOCK_D=block_d,
        BLOCK_N=block_n, PREC=_dot_precision(k_cache), PDL=on, num_warps=num_warps, num_stages=num_stages,
        **pdl.launch_options(on))
    if num_splits > 1:
        _merge_splits_kernel[(B, Hq)](part_out, part_lse, out, out.stride(0), out.stride(1), Hq,
                                      NUM_SPLITS=num_splits, D=D, BLOCK_D=block_d, PDL=on, **pdl.launch_options(on))
    return out


def _dot_precision(cache: torch.Tensor) -> str:
    # float32 models get float32 dots: Triton's default for them is TF32 (10-bit mantissa), which
    # moves logprobs by ~1e-3 from HF's float32 results.
    return "ieee" if cache.dtype == torch.float32 else "tf32"


def paged_prefill_attention(q, k_cache, v_cache, block_tables, query_start_loc, seq_lens, scale: float,
                            sliding_window: int | None = None, first_seq: int = 0, max_query_len: int | None = None,
                            out: torch.Tensor | None = None, block_m: int = 64, block_n: int = 64,
                            num_warps: int | None = None, num_stages: int = 2,
                            num_seqs: int | None = None) -> torch.Tensor:
    """Sequences first_seq.. (num_seqs of them; default: all the rest) of a flat batch. q: [T, Hq, D]
    (the whole batch); query_start_loc [B + 1] and seq_lens [B] device tensors; the chunk's own k, v
    must already be in the cache. Writes the rows of those sequences into `out` ([T, Hq, D]) and
    returns it."""
    T, Hq, D = q.shape
    Hkv = k_cache.shape[2]
    if out is None:
        out = torch.empty_like(q)
    num = seq_lens.shape[0] - first_seq if num_seqs is None else num_seqs
    if num <= 0:
        return out
    if max_query_len is None:
        max_query_len = int((query_start_loc[first_seq + 1:] - query_start_loc[first_seq:-1]).max())
    grid = (triton.cdiv(max_query_len, block_m), num, Hq)
    _prefill_kernel[grid](
        q, k_cache, v_cache, out, block_tables, query_start_loc, seq_lens,
        first_seq, float(scale), int(sliding_window or 0), k_cache.shape[1],
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        block_tables.stride(0), out.stride(0), out.stride(1),
        GROUP=Hq // Hkv, D=D, BLOCK_D=_next_pow2(D), BLOCK_M=block_m, BLOCK_N=block_n,
        PREC=_dot_precision(k_cache), num_warps=num_warps or (4 if block_m <= 64 else 8), num_stages=num_stages)
    return out


# ---- torch references ----------------------------------------------------------------------------
def reference_store_kv(k, v, k_cache, v_cache, slot_mapping) -> None:
    keep = slot_mapping >= 0
    H, D = k.shape[1:]
    k_cache.view(-1, H, D)[slot_mapping[keep]] = k[keep]
    v_cache.view(-1, H, D)[slot_mapping[keep]] = v[keep]


def _gather_seq(cache, table, L):
    bs, H, D = cache.shape[1:]
    nb = -(-L // bs)
    return cache[table[:nb].long()].reshape(-1, H, D)[:L].float()


def reference_paged_prefill_attention(q, k_cache, v_cache, block_tables, query_start_loc, seq_lens, scale: float,
                                      sliding_window: int | None = None, first_seq: int = 0) -> torch.Tensor:
    """Float32 per-sequence attention; rows of sequences before first_seq are left zero."""
    T, Hq, D = q.shape
    Hkv = k_cache.shape[2]
    out = torch.zeros_like(q)
    qsl, lens = query_start_loc.tolist(), seq_lens.tolist()
    for i in range(first_seq, len(lens)):
        s, e, L = qsl[i], qsl[i + 1], lens[i]
        if e == s:
            continue
        k = _gather_seq(k_cache, block_tables[i], L).repeat_interleave(Hq // Hkv, dim=1)
        v = _gather_seq(v_cache, block_tables[i], L).repeat_interleave(Hq // Hkv, dim=1)
        qpos = torch.arange(L - (e - s), L, device=q.device)[:, None]
        kpos = torch.arange(L, device=q.device)[None, :]
        mask = kpos <= qpos
        if sliding_window:
            mask &= kpos > qpos - sliding_window
        scores = torch.einsum("qhd,khd->hqk", q[s:e].float(), k) * scale
        scores = scores.masked_fill(~mask[None], float("-inf"))
        out[s:e] = torch.einsum("hqk,khd->qhd", scores.softmax(-1), v).to(q.dtype)
    return out


def reference_paged_decode_attention(q, k_cache, v_cache, block_tables, seq_lens, scale: float,
                                     sliding_window: int | None = None) -> torch.Tensor:
    """Decode is prefill with one query token per sequence; padded rows (seq_len 0) give zeros."""
    B = q.shape[0]
    lens = seq_lens.long()
    qsl = torch.cat([torch.zeros(1, dtype=torch.long, device=q.device), (lens > 0).long().cumsum(0)])
    return reference_paged_prefill_attention(q, k_cache, v_cache, block_tables, qsl, lens, scale, sliding_window) \
        if B else q.clone()
