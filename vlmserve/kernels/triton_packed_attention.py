"""FlashAttention over packed variable-length segments (each token attends within its own segment),
in Triton: bidirectional for vision encoders' images, frames and windows; causal, with grouped key
heads, for the language models' fresh prefill chunks (prompts with nothing cached before them).

Head sizes need not be powers of two. Qwen2-VL's ViT has head_dim 80: cuDNN's SDPA kernel for it is
tiled for head_dim 128 (the H200 profiles in BENCHMARKS.md), so 3/8 of its tensor-core work is
padding. Here a head of D = DA + DB (80 = 64 + 16, both powers of two) takes two dots for QK^T and
two for PV, with no padding, and no execution plan to build per batch shape as cuDNN does.

Where it runs (H200 figures in BENCHMARKS.md; `scripts/gpu_vision_attention_sweep.py` times the tiles):
- vision attention at head sizes cuDNN pads, on CUDA in 16 bits (`preferred_for_vision`): 1024x1024
  images (5476 tokens, 16 heads), 2226 us against cuDNN's 2573 for six, 422 against 443 for one;
- several fresh prefill chunks in one step (layers/attention/triton_backend.py): 27 LLaVA prompts of
  607 tokens take 358 us against 539 in torch's FlashAttention varlen op, 11 Qwen2-VL prompts of
  1400 (GQA 28 / 4) 443 against 594. A lone prompt in a prefill graph keeps dense SDPA (cuDNN: 23
  against 27 us at 607 tokens).
Most of that comes from the key tiles that need no mask (inside the segment; causal: before the
block's first row) running in their own loop, their scale folded into the exponent. For images two
blocks of rows share that loop, so that one's value dots overlap the other's softmax. Where the launch's
last wave would fill a part of the GPU only (a lone image: 688 programs in 264 slots on an H200), its
programs are cut into pieces over the keys and merged by a second kernel (`split_last_wave`).
`reference_packed_attention` is the torch computation it is tested against (on the CPU through
Triton's interpreter)."""
from __future__ import annotations

import logging
import os

import torch

try:
    import triton
    import triton.language as tl
except ImportError:
    triton = None

LOG2E = 1.4426950408889634
logger = logging.getLogger(__name__)


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


def preferred_for_vision(head_dim: int, dtype: torch.dtype, on_cuda: bool) -> bool:
    """Whether vision attention of this head size runs here rather than in torch's SDPA.
    VLMSERVE_TRITON_VISION_ATTENTION=1: wherever the kernel can (any split head size, CPU tensors
    in Triton's interpreter); =0: never. Unset: 16-bit CUDA tensors of head sizes that are not a
    power of two (80 = 64 + 16), which cuDNN pads to the next one; powers of two stay with cuDNN."""
    setting = os.environ.get("VLMSERVE_TRITON_VISION_ATTENTION")
    if triton is None or setting == "0" or split_head_dim(head_dim) is None:
        return False
    if setting == "1":
        return True
    return on_cuda and dtype in (torch.float16, torch.bfloat16) and split_head_dim(head_dim)[1] > 0


def usable(q: torch.Tensor) -> bool:
    return (q.is_cuda or os.environ.get("TRITON_INTERPRET") == "1") and q.dim() == 3 \
        and q.stride(-1) == 1 and split_head_dim(q.shape[-1]) is not None


