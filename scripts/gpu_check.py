"""GPU check of the Triton kernels against their torch references, on fresh random inputs with
poisoned outputs, by relative error ||out - ref|| / ||ref|| (bf16: under 1e-2; fp16 and fp32 too);
then times them (triton.testing.do_bench, median) and measures the device's two ceilings (a
device-to-device copy, a bf16 matmul). Writes everything to --out (JSON) and prints a table.

    python scripts/gpu_check.py --out /tmp/gpu_check.json"""
from __future__ import annotations

import argparse
import json
import os
import sys
from unittest import mock

import torch
import triton

from vlmserve.kernels import triton_fused as tf
from vlmserve.kernels import triton_gemv as tg
from vlmserve.kernels import triton_paged_attention as tpa
from vlmserve.layers.activation import ActAndMul, quick_gelu_torch
from vlmserve.layers.layernorm import RMSNorm
from vlmserve.layers.rotary import RotaryEmbedding

DEV = "cuda"
# float32: tl.dot runs in tf32 on the GPU (seen: 1.2-1.4e-3 on the H100)
TOL = {torch.bfloat16: 1e-2, torch.float16: 2e-3, torch.float32: 5e-3}


def rel_err(out, ref) -> float:
    out, ref = out.double(), ref.double()
    if out.isnan().any():
        return float("nan")
    return float((out - ref).norm() / ref.norm().clamp_min(1e-30))


