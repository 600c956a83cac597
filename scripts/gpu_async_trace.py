"""Where the host's time goes in an offline throughput run with async scheduling (issue 5): the
workload of `vlmserve bench throughput` through `LLM.generate`, with the runner's `launch` (host
work that queues a step) and `collect` (the wait for the step before it) timed, and every place
where launching made the host wait for the device (torch's sync debug mode) counted.

If the device never idles, the run's time is the waits plus the host work that overlaps them; a
launch that syncs turns that step's host work into device idle time. --profile-decode N profiles N
decode steps from the --profile-after'th on (the full batch, async as in the run): the GPU's busy
time per step, where it idles between kernels and what the host is doing then.

    python scripts/gpu_async_trace.py --model-shape llava-1.5-7b --image-size 336x336 --num-prompts 300"""
from __future__ import annotations

import argparse
import collections
import json
import tempfile
import time

from torch.profiler import ProfilerActivity, profile

from gpu_profile import gpu_timeline, kernel_table  # noqa: E402  (scripts/ is on the path as a script)
from gpu_step_trace import make_workload, workload_args  # noqa: E402
from vlmserve.testing.sync_watch import sync_sites


def main() -> int:
    p = argparse.ArgumentParser()
    workload_args(p, num_prompts=300)
    p.add_argument("--watch-syncs", type=int, default=1, help="0: time only (the watch costs host time)")
    p.add_argument("--profile-decode", type=int, default=0, help="decode steps to profile (0: none)")
    p.add_argument("--profile-after", type=int, default=40, help="decode steps before the profiled ones")
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

        def timed_launch(sched, *a, **k):
            kind = "decode" if all(s.num_new_tokens == 1 for s in sched.scheduled) else "prefill/mixed"
            profile_decodes(kind, sched)
            kinds[kind] += 1
            t0 = time.perf_counter()
            n0 = len(sites)
            if args.watch_syncs:
                with sync_sites(sites):
                    out = launch(sched, *a, **k)
            else:
                out = launch(sched, *a, **k)
            t[f"launch {kind} s"] += time.perf_counter() - t0
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
        t0 = time.perf_counter()
        llm.generate(inputs, sp, use_tqdm=False)
        elapsed = time.perf_counter() - t0
    res = {"model_shape": args.model_shape, "image_size": args.image_size, "num_prompts": args.num_prompts,
           "async_scheduling": engine.async_scheduling, "watch_syncs": bool(args.watch_syncs),
           "elapsed_s": elapsed, "req_per_s": args.num_prompts / elapsed, "steps": dict(kinds),
           "times_s": dict(t), "other_host_s": elapsed - sum(t.values()),
           "sync_sites": collections.Counter(sites).most_common(20)}
    if "wall_ms" in prof_box:  # N decode steps, launch to launch
        busy, top = kernel_table(prof_box["prof"], args.profile_decode, top=16)
        res.update(decode_profile_batch=prof_box["batch"], decode_profile_wall_ms_per_step=prof_box["wall_ms"],
                   decode_profile_gpu_busy_ms_per_step=busy, decode_profile_top_kernels=top,
                   decode_profile_timeline=gpu_timeline(prof_box["prof"], top=12))
    print(json.dumps(res, indent=1))
    with open(args.out, "w") as f:
        json.dump(res, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
