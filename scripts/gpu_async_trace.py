"""Where the host's time goes in an offline throughput run with async scheduling (issue 5): the
workload of `vlmserve bench throughput` through `LLM.generate`, with the runner's `launch` (host
work that queues a step) and `collect` (the wait for the step before it) timed, and every place
where launching made the host wait for the device (torch's sync debug mode) counted.
--step-gaps: CUDA events around each launch, on the step's stream, give where the device waited for the
host in the run itself: the gap between one step's last queued work and the next step's first, and
the time from the run's start to its first step (an event completes only once the work queued
before it has, so a gap is time the stream had nothing to run); and the launches in which the caching
allocator went to the driver (cudaMalloc, cudaFree, retries: a cudaFree waits for the device).

If the device never idles, the run's time is the waits plus the host work that overlaps them; a
launch that syncs turns that step's host work into device idle time. --profile-decode N profiles N
decode steps from the --profile-after'th on (the full batch, async as in the run): the GPU's busy
time per step, where it idles between kernels and what the host is doing then. --profile-launches A:N profiles
launches A..A+N-1 of any kind (prefill steps included) and lists, for the largest idle gaps of the GPU, the host's
aten ops and CUDA runtime calls around them.

    python scripts/gpu_async_trace.py --model-shape llava-1.5-7b --image-size 336x336 --num-prompts 300"""
from __future__ import annotations

import argparse
import collections
import gc
import json
import tempfile
import time

import torch
from torch.profiler import ProfilerActivity, profile

from gpu_profile import (gap_host_events, gpu_timeline, kernel_table,  # noqa: E402  (scripts/: the path)
                         launch_leads)
from gpu_step_trace import make_workload, workload_args  # noqa: E402
from vlmserve.testing.sync_watch import sync_sites


def step_gaps(run_start, events) -> dict:
    """Device time by step kind: spans (first to last queued work of a step, idle inside it
    included) and gaps before each step (the stream idle, waiting for the host), in seconds."""
    out: dict = {"before_first_step_s": run_start.elapsed_time(events[0][1]) / 1e3}
    gaps = []
    for i, (kind, start, end) in enumerate(events):
        span = start.elapsed_time(end) / 1e3
        out[f"{kind} spans s"] = out.get(f"{kind} spans s", 0.0) + span
        if i:
            gap = events[i - 1][2].elapsed_time(start) / 1e3
            out[f"gaps before {kind} s"] = out.get(f"gaps before {kind} s", 0.0) + gap
            gaps.append((gap, i, kind))
    out["largest_gaps"] = [{"s": g, "step": i, "kind": k} for g, i, k in sorted(gaps, reverse=True)[:12]]
    out["first_to_last_s"] = events[0][1].elapsed_time(events[-1][2]) / 1e3
    return out


