"""A chain of decode GEMVs (a 7B model's qkv, o, gate_up, down, layer after layer, each reading the last
one's output) in one CUDA graph: cuBLAS against a Triton GEMV, and the Triton GEMV with Hopper's
programmatic dependent launch (PDL), where a GEMV may start while the kernel before it is still running:
it loads its first weights, then waits (griddepcontrol.wait) for the kernel that writes its input. The
question: how close to the copy rate can a chain of GEMVs stream the weights when a kernel's start
overlaps the last one's tail?

    python scripts/gpu_gemv_pdl_probe.py --out gemv_pdl.json"""
from __future__ import annotations

import argparse
import json
import time

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

SHAPES = {  # hidden, q size, kv size, intermediate, layers
    "llava-1.5-7b": (4096, 4096, 4096, 11008, 32),
    "qwen2-vl-7b": (3584, 3584, 512, 18944, 28),
}


@triton.jit
def _gemv_kernel(x_ptr, w_ptr, y_ptr, N, K, stride_wn, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                 PRE_K: tl.constexpr, WAIT: tl.constexpr, TRIGGER: tl.constexpr):
    # y[n] = sum_k W[n, k] x[k] for BLOCK_N rows; PRE_K weights of each row loaded before the wait
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    rm = rows < N
    wp = w_ptr + rows.to(tl.int64)[:, None] * stride_wn
    if PRE_K > 0:
        pk = tl.arange(0, PRE_K)
        w_pre = tl.load(wp + pk[None, :], mask=rm[:, None] & (pk[None, :] < K), other=0.0)
    if WAIT:
        gdc_wait()
    if TRIGGER == 1:
        gdc_launch_dependents()
    ks = tl.arange(0, BLOCK_K)
    acc = tl.zeros([BLOCK_N, BLOCK_K], tl.float32)
    for k0 in range(PRE_K, K, BLOCK_K):
        km = (k0 + ks) < K
        w = tl.load(wp + k0 + ks[None, :], mask=rm[:, None] & km[None, :], other=0.0)
        x = tl.load(x_ptr + k0 + ks, mask=km, other=0.0)
        acc += w.to(tl.float32) * x.to(tl.float32)[None, :]
    y = tl.sum(acc, 1)
    if PRE_K > 0:
        xp = tl.load(x_ptr + pk, mask=pk < K, other=0.0)
        y += tl.sum(w_pre.to(tl.float32) * xp.to(tl.float32)[None, :], 1)
    if TRIGGER == 2:
        gdc_launch_dependents()
    tl.store(y_ptr + rows, y.to(y_ptr.dtype.element_ty), mask=rm)


def gemv(x, w, cfg):
    """x [K] contiguous, w [N, K] -> [N]. cfg: (block_n, block_k, warps, stages, pre_k, pdl, trigger)."""
    bn, bk, warps, stages, pre_k, pdl, trigger = cfg
    N, K = w.shape
    y = torch.empty(N, device=x.device, dtype=x.dtype)
    _gemv_kernel[(triton.cdiv(N, bn),)](x, w, y, N, K, w.stride(0), BLOCK_N=bn, BLOCK_K=bk, PRE_K=pre_k,
                                        WAIT=pdl, TRIGGER=trigger, num_warps=warps, num_stages=stages,
                                        launch_pdl=bool(pdl))
    return y


def make_layers(shape: str, dtype=torch.bfloat16):
    hidden, q, kv, inter, n = SHAPES[shape]
    g = torch.Generator(device="cuda").manual_seed(0)

    def w(rows, cols):
        return (torch.randn(rows, cols, device="cuda", dtype=dtype, generator=g) * cols ** -0.5).contiguous()

    return [{"qkv": w(q + 2 * kv, hidden), "o": w(hidden, q), "gu": w(2 * inter, hidden), "d": w(hidden, inter)}
            for _ in range(n)], q, inter


def chain(x, layers, q, inter, cfg):
    for L in layers:
        if cfg is None:  # cuBLAS, as nn.Linear runs a [1, K] input
            y = F.linear(x[None], L["qkv"])[0]
            y = F.linear(y[None, :q], L["o"])[0]
            y = F.linear(y[None], L["gu"])[0]
            x = F.linear(y[None, :inter], L["d"])[0]
        else:
            y = gemv(x, L["qkv"], cfg)
            y = gemv(y[:q], L["o"], cfg)
            y = gemv(y, L["gu"], cfg)
            x = gemv(y[:inter], L["d"], cfg)
    return x


def time_graph(graph, reps=50) -> float:
    for _ in range(5):
        graph.replay()
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    for _ in range(reps):
        graph.replay()
    b.record()
    b.synchronize()
    return a.elapsed_time(b) / reps


TILES = ((16, 256, 4, 3), (16, 512, 4, 2), (8, 512, 4, 3), (32, 256, 4, 3), (16, 256, 8, 3), (32, 512, 8, 2))
# (pre_k, pdl, trigger): plain launches; PDL waiting first; PDL with the first weights loaded before the wait;
# and the next GEMV let in at this one's start or at the end of its loop
MODES = ((0, 0, 0), (0, 1, 0), (256, 1, 0), (256, 1, 1), (256, 1, 2), (512, 1, 2))


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--out", default="gemv_pdl.json")
    p.add_argument("--shapes", default="llava-1.5-7b,qwen2-vl-7b")
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args()
    rows = []
    for shape in args.shapes.split(","):
        layers, q, inter = make_layers(shape)
        wbytes = sum(t.numel() * t.element_size() for L in layers for t in L.values())
        x = torch.randn(layers[0]["qkv"].shape[1], device="cuda", dtype=torch.bfloat16)
        cfgs = [None] + [t + m for t in TILES for m in MODES]
        graphs = {}
        for cfg in cfgs:
            try:
                chain(x, layers, q, inter, cfg)
                torch.cuda.synchronize()
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph):
                    y = chain(x, layers, q, inter, cfg)
                graph.replay()
                torch.cuda.synchronize()
                graphs[cfg] = (graph, y)
            except Exception as e:  # noqa: BLE001  a config that fails is a row, not the end
                rows.append({"shape": shape, "cfg": cfg, "error": f"{type(e).__name__}: {str(e)[:200]}"})
                print(json.dumps(rows[-1]), flush=True)
        ref = graphs[None][1].float()
        times: dict = {c: [] for c in graphs}
        for _ in range(args.rounds):
            for cfg, (graph, _) in graphs.items():
                times[cfg].append(time_graph(graph))
        for cfg, ts in times.items():
            y = graphs[cfg][1].float()
            err = ((y - ref).norm() / ref.norm()).item()
            row = {"shape": shape, "cfg": "cublas" if cfg is None else cfg, "ms": round(min(ts), 4),
                   "TBps": round(wbytes / (min(ts) * 1e-3) / 1e12, 3), "rel_err_vs_cublas": round(err, 5),
                   "ms_all": [round(t, 4) for t in ts]}
            rows.append(row)
            print(json.dumps(row), flush=True)
        del graphs, layers
        torch.cuda.empty_cache()
    with open(args.out, "w") as f:
        json.dump({"device": torch.cuda.get_device_name(), "triton": triton.__version__,
                   "time": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()), "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
