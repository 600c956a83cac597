"""The Triton vision attention (kernels/triton_packed_attention.py) over tile sizes,
each configuration in its own process: a configuration that faults (an illegal address leaves the
CUDA context unusable) costs only its own rows. Each row: the kernel's relative error
against SDPA's result (what the towers run now) and both times, at Qwen2-VL's 1024x1024 images
(5476 tokens, 16 heads, head_dim 80; 1 and 6 images) and Qwen2.5-VL's windows (SHAPES).
--causal: the language models' fresh prefill chunks instead (CAUSAL_SHAPES: a throughput run's
step of prompts, a lone prompt), against torch's FlashAttention varlen op (what eager prefill steps
run now) and, for a lone prompt, dense SDPA (cuDNN: what a prefill graph runs).

    python scripts/gpu_vision_attention_sweep.py --out /tmp/vision_sweep.json [--causal]"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

# (segments, tokens each, heads, head_dim, key heads): Qwen2-VL's 1024x1024 images, one and six; Qwen2.5-VL's
# windows of 8x8 patches (one such image in windows)
SHAPES = ((1, 5476, 16, 80, 16), (6, 5476, 16, 80, 16), (86, 64, 16, 80, 16))
# (segments, tokens each, query heads, head_dim, key heads): LLaVA-1.5-7B's 607-token prompts, 27 in a
# 16384-token step and one alone; Qwen2-VL-7B's 1400-token prompts (GQA 28 / 4), 11 and one
CAUSAL_SHAPES = ((27, 607, 32, 128, 32), (1, 607, 32, 128, 32), (11, 1400, 28, 128, 4), (1, 1400, 28, 128, 4))
# bm, bn, warps, stages, split_tail (1: full key tiles unmasked, the partial one after; 0: all masked)
# [, pair (1: bm rows as two blocks of bm / 2 whose full key tiles go through one loop)]
TILES = ((128, 64, 8, 3, 1), (128, 64, 8, 3, 0), (128, 64, 4, 3, 1), (128, 128, 8, 3, 1), (128, 128, 8, 2, 1),
         (64, 64, 4, 3, 1), (128, 32, 4, 3, 1), (64, 128, 4, 2, 1))


def one(config: str, causal: bool) -> None:
    import torch
    import torch.nn.functional as F
    import triton

    from vlmserve.kernels import triton_packed_attention as tpk
    from vlmserve.layers.vision_attention import varlen_attention

    os.environ["VLMSERVE_TRITON_VISION_ATTENTION"] = "0"  # varlen_attention: the SDPA path, to compare with
    bm, bn, warps, stages, split, *more = (int(x) for x in config.split(","))
    pair = bool(more and more[0])
    for nseq, L, h, d, hkv in CAUSAL_SHAPES if causal else SHAPES:
        if causal:  # as the language models make them: q apart, k and v from one buffer
            q = torch.randn(nseq * L, h, d, device="cuda", dtype=torch.bfloat16)
            k, v = torch.randn(nseq * L, 2, hkv, d, device="cuda", dtype=torch.bfloat16).unbind(1)
        else:  # as the towers do: views into one [n, 3, heads, d] projection
            q, k, v = torch.randn(nseq * L, 3, h, d, device="cuda", dtype=torch.bfloat16).unbind(1)
        cu_list = list(range(0, nseq * L + 1, L))
        cu = torch.tensor(cu_list, device="cuda", dtype=torch.int32)
        scale = d ** -0.5
        others = {}
        if causal:
            fa = torch.ops.aten._flash_attention_forward
            others["flash_us"] = lambda: fa(q, k, v, cu, cu, L, L, 0.0, True, False, scale=scale)[0]
            ref = tpk.reference_packed_attention(q, k, v, cu_list, scale, causal=True)
            if nseq == 1:
                qt, kt, vt = (x.transpose(0, 1)[None] for x in (q, k, v))
                others["dense_sdpa_us"] = lambda: F.scaled_dot_product_attention(
                    qt, kt, vt, is_causal=True, scale=scale, enable_gqa=h != hkv)
        else:
            ref = varlen_attention(q, k, v, cu_list, scale)
            others["sdpa_us"] = lambda: varlen_attention(q, k, v, cu_list, scale)
        run = lambda: tpk.packed_attention(q, k, v, cu, L, scale, block_m=bm, block_n=bn, num_warps=warps,  # noqa: E731
                                           num_stages=stages, split_tail=bool(split), causal=causal, pair=pair)
        got = run().double()
        row = {"config": config, "shape": f"{nseq}x{L} H={h}/{hkv} D={d}" + (" causal" if causal else ""),
               "rel_err": float((got - ref.double()).norm() / ref.double().norm())}
        ms = triton.testing.do_bench(run, return_mode="median")
        flops = 4 * nseq * L * L * h * d / (2 if causal else 1)
        row.update(us=1e3 * ms, tflops=flops / ms / 1e9)
        for name, fn in others.items():
            row[name] = 1e3 * triton.testing.do_bench(fn, return_mode="median")
        print(json.dumps(row), flush=True)


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--out", default="vision_sweep.json")
    p.add_argument("--one", help="bm,bn,warps,stages,split: one configuration, here")
    p.add_argument("--configs", help="configurations to run, ';'-separated (default: all of TILES)")
    p.add_argument("--causal", action="store_true", help="the language models' prefill shapes")
    args = p.parse_args()
    if args.one:
        one(args.one, args.causal)
        return 0
    rows = []
    configs = args.configs.split(";") if args.configs else [",".join(str(x) for x in t) for t in TILES]
    for config in configs:
        try:
            r = subprocess.run([sys.executable, __file__, "--one", config] + ["--causal"] * args.causal,
                               capture_output=True, text=True, timeout=120)
            out, code, tail = r.stdout, r.returncode, r.stderr[-300:]
        except subprocess.TimeoutExpired as e:
            out = (e.stdout or b"").decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
            code, tail = "timeout", ""
        got = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
        rows += got
        for row in got:
            print(json.dumps(row), flush=True)
        if len(got) < len(CAUSAL_SHAPES if args.causal else SHAPES):
            row = {"config": config, "error": f"exit {code}: {tail}"}
            rows.append(row)
            print(json.dumps(row), flush=True)
    with open(args.out, "w") as f:
        json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
