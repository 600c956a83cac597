"""Does prefetching the next GEMV's weights into L2 shorten a decode step? A probe on the GPU, outside the engine.

The step is a single-stream decode's chain at a 7B model's shapes (LLaVA-1.5-7B's Llama-2, Qwen2-VL-7B's
Qwen2), in one CUDA graph: per layer RMSNorm, the qkv GEMV, a pause for the attention (the GPU spins
one thread, as a latency-bound attention kernel leaves memory idle), the o GEMV, residual add, RMSNorm, the
gate_up GEMV, SiLU-and-mul, the down GEMV. Variants add bulk L2 prefetches (`prefetch` below) at
points of the chain; every variant measured slower (BENCHMARKS.md, the 2026-12-01 05:00 section), so the
engine has none. A variant is a list of `weight[:MB][!]@site`: after `site` (qkv, o, gu, down: the GEMV
just launched), prefetch `weight` (o, gu, d: this layer's; qkv: the next layer's), its first MB megabytes
(all of it without), with the evict_last hint where `!` is given.

    python scripts/gpu_l2_prefetch_probe.py --out l2_prefetch.json"""
from __future__ import annotations

import argparse
import json
import time

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from gpu_gemv_sweep import SHAPES, time_graph  # noqa: E402  (scripts/ is the first path when run as a script)

CHUNK = 8192
PER_PROG = 32


@triton.jit
def _l2_prefetch_kernel(ptr, nbytes, CHUNK: tl.constexpr, PER_PROG: tl.constexpr, EVICT_LAST: tl.constexpr):
    offs = (tl.program_id(0) * PER_PROG + tl.arange(0, PER_PROG)).to(tl.int64) * CHUNK
    size = tl.minimum(nbytes - offs, CHUNK).to(tl.int32)
    if EVICT_LAST:  # keep these lines over normal ones until read
        tl.inline_asm_elementwise(
            "{ .reg .pred p; .reg .b64 pol; setp.gt.s32 p, $2, 0;"
            " createpolicy.fractional.L2::evict_last.b64 pol, 1.0;"
            " @p cp.async.bulk.prefetch.L2.global.L2::cache_hint [$1], $2, pol; mov.u32 $0, 0; }",
            "=r,l,r", [ptr + offs, size], dtype=tl.int32, is_pure=False, pack=1)
    else:
        tl.inline_asm_elementwise(
            "{ .reg .pred p; setp.gt.s32 p, $2, 0; @p cp.async.bulk.prefetch.L2.global [$1], $2; mov.u32 $0, 0; }",
            "=r,l,r", [ptr + offs, size], dtype=tl.int32, is_pure=False, pack=1)


def prefetch(t: torch.Tensor, nbytes: int | None = None, evict_last: bool = False) -> None:
    """Ask for the first `nbytes` of t's memory (all of it by default) to be brought into L2 (t: a contiguous
    CUDA tensor on an sm_90+ GPU). The kernel issues Hopper's bulk L2 prefetches: each program asks for
    PER_PROG chunks of CHUNK bytes and exits; nothing waits for them, and no value changes."""
    total = t.numel() * t.element_size()
    nbytes = total if nbytes is None else min(nbytes, total)
    nbytes -= nbytes % 16  # bulk copies move whole 16-byte units
    if nbytes <= 0:
        return
    grid = (triton.cdiv(nbytes, CHUNK * PER_PROG),)
    _l2_prefetch_kernel[grid](t.view(torch.uint8) if t.dtype != torch.uint8 else t, nbytes, CHUNK=CHUNK,
                              PER_PROG=PER_PROG, EVICT_LAST=evict_last, num_warps=1)


VARIANTS = ["", "o:0.0001@qkv", "o@qkv", "o!@qkv", "o:16@qkv", "o@qkv,gu:8@qkv", "o@qkv,gu:16@qkv", "o@qkv,gu:8@o",
            "o@qkv,d:8@gu", "o@qkv,qkv:8@down", "o@qkv,gu:8@o,d:8@gu,qkv:8@down", "o!@qkv,gu:8!@o,d:8!@gu,qkv:8!@down"]


def parse(spec: str) -> dict[str, list[tuple[str, int | None, bool]]]:
    sites: dict[str, list[tuple[str, int | None, bool]]] = {}
    for part in filter(None, spec.split(",")):
        what, site = part.split("@")
        evict_last = what.endswith("!")
        what = what.rstrip("!")
        name, _, mb = what.partition(":")
        sites.setdefault(site, []).append((name, int(float(mb) * (1 << 20)) if mb else None, evict_last))
    return sites


