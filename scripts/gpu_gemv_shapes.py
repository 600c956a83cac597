"""Each decode GEMV shape of a 7B model on its own: a chain of one layer's GEMV of that shape per layer (distinct
weights, so nothing stays in L2) in one CUDA graph, cuBLAS against kernels/triton_gemv.py over tiles (None:
tiles_for's choice; "silu": gate_up writing silu(gate) * up). Weight bytes streamed per second, one row of x,
PDL on. (Its first version, 57ae62c, also
timed an RMSNorm, SiLU-and-mul and a residual add inside the GEMV: BENCHMARKS.md.)

    python scripts/gpu_gemv_shapes.py --out gemv_shapes.json"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
from gpu_gemv_sweep import SHAPES, time_graph, write_rows  # noqa: E402

from vlmserve.kernels import triton_gemv as tg  # noqa: E402

VOCAB = {"llava-1.5-7b": (32000, 4), "qwen2-vl-7b": (152064, 2)}  # LM head rows, copies in its chain
# block_n, block_k, warps
TILES = (None, (2, 2048, 4), (2, 1024, 2), (4, 2048, 4), (4, 1024, 4), (1, 2048, 4), (2, 4096, 4), (2, 2048, 2),
         (1, 1024, 2), (4, 512, 4))


def kinds(shape: str) -> dict[str, tuple[int, int, int]]:
    hidden, q, kv, inter, n = SHAPES[shape]
    vocab, copies = VOCAB[shape]
    return {"qkv": (q + 2 * kv, hidden, n), "o": (hidden, q, n), "gu": (2 * inter, hidden, n), "d": (hidden, inter, n),
            "head": (vocab, hidden, copies)}


def run_chain(ws, x, cfg):
    for w in ws:
        if cfg == "cublas":
            F.linear(x, w)
        elif cfg is None:
            tg.gemv(x, w, pdl=True)
        elif cfg == "silu":  # gate_up writing silu(gate) * up
            tg.gemv(x, w, pdl=True, silu_and_mul=True)
        else:
            tg.gemv(x, w, block_n=cfg[0], block_k=cfg[1], num_warps=cfg[2], pdl=True)


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--out", default="gemv_shapes.json")
    p.add_argument("--shapes", default="llava-1.5-7b,qwen2-vl-7b")
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args()
    rows = []
    g = torch.Generator(device="cuda").manual_seed(0)
    for shape in args.shapes.split(","):
        for kind, (N, K, n) in kinds(shape).items():
            ws = [torch.randn(N, K, device="cuda", dtype=torch.bfloat16, generator=g) * K ** -0.5 for _ in range(n)]
            x = torch.randn(1, K, device="cuda", dtype=torch.bfloat16, generator=g)
            graphs = {}
            for v in ("cublas",) + TILES + (("silu",) if kind == "gu" else ()):
                try:
                    run_chain(ws, x, v)
                    torch.cuda.synchronize()
                    graph = torch.cuda.CUDAGraph()
                    with torch.cuda.graph(graph):
                        run_chain(ws, x, v)
                    graphs[v] = graph
                except Exception as e:  # noqa: BLE001  a variant that fails is a row
                    rows.append({"shape": shape, "kind": kind, "cfg": v,
                                 "error": f"{type(e).__name__}: {str(e)[:200]}"})
                    print(json.dumps(rows[-1]), flush=True)
            times: dict = {v: [] for v in graphs}
            for _ in range(args.rounds):
                for v, graph in graphs.items():
                    times[v].append(time_graph(graph, reps=30))
            wbytes = n * N * K * 2
            for v, ts in times.items():
                row = {"shape": shape, "kind": kind, "N": N, "K": K, "chain": n,
                       "cfg": v if v is not None else f"default {tg.tiles_for(K)}",
                       "us_per_gemv": round(1e3 * min(ts) / n, 2), "TBps": round(wbytes / (min(ts) * 1e-3) / 1e12, 3)}
                rows.append(row)
                print(json.dumps(row), flush=True)
            del graphs, ws
            torch.cuda.empty_cache()
    write_rows(args.out, rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
