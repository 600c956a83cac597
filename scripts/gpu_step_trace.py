"""Where the time of an offline throughput run goes, step by step (issue 5): the workload of
`vlmserve bench throughput` (a --model-shape model with random weights made on the GPU, one random
image + --input-len text tokens per request, --output-len tokens out), run through `LLM.generate`
with every engine step timed on the host, async scheduling off (a step ends with the sampler's copy to
the host, so its wall time is its GPU time plus the host work that does not overlap it). Prints and writes (--out):
- decode-only steps: how many, their total time, and per batch size their median time against the
  step's own memory floor (the language model's weights plus the KV cache of the batch, read once
  at the measured copy bandwidth);
- steps with prefill: their total time, the prefill tokens and images in them, and the rate of
  matrix work they reach (the weight FLOPs of the tokens and the vision tower, attention left out);
- the host time between steps (scheduling, output processing);
- the GPU kernels of --profile-steps full-batch decode steps (torch profiler).

    python scripts/gpu_step_trace.py --model-shape llava-1.5-7b --image-size 336x336 --num-prompts 500"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time

import torch
from torch.profiler import ProfilerActivity, profile

from gpu_profile import kernel_table  # noqa: E402  (scripts/ is on the path when this runs as a script)
from vlmserve import LLM, SamplingParams
from vlmserve.benchmarks import throughput as tp
from vlmserve.benchmarks.gpu_models import write_model_dir

VISION_PARTS = ("vision_tower", "visual", "multi_modal_projector")  # LLaVA's and Qwen2-VL's parameter names


def copy_bandwidth() -> float:
    """Bytes per second of a 1 GiB device copy, read plus write (the ceiling decode is held to)."""
    import triton

    a = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    ms = triton.testing.do_bench(lambda: b.copy_(a), return_mode="median")
    return 2 * a.numel() / ms * 1e3


def weight_split(model) -> tuple[int, int, int]:
    """(bytes an LM decode step reads: every LM weight but the input embeddings; LM parameters
    without embeddings; vision parameters)."""
    lm_bytes = lm_params = vision = 0
    for name, p in model.named_parameters():
        if any(part in name for part in VISION_PARTS):
            vision += p.numel()
        elif "embed_tokens" not in name:
            lm_bytes += p.numel() * p.element_size()
            lm_params += p.numel()
    return lm_bytes, lm_params, vision


def workload_args(p: argparse.ArgumentParser, num_prompts: int) -> None:
    """The options of the `bench throughput` workload (shared with gpu_async_trace.py)."""
    p.add_argument("--model-shape", default="llava-1.5-7b")
    p.add_argument("--image-size", default="336x336")
    p.add_argument("--input-len", type=int, default=32)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--num-prompts", type=int, default=num_prompts)
    p.add_argument("--max-num-seqs", type=int, default=128)


def make_workload(args, model_dir: str, **llm_kwargs):
    """A random-weight model of args.model_shape in model_dir, its engine and the requests, warmed
    up on the first 8: -> (llm, the other requests, their sampling params)."""
    write_model_dir(model_dir, args.model_shape)
    prompts = tp.make_mm_prompts(model_dir, args.num_prompts + 8, args.input_len, 0, args.image_size)
    max_len = max(len(tp.prompt_ids(x)) for x in prompts) + args.output_len
    llm = LLM(model_dir, dtype="bfloat16", max_model_len=max_len, max_num_seqs=args.max_num_seqs,
              load_format="dummy", **llm_kwargs)
    inputs = [{"prompt": x["prompt"], "multi_modal_data": {"image": x["image"]}} for x in prompts]
    llm.generate(inputs[:8], SamplingParams(temperature=0, max_tokens=8, ignore_eos=True), use_tqdm=False)
    return llm, inputs[8:], SamplingParams(temperature=0, max_tokens=args.output_len, ignore_eos=True)


def main() -> int:
    p = argparse.ArgumentParser()
    workload_args(p, num_prompts=500)
    p.add_argument("--profile-steps", type=int, default=4)
    p.add_argument("--profile-prefill-step", type=int, default=12, help="profile the prefill step of this index")
    p.add_argument("--top-kernels", type=int, default=15, help="rows of each kernel table")
    p.add_argument("--out", default="step_trace.json")
    args = p.parse_args()
    bw = copy_bandwidth()
    with tempfile.TemporaryDirectory() as d:
        # steps one at a time (no async scheduling), so that each step's wall time is its own
        llm, inputs, sp = make_workload(args, d, async_scheduling=False)
        runner = llm.llm_engine.runner
        lm_bytes, lm_params, vision_params = weight_split(runner.model)
        kv_per_token = runner.kv_bytes_per_block() / runner.block_size

        steps: list[dict] = []
        launch = runner.launch
        prof_box: dict = {}
        acts = [ProfilerActivity.CPU, ProfilerActivity.CUDA]

        def traced(sched, *a, **k):
            nd = sum(1 for s in sched.scheduled if s.num_new_tokens == 1)
            full = nd == len(sched.scheduled) == args.max_num_seqs
            if full and "prof" not in prof_box and sum(1 for s in steps if s["full_decode"]) >= 16:
                prof_box["prof"] = profile(activities=acts)
                prof_box["prof"].start()
                prof_box["left"] = args.profile_steps
            prefill_now = nd < len(sched.scheduled)
            if prefill_now and "prefill_prof" not in prof_box and \
                    sum(1 for s in steps if s["prefill_tokens"]) == args.profile_prefill_step:
                prof_box["prefill_prof"] = profile(activities=acts)
                prof_box["prefill_prof"].start()
            enc0 = runner.encoder_cache.num_encoded_items
            t0 = time.perf_counter()
            out = launch(sched, *a, **k)
            if out.done is not None:
                out.done.synchronize()
            t1 = time.perf_counter()
            if prefill_now and "prefill_prof" in prof_box and "prefill_wall" not in prof_box:
                prof_box["prefill_prof"].stop()
                prof_box["prefill_wall"] = t1 - t0
            if prof_box.get("left"):
                prof_box["left"] -= 1
                if prof_box["left"] == 0:
                    prof_box["prof"].stop()
            steps.append({"t0": t0, "t1": t1, "decodes": nd, "full_decode": full,
                          "prefill_tokens": sum(s.num_new_tokens for s in sched.scheduled if s.num_new_tokens != 1),
                          "context": sum(s.seq.num_computed_tokens + s.num_new_tokens for s in sched.scheduled
                                         if s.num_new_tokens == 1),
                          "images": runner.encoder_cache.num_encoded_items - enc0})
            return out

        runner.launch = traced
        t0 = time.perf_counter()
        llm.generate(inputs, sp, use_tqdm=False)
        elapsed = time.perf_counter() - t0
        runner.launch = launch

    walls = [s["t1"] - s["t0"] for s in steps]
    gaps = [b["t0"] - a["t1"] for a, b in zip(steps, steps[1:])]
    dec = [(s, w) for s, w in zip(steps, walls) if s["prefill_tokens"] == 0]
    pre = [(s, w) for s, w in zip(steps, walls) if s["prefill_tokens"] > 0]
    floor = lambda s: (lm_bytes + s["context"] * kv_per_token) / bw  # noqa: E731
    by_batch: dict[int, list] = {}
    for s, w in dec:
        by_batch.setdefault(s["decodes"] // 16 * 16, []).append((w, floor(s)))
    res = {
        "model_shape": args.model_shape, "image_size": args.image_size, "num_prompts": args.num_prompts,
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu", "copy_tbps": bw / 1e12, "lm_weight_gb": lm_bytes / 1e9,
        "kv_mb_per_token": kv_per_token / 1e6, "elapsed_s": elapsed, "req_per_s": args.num_prompts / elapsed,
        "steps": len(steps), "step_wall_sum_s": sum(walls), "host_gap_sum_s": sum(gaps),
        "decode_steps": len(dec), "decode_s": sum(w for _, w in dec),
        "decode_floor_s": sum(floor(s) for s, _ in dec),
        "decode_by_batch": {b: {"steps": len(v), "median_ms": 1e3 * statistics.median(w for w, _ in v),
                                "median_floor_ms": 1e3 * statistics.median(f for _, f in v)}
                            for b, v in sorted(by_batch.items())},
        "prefill_steps": len(pre), "prefill_s": sum(w for _, w in pre),
        "prefill_tokens": sum(s["prefill_tokens"] for s, _ in pre), "images": sum(s["images"] for s, _ in pre),
        "decodes_in_prefill_steps": sum(s["decodes"] for s, _ in pre),
        "gap_median_ms": 1e3 * statistics.median(gaps) if gaps else None,
    }
    # matrix work of the prefill steps: 2 FLOPs per weight per token (LM), per patch token (vision)
    pf = 2 * lm_params * res["prefill_tokens"] + 2 * vision_params * res["images"] * tp_patches(args)
    res["prefill_weight_tflops_per_s"] = pf / res["prefill_s"] / 1e12 if res["prefill_s"] else None
    for key, name, n in (("prof", "full_decode", args.profile_steps), ("prefill_prof", "prefill_step", 1)):
        prof = prof_box.get(key)
        if prof is None:
            continue
        res[f"{name}_gpu_busy_ms"], res[f"{name}_top_kernels"] = kernel_table(prof, n, top=args.top_kernels)
        res[f"{name}_top_cpu_ops"] = cpu_table(prof, n, top=15)
    if "prefill_wall" in prof_box:
        res["prefill_step_wall_ms"] = 1e3 * prof_box["prefill_wall"]
    res["triton_variants"] = compiled_variants()
    slow = sorted(range(len(steps)), key=lambda i: -walls[i])[:12]
    res["slowest_steps"] = [{**{k: v for k, v in steps[i].items() if k not in ("t0", "t1")}, "index": i,
                             "wall_ms": 1e3 * walls[i]} for i in sorted(slow)]
    res["step_records"] = [[round(1e3 * w, 2), s["decodes"], s["prefill_tokens"], s["images"]]
                           for s, w in zip(steps, walls)]
    with open(args.out, "w") as f:
        json.dump(res, f, indent=1)
    print(json.dumps({k: v for k, v in res.items() if not k.endswith(("top_kernels", "top_cpu_ops")) and k != "step_records"},
                     indent=1))
    for key in ("full_decode_top_kernels", "prefill_step_top_kernels", "full_decode_top_cpu_ops",
                "prefill_step_top_cpu_ops"):
        print(key)
        for r in res.get(key, []):
            print(f"  {r['ms_per_step']:7.3f} ms/step  x{r['calls_per_step']:6.1f}  {r['kernel']}")
    return 0


def cpu_table(prof, steps: int, top: int = 15) -> list[dict]:
    """The host's time per step by op (self time, ms): what a step spends outside the GPU's work
    (plan building, compiles, allocations) shows here."""
    rows = [{"kernel": e.key[:90], "calls_per_step": e.count / steps, "ms_per_step": e.self_cpu_time_total / 1e3 / steps}
            for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CPU and e.self_cpu_time_total]
    rows.sort(key=lambda r: -r["ms_per_step"])
    return rows[:top]


def compiled_variants() -> dict:
    """How many specializations of each Triton kernel were compiled in this process."""
    from vlmserve.kernels import triton_fused, triton_packed_attention, triton_paged_attention

    out = {}
    for mod in (triton_paged_attention, triton_fused, triton_packed_attention):
        for name in dir(mod):
            fn = getattr(mod, name)
            caches = getattr(fn, "device_caches", None)
            if caches:
                try:
                    out[name] = sum(len(c[0]) for c in caches.values())
                except Exception:  # another Triton's layout
                    pass
    return out


def tp_patches(args) -> int:
    """Vision tokens per image of the shapes this script knows (CLIP-L/14-336: 577; Qwen2-VL: the
    14x14 patches of the smart-resized image)."""
    if args.model_shape.startswith("llava"):
        return 577
    w, h = (int(x) for x in args.image_size.split("x"))
    return (round(w / 28) * 2) * (round(h / 28) * 2)


if __name__ == "__main__":
    raise SystemExit(main())
