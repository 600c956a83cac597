"""Where the time of one request goes on the GPU (issue 5): for a --model-shape model with random
weights made on the GPU, one request with one image at batch 1:
- TTFT split: CPU preprocessing (HF's processor and vlmserve's, as the engine runs it), the vision
  tower, and the whole first token, with the GPU's busy time in it, its top kernels and where the
  GPU sits idle in it;
- single-stream decode: wall time per step against the GPU's busy time per step (kernel time from
  the torch profiler), i.e. how much host work does not overlap, and the kernels that take it.

    python scripts/gpu_profile.py --model-shape llava-1.5-7b --image-size 336x336 --out profile.json"""
from __future__ import annotations

import argparse
import cProfile
import json
import os
import pstats
import statistics
import tempfile
import time

import torch
from torch.profiler import ProfilerActivity, profile

from vlmserve import LLM, SamplingParams
from vlmserve.benchmarks import throughput as tp
from vlmserve.benchmarks.gpu_models import write_model_dir


CUDA = torch.cuda.is_available()
DEV = "cuda" if CUDA else "cpu"
BURN_N = 4096  # the matmuls that keep the GPU busy before a warm TTFT


def sync():
    if CUDA:
        torch.cuda.synchronize()


def ms(fn, n=5):
    out = []
    for _ in range(n):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        out.append(1e3 * (time.perf_counter() - t0))
    return statistics.median(out)


def kernel_table(prof, steps: int, top: int = 12) -> tuple[float, list[dict]]:
    """Total GPU kernel time per step (ms) and the top kernels."""
    rows = []
    for e in prof.key_averages():
        t = getattr(e, "device_time_total", None) or getattr(e, "cuda_time_total", 0)
        if t and e.device_type == torch.autograd.DeviceType.CUDA:
            rows.append({"kernel": e.key[:90], "calls_per_step": e.count / steps, "ms_per_step": t / 1e3 / steps})
    rows.sort(key=lambda r: -r["ms_per_step"])
    return sum(r["ms_per_step"] for r in rows), rows[:top]


def _kernel_gaps(prof) -> tuple[list, list, float]:
    """The profile's GPU events in start order, the idle gaps between them, largest first, as (length,
    start, the event before, the event after) in us, and the end of the last event."""
    cuda = torch.autograd.DeviceType.CUDA
    kernels = sorted((e for e in prof.events() if e.device_type == cuda), key=lambda e: e.time_range.start)
    if not kernels:
        return [], [], 0.0
    gaps, end, prev = [], kernels[0].time_range.end, kernels[0]
    for e in kernels[1:]:
        if e.time_range.start > end:
            gaps.append((e.time_range.start - end, end, prev, e))
        if e.time_range.end > end:
            end, prev = e.time_range.end, e
    gaps.sort(key=lambda g: -g[0])
    return kernels, gaps, end


def gpu_timeline(prof, top: int = 8) -> dict:
    """Where the GPU sits idle in one profiled request: from the first host event to the first
    kernel, the largest gaps between kernels (with the kernels around them and the host ops that
    span them), and from the last kernel to the last host event."""
    kernels, gaps, end = _kernel_gaps(prof)
    host = [e for e in prof.events() if e.device_type != torch.autograd.DeviceType.CUDA]
    if not kernels or not host:
        return {}

    def spanning(t0, t1):  # the innermost host ops running through the whole gap
        ops = [h for h in host if h.time_range.start <= t0 and h.time_range.end >= t1]
        ops.sort(key=lambda h: h.time_range.end - h.time_range.start)
        return [h.name[:60] for h in ops[:3]]

    return {
        "host_to_first_kernel_ms": (kernels[0].time_range.start - min(h.time_range.start for h in host)) / 1e3,
        "last_kernel_to_host_end_ms": (max(h.time_range.end for h in host) - end) / 1e3,
        "kernel_span_ms": (end - kernels[0].time_range.start) / 1e3,
        "idle_in_span_ms": sum(g[0] for g in gaps) / 1e3,
        "largest_gaps": [{"ms": g / 1e3, "at_ms": (t - kernels[0].time_range.start) / 1e3, "after": a.name[:60],
                          "before": b.name[:60], "host_ops": spanning(t, t + g)}
                         for g, t, a, b in gaps[:top]],
    }


