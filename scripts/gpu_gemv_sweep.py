"""The decode GEMVs of a 7B model in a chain (qkv, o, gate_up, down, layer after layer, each reading the
last one's output) in one CUDA graph: cuBLAS against kernels/triton_gemv.py over tiles, with and without
programmatic dependent launch, for x of 1, 2 and 4 rows. Weight bytes streamed per second is what
single-stream decode is bound by. (Stages no longer apply: the kernel's loop is not software-pipelined. The
tiles below were the first kernel's; gpu_gemv_shapes.py times the current one's, shape by shape. The first
version of this script, c850bdb, also tried loading a GEMV's first weights before its wait, and letting the
next GEMV in early: both slower.)

    python scripts/gpu_gemv_sweep.py --out gemv_sweep.json"""
from __future__ import annotations

import argparse
import json
import time

import torch
import torch.nn.functional as F
import triton

from vlmserve.kernels import triton_gemv as tg

SHAPES = {  # hidden, q size, kv size, intermediate, layers
    "llava-1.5-7b": (4096, 4096, 4096, 11008, 32),
    "qwen2-vl-7b": (3584, 3584, 512, 18944, 28),
}
# block_n, block_k, warps, stages
TILES = ((8, 512, 4, 3), (8, 512, 4, 2), (8, 512, 4, 4), (4, 512, 4, 3), (8, 1024, 4, 3), (8, 1024, 8, 3),
         (16, 512, 4, 3), (4, 1024, 4, 3), (8, 256, 2, 3), (8, 512, 2, 3))


def make_layers(shape: str, dtype=torch.bfloat16):
    hidden, q, kv, inter, n = SHAPES[shape]
    g = torch.Generator(device="cuda").manual_seed(0)

    def w(rows, cols):
        return (torch.randn(rows, cols, device="cuda", dtype=dtype, generator=g) * cols ** -0.5).contiguous()

    return [{"qkv": w(q + 2 * kv, hidden), "o": w(hidden, q), "gu": w(2 * inter, hidden), "d": w(hidden, inter)}
            for _ in range(n)], q, inter


def chain(x, layers, q, inter, cfg):
    lin = F.linear if cfg is None else (lambda a, w: tg.gemv(a, w, block_n=cfg[0], block_k=cfg[1],
                                                             num_warps=cfg[2], pdl=cfg[4]))
    for L in layers:
        y = lin(x, L["qkv"])
        y = lin(y[:, :q], L["o"])
        y = lin(y, L["gu"])
        x = lin(y[:, :inter], L["d"])
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


def write_rows(path: str, rows: list) -> None:
    with open(path, "w") as f:
        json.dump({"device": torch.cuda.get_device_name(), "triton": triton.__version__,
                   "time": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()), "rows": rows}, f, indent=1)


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--out", default="gemv_sweep.json")
    p.add_argument("--shapes", default="llava-1.5-7b,qwen2-vl-7b")
    p.add_argument("--rows", default="1,2,4")
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args()
    rows = []
    for shape in args.shapes.split(","):
        layers, q, inter = make_layers(shape)
        wbytes = sum(t.numel() * t.element_size() for L in layers for t in L.values())
        for M in (int(m) for m in args.rows.split(",")):
            x = torch.randn(M, layers[0]["qkv"].shape[1], device="cuda", dtype=torch.bfloat16)
            cfgs = [None] + [t + (pdl,) for t in TILES for pdl in (True, False) if M == 1 or t == TILES[0]]
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
                    rows.append({"shape": shape, "M": M, "cfg": cfg, "error": f"{type(e).__name__}: {str(e)[:200]}"})
                    print(json.dumps(rows[-1]), flush=True)
            ref = graphs[None][1].float()
            times: dict = {c: [] for c in graphs}
            for _ in range(args.rounds):  # alternating, so drift hits every config alike
                for cfg, (graph, _) in graphs.items():
                    times[cfg].append(time_graph(graph))
            for cfg, ts in times.items():
                err = ((graphs[cfg][1].float() - ref).norm() / ref.norm()).item()
                row = {"shape": shape, "M": M, "cfg": "cublas" if cfg is None else cfg, "ms": round(min(ts), 4),
                       "TBps": round(wbytes / (min(ts) * 1e-3) / 1e12, 3), "rel_err_vs_cublas": round(err, 5),
                       "ms_all": [round(t, 4) for t in ts]}
                rows.append(row)
                print(json.dumps(row), flush=True)
            del graphs
        del layers
        torch.cuda.empty_cache()
    write_rows(args.out, rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
