"""Times the CPU kernels (per call, CPU time of one thread, median of repeats): the fused
elementwise ops against the torch code they replace, the paged decode-attention kernel against the
same kernel at an earlier git revision (--baseline-rev), and oneDNN's linear against F.linear.

    python scripts/cpu_kernels_bench.py --baseline-rev 5c21ab0"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import tempfile
import time

import torch
import torch.nn.functional as F

from vlmserve.kernels import fused_cpu as fc
from vlmserve.kernels import paged_attention_cpu as pa
from vlmserve.kernels.cpu_build import _CSRC


def cpu_ms(fn, reps: int = 5, calls: int = 10) -> float:
    fn()
    times = []
    for _ in range(reps):
        t = time.process_time()
        for _ in range(calls):
            fn()
        times.append((time.process_time() - t) / calls * 1e3)
    return statistics.median(times)


def baseline_decode_kernel(rev: str):
    """The decode kernel's source at `rev`, built beside the current one."""
    from torch.utils.cpp_extension import load

    d = tempfile.mkdtemp()
    root = subprocess.run(["git", "rev-parse", "--show-toplevel"], capture_output=True, text=True,
                          cwd=os.path.dirname(__file__)).stdout.strip()
    for name in ("paged_decode_cpu.cpp", "vexp.h"):
        rel = os.path.relpath(os.path.join(_CSRC, name), root)
        src = subprocess.run(["git", "show", f"{rev}:{rel}"], capture_output=True, text=True, cwd=root)
        if src.returncode == 0:
            with open(os.path.join(d, name), "w") as f:
                f.write(src.stdout)
    return load(name=f"baseline_paged_decode_{rev}", sources=[os.path.join(d, "paged_decode_cpu.cpp")],
                extra_cflags=["-O3", "-march=native", "-fopenmp", "-fno-math-errno", "-fno-trapping-math"],
                extra_ldflags=["-fopenmp"])


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--baseline-rev", default=None, help="git revision of the decode kernel to compare with")
    args = p.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    rows = []
    with torch.inference_mode():
        T, H, inter = 4096, 512, 1376
        x, r, w = torch.randn(T, H), torch.randn(T, H), torch.randn(H)
        rows.append(("add + RMSNorm [4096 x 512]", cpu_ms(lambda: fc.add_rms_norm(x, r, w, 1e-6)),
                     cpu_ms(lambda: fc.reference_rms_norm(x + r, w, 1e-6))))
        qkv = torch.randn(T, 3 * H)
        q, cos, sin = qkv[:, :H].view(T, 8, 64), torch.randn(T, 1, 64), torch.randn(T, 1, 64)
        rows.append(("rotary q [4096 x 8 x 64]", cpu_ms(lambda: fc.rotary_(q, cos, sin)),
                     cpu_ms(lambda: fc.reference_rotary(q, cos, sin))))
        g = torch.randn(T, 2 * inter)
        rows.append(("SiLU-and-mul [4096 x 2752]", cpu_ms(lambda: fc.silu_and_mul(g)),
                     cpu_ms(lambda: fc.reference_silu_and_mul(g))))
        print("| op | kernel ms | torch ms |\n|---|---|---|")
        for name, a, b in rows:
            print(f"| {name} | {a:.2f} | {b:.2f} |")

        B, Hkv, D, bs, L = 256, 8, 64, 16, 192
        nb, NB = L // bs, B * (L // bs) + 10
        kc, vc = torch.randn(NB, bs, Hkv, D), torch.randn(NB, bs, Hkv, D)
        tables = torch.randperm(NB)[:B * nb].view(B, nb)
        lens = torch.randint(L - 40, L + 1, (B,))
        qd = torch.randn(B, 8, D)
        call = lambda m: (lambda: m.paged_decode_attention(qd, kc, vc, tables, lens, 0.125, 0))  # noqa: E731
        cur = cpu_ms(call(pa._load()))
        line = f"\ndecode attention, 256 sequences x ~172 tokens, 8 heads of 64, fp32: {cur:.2f} ms"
        if args.baseline_rev:
            line += f" (at {args.baseline_rev}: {cpu_ms(call(baseline_decode_kernel(args.baseline_rev))):.2f} ms)"
        print(line)

        print("\n| linear [M x K] x [K x N] | oneDNN GFLOP/s | F.linear GFLOP/s |\n|---|---|---|")
        for M, K, N in ((256, 512, 2752), (8192, 512, 1536), (8192, 1376, 512)):
            a, wt = torch.randn(M, K), torch.randn(N, K)
            flop = 2 * M * K * N / 1e6
            one = cpu_ms(lambda: torch.ops.mkldnn._linear_pointwise(a, wt, None, "none", [], ""), 3, 3)
            print(f"| {M} x {K} x {N} | {flop / one:.1f} | {flop / cpu_ms(lambda: F.linear(a, wt), 3, 3):.1f} |")


if __name__ == "__main__":
    main()