def paged_cache(lens, block_size, hkv, d, dtype, num_blocks):
    k = torch.full((num_blocks, block_size, hkv, d), float("nan"), dtype=dtype, device=DEV)
    v = torch.full_like(k, float("nan"))
    max_blocks = max(-(-L // block_size) for L in lens)
    tables = torch.zeros((len(lens), max_blocks), dtype=torch.long, device=DEV)
    ids = torch.randperm(num_blocks, device=DEV)
    used = 0
    for b, L in enumerate(lens):
        nb = -(-L // block_size)
        tables[b, :nb] = ids[used:used + nb]
        used += nb
    # fill whole used blocks (the tail of a last block is never read: NaN there would show)
    for b, L in enumerate(lens):
        nb = -(-L // block_size)
        for cache in (k, v):
            flat = cache[tables[b, :nb]].reshape(-1, hkv, d)
            flat[:L] = torch.randn(L, hkv, d, device=DEV, dtype=dtype)
            cache[tables[b, :nb]] = flat.view(nb, block_size, hkv, d)
    return k, v, tables


def check_decode(rows, dtype, B, hq, hkv, d, max_len, window=None, time_it=True, splits=None, min_len=1,
                 block_n=None, num_warps=None, in_graph=False):
    """in_graph: timed as CUDA-graph replays (as decode steps run), without the host's launch cost,
    which is the whole time of a small batch's kernel otherwise."""
    lens = torch.randint(min_len, max_len + 1, (B,)).tolist()
    lens[0] = max_len
    bs = 16
    k, v, tables = paged_cache(lens, bs, hkv, d, dtype, sum(-(-L // bs) for L in lens) + 4)
    q = torch.randn(B, hq, d, device=DEV, dtype=dtype)
    seq_lens = torch.tensor(lens, device=DEV)
    scale = d ** -0.5
    if splits is None:
        splits = tpa.decode_num_splits(B, hkv, max_len, torch.cuda.get_device_properties(0).multi_processor_count)
    out = torch.full_like(q, float("nan"))
    default_n, default_warps = tpa.default_decode_tiles(k)
    block_n, num_warps = block_n or default_n, num_warps or default_warps
    tiles = dict(block_n=block_n, num_warps=num_warps)
    tpa.paged_decode_attention(q, k, v, tables, seq_lens, scale, window, num_splits=splits, out=out, **tiles)
    ref = tpa.reference_paged_decode_attention(q, k, v, tables, seq_lens, scale, window)
    err = rel_err(out, ref)
    row = {"kernel": "decode", "dtype": str(dtype), "shape": f"B={B} Hq={hq} Hkv={hkv} D={d} len<={max_len} "
           f"win={window} splits={splits} block_n={block_n} warps={num_warps}", "rel_err": err, "ok": err < TOL[dtype]}
    if time_it:
        bench = triton.testing.do_bench_cudagraph if in_graph else triton.testing.do_bench
        ms = bench(lambda: tpa.paged_decode_attention(
            q, k, v, tables, seq_lens, scale, window, num_splits=splits, out=out, **tiles), return_mode="median")
        nbytes = 2 * sum(lens) * hkv * d * q.element_size()
        row.update(us=1e3 * ms, gbps=nbytes / ms / 1e6)
    rows.append(row)


def check_prefill(rows, dtype, hq, hkv, d, chunks, window=None, time_it=True):
    """chunks: (cached context, new tokens) per sequence."""
    lens = [c + n for c, n in chunks]
    bs = 16
    k, v, tables = paged_cache(lens, bs, hkv, d, dtype, sum(-(-L // bs) for L in lens) + 4)
    qsl = torch.tensor([0] + [n for _, n in chunks], device=DEV).cumsum(0)
    q = torch.randn(int(qsl[-1]), hq, d, device=DEV, dtype=dtype)
    seq_lens = torch.tensor(lens, device=DEV)
    scale = d ** -0.5
    out = torch.full_like(q, float("nan"))
    maxq = max(n for _, n in chunks)
    tpa.paged_prefill_attention(q, k, v, tables, qsl, seq_lens, scale, window, max_query_len=maxq, out=out)
    ref = tpa.reference_paged_prefill_attention(q, k, v, tables, qsl, seq_lens, scale, window)
    err = rel_err(out, ref)
    row = {"kernel": "prefill", "dtype": str(dtype), "shape": f"Hq={hq} Hkv={hkv} D={d} chunks={chunks[:3]}"
           f"{'...' if len(chunks) > 3 else ''} x{len(chunks)} win={window}", "rel_err": err, "ok": err < TOL[dtype]}
    if time_it:
        ms = triton.testing.do_bench(lambda: tpa.paged_prefill_attention(
            q, k, v, tables, qsl, seq_lens, scale, window, max_query_len=maxq, out=out), return_mode="median")
        flops = sum(4 * n * (c + (n + 1) / 2) * d * hq for c, n in chunks)
        row.update(us=1e3 * ms, tflops=flops / ms / 1e9)
    rows.append(row)


def check_fused(rows, dtype, T, hidden, inter, hq, hkv, d):
    norm = RMSNorm(hidden, 1e-5).to(DEV, dtype)
    norm.weight.data.normal_(1.0, 0.1)
    x = torch.randn(T, hidden, device=DEV, dtype=dtype)
    res = torch.randn(T, hidden, device=DEV, dtype=dtype)
    got, ref = tf.rms_norm(x, norm.weight, norm.eps, res), norm.forward_torch(x.float(), res.float())
    err = max(rel_err(got[0], ref[0]), rel_err(got[1], ref[1]))
    ms = triton.testing.do_bench(lambda: tf.rms_norm(x, norm.weight, norm.eps, res), return_mode="median")
    ms_ref = triton.testing.do_bench(lambda: norm.forward_torch(x, res), return_mode="median")
    rows.append({"kernel": "add+rmsnorm", "dtype": str(dtype), "shape": f"T={T} H={hidden}", "rel_err": err,
                 "ok": err < TOL[dtype], "us": 1e3 * ms, "torch_us": 1e3 * ms_ref})

    rope = RotaryEmbedding(d, 4096, {"rope_theta": 10000.0, "rope_type": "default"}, 4096).to(DEV)
    pos = torch.randint(0, 4096, (T,), device=DEV)
    qkv = torch.randn(T, (hq + 2 * hkv) * d, device=DEV, dtype=dtype)
    q, k, _ = qkv.split([hq * d, hkv * d, hkv * d], dim=-1)
    q, k = q.view(T, hq, d), k.view(T, hkv, d)
    cos, sin = rope.lookup(pos, torch.float32)
    rq = q.float() * cos + torch.cat((-q.float()[..., d // 2:], q.float()[..., :d // 2]), -1) * sin
    rk = k.float() * cos + torch.cat((-k.float()[..., d // 2:], k.float()[..., :d // 2]), -1) * sin
    cs = rope.lookup(pos, dtype)
    tf.rotary_inplace(q, k, *cs)
    err = max(rel_err(q, rq), rel_err(k, rk))
    ms = triton.testing.do_bench(lambda: tf.rotary_inplace(q, k, *cs), return_mode="median")
    rows.append({"kernel": "rotary", "dtype": str(dtype), "shape": f"T={T} Hq={hq} Hkv={hkv} D={d}",
                 "rel_err": err, "ok": err < TOL[dtype], "us": 1e3 * ms})

    # rotary inside the KV store (tpa.store_kv(..., rotary=)): q and k rotated in place, k and v cached
    q, k, v = (t.view(T, -1, d) for t in qkv.normal_().split([hq * d, hkv * d, hkv * d], dim=-1))
    rq = q.float() * cos + torch.cat((-q.float()[..., d // 2:], q.float()[..., :d // 2]), -1) * sin
    rk = k.float() * cos + torch.cat((-k.float()[..., d // 2:], k.float()[..., :d // 2]), -1) * sin
    kc, vc = (torch.full((T // 16 + 2, 16, hkv, d), float("nan"), device=DEV, dtype=dtype) for _ in range(2))
    slots = torch.randperm(kc.shape[0] * 16, device=DEV)[:T]
    tpa.store_kv(k, v, kc, vc, slots, rotary=(q, *cs))
    err = max(rel_err(q, rq), rel_err(k, rk), rel_err(kc.view(-1, hkv, d)[slots], rk),
              rel_err(vc.view(-1, hkv, d)[slots], v.float()))
    ms = triton.testing.do_bench(lambda: tpa.store_kv(k, v, kc, vc, slots, rotary=(q, *cs)), return_mode="median")
    rows.append({"kernel": "rotary+store_kv", "dtype": str(dtype), "shape": f"T={T} Hq={hq} Hkv={hkv} D={d}",
                 "rel_err": err, "ok": err < TOL[dtype], "us": 1e3 * ms})

    if d == 128 and T > 1:  # Qwen2-VL's ViT: q, k views of one qkv projection, head_dim 80, float32 cos/sin
        from vlmserve.models.qwen2_vl import VisionRotary, apply_vision_rotary

        qv, kv, _ = torch.randn(T, 3, 16, 80, device=DEV, dtype=dtype).unbind(1)
        vcos, vsin = VisionRotary(80, 10000.0).to(DEV)(torch.randint(0, 74, (T, 2), device=DEV))
        ref_q, ref_k = apply_vision_rotary(qv, vcos, vsin), apply_vision_rotary(kv, vcos, vsin)
        tf.rotary_inplace(qv, kv, vcos, vsin)
        err = max(rel_err(qv, ref_q), rel_err(kv, ref_k))
        rows.append({"kernel": "vision_rotary", "dtype": str(dtype), "shape": f"T={T} H=16 D=80",
                     "rel_err": err, "ok": err < TOL[dtype]})

    act = ActAndMul("silu")
    x = torch.randn(T, 2 * inter, device=DEV, dtype=dtype)
    err = rel_err(tf.silu_and_mul(x), act.forward_torch(x.float()))
    ms = triton.testing.do_bench(lambda: tf.silu_and_mul(x), return_mode="median")
    ms_ref = triton.testing.do_bench(lambda: act.forward_torch(x), return_mode="median")
    rows.append({"kernel": "silu_and_mul", "dtype": str(dtype), "shape": f"T={T} I={inter}", "rel_err": err,
                 "ok": err < TOL[dtype], "us": 1e3 * ms, "torch_us": 1e3 * ms_ref})

    if T > 1:  # the vision MLPs' QuickGELU (Qwen2-VL: 5120 wide), against HF's ops in this dtype and in float32
        x = 3 * torch.randn(T, 5120, device=DEV, dtype=dtype)
        got, same_ops = tf.quick_gelu(x), quick_gelu_torch(x)
        err = rel_err(got, quick_gelu_torch(x.float()))
        ms = triton.testing.do_bench(lambda: tf.quick_gelu(x), return_mode="median")
        ms_ref = triton.testing.do_bench(lambda: quick_gelu_torch(x), return_mode="median")
        rows.append({"kernel": "quick_gelu", "dtype": str(dtype), "shape": f"T={T} N=5120", "rel_err": err,
                     "ok": err < TOL[dtype], "us": 1e3 * ms, "torch_us": 1e3 * ms_ref,
                     "frac_differing_from_torch_same_dtype": float((got != same_ops).float().mean())})


def check_layer_norm(rows, dtype, T, n):
    """The vision towers' residual add + LayerNorm (one Triton kernel) against torch's add and
    layer_norm in float32, timed beside torch's two ops in this dtype."""
    from vlmserve.layers.layernorm import LayerNorm

    norm = LayerNorm(n, eps=1e-6).to(DEV, dtype)
    norm.weight.data.normal_(1.0, 0.1)
    norm.bias.data.normal_(0.0, 0.1)
    x, res = 2 + torch.randn(T, n, device=DEV, dtype=dtype), torch.randn(T, n, device=DEV, dtype=dtype)
    got = tf.layer_norm(x, norm.weight, norm.bias, norm.eps, res)
    ref = norm.float().forward_torch(x.float(), res.float())
    norm.to(dtype)
    err = max(rel_err(got[0], ref[0]), rel_err(got[1], ref[1]))
    ms = triton.testing.do_bench(lambda: tf.layer_norm(x, norm.weight, norm.bias, norm.eps, res), return_mode="median")
    ms_ref = triton.testing.do_bench(lambda: norm.forward_torch(x, res), return_mode="median")
    ms_plain = triton.testing.do_bench(lambda: tf.layer_norm(x, norm.weight, norm.bias, norm.eps), return_mode="median")
    ms_plain_ref = triton.testing.do_bench(lambda: norm.forward_torch(x), return_mode="median")
    gb = T * n * x.element_size() / 1e9
    rows.append({"kernel": "add+layernorm", "dtype": str(dtype), "shape": f"T={T} H={n}", "rel_err": err,
                 "ok": err < TOL[dtype], "us": 1e3 * ms, "torch_us": 1e3 * ms_ref, "tbps": 4 * gb / ms,
                 "layernorm_us": 1e3 * ms_plain, "torch_layernorm_us": 1e3 * ms_plain_ref,
                 "layernorm_tbps": 2 * gb / ms_plain})


def check_packed_attention(rows, dtype, lengths, h, d, hkv=None, causal=False, time_it=True, last_split=None):
    """The Triton packed attention (head_dim split into powers of two) against its float32 torch
    reference, and timed beside what runs otherwise: bidirectional (vision) on q, k, v views of one
    fused qkv, beside torch's SDPA path; causal (fresh prompts, hkv key heads) beside FlashAttention's
    varlen op. last_split: the kernel's (programs cut, pieces each), else its plan for the GPU."""
    from vlmserve.kernels import triton_packed_attention as tpk
    from vlmserve.layers.vision_attention import varlen_attention

    cu = [0]
    for n in lengths:
        cu.append(cu[-1] + n)
    if causal:
        q = torch.randn(cu[-1], h, d, device=DEV, dtype=dtype)
        k, v = torch.randn(cu[-1], 2, hkv, d, device=DEV, dtype=dtype).unbind(1)
    else:
        q, k, v = torch.randn(cu[-1], 3, h, d, device=DEV, dtype=dtype).unbind(1)
    scale = d ** -0.5
    cu_t = torch.tensor(cu, device=DEV, dtype=torch.int32)
    run = lambda: tpk.packed_attention(q, k, v, cu_t, max(lengths), scale, causal=causal,  # noqa: E731
                                       last_split=last_split)
    row = {"kernel": "prefill_packed_attn" if causal else "vision_attn", "dtype": str(dtype),
           "shape": f"lens={lengths[:3]}{'...' if len(lengths) > 3 else ''} x{len(lengths)} H={h}"
                    + (f"/{hkv} causal" if causal else "") + f" D={d}"
                    + (f" cut {last_split[0]}x{last_split[1]}" if last_split else "")}
    try:  # a kernel not yet compiled on a GPU: a failure is a BAD row, not the end of the other checks
        err = rel_err(run(), tpk.reference_packed_attention(q, k, v, cu, scale, causal=causal))
    except Exception as e:  # noqa: BLE001
        rows.append({**row, "rel_err": float("nan"), "ok": False, "error": f"{type(e).__name__}: {str(e)[:300]}"})
        return
    row.update(rel_err=err, ok=err < TOL[dtype])
    if time_it:
        ms = triton.testing.do_bench(run, return_mode="median")
        if causal:
            L = max(lengths)
            fa = torch.ops.aten._flash_attention_forward
            ms_ref = triton.testing.do_bench(lambda: fa(q, k, v, cu_t, cu_t, L, L, 0.0, True, False, scale=scale),
                                             return_mode="median")
        else:
            with mock.patch.dict(os.environ, VLMSERVE_TRITON_VISION_ATTENTION="0"):  # the SDPA path
                ms_ref = triton.testing.do_bench(lambda: varlen_attention(q, k, v, cu, scale), return_mode="median")
        flops = 4 * sum(n * n for n in lengths) * h * d / (2 if causal else 1)
        row.update(us=1e3 * ms, torch_us=1e3 * ms_ref, tflops=flops / ms / 1e9)
    rows.append(row)


def check_gemv(rows, dtype, M, K, N, bias=False, silu_and_mul=False):
    """The decode GEMV (kernels/triton_gemv.py) against its reference, timed beside cuBLAS: weight bytes
    read per microsecond is what single-stream decode is bound by. silu_and_mul: a gated MLP's [gate; up]
    projection writing silu(gate) * up (cuBLAS's time then includes the SiLU-and-mul kernel after it)."""
    x = torch.randn(M, K, device=DEV, dtype=dtype)
    w = torch.randn(N, K, device=DEV, dtype=dtype) * K ** -0.5
    b = torch.randn(N, device=DEV, dtype=dtype) if bias else None
    err = rel_err(tg.gemv(x, w, b, silu_and_mul=silu_and_mul), tg.reference_gemv(x, w, b, silu_and_mul))
    ms = triton.testing.do_bench(lambda: tg.gemv(x, w, b, silu_and_mul=silu_and_mul), return_mode="median")
    unfused = (lambda: tf.silu_and_mul(torch.nn.functional.linear(x, w, b))) if silu_and_mul \
        else (lambda: torch.nn.functional.linear(x, w, b))
    ms_ref = triton.testing.do_bench(unfused, return_mode="median")
    rows.append({"kernel": "gemv_silu_mul" if silu_and_mul else "gemv", "dtype": str(dtype),
                 "shape": f"M={M} K={K} N={N}{' bias' if bias else ''}", "rel_err": err, "ok": err < TOL[dtype],
                 "us": 1e3 * ms, "torch_us": 1e3 * ms_ref, "tbps": w.numel() * w.element_size() / ms / 1e9,
                 "cublas_tbps": w.numel() * w.element_size() / ms_ref / 1e9})


def sweep(rows) -> None:
    """Tile sizes of the decode kernel (the throughput workload's full batch: 128 sequences of 672
    tokens, MHA) and of the decode GEMV (single-stream decode's shapes), timed for choosing;
    errors checked too."""
    dtype = torch.bfloat16
    B, h, d, L = 128, 32, 128, 672
    k, v, tables = paged_cache([L] * B, 16, h, d, dtype, B * L // 16 + 4)
    q = torch.randn(B, h, d, device=DEV, dtype=dtype)
    seq_lens = torch.full((B,), L, device=DEV)
    ref = tpa.reference_paged_decode_attention(q, k, v, tables, seq_lens, d ** -0.5)
    nbytes = 2 * B * L * h * d * 2
    for block_n, warps in ((64, 4), (64, 2), (128, 4)):
        out = torch.full_like(q, float("nan"))
        run = lambda: tpa.paged_decode_attention(q, k, v, tables, seq_lens, d ** -0.5, out=out,  # noqa: E731
                                                  block_n=block_n, num_warps=warps)
        run()
        err = rel_err(out, ref)
        ms = triton.testing.do_bench(run, return_mode="median")
        rows.append({"kernel": "sweep_decode", "dtype": str(dtype), "shape": f"B={B} L={L} block_n={block_n} "
                     f"warps={warps}", "rel_err": err, "ok": err < TOL[dtype], "us": 1e3 * ms,
                     "gbps": nbytes / ms / 1e6})
    # the KV store of a prefill step: 8192 tokens, 32 heads
    T = 8192
    kk, vv = (torch.randn(T, h, d, device=DEV, dtype=dtype) for _ in range(2))
    kc, vc = (torch.full((T // 16 + 8, 16, h, d), float("nan"), device=DEV, dtype=dtype) for _ in range(2))
    slots = torch.randperm(kc.shape[0] * 16, device=DEV)[:T]
    slots[::97] = -1
    tpa.store_kv(kk, vv, kc, vc, slots)
    keep = slots >= 0
    err = max(rel_err(kc.view(-1, h, d)[slots[keep]], kk[keep]), rel_err(vc.view(-1, h, d)[slots[keep]], vv[keep]))
    ms = triton.testing.do_bench(lambda: tpa.store_kv(kk, vv, kc, vc, slots), return_mode="median")
    rows.append({"kernel": "store_kv", "dtype": str(dtype), "shape": f"T={T} H={h} D={d}", "rel_err": err,
                 "ok": err == 0.0, "us": 1e3 * ms, "gbps": 4 * kk.numel() * 2 / ms / 1e6})
    # prefill attention: LLaVA's 13 prompts of 608 tokens (MHA) and one Qwen2-VL prompt of 1400 (GQA 7:1)
    for hq, hkv, chunks in ((32, 32, [(0, 608)] * 13), (28, 4, [(0, 1400)])):
        lens = [c + n for c, n in chunks]
        k, v, tables = paged_cache(lens, 16, hkv, d, dtype, sum(-(-L // 16) for L in lens) + 4)
        qsl = torch.tensor([0] + [n for _, n in chunks], device=DEV).cumsum(0)
        q = torch.randn(int(qsl[-1]), hq, d, device=DEV, dtype=dtype)
        seq_lens = torch.tensor(lens, device=DEV)
        ref = tpa.reference_paged_prefill_attention(q, k, v, tables, qsl, seq_lens, d ** -0.5)
        flops = sum(4 * n * (c + (n + 1) / 2) * d * hq for c, n in chunks)
        for bm, bn, nw, ns in ((64, 64, 4, 2), (64, 64, 4, 3), (128, 64, 8, 2), (128, 64, 8, 3), (128, 128, 8, 2),
                               (64, 128, 4, 2), (128, 32, 4, 3), (128, 64, 4, 3)):
            out = torch.full_like(q, float("nan"))
            run = lambda: tpa.paged_prefill_attention(q, k, v, tables, qsl, seq_lens, d ** -0.5,  # noqa: E731
                                                      max_query_len=max(n for _, n in chunks), out=out, block_m=bm,
                                                      block_n=bn, num_warps=nw, num_stages=ns)
            try:
                run()
                err = rel_err(out, ref)
                ms = triton.testing.do_bench(run, return_mode="median")
            except Exception as e:  # out of shared memory, say
                rows.append({"kernel": "sweep_prefill", "dtype": str(dtype), "shape": f"{bm}/{bn}/{nw}/{ns}",
                             "rel_err": float("nan"), "ok": True, "error": str(e)[:100]})
                continue
            rows.append({"kernel": "sweep_prefill", "dtype": str(dtype), "shape": f"Hq={hq} Hkv={hkv} "
                         f"x{len(chunks)}x{chunks[0][1]} block_m={bm} block_n={bn} warps={nw} stages={ns}",
                         "rel_err": err, "ok": err < TOL[dtype], "us": 1e3 * ms, "tflops": flops / ms / 1e9})
    for M, K, N in ((1, 4096, 12288), (1, 11008, 4096)):
        x = torch.randn(M, K, device=DEV, dtype=dtype)
        w = torch.randn(N, K, device=DEV, dtype=dtype) * K ** -0.5
        ref = tg.reference_gemv(x, w)
        ms = triton.testing.do_bench(lambda: torch.nn.functional.linear(x, w), return_mode="median")
        rows.append({"kernel": "sweep_cublas", "dtype": str(dtype), "shape": f"M={M} K={K} N={N}", "rel_err": 0.0,
                     "ok": True, "us": 1e3 * ms, "gbps": w.numel() * 2 / ms / 1e6})
        for bn, bk, nw in ((2, 2048, 4), (2, 1024, 2), (4, 1024, 4), (4, 512, 4)):
            run = lambda: tg.gemv(x, w, block_n=bn, block_k=bk, num_warps=nw)  # noqa: E731
            err = rel_err(run(), ref)
            ms = triton.testing.do_bench(run, return_mode="median")
            rows.append({"kernel": "sweep_gemv", "dtype": str(dtype), "shape": f"M={M} K={K} N={N} "
                         f"block_n={bn} block_k={bk} warps={nw}", "rel_err": err,
                         "ok": err < TOL[dtype], "us": 1e3 * ms, "gbps": w.numel() * 2 / ms / 1e6})


def ceilings() -> dict:
    n = 1 << 30
    a = torch.empty(n, dtype=torch.uint8, device=DEV)
    b = torch.empty_like(a)
    ms = triton.testing.do_bench(lambda: b.copy_(a), return_mode="median")
    x = torch.randn(8192, 8192, device=DEV, dtype=torch.bfloat16)
    y = torch.randn(8192, 8192, device=DEV, dtype=torch.bfloat16)
    z = torch.empty_like(x)
    mm = triton.testing.do_bench(lambda: x @ y, return_mode="median")  # L2 flushed between products
    mm_b2b = back_to_back_ms(lambda: torch.mm(x, y, out=z), 20)  # as the anchor was taken
    # single-stream decode's matmul: [1, 4096] x [4096, 11008] weights read once
    w = torch.randn(11008 * 2, 4096, device=DEV, dtype=torch.bfloat16)
    v = torch.randn(1, 4096, device=DEV, dtype=torch.bfloat16)
    gemv = triton.testing.do_bench(lambda: torch.nn.functional.linear(v, w), return_mode="median")
    out = {"copy_tbps_read_plus_write": 2 * n / ms / 1e9, "bf16_matmul_tflops": 2 * 8192 ** 3 / mm / 1e9,
           "bf16_matmul_back_to_back_tflops": 2 * 8192 ** 3 / mm_b2b / 1e9,
           "gemv_1x4096x22016_tbps": w.numel() * 2 / gemv / 1e9}
    # the language model's GEMMs of a LLaVA-1.5-7B prefill of one 608-token prompt, back to back
    for name, (m, k, nn) in {"qkv": (608, 4096, 12288), "o": (608, 4096, 4096), "gate_up": (608, 4096, 22016),
                             "down": (608, 11008, 4096)}.items():
        a = torch.randn(m, k, device=DEV, dtype=torch.bfloat16)
        wt = torch.randn(nn, k, device=DEV, dtype=torch.bfloat16)
        o = torch.empty(m, nn, device=DEV, dtype=torch.bfloat16)
        t = back_to_back_ms(lambda: torch.mm(a, wt.t(), out=o), 50)
        out[f"llava_prefill_{name}_tflops"] = 2 * m * k * nn / t / 1e9
    return out


def back_to_back_ms(fn, reps: int) -> float:
    """Mean time of `reps` calls queued back to back, after 3 warm-up calls (no cache flushes
    between them): the method of the issue's matrix-rate anchor."""
    for _ in range(3):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / reps


def print_rows(rows) -> None:
    for r in rows:
        extra = " ".join(f"{k}={r[k]:.1f}" for k in ("us", "torch_us", "gbps", "tflops") if k in r)
        print(f"{'OK ' if r['ok'] else 'BAD'} {r['kernel']:13s} {r['dtype']:15s} err={r['rel_err']:.2e} "
              f"{extra}  {r['shape']}{'  ' + r['error'] if 'error' in r else ''}")


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--out", default="gpu_check.json")
    p.add_argument("--sweep", action="store_true", help="also time tile sizes of the decode and GEMV kernels")
    p.add_argument("--splits", action="store_true", help="only time the decode kernel's KV split counts at the "
                   "throughput runs' full batches (Qwen2-VL-7B: 128 x ~1470 tokens, GQA 28/4; LLaVA: 256 x ~670, MHA), "
                   "and for Qwen2-VL its tiles (tokens per tile, warps)")
    p.add_argument("--tiles", action="store_true", help="only time the decode kernel's tiles (tokens per tile, "
                   "warps) at the batches single-stream decode and the throughput runs give, both models, with the "
                   "split count decode_num_splits picks and with one split")
    p.add_argument("--single", action="store_true", help="only time the decode kernel at single-stream decode's "
                   "shapes (LLaVA: 32 heads, ~700 tokens; Qwen2-VL: GQA 28/4, ~1500) over split counts and tiles")
    args = p.parse_args()
    torch.manual_seed(0)
    rows: list[dict] = []
    if args.single:
        for hq, hkv, length in ((32, 32, 700), (28, 4, 1500)):
            for splits in (1, 2, 4, 8, 16, 32):
                for block_n, warps in ((128, 4), (64, 4), (64, 2), (32, 2), (32, 4), (16, 2)):
                    check_decode(rows, torch.bfloat16, 1, hq, hkv, 128, length, splits=splits, min_len=length,
                                 block_n=block_n, num_warps=warps, in_graph=True)
        print_rows(rows)
        return 0
    if args.tiles:
        shapes = [(1, 28, 4, 1400, 1400), (16, 28, 4, 1528, 1400), (64, 28, 4, 1528, 1400), (128, 28, 4, 1528, 1400),
                  (1, 32, 32, 700, 700), (64, 32, 32, 735, 608), (256, 32, 32, 735, 608)]
        for B, hq, hkv, max_len, min_len in shapes:
            auto = tpa.decode_num_splits(B, hkv, max_len, torch.cuda.get_device_properties(0).multi_processor_count)
            for splits in sorted({auto, max(1, auto // 2), 1}):
                for block_n, warps in ((64, 4), (64, 2), (32, 2), (128, 4), (128, 2), (32, 4)):
                    check_decode(rows, torch.bfloat16, B, hq, hkv, 128, max_len, splits=splits, min_len=min_len,
                                 block_n=block_n, num_warps=warps, in_graph=True)
        print_rows(rows)
        return 0
    if args.splits:
        for s in (1, 2, 4, 8):
            check_decode(rows, torch.bfloat16, 128, 28, 4, 128, 1528, splits=s, min_len=1400)
        for s in (1, 2, 4):
            for block_n, warps in ((32, 2), (32, 4), (64, 2), (64, 8), (128, 4), (128, 8), (256, 8)):
                try:  # a tile that does not fit (shared memory) is a BAD row, not the end of the sweep
                    check_decode(rows, torch.bfloat16, 128, 28, 4, 128, 1528, splits=s, min_len=1400,
                                 block_n=block_n, num_warps=warps)
                except Exception as e:  # noqa: BLE001
                    rows.append({"kernel": "decode", "dtype": "torch.bfloat16", "rel_err": float("nan"), "ok": False,
                                 "shape": f"B=128 GQA 28/4 splits={s} block_n={block_n} warps={warps}",
                                 "error": f"{type(e).__name__}: {str(e)[:120]}"})
        for s in (1, 2, 4):
            check_decode(rows, torch.bfloat16, 256, 32, 32, 128, 735, splits=s, min_len=608)
        print_rows(rows)
        return 0
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        t = dtype == torch.bfloat16
        check_decode(rows, dtype, 1, 32, 32, 128, 700, time_it=t)
        check_decode(rows, dtype, 64, 32, 8, 128, 1000, window=300, time_it=t)
        check_prefill(rows, dtype, 32, 8, 64, [(0, 77), (40, 19), (0, 1)], window=50, time_it=False)
        check_prefill(rows, dtype, 32, 32, 128, [(0, 608), (300, 200), (17, 1)], time_it=t)
    check_decode(rows, torch.bfloat16, 128, 32, 32, 128, 736)
    check_decode(rows, torch.bfloat16, 256, 32, 32, 128, 736)
    check_prefill(rows, torch.bfloat16, 32, 32, 128, [(0, 608)] * 13)
    check_prefill(rows, torch.bfloat16, 16, 16, 64, [(0, 577)] * 16)
    check_packed_attention(rows, torch.bfloat16, [5476], 16, 80)  # one 1024x1024 image, Qwen2-VL's ViT
    check_packed_attention(rows, torch.bfloat16, [577] * 8, 16, 64)  # eight CLIP ViT-L/14-336 images
    check_packed_attention(rows, torch.float32, [100, 37, 256, 1], 4, 80, time_it=False)
    check_packed_attention(rows, torch.bfloat16, [5476] * 2, 16, 80)  # two images: the plan cuts 56 programs in 4
    check_packed_attention(rows, torch.float32, [100, 37, 256, 1], 4, 80, time_it=False, last_split=(10, 3))
    check_packed_attention(rows, torch.bfloat16, [607] * 27, 32, 128, hkv=32, causal=True)  # a LLaVA prefill step
    check_packed_attention(rows, torch.bfloat16, [1400] * 11, 28, 128, hkv=4, causal=True)  # Qwen2-VL's
    check_packed_attention(rows, torch.float32, [100, 37, 256, 1], 8, 96, hkv=2, causal=True, time_it=False)
    check_fused(rows, torch.bfloat16, 1, 4096, 11008, 32, 32, 128)
    check_fused(rows, torch.bfloat16, 8192, 4096, 11008, 32, 32, 128)
    check_fused(rows, torch.float32, 64, 4096, 11008, 32, 8, 128)
    check_layer_norm(rows, torch.bfloat16, 12 * 5476, 1280)  # a Qwen2-VL prefill step's 12 images
    check_layer_norm(rows, torch.bfloat16, 27 * 577, 1024)  # LLaVA's CLIP tower, 27 images
    check_layer_norm(rows, torch.float32, 100, 80)
    for M, K, N in ((1, 4096, 12288), (1, 4096, 22016), (1, 11008, 4096), (4, 4096, 22016), (2, 4096, 4096)):
        check_gemv(rows, torch.bfloat16, M, K, N)  # Llama-2-7B's qkv, gate_up, down, o at decode
    check_gemv(rows, torch.bfloat16, 1, 3584, 4608, bias=True)  # Qwen2-7B's qkv
    check_gemv(rows, torch.bfloat16, 1, 3584, 152064)  # Qwen2-7B's LM head: 76032 tiles of 2 rows
    check_gemv(rows, torch.bfloat16, 1, 4096, 22016, silu_and_mul=True)  # Llama-2-7B's gate_up, writing the activation
    check_gemv(rows, torch.float16, 3, 1000, 257)
    check_gemv(rows, torch.float32, 1, 1030, 130)
    if "--sweep" in sys.argv:
        sweep(rows)
    ceil = ceilings()
    with open(args.out, "w") as f:
        json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                   "triton": triton.__version__, "rows": rows, "ceilings": ceil}, f, indent=2)
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}")
    print_rows(rows)
    print("ceilings:", {k: round(v, 2) for k, v in ceil.items()})
    return 0 if all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