def main() -> int:
    p = argparse.ArgumentParser()
    workload_args(p, num_prompts=300)
    p.add_argument("--watch-syncs", type=int, default=1, help="0: time only (the watch costs host time)")
    p.add_argument("--profile-decode", type=int, default=0, help="decode steps to profile (0: none)")
    p.add_argument("--profile-after", type=int, default=40, help="decode steps before the profiled ones")
    p.add_argument("--profile-launches", default="", help="A:N: profile launches A..A+N-1 (any kind)")
    p.add_argument("--step-gaps", type=int, default=0, help="1: events around each launch (device idle)")
    p.add_argument("--out", default="async_trace.json")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as d:
        llm, inputs, sp = make_workload(args, d)
        engine, runner = llm.llm_engine, llm.llm_engine.runner

        launch, collect = runner.launch, runner.collect
        t = collections.Counter()
        kinds = collections.Counter()
        sites: list[str] = []
        prof_box: dict = {}

        def profile_decodes(kind: str, sched) -> None:  # start before, stop after the chosen decode launches
            if kind != "decode" or not args.profile_decode:
                return
            n = kinds["decode"]
            if n == args.profile_after:
                prof_box["prof"] = profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA])
                prof_box["prof"].__enter__()
                prof_box["t0"], prof_box["batch"] = time.perf_counter(), len(sched.scheduled)
            elif n == args.profile_after + args.profile_decode and "prof" in prof_box:
                prof_box["wall_ms"] = (time.perf_counter() - prof_box["t0"]) * 1e3 / args.profile_decode
                prof_box["prof"].__exit__(None, None, None)

        first, count = (int(x) for x in args.profile_launches.split(":")) if args.profile_launches else (-1, 0)
        launch_kinds: list[str] = []

        def profile_launches() -> None:  # starts the profiler before launch `first`, stops it before first + count
            n = len(launch_kinds)
            if n == first:
                prof_box["launches"] = profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA])
                prof_box["launches"].__enter__()
            elif n == first + count and "launches" in prof_box:
                prof_box["launches"].__exit__(None, None, None)
                prof_box["launch_kinds"] = launch_kinds[first:]

        def timed_launch(sched, *a, **k):
            kind = "decode" if all(s.num_new_tokens == 1 for s in sched.scheduled) else "prefill/mixed"
            profile_decodes(kind, sched)
            profile_launches()
            launch_kinds.append(kind)
            kinds[kind] += 1
            t0 = time.perf_counter()
            n0 = len(sites)
            if args.step_gaps:
                events.append((kind, torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)))
                events[-1][1].record()
            if args.watch_syncs:
                with sync_sites(sites):
                    out = launch(sched, *a, **k)
            else:
                out = launch(sched, *a, **k)
            if args.step_gaps:
                events[-1][2].record()
            t[f"launch {kind} s"] += time.perf_counter() - t0
            if args.step_gaps:  # after the launch's time: reading the allocator's counters costs host time too
                alloc_events(len(events) - 1, kind)
            if len(sites) > n0:
                kinds[f"{kind} launches that synced"] += 1
            return out

        def timed_collect(step):
            t0 = time.perf_counter()
            if step.done is not None:
                step.done.synchronize()
            t["collect wait s"] += time.perf_counter() - t0
            return collect(step)

        runner.launch, runner.collect = timed_launch, timed_collect
        # the caching allocator's trips to the driver: a cudaFree (after a failed cudaMalloc, a retry) waits for
        # the whole device, so a launch that frees turns the queued work into host wait and then device idle
        counted = ("num_alloc_retries", "num_device_alloc", "num_device_free", "num_sync_all_streams")
        alloc_by_step: list[dict] = []
        last_stats = [{k: torch.cuda.memory_stats().get(k, 0) for k in counted}]

        def alloc_events(step: int, kind: str) -> None:
            now = {k: torch.cuda.memory_stats().get(k, 0) for k in counted}
            moved = {k: now[k] - last_stats[0][k] for k in counted if now[k] != last_stats[0][k]}
            if moved:
                alloc_by_step.append({"step": step, "kind": kind, **moved})
            last_stats[0] = now
        events: list[tuple[str, torch.cuda.Event, torch.cuda.Event]] = []
        run_start = torch.cuda.Event(enable_timing=True)
        pauses: dict[int, list[float]] = collections.defaultdict(list)  # the garbage collector's, by generation
        gc_t0 = [0.0]

        def on_gc(phase, info):
            if phase == "start":
                gc_t0[0] = time.perf_counter()
            else:
                pauses[info["generation"]].append(time.perf_counter() - gc_t0[0])

        gc.callbacks.append(on_gc)
        t0 = time.perf_counter()
        run_start.record()
        llm.generate(inputs, sp, use_tqdm=False)
        torch.cuda.synchronize()
        elapsed = time.perf_counter() - t0
        gc.callbacks.remove(on_gc)
    res = {"model_shape": args.model_shape, "image_size": args.image_size, "num_prompts": args.num_prompts,
           "async_scheduling": engine.async_scheduling, "watch_syncs": bool(args.watch_syncs),
           "elapsed_s": elapsed, "req_per_s": args.num_prompts / elapsed, "steps": dict(kinds),
           "times_s": dict(t), "other_host_s": elapsed - sum(t.values()),
           "sync_sites": collections.Counter(sites).most_common(20),
           "gc_pauses": {f"gen{g}": {"n": len(v), "total_s": sum(v), "max_s": max(v)}
                         for g, v in sorted(pauses.items())},
           "gc_frozen_objects": gc.get_freeze_count()}
    if events:
        res["step_gaps"] = step_gaps(run_start, events)
        res["allocator_by_launch"] = alloc_by_step[:40]
        res["allocator_totals"] = {k: sum(a.get(k, 0) for a in alloc_by_step) for k in counted}
    if "wall_ms" in prof_box:  # N decode steps, launch to launch
        busy, top = kernel_table(prof_box["prof"], args.profile_decode, top=16)
        res.update(decode_profile_batch=prof_box["batch"], decode_profile_wall_ms_per_step=prof_box["wall_ms"],
                   decode_profile_gpu_busy_ms_per_step=busy, decode_profile_top_kernels=top,
                   decode_profile_timeline=gpu_timeline(prof_box["prof"], top=12))
    if "launch_kinds" in prof_box:
        res.update(profiled_launches=prof_box["launch_kinds"],
                   profiled_timeline=gpu_timeline(prof_box["launches"], top=8),
                   profiled_gap_hosts=gap_host_events(prof_box["launches"]),
                   profiled_launch_leads=launch_leads(prof_box["launches"]))
    print(json.dumps(res, indent=1))
    with open(args.out, "w") as f:
        json.dump(res, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
