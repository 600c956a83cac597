"""Alternatives measured before choosing (issue 5), each against what vlmserve runs now, on the GPU:
- prefill attention without cached context: the Triton paged kernel against torch's FlashAttention
  varlen op (and cuDNN's, where this torch has it), LLaVA- and Qwen2-VL-shaped;
- vision-tower attention over packed images (non-causal): SDPA per length (now) against the
  varlen ops and the opt-in Triton kernel that does not pad head_dim 80 (tile sizes swept);
- the ViT's head_dim 80 zero-padded to 96, 112 or 128 before SDPA, by backend and layout
  (`--parts vision_pad`; not in the default parts);
- the first SDPA call at a new shape against the next one, per backend (`--parts sdpa_first`; not
  in the default parts);
- single-stream decode attention: KV splits, tile sizes and warps, each in a CUDA graph;
- decode GEMVs of a 7B model, 32 layers back to back in one CUDA graph: cuBLAS against cuBLASLt;
- Qwen2-VL preprocessing of a 1024x1024 image: the CPU fast path against the same ops on the GPU,
  and HF's processor with device="cuda";
- Qwen2-VL's and Qwen2.5-VL's vision towers on one 1024x1024 image: eager with cuDNN, eager with the
  Triton attention, replayed from a CUDA graph (`--parts towers`; not in the default parts).
Writes --out (JSON) and prints each row.

    python scripts/gpu_alternatives.py --out /tmp/alternatives.json"""
from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import time
from unittest import mock

import numpy as np
import torch
import triton

from vlmserve.kernels import triton_paged_attention as tpa
from vlmserve.kernels import triton_packed_attention as tpk
from vlmserve.layers.vision_attention import varlen_attention

DEV = "cuda"
ROWS: list[dict] = []


def emit(**row):
    ROWS.append(row)
    print(json.dumps(row), flush=True)


def bench(fn) -> float:
    return triton.testing.do_bench(fn, return_mode="median")


def rel_err(a, b) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def flash_varlen(q, k, v, cu, max_len, causal, scale):
    out = torch.ops.aten._flash_attention_forward(q, k, v, cu, cu, max_len, max_len, 0.0, causal, False,
                                                  scale=scale)
    return out[0]


def cudnn_varlen(q, k, v, cu, max_len, causal, scale):
    out = torch.ops.aten._cudnn_attention_forward(q, k, v, None, cu, cu, max_len, max_len, True, 0.0, causal,
                                                  False, scale=scale)
    return out[0]


def schemas():
    for name in ("_flash_attention_forward", "_cudnn_attention_forward", "_efficient_attention_forward"):
        op = getattr(torch.ops.aten, name, None)
        emit(what="schema", op=name, schema=str(op.default._schema) if op is not None else None)
    try:
        import torch.nn.attention.varlen as v
        import inspect
        emit(what="schema", op="varlen_attn", schema=str(inspect.signature(v.varlen_attn)))
    except Exception as e:  # noqa: BLE001
        emit(what="schema", op="varlen_attn", schema=f"absent: {e}")


def varlen_ops(what, shape, flops, ref, args):
    """torch's FlashAttention and cuDNN varlen ops on args (q, k, v, cu_seqlens, max_len, causal,
    scale): time, rate and error against ref, or the error they raise."""
    for name, fn in (("flash", flash_varlen), ("cudnn", cudnn_varlen)):
        try:
            err = rel_err(fn(*args), ref)
            ms = bench(lambda: fn(*args))
            emit(what=what, impl=name, shape=shape, us=1e3 * ms, tflops=flops / ms / 1e9, rel_err=err)
        except Exception as e:  # noqa: BLE001
            emit(what=what, impl=name, shape=shape, error=f"{type(e).__name__}: {str(e)[:200]}")