def gap_host_events(prof, top: int = 6, min_gap_ms: float = 1.0, window_ms: float = 3.0) -> list[dict]:
    """For the largest idle gaps between kernels (at least min_gap_ms): the host events (aten ops and CUDA runtime
    calls) that overlap the gap (20 us or longer, or a copy, sync or allocation), and the last ten that ended in
    the window_ms before it, in time order, their starts relative to the gap's; a runtime call through the gap (a
    copy, a sync) is where the host was held, none at all: Python work."""
    gaps = [g for g in _kernel_gaps(prof)[1] if g[0] >= min_gap_ms * 1e3]
    host = sorted((e for e in prof.events() if e.device_type != torch.autograd.DeviceType.CUDA),
                  key=lambda e: e.time_range.start)
    held = ("cudaStream", "cudaEvent", "cudaMemcpy", "cudaDevice", "cudaHost", "cudaMalloc", "cudaFree")

    def rows(evs, t0):
        return [{"name": h.name[:48], "start_ms": round((h.time_range.start - t0) / 1e3, 3),
                 "ms": round((h.time_range.end - h.time_range.start) / 1e3, 3)} for h in evs]

    out = []
    for g, t0, before, after in gaps[:top]:
        t1 = t0 + g
        inside = [h for h in host if h.time_range.end >= t0 and h.time_range.start <= t1
                  and (h.time_range.end - h.time_range.start >= 20 or h.name.startswith(held))]
        lead = [h for h in host if t0 - window_ms * 1e3 <= h.time_range.end < t0]
        out.append({"gap_ms": g / 1e3, "kernel_before": before.name[:50], "kernel_after": after.name[:50],
                    "host_in_gap": rows(inside[:30], t0), "host_before_gap": rows(lead[-10:], t0)})
    return out


def launch_leads(prof) -> dict:
    """How far ahead of the GPU the host queues work: for each kernel and copy, the time from its launch call's
    start on the host to its start on the GPU (percentiles, ms), and the host's time in each CUDA runtime or driver
    call (count, total, longest): a launch that blocks (a full queue) shows as a long call. From the profiler's
    trace, whose events pair a call with its kernel by correlation id."""
    fd, path = tempfile.mkstemp(suffix=".json")
    os.close(fd)
    try:
        prof.export_chrome_trace(path)
        with open(path) as f:
            events = json.load(f).get("traceEvents", [])
    finally:
        os.unlink(path)
    calls, device = {}, []
    by_api: dict = {}
    for e in events:
        cat, corr = e.get("cat", ""), (e.get("args") or {}).get("correlation")
        if cat in ("cuda_runtime", "cuda_driver"):
            if corr is not None:
                calls[corr] = e
            a = by_api.setdefault(e["name"], [0, 0.0, 0.0])
            a[0] += 1
            a[1] += e.get("dur", 0) / 1e3
            a[2] = max(a[2], e.get("dur", 0) / 1e3)
        elif cat in ("kernel", "gpu_memcpy", "gpu_memset") and corr is not None:
            device.append(e)
    leads = sorted((e["ts"] - calls[e["args"]["correlation"]]["ts"]) / 1e3 for e in device
                   if e["args"]["correlation"] in calls)
    if not leads:
        return {}

    def pct(q):
        return round(leads[min(len(leads) - 1, int(q * len(leads)))], 3)

    ops = sorted((e for e in events if e.get("cat") == "cpu_op"), key=lambda e: -e.get("dur", 0))[:15]
    lazy = [e for e in events if "Lazy" in e.get("name", "")]
    device.sort(key=lambda e: e["ts"])
    tail = [e for e in device[-12:] if e["args"]["correlation"] in calls]
    return {"n": len(leads), "lead_ms_p10_p50_p90_max": [pct(0.1), pct(0.5), pct(0.9), round(leads[-1], 3)],
            "last_kernels_lead_ms": [(e["name"][:40], round((e["ts"] - calls[e["args"]["correlation"]]["ts"]) / 1e3,
                                                            3)) for e in tail],
            "longest_cpu_ops": [(e["name"][:40], round(e.get("dur", 0) / 1e3, 3)) for e in ops],
            "lazy_loading": [len(lazy), round(sum(e.get("dur", 0) for e in lazy) / 1e3, 3)],
            "host_calls": sorted(([k, v[0], round(v[1], 3), round(v[2], 3)] for k, v in by_api.items()),
                                 key=lambda r: -r[2])[:12]}