def make_layers(shape: str, dtype=torch.bfloat16):
    hidden, q, kv, inter, n = SHAPES[shape]
    g = torch.Generator(device="cuda").manual_seed(0)

    def w(rows, cols):
        return (torch.randn(rows, cols, device="cuda", dtype=dtype, generator=g) * cols ** -0.5).contiguous()

    return [{"qkv": w(q + 2 * kv, hidden), "o": w(hidden, q), "gu": w(2 * inter, hidden), "d": w(hidden, inter),
             "n1": torch.ones(hidden, device="cuda", dtype=dtype), "n2": torch.ones(hidden, device="cuda", dtype=dtype)}
            for _ in range(n)], q, inter


def step(x, layers, q, inter, sites, sleep_cycles):
    def hook(site, i):
        for name, nbytes, evict_last in sites.get(site, ()):
            if name != "qkv":
                prefetch(layers[i][name], nbytes, evict_last)
            elif i + 1 < len(layers):
                prefetch(layers[i + 1]["qkv"], nbytes, evict_last)

    hidden = x.shape[-1]
    for i, L in enumerate(layers):
        h = F.rms_norm(x, (hidden,), L["n1"], 1e-6)
        qkv = F.linear(h, L["qkv"])
        hook("qkv", i)
        if sleep_cycles:
            torch.cuda._sleep(sleep_cycles)
        o = F.linear(qkv[:, :q], L["o"])
        hook("o", i)
        x = x + o
        h = F.rms_norm(x, (hidden,), L["n2"], 1e-6)
        gu = F.linear(h, L["gu"])
        hook("gu", i)
        act = F.silu(gu[:, :inter]) * gu[:, inter:]
        d = F.linear(act, L["d"])
        hook("down", i)
        x = x + d
    return x


def cycles_per_us() -> float:
    torch.cuda.synchronize()
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    torch.cuda._sleep(2_000_000)
    b.record()
    b.synchronize()
    return 2_000_000 / (a.elapsed_time(b) * 1000)


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--out", default="l2_prefetch.json")
    p.add_argument("--shapes", default="llava-1.5-7b,qwen2-vl-7b")
    p.add_argument("--pauses-us", default="0,12", help="the attention's pause per layer, microseconds")
    p.add_argument("--variants", default=";".join(VARIANTS))
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args()
    cpu = cycles_per_us()
    print(f"{torch.cuda.get_device_name()}: {cpu:.0f} sleep cycles per us; L2 "
          f"{torch.cuda.get_device_properties(0).L2_cache_size >> 20} MB")
    rows = []
    for shape in args.shapes.split(","):
        layers, q, inter = make_layers(shape)
        weight_bytes = sum(t.numel() * t.element_size() for L in layers for k, t in L.items() if k not in ("n1", "n2"))
        x = torch.randn(1, layers[0]["o"].shape[0], device="cuda", dtype=torch.bfloat16)
        for pause in (float(s) for s in args.pauses_us.split(",")):
            graphs = {}
            for spec in args.variants.split(";"):
                step(x, layers, q, inter, parse(spec), int(pause * cpu))  # compile, warm
                torch.cuda.synchronize()
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph):
                    y = step(x, layers, q, inter, parse(spec), int(pause * cpu))
                graphs[spec] = (graph, y)
            graphs[""][0].replay()
            torch.cuda.synchronize()
            ref = graphs[""][1].float()
            times: dict[str, list[float]] = {s: [] for s in graphs}
            for _ in range(args.rounds):  # alternate, so drift hits every variant alike
                for spec, (graph, _) in graphs.items():
                    times[spec].append(time_graph(graph))
            base = min(times[""])
            for spec, ts in times.items():
                graphs[spec][0].replay()
                torch.cuda.synchronize()
                same = torch.equal(graphs[spec][1].float(), ref)
                row = {"shape": shape, "pause_us": pause, "variant": spec or "none", "ms": round(min(ts), 4),
                       "ms_all": [round(t, 4) for t in ts], "vs_none": round(min(ts) / base, 4),
                       "weights_TBps": round(weight_bytes / (min(ts) * 1e-3) / 1e12, 3), "same_result": same}
                rows.append(row)
                print(json.dumps(row), flush=True)
            del graphs
        del layers
        torch.cuda.empty_cache()
    with open(args.out, "w") as f:
        json.dump({"device": torch.cuda.get_device_name(),
                   "time": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()), "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