def prefill_attention(nseq, L, hq, hkv, d):
    T = nseq * L
    q = torch.randn(T, hq, d, device=DEV, dtype=torch.bfloat16)
    k = torch.randn(T, hkv, d, device=DEV, dtype=torch.bfloat16)
    v = torch.randn(T, hkv, d, device=DEV, dtype=torch.bfloat16)
    bs = 16
    nb = -(-L // bs)
    kc = torch.zeros(nseq * nb + 1, bs, hkv, d, device=DEV, dtype=torch.bfloat16)
    vc = torch.zeros_like(kc)
    tables = torch.arange(nseq * nb, device=DEV).view(nseq, nb)
    slots = torch.cat([(tables[i, :, None] * bs + torch.arange(bs, device=DEV)).flatten()[:L] for i in range(nseq)])
    tpa.store_kv(k, v, kc, vc, slots)
    qsl = torch.arange(0, T + 1, L, device=DEV, dtype=torch.int32)
    seq_lens = torch.full((nseq,), L, device=DEV)
    scale = d ** -0.5
    out = torch.empty_like(q)

    def ours():
        tpa.paged_prefill_attention(q, kc, vc, tables, qsl, seq_lens, scale, None, first_seq=0,
                                    max_query_len=L, out=out)
    ours()
    ref = out.clone()
    flops = 4 * nseq * L * L / 2 * hq * d
    shape = f"{nseq}x{L} Hq={hq} Hkv={hkv} D={d} causal"
    ms = bench(ours)
    emit(what="prefill_attention", impl="triton", shape=shape, us=1e3 * ms, tflops=flops / ms / 1e9)
    varlen_ops("prefill_attention", shape, flops, ref, (q, k, v, qsl, L, True, scale))
    if nseq == 1:
        dense_sdpa("prefill_attention", shape, flops, ref, q, k, v, scale)


def dense_sdpa(what, shape, flops, ref, q, k, v, scale):
    """One sequence through F.scaled_dot_product_attention ([1, H, T, D], causal), by backend; GQA
    by enable_gqa, and by K/V repeated to the query heads (the repeat timed with it)."""
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    gqa = q.shape[1] != k.shape[1]
    qt, kt, vt = (x.transpose(0, 1)[None] for x in (q, k, v))

    def run(kk, vv, **kw):
        return F.scaled_dot_product_attention(qt, kk, vv, is_causal=True, scale=scale, **kw)[0].transpose(0, 1)

    def repeated():
        r = q.shape[1] // k.shape[1]
        return run(kt.repeat_interleave(r, dim=1), vt.repeat_interleave(r, dim=1))

    variants = [("gqa_flag", lambda: run(kt, vt, enable_gqa=gqa))]
    if gqa:
        variants.append(("repeat_kv", repeated))
    for backend in (None, SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION):
        for how, fn in variants:
            name = f"sdpa_{backend.name.lower() if backend else 'default'}_{how}"
            try:
                ctx = sdpa_kernel([backend]) if backend else contextlib.nullcontext()
                with ctx:
                    err = rel_err(fn(), ref)
                    ms = bench(fn)
                emit(what=what, impl=name, shape=shape, us=1e3 * ms, tflops=flops / ms / 1e9, rel_err=err)
            except Exception as e:  # noqa: BLE001
                emit(what=what, impl=name, shape=shape, error=f"{type(e).__name__}: {str(e)[:160]}")


def vision_attention(nseq, L, h, d):
    T = nseq * L
    # strided views of one fused qkv projection, as the vision blocks make them
    q, k, v = torch.randn(T, 3, h, d, device=DEV, dtype=torch.bfloat16).unbind(1)
    cu_list = list(range(0, T + 1, L))
    cu = torch.tensor(cu_list, device=DEV, dtype=torch.int32)
    scale = d ** -0.5
    flops = 4 * nseq * L * L * h * d
    shape = f"{nseq}x{L} H={h} D={d} bidirectional"
    with mock.patch.dict(os.environ, VLMSERVE_TRITON_VISION_ATTENTION="0"):  # the SDPA path
        ref = varlen_attention(q, k, v, cu_list, scale)
        ms = bench(lambda: varlen_attention(q, k, v, cu_list, scale))
    emit(what="vision_attention", impl="sdpa_by_length", shape=shape, us=1e3 * ms, tflops=flops / ms / 1e9)
    varlen_ops("vision_attention", shape, flops, ref, (q.contiguous(), k.contiguous(), v.contiguous(), cu, L,
                                                       False, scale))
    if tpk.split_head_dim(d) is None:
        return
    # the Triton kernel without head_dim padding (kernels/triton_packed_attention.py), over tile sizes
    for bm, bn, warps, stages in ((64, 64, 4, 3), (128, 64, 4, 3), (64, 64, 4, 4), (128, 64, 4, 4),
                                  (64, 32, 4, 3), (64, 128, 4, 3), (128, 128, 8, 3), (128, 64, 8, 3),
                                  (128, 32, 4, 3), (64, 64, 4, 2), (128, 64, 8, 2), (128, 128, 8, 2),
                                  (128, 64, 8, 4), (128, 128, 8, 4)):
        run = lambda: tpk.packed_attention(q, k, v, cu, L, scale, block_m=bm, block_n=bn,  # noqa: E731
                                           num_warps=warps, num_stages=stages)
        try:
            err = rel_err(run(), ref)
            ms = bench(run)
            emit(what="vision_attention", impl=f"triton_split bm={bm} bn={bn} warps={warps} stages={stages}",
                 shape=shape, us=1e3 * ms, tflops=flops / ms / 1e9, rel_err=err)
        except Exception as e:  # noqa: BLE001
            emit(what="vision_attention", impl=f"triton_split bm={bm} bn={bn} warps={warps} stages={stages}",
                 shape=shape, error=f"{type(e).__name__}: {str(e)[:200]}")


def vision_head_dim_padding(nseq, L, h, d=80):
    """The ViT's attention (head_dim 80) through SDPA by backend, as now and with q, k, v zero-padded
    to a larger head_dim (exact: zero columns add nothing to q.k, and the padded output columns are
    dropped), the padding timed with it; layouts as the towers make them ([B, L, H, D] viewed as
    [B, H, L, D]) and contiguous [B, H, L, D]. TFLOP/s count head_dim 80."""
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    q, k, v = torch.randn(nseq, L, 3, h, d, device=DEV, dtype=torch.bfloat16).unbind(2)
    scale = d ** -0.5
    flops = 4 * nseq * L * L * h * d
    shape = f"{nseq}x{L} H={h} D={d} bidirectional"
    ref = F.scaled_dot_product_attention(*(x.transpose(1, 2) for x in (q, k, v)), scale=scale)

    def padded(dp, contiguous):
        def fn():
            xs = (F.pad(x, (0, dp - d)) if dp > d else x for x in (q, k, v))
            xs = [x.transpose(1, 2) for x in xs]
            if contiguous:
                xs = [x.contiguous() for x in xs]
            return F.scaled_dot_product_attention(*xs, scale=scale)[..., :d]
        return fn

    for backend in (SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION):
        for dp in (80, 96, 112, 128):
            for contiguous in (False, True):
                fn = padded(dp, contiguous)
                name = f"{backend.name.lower()} d={dp} {'bhld' if contiguous else 'blhd_view'}"
                try:
                    with sdpa_kernel([backend]):
                        err = rel_err(fn(), ref)
                        ms = bench(fn)
                    emit(what="vision_head_dim", impl=name, shape=shape, us=1e3 * ms, tflops=flops / ms / 1e9,
                         rel_err=err)
                except Exception as e:  # noqa: BLE001
                    emit(what="vision_head_dim", impl=name, shape=shape, error=f"{type(e).__name__}: {str(e)[:160]}")


def sdpa_first_calls():
    """The first call of SDPA at a shape it has not seen, against the next call, per backend: cuDNN's
    backend builds an execution plan per shape. The vision towers run SDPA over [images, tokens, heads,
    head_dim], so every new image count in a throughput run is a new shape (the H200 step traces show
    one-off steps 0.3-0.4 s too long, with no Triton compile in them). Each row: first and second call
    of one backend at one shape, synchronized, in ms."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backends = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION,
                "efficient": SDPBackend.EFFICIENT_ATTENTION}
    # CLIP-L/14-336 and Qwen2-VL's ViT (1024x1024 images) at image counts a run meets; a lone LLaVA prompt
    shapes = ([(n, 16, 577, 64, False) for n in (3, 5, 13, 26, 27)] + [(n, 16, 5476, 80, False) for n in (1, 3, 11)]
              + [(1, 32, 640, 128, True)])
    for name, backend in backends.items():
        try:  # the backend's one-time setup (handles, libraries) on a shape of its own, not in the rows
            with sdpa_kernel([backend]):
                x = torch.randn(1, 4, 64, 64, device=DEV, dtype=torch.bfloat16)
                torch.nn.functional.scaled_dot_product_attention(x, x, x)
        except Exception:  # noqa: BLE001 (the rows below say why)
            pass
        for b, h, L, d, causal in shapes:
            q, k, v = (torch.randn(b, h, L, d, device=DEV, dtype=torch.bfloat16) for _ in range(3))
            times = []
            try:
                with sdpa_kernel([backend]):
                    for _ in range(2):
                        torch.cuda.synchronize()
                        t = time.perf_counter()
                        torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal)
                        torch.cuda.synchronize()
                        times.append(1e3 * (time.perf_counter() - t))
                emit(what="sdpa_first_call", impl=name, shape=f"B={b} H={h} L={L} D={d} causal={causal}",
                     first_ms=times[0], second_ms=times[1])
            except Exception as e:  # noqa: BLE001
                emit(what="sdpa_first_call", impl=name, shape=f"B={b} H={h} L={L} D={d} causal={causal}",
                     error=f"{type(e).__name__}: {str(e)[:160]}")


def decode_attention_b1():
    """Single-stream decode attention (LLaVA-1.5-7B: 32 KV heads, head_dim 128, 736 tokens of
    context), each configuration replayed in a CUDA graph (launch cost as in a decode graph)."""
    L, hkv, d, bs = 736, 32, 128, 16
    nb = L // bs
    kc = torch.randn(nb + 8, bs, hkv, d, device=DEV, dtype=torch.bfloat16)
    vc = torch.randn_like(kc)
    tables = torch.randperm(nb + 8, device=DEV)[:nb].view(1, nb)
    q = torch.randn(1, hkv, d, device=DEV, dtype=torch.bfloat16)
    seq_lens = torch.tensor([L], device=DEV)
    out = torch.empty_like(q)
    ref = tpa.reference_paged_decode_attention(q, kc, vc, tables, seq_lens, d ** -0.5)
    nbytes = 2 * L * hkv * d * 2
    for splits in (1, 2, 4, 8, 16):
        for block_n in (16, 32, 64, 128):
            for warps in (2, 4, 8):
                def fn():
                    tpa.paged_decode_attention(q, kc, vc, tables, seq_lens, d ** -0.5, None, num_splits=splits,
                                               out=out, block_n=block_n, num_warps=warps)
                try:
                    fn()
                    err = rel_err(out, ref)
                    ms = triton.testing.do_bench_cudagraph(fn, rep=50)
                    emit(what="decode_attention_b1", splits=splits, block_n=block_n, num_warps=warps,
                         us=1e3 * ms, tbps=nbytes / ms / 1e9, rel_err=err)
                except Exception as e:  # noqa: BLE001
                    emit(what="decode_attention_b1", splits=splits, block_n=block_n, num_warps=warps,
                         error=f"{type(e).__name__}: {str(e)[:120]}")


def gemv_chain():
    """The decode GEMVs of Llama-2-7B (qkv, o, gate_up, down) x 32 layers, M=1, in one graph."""
    torch.manual_seed(0)
    shapes = [(12288, 4096), (4096, 4096), (22016, 4096), (4096, 11008)]
    layers = [[torch.randn(n, k, device=DEV, dtype=torch.bfloat16) * 0.02 for n, k in shapes] for _ in range(32)]
    nbytes = sum(w.numel() * 2 for ws in layers for w in ws)
    xs = {k: torch.randn(1, k, device=DEV, dtype=torch.bfloat16) for _, k in shapes}

    def chain():
        for ws in layers:
            for w in ws:
                torch.nn.functional.linear(xs[w.shape[1]], w)
    for lib in ("cublas", "cublaslt"):
        try:
            torch.backends.cuda.preferred_blas_library(lib)
            chain()
            torch.cuda.synchronize()
            g = torch.cuda.CUDAGraph()
            s = torch.cuda.Stream()
            s.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(s):
                chain()
            torch.cuda.current_stream().wait_stream(s)
            with torch.cuda.graph(g):
                chain()
            ms = bench(g.replay)
            emit(what="gemv_chain", impl=lib, gb=nbytes / 1e9, ms=ms, tbps=nbytes / ms / 1e9)
        except Exception as e:  # noqa: BLE001
            emit(what="gemv_chain", impl=lib, error=f"{type(e).__name__}: {str(e)[:200]}")
    torch.backends.cuda.preferred_blas_library("cublas")
    layers.clear()


def qwen_preprocess():
    import torchvision.transforms.v2.functional as tvF
    from PIL import Image
    from transformers import Qwen2VLImageProcessor

    from vlmserve.models.qwen2_vl_image_processing import FastQwen2VLImageProcessor

    proc = Qwen2VLImageProcessor()
    fast = FastQwen2VLImageProcessor.from_hf(proc, 14, 2, 2)
    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (1024, 1024, 3), dtype=np.uint8))
    lo, hi = proc.size["shortest_edge"], proc.size["longest_edge"]
    cpu_pix, grid = fast(img, lo, hi)
    t = []
    for _ in range(5):
        t0 = time.perf_counter()
        fast(img, lo, hi)
        t.append(time.perf_counter() - t0)
    emit(what="qwen_preprocess", impl="cpu_fast_path", ms=1e3 * sorted(t)[2], patches=cpu_pix.shape[0])
    h, w = fast.resized_hw(1024, 1024, lo, hi)
    mean, std = fast.mean.to(DEV), fast.std.to(DEV)
    host = torch.from_numpy(np.asarray(img)).pin_memory()

    def gpu():
        x = host.to(DEV, non_blocking=True).permute(2, 0, 1)
        x = tvF.resize(x, [h, w], interpolation=fast._interp, antialias=True)
        x = (x.float() - mean) / std
        p, m = 14, 2
        gh, gw = h // p, w // p
        x = x.view(1, 3, gh // m, m, p, gw // m, m, p).permute(2, 5, 3, 6, 1, 0, 4, 7)
        return x.expand(gh // m, gw // m, m, m, 3, 2, p, p).reshape(gh * gw, 3 * 2 * p * p)
    g = gpu()
    torch.cuda.synchronize()
    d = (g.cpu() - cpu_pix).abs()
    emit(what="qwen_preprocess", impl="gpu_same_ops", ms=bench(gpu), max_abs_diff_vs_cpu=float(d.max()),
         frac_diff_vs_cpu=float((d > 0).float().mean()))
    try:
        hf = proc(images=[img], return_tensors="pt", device=DEV)["pixel_values"]
        d2 = (hf.to(DEV) - g).abs()
        ms = bench(lambda: proc(images=[img], return_tensors="pt", device=DEV))
        emit(what="qwen_preprocess", impl="hf_device_cuda", ms=ms, max_abs_diff_vs_gpu_same_ops=float(d2.max()))
    except Exception as e:  # noqa: BLE001
        emit(what="qwen_preprocess", impl="hf_device_cuda", error=f"{type(e).__name__}: {str(e)[:200]}")


def vision_towers(depth: int = 32):
    """Qwen2-VL's and Qwen2.5-VL's 7B vision towers (random weights, bf16) on one 1024x1024 image:
    eager with cuDNN's SDPA (VLMSERVE_TRITON_VISION_ATTENTION=0), eager with the Triton attention (the
    default at head_dim 80), and replayed from a CUDA graph (GridEncoderGraphs), each the median of
    host-timed calls that wait for the GPU (what a request's first token waits for)."""
    from transformers import Qwen2_5_VLConfig, Qwen2VLConfig

    from vlmserve.benchmarks.gpu_models import QWEN2_VL_VISION
    from vlmserve.models.qwen2_5_vl import Qwen2_5_VisionTransformer
    from vlmserve.models.qwen2_vl import Qwen2VisionTransformer
    from vlmserve.worker.encoder_graphs import GridEncoderGraphs

    qwen2_5 = dict(depth=depth, hidden_size=1280, num_heads=16, intermediate_size=3420, out_hidden_size=3584,
                   patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=112,
                   fullatt_block_indexes=[7, 15, 23, 31], hidden_act="silu")
    towers = {"qwen2_vl": (Qwen2VisionTransformer,
                           Qwen2VLConfig(vision_config={**QWEN2_VL_VISION, "depth": depth}).vision_config),
              "qwen2_5_vl": (Qwen2_5_VisionTransformer, Qwen2_5_VLConfig(vision_config=qwen2_5).vision_config)}
    grids = [(1, 74, 74)]  # 1024x1024 resized to 1036x1036: 74 x 74 patches
    for name, (cls, vcfg) in towers.items():
        with torch.device(DEV):
            tower = cls(vcfg).to(torch.bfloat16).eval()
        pixels = torch.randn(74 * 74, 3 * 2 * 14 * 14, device=DEV, dtype=torch.bfloat16)

        def once(fn):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            fn()
            torch.cuda.synchronize()
            return 1e3 * (time.perf_counter() - t0)

        def timed(fn, n=20):
            fn()
            torch.cuda.synchronize()
            times = []
            for _ in range(n):
                t0 = time.perf_counter()
                fn()
                torch.cuda.synchronize()
                times.append(1e3 * (time.perf_counter() - t0))
            return float(np.median(times))

        with torch.inference_mode():
            with mock.patch.dict(os.environ, VLMSERVE_TRITON_VISION_ATTENTION="0"):
                ms_sdpa = timed(lambda: tower(pixels, grids))
                ref = tower(pixels, grids)
            ms_triton = timed(lambda: tower(pixels, grids))
            graphs = GridEncoderGraphs(tower, torch.device(DEV))
            # three sights of two layouts (eager, capture, replay): the first capture warms up with
            # an eager pass, the second rides on its layout's first sight
            other = [(1, 58, 42)]  # an 812x588 image
            sights = {str(g): [once(lambda: graphs(px, g)) for _ in range(3)]
                      for g, px in ((grids, pixels), (other, torch.randn(58 * 42, pixels.shape[1], device=DEV,
                                                                          dtype=torch.bfloat16)))}
            ms_graph = timed(lambda: graphs(pixels, grids))
            out = graphs(pixels, grids)
            exact = copy.deepcopy(tower).float()(pixels.float(), grids)  # float32 (SDPA): the reference
        emit(what="vision_tower", tower=name, grids=grids, eager_sdpa_ms=ms_sdpa, eager_triton_ms=ms_triton,
             graph_ms=ms_graph, graphs=len(graphs.graphs), sights_eager_capture_replay_ms=sights,
             graph_vs_sdpa_rel_err=rel_err(out, ref),
             bf16_sdpa_vs_fp32_rel_err=rel_err(ref, exact), bf16_graph_triton_vs_fp32_rel_err=rel_err(out, exact))
        tower = graphs = exact = None  # noqa: F841 - freed before the next tower is made
        torch.cuda.empty_cache()


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--out", default="alternatives.json")
    p.add_argument("--parts", default="schemas,prefill,vision,gemv,preprocess,decode1")
    args = p.parse_args()
    parts = args.parts.split(",")
    emit(what="env", torch=torch.__version__, triton=triton.__version__, device=torch.cuda.get_device_name(0))
    if "schemas" in parts:
        schemas()
    if "prefill" in parts:
        for shape in ((1, 608, 32, 32, 128), (13, 608, 32, 32, 128), (1, 1400, 28, 4, 128), (6, 1400, 28, 4, 128)):
            prefill_attention(*shape)
    if "vision" in parts:
        for shape in ((1, 577, 16, 64), (8, 577, 16, 64), (1, 5476, 16, 80), (6, 5476, 16, 80)):
            vision_attention(*shape)
    if "vision_pad" in parts:
        for nseq in (1, 6, 11):
            vision_head_dim_padding(nseq, 5476, 16)
    if "preprocess" in parts:
        qwen_preprocess()
    if "sdpa_first" in parts:
        sdpa_first_calls()
    if "decode1" in parts:
        decode_attention_b1()
    if "gemv" in parts:
        gemv_chain()
    if "towers" in parts:
        vision_towers()
    with open(args.out, "w") as f:
        json.dump(ROWS, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