def encoder_graph_check(model, graphs, pixels: torch.Tensor) -> dict:
    """The vision tower's CUDA graphs against eager on fresh random images (1 image; 3 in the
    4-image bucket): relative error ||graph - eager|| / ||eager||, and the time of each for 1 image."""
    out = {}
    with torch.inference_mode():
        for n in (1, 3):
            x = torch.randn((n, *pixels.shape), device=DEV, dtype=pixels.dtype)
            ref = model.encode_images(x).double()
            got = graphs(x).double()
            err = float((got - ref).norm() / ref.norm()) if not got.isnan().any() else float("nan")
            out[f"encoder_graph_rel_err_{n}"] = err
        out["encoder_graph_ok"] = all(out[f"encoder_graph_rel_err_{n}"] < 1e-2 for n in (1, 3))
        x = pixels[None]
        out["encoder_eager_ms"] = ms(lambda: model.encode_images(x), 10)
        out["encoder_graph_ms"] = ms(lambda: graphs(x), 10)
    out["encoder_graphs_captured"] = [str(k) for k in graphs.graphs]
    return out


def warm_ttft(llm, engine, inputs, params) -> dict:
    """TTFT with the GPU busy right before each request (~50 ms of matmuls, then a sync), as under
    load, against an idle GPU whose clocks must first ramp up; and where the time goes: from the
    call to the first engine step (tokenizing, preprocessing, queueing), the step itself."""
    a = torch.randn(BURN_N, BURN_N, device=DEV, dtype=torch.bfloat16) if CUDA else None
    runner = engine.runner
    launch = runner.launch
    marks: list[float] = []

    def traced(*args, **kw):  # the step from its launch to its results on the host
        marks.append(time.perf_counter())
        out = launch(*args, **kw)
        marks.append(time.perf_counter())  # the host has queued the step
        if out.done is not None:
            out.done.synchronize()
        marks.append(time.perf_counter())
        return out

    def burn():  # ~50 ms of matmuls, then a sync: the clocks are up, the queue is empty
        if a is None:
            return
        t_end = time.perf_counter() + 0.05
        while time.perf_counter() < t_end:
            for _ in range(20):
                a @ a
            sync()

    runner.launch = traced
    ttft, before, queue, wait, after = [], [], [], [], []
    try:
        for x in inputs:
            x = {**x, "multi_modal_data": {"image": x["multi_modal_data"]["image"].transpose(0)}}  # a new image
            burn()
            marks.clear()
            t0 = time.perf_counter()
            llm.generate(x, params, use_tqdm=False)
            t1 = time.perf_counter()
            ttft.append(1e3 * (t1 - t0))
            before.append(1e3 * (marks[0] - t0))
            queue.append(1e3 * (marks[1] - marks[0]))
            wait.append(1e3 * (marks[2] - marks[1]))
            after.append(1e3 * (t1 - marks[2]))
        # the host's functions over the same requests again, under cProfile (which slows the host)
        prof = cProfile.Profile()
        for x in inputs:
            x = {**x, "multi_modal_data": {"image": x["multi_modal_data"]["image"].transpose(1)}}
            burn()
            prof.enable()
            llm.generate(x, params, use_tqdm=False)
            prof.disable()
    finally:
        runner.launch = launch
    stats = pstats.Stats(prof)
    rows = [{"function": f"{f[0].split('/')[-1]}:{f[1]}:{f[2]}", "calls": v[1],
             "tottime_ms_per_request": 1e3 * v[2] / len(inputs), "cumtime_ms_per_request": 1e3 * v[3] / len(inputs)}
            for f, v in stats.stats.items()]
    return {"ttft_warm_ms": statistics.median(ttft), "ttft_warm_all_ms": ttft,
            "ttft_warm_before_step_ms": statistics.median(before), "ttft_warm_step_ms":
            statistics.median([q + w for q, w in zip(queue, wait)]),
            "ttft_warm_step_queue_ms": statistics.median(queue), "ttft_warm_step_wait_ms": statistics.median(wait),
            "ttft_warm_after_step_ms": statistics.median(after),
            "ttft_host_top_cumtime": sorted(rows, key=lambda r: -r["cumtime_ms_per_request"])[:40],
            "ttft_host_top_tottime": sorted(rows, key=lambda r: -r["tottime_ms_per_request"])[:25]}


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--model-shape", default="llava-1.5-7b")
    p.add_argument("--image-size", default="336x336")
    p.add_argument("--input-len", type=int, default=32)
    p.add_argument("--decode-steps", type=int, default=32)
    p.add_argument("--out", default="profile.json")
    args = p.parse_args()
    res: dict = {"model_shape": args.model_shape, "image_size": args.image_size, "device": torch.cuda.get_device_name() if CUDA else "cpu"}
    with tempfile.TemporaryDirectory() as d:
        write_model_dir(d, args.model_shape)
        prompts = tp.make_mm_prompts(d, 9, args.input_len, 1, args.image_size)
        max_len = max(len(x["ids"]) for x in prompts) + args.decode_steps + 8
        llm = LLM(d, dtype="bfloat16" if CUDA else "float32", max_model_len=max_len, max_num_seqs=1, load_format="dummy")
        engine = llm.llm_engine
        inputs = [{"prompt": x["prompt"], "multi_modal_data": {"image": x["image"]}} for x in prompts]
        prompts_extra = inputs[8:]
        one = SamplingParams(temperature=0, max_tokens=1, ignore_eos=True)
        many = SamplingParams(temperature=0, max_tokens=args.decode_steps + 1, ignore_eos=True)
        llm.generate(inputs[:2], many, use_tqdm=False)  # warm-up: compiles, captures graphs

        # -- TTFT split
        ids = engine.tokenizer(prompts[0]["prompt"]).input_ids
        image = prompts[0]["image"]
        proc = engine.mm_processor
        hf_proc = getattr(proc, "image_processor", None)
        res["hf_image_processor"] = f"{type(hf_proc).__name__} ({getattr(hf_proc, 'backend', '?')})"
        res["preprocess_engine_ms"] = ms(lambda: engine.process_multimodal(ids, {"image": image}))
        res["preprocess_hf_ms"] = ms(lambda: hf_proc(images=[image], return_tensors="pt"))
        _, items = engine.process_multimodal(ids, {"image": image})
        data = [{k: v.to(DEV) for k, v in items[0].data.items()}]
        with torch.inference_mode():
            res["vision_tower_ms"] = ms(lambda: engine.runner.model.embed_multimodal("image", data))
        graphs = getattr(engine.runner.model, "image_encoder", None)
        if graphs is not None:  # the tower's CUDA graphs (issue 5) against eager
            res.update(encoder_graph_check(engine.runner.model, graphs, data[0]["pixel_values"]))
        ttft = []
        for x in inputs[2:7]:  # new images each time: no encoder or prefix cache hits
            sync()
            t0 = time.perf_counter()
            llm.generate(x, one, use_tqdm=False)
            ttft.append(1e3 * (time.perf_counter() - t0))
        res["ttft_ms"] = statistics.median(ttft)
        res["ttft_all_ms"] = ttft
        res.update(warm_ttft(llm, engine, inputs[2:7], one))
        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if CUDA else [])
        with profile(activities=acts) as prof:  # one more new request: GPU busy time and its kernels
            llm.generate(prompts_extra[0], one, use_tqdm=False)
            sync()
        res["ttft_gpu_busy_ms"], res["ttft_top_kernels"] = kernel_table(prof, 1, top=40)
        res["ttft_gpu_timeline"] = gpu_timeline(prof)

        # -- single-stream decode: wall per step vs GPU busy per step
        n = args.decode_steps
        t0 = time.perf_counter()
        llm.generate(inputs[7], one, use_tqdm=False)
        first = time.perf_counter() - t0
        with profile(activities=acts) as prof:
            sync()
            t0 = time.perf_counter()
            llm.generate(inputs[7], many, use_tqdm=False)
            sync()
            total = time.perf_counter() - t0
        # the prefix cache serves the prompt now: the run is (almost) only decode steps
        res["decode_wall_ms_per_step"] = 1e3 * total / n
        busy, top = kernel_table(prof, n, top=30)
        res["decode_gpu_busy_ms_per_step"] = busy
        res["decode_host_gap_ms_per_step"] = res["decode_wall_ms_per_step"] - busy  # host work not overlapped
        res["decode_top_kernels"] = top
        res["first_request_s"] = first
        res["cuda_graphs"] = engine.runner.decode_graphs is not None
    with open(args.out, "w") as f:
        json.dump(res, f, indent=2)
    print(json.dumps({k: v for k, v in res.items() if "_top_" not in k and k != "ttft_gpu_timeline"}, indent=1))
    print("ttft_gpu_timeline", json.dumps(res.get("ttft_gpu_timeline"), indent=1))
    for key in ("ttft_top_kernels", "decode_top_kernels"):
        print(key)
        for r in res[key]:
            print(f"  {r['ms_per_step']:7.3f} ms/step  x{r['calls_per_step']:6.1f}  {r['kernel']}")
    for key in ("ttft_host_top_cumtime", "ttft_host_top_tottime"):
        print(key, "(ms per request, under cProfile)")
        for r in res.get(key, []):
            print(f"  cum {r['cumtime_ms_per_request']:7.3f}  own {r['tottime_ms_per_request']:7.3f}  "
                  f"x{r['calls']:<5} {r['function']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