if triton is not None:

    @triton.jit
    def _load_split(ptrs, DA: tl.constexpr, DB: tl.constexpr):
        """Columns :DA and DA:DA + DB of a tile of rows (DB == 0: the first again, never read)."""
        va = tl.load(ptrs + tl.arange(0, DA)[None, :])
        vb = va
        if DB > 0:
            vb = tl.load(ptrs + DA + tl.arange(0, DB)[None, :])
        return va, vb

    @triton.jit
    def _attend_tiles(acc_a, acc_b, l, m, qa, qb, rows, k_base, v_base, stride_kt, stride_vt, lo, hi, length,
                      qk_scale, DA: tl.constexpr, DB: tl.constexpr, BLOCK_N: tl.constexpr, PREC: tl.constexpr,
                      MASKED: tl.constexpr, CAUSAL: tl.constexpr):
        """The online softmax of one block of rows over key tiles lo, lo + BLOCK_N, ... < hi.
        MASKED tiles may run past the segment's end: their key rows are clamped to it (every address
        stays inside) and the scores past it, or (CAUSAL) past each row's own position, are pushed to
        -1e30. Unmasked tiles lie wholly inside and before every row, and their scale folds into the
        exponent's subtraction (one FMA a score)."""
        da = tl.arange(0, DA)
        db = DA + tl.arange(0, DB if DB > 0 else 16)  # DB == 0: placeholders, never read
        for n0 in range(lo, hi, BLOCK_N):
            cols = n0 + tl.arange(0, BLOCK_N)
            if MASKED:
                cols = tl.minimum(cols, length - 1)
            k_rows = k_base + cols[:, None].to(tl.int64) * stride_kt
            s = tl.dot(qa, tl.trans(tl.load(k_rows + da[None, :])), input_precision=PREC)
            if DB > 0:
                s = tl.dot(qb, tl.trans(tl.load(k_rows + db[None, :])), s, input_precision=PREC)
            scale = qk_scale
            if MASKED:
                keep = (n0 + tl.arange(0, BLOCK_N) < length)[None, :]
                if CAUSAL:
                    keep = keep & ((n0 + tl.arange(0, BLOCK_N))[None, :] <= rows[:, None])
                s = tl.where(keep, s * qk_scale, -1.0e30)
                scale = 1.0
            va, vb = _load_split(v_base + cols[:, None].to(tl.int64) * stride_vt, DA, DB)
            acc_a, acc_b, l, m = _fold_tile(s, scale, m, l, acc_a, acc_b, va, vb, DB, PREC)
        return acc_a, acc_b, l, m

    @triton.jit
    def _fold_tile(s, scale, m, l, acc_a, acc_b, va, vb, DB: tl.constexpr, PREC: tl.constexpr):
        """One key tile into a block of rows' online softmax (log2 units): its scores s, times
        `scale`, update the running max m and sum l; the outputs take its values va, vb (DB > 0)."""
        m_new = tl.maximum(m, tl.max(s, 1) * scale)
        p = tl.exp2(s * scale - m_new[:, None])
        alpha = tl.exp2(m - m_new)
        l = l * alpha + tl.sum(p, 1)
        p = p.to(va.dtype)
        acc_a = tl.dot(p, va, acc_a * alpha[:, None], input_precision=PREC)
        if DB > 0:
            acc_b = tl.dot(p, vb, acc_b * alpha[:, None], input_precision=PREC)
        return acc_a, acc_b, l, m_new

    @triton.jit
    def _attend_full_tiles_paired(acc_a0, acc_b0, l0, m0, acc_a1, acc_b1, l1, m1, qa0, qb0, qa1, qb1, k_base,
                                  v_base, stride_kt, stride_vt, lo, hi, qk_scale, DA: tl.constexpr,
                                  DB: tl.constexpr, BLOCK_N: tl.constexpr, PREC: tl.constexpr):
        """`_attend_tiles` over unmasked tiles for two blocks of rows at once, sharing each tile's
        loads: both blocks' score dots go first, then one block's value dots run on the tensor cores
        while the other's softmax runs."""
        da = tl.arange(0, DA)
        db = DA + tl.arange(0, DB if DB > 0 else 16)
        for n0 in range(lo, hi, BLOCK_N):
            cols = (n0 + tl.arange(0, BLOCK_N))[:, None].to(tl.int64)
            k_rows = k_base + cols * stride_kt
            ka = tl.trans(tl.load(k_rows + da[None, :]))
            s0 = tl.dot(qa0, ka, input_precision=PREC)
            s1 = tl.dot(qa1, ka, input_precision=PREC)
            if DB > 0:
                kb = tl.trans(tl.load(k_rows + db[None, :]))
                s0 = tl.dot(qb0, kb, s0, input_precision=PREC)
                s1 = tl.dot(qb1, kb, s1, input_precision=PREC)
            va, vb = _load_split(v_base + cols * stride_vt, DA, DB)
            acc_a0, acc_b0, l0, m0 = _fold_tile(s0, qk_scale, m0, l0, acc_a0, acc_b0, va, vb, DB, PREC)
            acc_a1, acc_b1, l1, m1 = _fold_tile(s1, qk_scale, m1, l1, acc_a1, acc_b1, va, vb, DB, PREC)
        return acc_a0, acc_b0, l0, m0, acc_a1, acc_b1, l1, m1

    @triton.jit
    def _load_rows(q_ptr, start, rows, length, h, stride_qt, stride_qh, DA: tl.constexpr, DB: tl.constexpr):
        """A block of rows' queries (rows past the segment read its last one) and a zero state:
        -> qa, qb, m, l, acc_a, acc_b."""
        q_rows = q_ptr + (start + tl.minimum(rows, length - 1))[:, None] * stride_qt + h * stride_qh
        qa, qb = _load_split(q_rows, DA, DB)
        m = tl.full([rows.shape[0]], -1.0e30, tl.float32)
        l = tl.zeros([rows.shape[0]], tl.float32)
        acc_a = tl.zeros([rows.shape[0], DA], tl.float32)
        acc_b = tl.zeros([rows.shape[0], DB if DB > 0 else 16], tl.float32)
        return qa, qb, m, l, acc_a, acc_b

    @triton.jit
    def _store_rows(o_ptr, start, rows, length, h, stride_ot, stride_oh, acc_a, acc_b, l,
                    DA: tl.constexpr, DB: tl.constexpr):
        """The block's outputs, acc / l, for its rows inside the segment."""
        rm = (rows < length)[:, None]
        o_rows = o_ptr + (start + rows)[:, None] * stride_ot + h * stride_oh
        tl.store(o_rows + tl.arange(0, DA)[None, :], (acc_a / l[:, None]).to(o_ptr.dtype.element_ty), mask=rm)
        if DB > 0:
            tl.store(o_rows + DA + tl.arange(0, DB)[None, :], (acc_b / l[:, None]).to(o_ptr.dtype.element_ty),
                     mask=rm)

    @triton.jit
    def _attend_range(acc_a, acc_b, l, m, qa, qb, rows, k_base, v_base, stride_kt, stride_vt, lo, hi, length,
                      qk_scale, DA: tl.constexpr, DB: tl.constexpr, BLOCK_N: tl.constexpr, PREC: tl.constexpr):
        """`_attend_tiles` (bidirectional) over keys lo:hi, lo a multiple of BLOCK_N: the tiles wholly
        inside the segment unmasked, then the partial one (at the segment's end) masked."""
        full = tl.maximum(lo, tl.minimum(hi, (length // BLOCK_N) * BLOCK_N))
        acc_a, acc_b, l, m = _attend_tiles(acc_a, acc_b, l, m, qa, qb, rows, k_base, v_base, stride_kt, stride_vt,
                                           lo, full, length, qk_scale, DA, DB, BLOCK_N, PREC, False, False)
        return _attend_tiles(acc_a, acc_b, l, m, qa, qb, rows, k_base, v_base, stride_kt, stride_vt, full, hi,
                             length, qk_scale, DA, DB, BLOCK_N, PREC, True, False)

    @triton.jit
    def _store_piece(acc_ptr, ml_ptr, piece, offset, acc_a, acc_b, l, m, DA: tl.constexpr, DB: tl.constexpr,
                     BLOCK_M: tl.constexpr):
        """A piece's partial state (unnormalized outputs, running sum and max) for a block of its rows,
        `offset` rows into its BLOCK_M, in float32: acc [pieces * BLOCK_M, DA + DB], ml [.., 2]."""
        rows = piece * BLOCK_M + offset + tl.arange(0, l.shape[0])
        a_rows = acc_ptr + rows[:, None].to(tl.int64) * (DA + DB)
        tl.store(a_rows + tl.arange(0, DA)[None, :], acc_a)
        if DB > 0:
            tl.store(a_rows + DA + tl.arange(0, DB)[None, :], acc_b)
        tl.store(ml_ptr + rows * 2, l)
        tl.store(ml_ptr + rows * 2 + 1, m)

    @triton.jit
    def _segment(cu_ptr, k_ptr, v_ptr, seg, kvh, stride_kt, stride_kh, stride_vt, stride_vh):
        """A segment's first row and length, and where its keys and values of key head kvh start."""
        start = tl.load(cu_ptr + seg).to(tl.int64)  # row offsets in 64 bits: long videos pass 2^31 elements
        length = (tl.load(cu_ptr + seg + 1) - start).to(tl.int32)
        return start, length, k_ptr + start * stride_kt + kvh * stride_kh, v_ptr + start * stride_vt + kvh * stride_vh

    @triton.jit
    def _program_item(item, n_tiles, n_heads):
        """(tile, head, segment) of the item-th program: tiles fastest, then heads, then segments."""
        return item % n_tiles, item // n_tiles % n_heads, item // (n_tiles * n_heads)

    @triton.jit
    def _attend_piece(q_ptr, k_base, v_base, acc_ptr, ml_ptr, piece, part, start, length, tile, h, qk_scale,
                      stride_qt, stride_qh, stride_kt, stride_vt, DA: tl.constexpr, DB: tl.constexpr,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PREC: tl.constexpr, PAIRED: tl.constexpr,
                      PIECES: tl.constexpr):
        """Piece `part` of a cut program (bidirectional, split tails): its block of rows over the
        part-th share of the key tiles, as evenly as they go; its partial state to `_store_piece`."""
        if tile * BLOCK_M < length:
            share = tl.cdiv(tl.cdiv(length, BLOCK_N), PIECES) * BLOCK_N
            lo = tl.minimum(part * share, length)
            hi = tl.minimum(lo + share, length)
            if PAIRED:
                rows0 = tile * BLOCK_M + tl.arange(0, BLOCK_M // 2)
                rows1 = rows0 + BLOCK_M // 2
                qa0, qb0, m0, l0, acc_a0, acc_b0 = _load_rows(q_ptr, start, rows0, length, h, stride_qt,
                                                              stride_qh, DA, DB)
                qa1, qb1, m1, l1, acc_a1, acc_b1 = _load_rows(q_ptr, start, rows1, length, h, stride_qt,
                                                              stride_qh, DA, DB)
                full = tl.maximum(lo, tl.minimum(hi, (length // BLOCK_N) * BLOCK_N))
                acc_a0, acc_b0, l0, m0, acc_a1, acc_b1, l1, m1 = _attend_full_tiles_paired(
                    acc_a0, acc_b0, l0, m0, acc_a1, acc_b1, l1, m1, qa0, qb0, qa1, qb1, k_base, v_base,
                    stride_kt, stride_vt, lo, full, qk_scale, DA, DB, BLOCK_N, PREC)
                acc_a0, acc_b0, l0, m0 = _attend_tiles(acc_a0, acc_b0, l0, m0, qa0, qb0, rows0, k_base, v_base,
                                                       stride_kt, stride_vt, full, hi, length, qk_scale, DA,
                                                       DB, BLOCK_N, PREC, True, False)
                acc_a1, acc_b1, l1, m1 = _attend_tiles(acc_a1, acc_b1, l1, m1, qa1, qb1, rows1, k_base, v_base,
                                                       stride_kt, stride_vt, full, hi, length, qk_scale, DA,
                                                       DB, BLOCK_N, PREC, True, False)
                _store_piece(acc_ptr, ml_ptr, piece, 0, acc_a0, acc_b0, l0, m0, DA, DB, BLOCK_M)
                _store_piece(acc_ptr, ml_ptr, piece, BLOCK_M // 2, acc_a1, acc_b1, l1, m1, DA, DB, BLOCK_M)
            else:
                rows = tile * BLOCK_M + tl.arange(0, BLOCK_M)
                qa, qb, m, l, acc_a, acc_b = _load_rows(q_ptr, start, rows, length, h, stride_qt, stride_qh, DA,
                                                        DB)
                acc_a, acc_b, l, m = _attend_range(acc_a, acc_b, l, m, qa, qb, rows, k_base, v_base, stride_kt,
                                                   stride_vt, lo, hi, length, qk_scale, DA, DB, BLOCK_N, PREC)
                _store_piece(acc_ptr, ml_ptr, piece, 0, acc_a, acc_b, l, m, DA, DB, BLOCK_M)

    # The program counts are not specialized on (as Triton does ints: == 1, divisible by 16): they vary
    # from launch to launch, and each specialization would be a variant compiled mid-run.
    @triton.jit(do_not_specialize=["n_tiles", "n_programs", "n_whole"], do_not_specialize_on_alignment=["cu_ptr"])
    def _packed_attention_kernel(q_ptr, k_ptr, v_ptr, o_ptr, cu_ptr, acc_ptr, ml_ptr, qk_scale, n_tiles, n_heads,
                                 n_programs, n_whole, stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,
                                 stride_ot, stride_oh,
                                 DA: tl.constexpr, DB: tl.constexpr, BLOCK_M: tl.constexpr,
                                 BLOCK_N: tl.constexpr, PREC: tl.constexpr, SPLIT_TAIL: tl.constexpr,
                                 CAUSAL: tl.constexpr, GROUP: tl.constexpr, PAIRED: tl.constexpr,
                                 PIECES: tl.constexpr):
        """FlashAttention over one segment, for BLOCK_M of its rows and query head h (key head
        h // GROUP). SPLIT_TAIL: the key tiles that need no mask in one loop, the rest (the partial
        tile; CAUSAL: the tiles from the block's first row on) in a second loop; else every tile masked.
        PAIRED (bidirectional, SPLIT_TAIL): the rows as two blocks of BLOCK_M / 2 whose unmasked tiles
        share one loop (`_attend_full_tiles_paired`).
        PIECES > 1 (bidirectional, SPLIT_TAIL): of the n_programs (tile, head, segment) programs, in
        that order, the first n_whole run whole; each one after them is cut into PIECES programs
        (grid.z past the segments), each over a share of the keys, that leave a partial state for
        `_merge_pieces_kernel` (acc_ptr, ml_ptr). The grid stays 3D rather than one dimension decoded
        here: that ran 2-3% slower on an H200 (BENCHMARKS.md)."""
        tile = tl.program_id(0)
        if CAUSAL:  # the last blocks of a segment have the most keys: start them first
            tile = n_tiles - 1 - tile
        h = tl.program_id(1)
        seg = tl.program_id(2)
        if PIECES > 1 and (seg * n_heads + h) * n_tiles + tile >= n_whole:  # cut, or a piece of a cut one
            piece = (seg * n_heads + h) * n_tiles + tile - n_programs
            if (piece >= 0) & (piece < (n_programs - n_whole) * PIECES):
                tile, h, seg = _program_item(n_whole + piece // PIECES, n_tiles, n_heads)
                start, length, k_base, v_base = _segment(cu_ptr, k_ptr, v_ptr, seg, h // GROUP, stride_kt,
                                                         stride_kh, stride_vt, stride_vh)
                _attend_piece(q_ptr, k_base, v_base, acc_ptr, ml_ptr, piece, piece % PIECES, start, length, tile,
                              h, qk_scale, stride_qt, stride_qh, stride_kt, stride_vt, DA, DB, BLOCK_M, BLOCK_N,
                              PREC, PAIRED, PIECES)
        else:
            start, length, k_base, v_base = _segment(cu_ptr, k_ptr, v_ptr, seg, h // GROUP, stride_kt, stride_kh,
                                                     stride_vt, stride_vh)
            if tile * BLOCK_M < length:
                if PAIRED:
                    _attend_block_pair(q_ptr, o_ptr, k_base, v_base, start, length, tile, h, qk_scale, stride_qt,
                                       stride_qh, stride_kt, stride_vt, stride_ot, stride_oh, DA, DB, BLOCK_M,
                                       BLOCK_N, PREC)
                else:
                    _attend_block(q_ptr, o_ptr, k_base, v_base, start, length, tile, h, qk_scale, stride_qt,
                                  stride_qh, stride_kt, stride_vt, stride_ot, stride_oh, DA, DB, BLOCK_M, BLOCK_N,
                                  PREC, SPLIT_TAIL, CAUSAL)

    @triton.jit
    def _attend_block_pair(q_ptr, o_ptr, k_base, v_base, start, length, tile, h, qk_scale, stride_qt, stride_qh,
                           stride_kt, stride_vt, stride_ot, stride_oh, DA: tl.constexpr, DB: tl.constexpr,
                           BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PREC: tl.constexpr):
        """A whole program of PAIRED: BLOCK_M rows of a segment as two blocks; their outputs."""
        rows0 = tile * BLOCK_M + tl.arange(0, BLOCK_M // 2)
        rows1 = rows0 + BLOCK_M // 2
        qa0, qb0, m0, l0, acc_a0, acc_b0 = _load_rows(q_ptr, start, rows0, length, h, stride_qt, stride_qh, DA, DB)
        qa1, qb1, m1, l1, acc_a1, acc_b1 = _load_rows(q_ptr, start, rows1, length, h, stride_qt, stride_qh, DA, DB)
        full = (length // BLOCK_N) * BLOCK_N
        acc_a0, acc_b0, l0, m0, acc_a1, acc_b1, l1, m1 = _attend_full_tiles_paired(
            acc_a0, acc_b0, l0, m0, acc_a1, acc_b1, l1, m1, qa0, qb0, qa1, qb1, k_base, v_base,
            stride_kt, stride_vt, 0, full, qk_scale, DA, DB, BLOCK_N, PREC)
        acc_a0, acc_b0, l0, m0 = _attend_tiles(acc_a0, acc_b0, l0, m0, qa0, qb0, rows0, k_base, v_base, stride_kt,
                                               stride_vt, full, length, length, qk_scale, DA, DB, BLOCK_N, PREC, True,
                                               False)
        acc_a1, acc_b1, l1, m1 = _attend_tiles(acc_a1, acc_b1, l1, m1, qa1, qb1, rows1, k_base, v_base, stride_kt,
                                               stride_vt, full, length, length, qk_scale, DA, DB, BLOCK_N, PREC, True,
                                               False)
        _store_rows(o_ptr, start, rows0, length, h, stride_ot, stride_oh, acc_a0, acc_b0, l0, DA, DB)
        _store_rows(o_ptr, start, rows1, length, h, stride_ot, stride_oh, acc_a1, acc_b1, l1, DA, DB)

    @triton.jit
    def _attend_block(q_ptr, o_ptr, k_base, v_base, start, length, tile, h, qk_scale, stride_qt, stride_qh,
                      stride_kt, stride_vt, stride_ot, stride_oh, DA: tl.constexpr, DB: tl.constexpr,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PREC: tl.constexpr, SPLIT_TAIL: tl.constexpr,
                      CAUSAL: tl.constexpr):
        """A whole program not PAIRED: BLOCK_M rows of a segment; their outputs."""
        rows = tile * BLOCK_M + tl.arange(0, BLOCK_M)
        qa, qb, m, l, acc_a, acc_b = _load_rows(q_ptr, start, rows, length, h, stride_qt, stride_qh, DA, DB)
        end = length
        if CAUSAL:
            end = tl.minimum(length, (tile + 1) * BLOCK_M)
        unmasked_end = 0
        if SPLIT_TAIL:
            unmasked_end = (length // BLOCK_N) * BLOCK_N
            if CAUSAL:
                unmasked_end = tl.minimum(unmasked_end, ((tile * BLOCK_M) // BLOCK_N) * BLOCK_N)
            acc_a, acc_b, l, m = _attend_tiles(acc_a, acc_b, l, m, qa, qb, rows, k_base, v_base, stride_kt, stride_vt,
                                               0, unmasked_end, length, qk_scale, DA, DB, BLOCK_N, PREC, False, CAUSAL)
        acc_a, acc_b, l, m = _attend_tiles(acc_a, acc_b, l, m, qa, qb, rows, k_base, v_base, stride_kt, stride_vt,
                                           unmasked_end, end, length, qk_scale, DA, DB, BLOCK_N, PREC, True, CAUSAL)
        _store_rows(o_ptr, start, rows, length, h, stride_ot, stride_oh, acc_a, acc_b, l, DA, DB)

    @triton.jit(do_not_specialize=["n_tiles", "n_whole"], do_not_specialize_on_alignment=["cu_ptr"])
    def _merge_pieces_kernel(o_ptr, cu_ptr, acc_ptr, ml_ptr, n_tiles, n_heads, n_whole, stride_ot, stride_oh,
                             D: tl.constexpr, D_POW2: tl.constexpr, BLOCK_M: tl.constexpr, PIECES: tl.constexpr):
        """The outputs of program n_whole + program_id(0), from its PIECES partial states: each
        piece's sums rescaled to the largest running max, added, divided by the summed weights."""
        t = tl.program_id(0)
        tile, h, seg = _program_item(n_whole + t, n_tiles, n_heads)
        start = tl.load(cu_ptr + seg).to(tl.int64)
        length = (tl.load(cu_ptr + seg + 1) - start).to(tl.int32)
        if tile * BLOCK_M < length:
            rows = tile * BLOCK_M + tl.arange(0, BLOCK_M)
            cols = tl.arange(0, D_POW2)
            m = tl.full([BLOCK_M], -1.0e30, tl.float32)
            l = tl.zeros([BLOCK_M], tl.float32)
            acc = tl.zeros([BLOCK_M, D_POW2], tl.float32)
            for j in tl.static_range(PIECES):
                piece_rows = (t * PIECES + j) * BLOCK_M + tl.arange(0, BLOCK_M)
                m_j = tl.load(ml_ptr + piece_rows * 2 + 1)
                l_j = tl.load(ml_ptr + piece_rows * 2)
                acc_j = tl.load(acc_ptr + piece_rows[:, None].to(tl.int64) * D + cols[None, :],
                                mask=(cols < D)[None, :], other=0.0)
                m_new = tl.maximum(m, m_j)
                alpha = tl.exp2(m - m_new)
                beta = tl.exp2(m_j - m_new)
                acc = acc * alpha[:, None] + acc_j * beta[:, None]
                l = l * alpha + l_j * beta
                m = m_new
            o_rows = o_ptr + (start + rows)[:, None] * stride_ot + h * stride_oh + cols[None, :]
            tl.store(o_rows, (acc / l[:, None]).to(o_ptr.dtype.element_ty),
                     mask=(rows < length)[:, None] & (cols < D)[None, :])


def default_tiles(max_len: int, causal: bool) -> tuple[int, bool, int]:
    """(block_m, pair, num_stages), by the H200 sweeps (BENCHMARKS.md; 4 warps in each case):
    - images: 128 rows as two paired blocks of 64, 4 warps, 3 stages (six 1024x1024 images: 2226
      against 2342 us unpaired with 8 warps; one: 422 against 429);
    - no segment longer than 64 (Qwen2.5-VL's 64-patch windows): 64 rows, 4 warps (29 against 41 us
      for an image's 86 windows, where half of each 128-row tile would be empty);
    - causal prompts: 64 rows, 4 warps, 2 stages (the fastest or within 6% of it at 607 and 1400
      tokens, head_dim 128).
    VLMSERVE_VISION_ATTENTION_PAIRED=0: images unpaired, 8 warps (for A/B runs)."""
    if causal:
        return 64, False, 2
    if max_len <= 64:
        return 64, False, 3
    return 128, os.environ.get("VLMSERVE_VISION_ATTENTION_PAIRED", "1") != "0", 3


def packed_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor,
                     max_len: int, scale: float, block_m: int | None = None, block_n: int = 64,
                     num_warps: int | None = None, num_stages: int | None = None, split_tail: bool = True,
                     causal: bool = False, out: torch.Tensor | None = None,
                     pair: bool | None = None, last_split: tuple[int, int] | None = None) -> torch.Tensor:
    """q: [N, H, D]; k, v: [N, Hkv, D] with H a multiple of Hkv (query heads share key heads in
    groups); last dims contiguous, rows may be strided (views of a fused qkv); cu_seqlens: [S + 1]
    int32 on q's device, segment i spanning rows cu_seqlens[i]:cu_seqlens[i + 1]; max_len: the
    longest segment (sizes the launch grid). -> [N, H, D], each token attending to its own segment
    only (causal: to its own position and those before it there). `out`: where to write it
    ([N, H, D], last dim contiguous, e.g. rows of a larger buffer), else a new tensor.

    Tiles: `default_tiles` for what is not given (`pair`: as they say where block_m is not given,
    else False; warps: 4 for 64 rows or paired blocks, else 8). pair: block_m rows as two blocks of
    block_m / 2 whose full key tiles share one loop (bidirectional, split tails only).
    last_split (bidirectional, split tails): (n, pieces), the last n programs (blocks of rows of a
    head) each run as `pieces` programs over a share of the keys, merged by a second kernel; not
    given: `split_last_wave` on a CUDA device, so that a lone image's last wave fills the GPU."""
    tiles = default_tiles(max_len, causal)
    if pair is None:
        pair = block_m is None and tiles[1]
    if block_m is None:
        block_m = tiles[0]
    if num_warps is None:
        num_warps = 4 if block_m <= 64 or pair else 8
    if num_stages is None:
        num_stages = tiles[2]
    if pair and (causal or not split_tail or block_m < 32):
        raise ValueError("paired blocks are for bidirectional attention with split tails, of at least 32 rows")
    N, H, D = q.shape
    split = split_head_dim(D)
    if split is None:
        raise ValueError(f"head_dim {D} does not split into powers of two of at least 16")
    if k.shape[1] == 0 or H % k.shape[1]:
        raise ValueError(f"{H} query heads do not share {k.shape[1]} key heads in equal groups")
    if out is None:
        out = torch.empty((N, H, D), dtype=q.dtype, device=q.device)
    elif out.shape != q.shape or out.dtype != q.dtype or out.stride(-1) != 1:
        raise ValueError(f"out {tuple(out.shape)} {out.dtype} does not take q's {tuple(q.shape)} {q.dtype}")
    S = cu_seqlens.shape[0] - 1
    if N == 0 or S == 0:
        return out
    n_tiles = triton.cdiv(max_len, block_m)
    args = (q, k, v, out, cu_seqlens)
    strides = (q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), out.stride(0),
               out.stride(1))
    meta = dict(DA=split[0], DB=split[1], BLOCK_M=block_m, BLOCK_N=block_n,
                PREC="ieee" if q.dtype == torch.float32 else "tf32", SPLIT_TAIL=split_tail, CAUSAL=causal,
                GROUP=H // k.shape[1], PAIRED=pair, num_warps=num_warps, num_stages=num_stages)
    programs = n_tiles * H * S
    if last_split is None:
        last_split = (0, 1) if causal or not split_tail else _plan_last_split(
            args, (n_tiles, H, programs), max_len, strides, meta, q.device)
    cut, pieces = last_split
    if pieces < 1 or not 0 <= cut <= programs:
        raise ValueError(f"last_split {last_split}: cut 0..{programs} programs into at least one piece each")
    if cut == 0 or pieces == 1:
        cut, pieces = 0, 1
    elif causal or not split_tail:
        raise ValueError("last_split is for bidirectional attention with split tails")
    n_whole = programs - cut
    acc = ml = out  # placeholders where nothing is cut: the kernel never reads them
    if pieces > 1:
        acc = torch.empty((cut * pieces * block_m, D), dtype=torch.float32, device=q.device)
        ml = torch.empty((cut * pieces * block_m, 2), dtype=torch.float32, device=q.device)
    pieces_z = triton.cdiv(cut * pieces, n_tiles * H)  # the pieces' slices of the grid, past the segments'
    _packed_attention_kernel[(n_tiles, H, S + pieces_z)](
        *args, acc, ml, float(scale) * LOG2E, n_tiles, H, programs, n_whole, *strides, PIECES=pieces, **meta)
    if pieces > 1:
        _merge_pieces_kernel[(cut,)](out, cu_seqlens, acc, ml, n_tiles, H, n_whole, out.stride(0), out.stride(1),
                                     D=D, D_POW2=triton.next_power_of_2(D), BLOCK_M=block_m, PIECES=pieces,
                                     num_warps=4)
    return out


MAX_PIECES = 4  # the most pieces a cut program is split into (split_last_wave)


def split_last_wave(programs: int, slots: int, key_tiles: int, max_pieces: int = MAX_PIECES,
                    min_gain: float = 0.03) -> tuple[int, int]:
    """(programs to cut, pieces each) so that the launch's last wave fills the GPU: `slots` programs
    run at once (SMs x programs an SM holds), so the programs past the last full wave would run on a
    part of the GPU while the rest idles; cut into pieces over the keys, they spread over all of it.
    By waves of whole-program time: one 1024x1024 image on an H200 is 688 programs in 264 slots,
    2 full waves and 160 programs (a third wave), cut in 3: 480 pieces, 2 waves of a third each, 2.67
    in all. (0, 1) where no count of pieces saves `min_gain` of the launch, or under one full wave
    (an SM's lone program runs faster than a shared one, which waves do not count). At most
    `key_tiles` pieces (the longest segment's): a piece without keys would only add work (Qwen2.5-VL's
    windows of 64 tokens are one tile each)."""
    max_pieces = min(max_pieces, key_tiles)
    if slots <= 0 or programs < slots:
        return 0, 1
    full, tail = divmod(programs, slots)
    if tail == 0:
        return 0, 1
    best = (full + 1.0, 1)
    for pieces in range(2, max_pieces + 1):
        waves = full + -(-tail * pieces // slots) / pieces
        if waves < best[0]:
            best = (waves, pieces)
    if best[1] == 1 or best[0] > (full + 1.0) * (1.0 - min_gain):
        return 0, 1
    return tail, best[1]


_SLOTS: dict[tuple, int] = {}


def _plan_last_split(args: tuple, counts: tuple[int, int, int], max_len: int, strides: tuple, meta: dict,
                     device: torch.device) -> tuple[int, int]:
    """`split_last_wave` for this launch on a CUDA device, with the slots its compiled kernel leaves
    (the cut kernel's registers and shared memory against the SM's); (0, 1) elsewhere, or where the
    compiled kernel cannot say. VLMSERVE_VISION_ATTENTION_SPLIT=0: never cut (for A/B runs)."""
    if device.type != "cuda" or os.environ.get("VLMSERVE_VISION_ATTENTION_SPLIT") == "0":
        return 0, 1
    # What Triton specializes the compiled code on besides `meta`: the head count, the strides (== 1,
    # divisible by 16) and the tensors' 16-byte alignment. One model's launches share them; another
    # model's (or test's) tower may not, and its cut variants are compiled when it is first met too.
    key = (device.index, args[0].dtype, tuple(sorted(meta.items())), counts[1], strides,
           tuple(t.data_ptr() % 16 == 0 for t in args[:4]))
    if key not in _SLOTS:
        _SLOTS[key] = 0
        try:
            compiled = compiled_kernel(args, counts, strides, meta, pieces=2)
            props = torch.cuda.get_device_properties(device)
            _SLOTS[key] = props.multi_processor_count * resident_programs(
                compiled.n_regs, compiled.metadata.shared, meta["num_warps"], props)
        except Exception:  # a Triton whose compiled kernels say less: no cuts, as before them
            pass
        if _SLOTS[key]:
            try:
                _compile_cut_variants(args, counts, strides, meta)
            except Exception as e:  # cuts still work: their variants compile at first use
                logger.warning("compiling the vision attention's cut variants ahead failed: %s", e)
    return split_last_wave(counts[2], _SLOTS[key], triton.cdiv(max_len, meta["BLOCK_N"]))


def _compile_cut_variants(args: tuple, counts: tuple[int, int, int], strides: tuple, meta: dict) -> None:
    """Both kernels' variants for every piece count a plan may choose (PIECES is a constant of their
    code), compiled when a tile configuration with a launch's specialization (`_plan_last_split`'s
    key) is first met: on a GPU engine that is its memory profiling, before any request. Else a run
    compiles each the first time a launch is cut that many ways: on an H200 whose Triton cache lacked
    them, Qwen2-VL's throughput run took 12.48 s; 8.48 s with them compiled ahead, on a fresh machine
    (BENCHMARKS.md)."""
    q, out, cu = args[0], args[3], args[4]
    D = q.shape[-1]
    scratch = torch.empty(2, dtype=torch.float32, device=q.device)
    for pieces in range(2, MAX_PIECES + 1):
        compiled_kernel(args, counts, strides, meta, pieces)
        _merge_pieces_kernel.warmup(out, cu, scratch, scratch, counts[0], counts[1], counts[2], out.stride(0),
                                    out.stride(1), D=D, D_POW2=triton.next_power_of_2(D), BLOCK_M=meta["BLOCK_M"],
                                    PIECES=pieces, num_warps=4, grid=(1,))


def compiled_kernel(args: tuple, counts: tuple[int, int, int], strides: tuple, meta: dict, pieces: int):
    """The kernel as Triton compiles it for these arguments (q, k, v, out, cu_seqlens; n_tiles,
    n_heads, programs), loaded, so that it tells its registers (n_regs, n_spills) and shared memory
    (metadata.shared)."""
    scratch = torch.empty(2, dtype=torch.float32, device=args[0].device)
    compiled = _packed_attention_kernel.warmup(*args, scratch, scratch, 1.0, *counts, counts[2], *strides,
                                               grid=(1,), PIECES=pieces, **meta)
    compiled.run  # noqa: B018 (loads the binary, which tells its registers)
    return compiled


def resident_programs(regs_per_thread: int, shared_bytes: int, num_warps: int, props) -> int:
    """Programs of a kernel one SM holds at once, by its registers (allocated per warp in units of
    256), shared memory (1 KB reserved per block) and threads; props: torch's CUDA device properties."""
    regs_per_warp = -(-max(regs_per_thread, 1) * 32 // 256) * 256
    by_regs = getattr(props, "regs_per_multiprocessor", 65536) // (regs_per_warp * num_warps)
    smem = getattr(props, "shared_memory_per_multiprocessor", 233472)
    by_smem = smem // (shared_bytes + 1024)
    by_threads = props.max_threads_per_multi_processor // (32 * num_warps)
    return max(0, min(by_regs, by_smem, by_threads, 32))


def reference_packed_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: list[int],
                               scale: float, causal: bool = False) -> torch.Tensor:
    """The kernel's computation in torch, one segment at a time, in float32."""
    out = torch.empty_like(q)
    group = q.shape[1] // k.shape[1]
    for a, b in zip(cu_seqlens[:-1], cu_seqlens[1:]):
        if b > a:
            qs = q[a:b].float().transpose(0, 1)
            ks, vs = (x[a:b].float().transpose(0, 1).repeat_interleave(group, 0) for x in (k, v))
            scores = qs @ ks.transpose(1, 2) * scale
            if causal:
                later = torch.ones(b - a, b - a, dtype=torch.bool, device=q.device).triu(1)
                scores = scores.masked_fill(later, float("-inf"))
            out[a:b] = (torch.softmax(scores, dim=-1) @ vs).transpose(0, 1).to(q.dtype)
    return out
