"""The vision attention's last wave on a GPU (kernels/triton_packed_attention.py): the compiled
kernel's registers and shared memory, whole and with pieces; then, for lone images of several sizes
and for 1-6 images of 1024x1024 (Qwen2-VL's ViT: 16 heads, head_dim 80, bf16), what `split_last_wave`
plans, its error against the float32 torch reference, and the time of one layer's attention under
CUDA graphs for: the tree in --before (the kernel before cuts), no cut, the plan, and other pieces.
The variants alternate in --rounds rounds; each figure is the median over them.

    python scripts/gpu_last_wave_probe.py --out /tmp/last_wave.json [--before .before_tree]"""
from __future__ import annotations

import argparse
import importlib.util
import json
import statistics

import torch
import triton
import triton.testing

from vlmserve.kernels import triton_packed_attention as tpk

PATCH = 14 * 2  # Qwen2-VL's patches are 14 pixels, merged 2x2: sides round to 28
# (images, side in pixels)
CASES = ((1, 448), (1, 672), (1, 1024), (2, 1024), (3, 1024), (6, 1024), (1, 1344), (1, 2016))
HEADS, HEAD_DIM = 16, 80


def tokens(side: int) -> int:
    return (round(side / PATCH) * 2) ** 2


def load_before(tree: str):
    spec = importlib.util.spec_from_file_location("tpk_before", f"{tree}/vlmserve/kernels/triton_packed_attention.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def kernel_facts(q, k, v, cu, max_len) -> dict:
    """Registers, spills, shared memory and programs an SM holds, of the image kernel whole and cut."""
    block_m, pair, stages = tpk.default_tiles(max_len, causal=False)
    out = torch.empty_like(q)
    args = (q, k, v, out, cu)
    strides = (q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), out.stride(0),
               out.stride(1))
    meta = dict(DA=64, DB=16, BLOCK_M=block_m, BLOCK_N=64, PREC="tf32", SPLIT_TAIL=True, CAUSAL=False, GROUP=1,
                PAIRED=pair, num_warps=4, num_stages=stages)
    props = torch.cuda.get_device_properties(q.device)
    facts = {"sms": props.multi_processor_count}
    for pieces in (1, 2):
        programs = triton.cdiv(max_len, block_m) * q.shape[1] * (cu.shape[0] - 1)
        c = tpk.compiled_kernel(args, (triton.cdiv(max_len, block_m), q.shape[1], programs), strides, meta, pieces)
        facts[f"pieces{pieces}"] = {"n_regs": c.n_regs, "n_spills": c.n_spills, "shared": c.metadata.shared,
                                    "per_sm": tpk.resident_programs(c.n_regs, c.metadata.shared, 4, props)}
    return facts


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--before", default=None, help="a tree whose kernel to time beside (git archive of the base)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--rep", type=int, default=100, help="ms of replays per figure")
    a = ap.parse_args()
    before = load_before(a.before) if a.before else None
    torch.manual_seed(0)
    result = {"device": torch.cuda.get_device_name(), "cases": []}
    for n, side in CASES:
        L = tokens(side)
        q, k, v = torch.randn(n * L, 3, HEADS, HEAD_DIM, device="cuda", dtype=torch.bfloat16).unbind(1)
        cu_list = list(range(0, n * L + 1, L))
        cu = torch.tensor(cu_list, device="cuda", dtype=torch.int32)
        scale = HEAD_DIM ** -0.5
        if "facts" not in result:
            result["facts"] = kernel_facts(q, k, v, cu, L)
            print(json.dumps(result["facts"]), flush=True)
        slots = result["facts"]["sms"] * result["facts"]["pieces2"]["per_sm"]
        block_m = tpk.default_tiles(L, causal=False)[0]
        programs = triton.cdiv(L, block_m) * HEADS * n
        plan = tpk.split_last_wave(programs, slots, triton.cdiv(L, 64))
        tail = programs % slots if programs >= slots else programs
        variants = {"none": (0, 1), "plan": None}
        for pieces in (2, 3, 4, 6):
            if tail and (tail, pieces) != plan:
                variants[f"{tail}x{pieces}"] = (tail, pieces)
        runs = {name: (lambda ls=ls: tpk.packed_attention(q, k, v, cu, L, scale, last_split=ls))
                for name, ls in variants.items()}
        if before is not None:
            runs["before"] = lambda: before.packed_attention(q, k, v, cu, L, scale)
        case = {"images": n, "side": side, "tokens": L, "programs": programs, "slots": slots, "plan": list(plan),
                "waves": programs / slots}
        whole = runs["none"]()
        got = runs["plan"]()
        if n * L <= 9216:
            ref = tpk.reference_packed_attention(q, k, v, cu_list, scale)
            case["plan_rel_err"] = ((got.float() - ref.float()).norm() / ref.float().norm()).item()
            case["none_rel_err"] = ((whole.float() - ref.float()).norm() / ref.float().norm()).item()
            del ref
        case["plan_vs_none_max_abs"] = (got.float() - whole.float()).abs().max().item()
        if before is not None:
            case["none_equals_before"] = bool(torch.equal(whole, runs["before"]()))
        times = {name: [] for name in runs}
        for _ in range(a.rounds):
            for name, fn in runs.items():
                times[name].append(1e3 * triton.testing.do_bench_cudagraph(fn, rep=a.rep, return_mode="median"))
        case["us"] = {name: round(statistics.median(t), 2) for name, t in times.items()}
        case["us_per_image"] = {name: round(us / n, 2) for name, us in case["us"].items()}
        result["cases"].append(case)
        print(json.dumps(case), flush=True)
    with open(a.out, "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
