"""Where a lone request's time to first token goes, host and device side by side (issue 5): the
workload of `vlmserve bench latency` (one prompt, one new image, max_tokens=1, requests back to
back) on a --model-shape model with random weights, each request's host stages timed by wrapping
the engine's functions (as scripts/cpu_ttft_host_profile.py does) and CUDA events recorded on the
step's stream at the same points. An event recorded at the call's start, on an idle stream, ties
the device's clock to the host's, so every mark below is ms from the generate call:
- host: the tower queued (encoder call returned), the step's launch entered, its prefill graph's
  replay called, the launch returned, the step's results read, generate returned;
- device: the tower done, the launch's first work reached, the graph reached (what the launch
  queued before it done), the step done.
"count: cudaMalloc calls" is the caching allocator's new device allocations during a request.
"device lead at the graph" is the device's mark less the host's: about 0 where the stream had
run out of work and waited for the host to queue the language model's graph, positive where it was
still busy with the tower or the merge. "host after the step" is the time from the step's end on
the device to generate's return. Medians over --iters requests; --model-dir runs a checkpoint
already on disk (a small one: the script on the CPU).

    python scripts/gpu_ttft_timeline.py --model-shape llava-1.5-7b --image-size 336x336 --out t.json"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time

import torch

from cpu_ttft_host_profile import STAGES, Timeline, instrument  # noqa: E402  (scripts/: the path)
from vlmserve import LLM, SamplingParams
from vlmserve.benchmarks import throughput as tp
from vlmserve.benchmarks.gpu_models import write_model_dir

CUDA = torch.cuda.is_available()


class Marks:
    """One request's host times and device events, by name."""

    def __init__(self):
        self.host: dict[str, float] = {}
        self.events: dict[str, torch.cuda.Event] = {}

    def reset(self) -> None:
        self.host, self.events = {}, {}

    def mark(self, name: str, event: bool = False) -> None:
        if name in self.host:  # the first occurrence counts (a request's one step, one tower call)
            return
        self.host[name] = time.perf_counter()
        if event and CUDA:
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            self.events[name] = ev

    def relative(self) -> dict[str, float]:
        """ms from the call: host marks, and device marks against the call's event."""
        t0 = self.host["call"]
        out = {f"host: {k}": 1e3 * (v - t0) for k, v in self.host.items() if k != "call"}
        if CUDA:
            e0 = self.events["call"]
            out.update({f"device: {k}": e0.elapsed_time(ev) for k, ev in self.events.items() if k != "call"})
        return out


def wrap_after(owner, attr: str, fn_after) -> None:
    orig = getattr(owner, attr)

    def wrapped(*a, **kw):
        out = orig(*a, **kw)
        fn_after(out)
        return out
    setattr(owner, attr, wrapped)


def add_marks(llm, m: Marks) -> None:
    runner = llm.llm_engine.runner
    wrap_after(runner, "_encode", lambda _: m.mark("tower queued", event=True))
    launch = runner.launch

    def traced_launch(*a, **kw):
        m.mark("launch entered", event=True)
        graphs = runner._get_prefill_graphs() if runner.use_cuda_graphs and runner.prefill_graph_tokens else None
        if graphs is not None and not getattr(graphs, "_timeline_wrapped", False):
            run = graphs.run

            def traced_run(*ra, **rkw):
                m.mark("graph replay called", event=True)
                return run(*ra, **rkw)
            graphs.run, graphs._timeline_wrapped = traced_run, True
        step = launch(*a, **kw)
        m.mark("launch returned")
        if step.done is not None:  # the step's own event does not time: one right behind it
            m.mark("step done", event=True)
        return step
    runner.launch = traced_launch
    wrap_after(runner, "collect", lambda _: m.mark("results read"))


def wrap_before(owner, attr: str, fn_before) -> None:
    orig = getattr(owner, attr)

    def wrapped(*a, **kw):
        fn_before()
        return orig(*a, **kw)
    setattr(owner, attr, wrapped)


def add_fine_marks(llm, m: Marks) -> None:
    """--fine: marks inside the path to the tower (and after the step), with events where the
    stream's position says something: where the host's time before the tower goes."""
    from vlmserve.multimodal.device_pixels import DevicePixels
    from vlmserve.multimodal.processing import ProcessedMedia
    from vlmserve.worker import encoder_graphs

    eng, runner = llm.llm_engine, llm.llm_engine.runner
    wrap_after(eng, "process_media", lambda _: m.mark("process media returned"))
    wrap_before(runner, "_encode", lambda: m.mark("encode entered", event=True))
    wrap_before(DevicePixels, "to", lambda: m.mark("pixels to the device", event=True))
    wrap_after(DevicePixels, "to", lambda _: m.mark("pixels finished (queued)", event=True))
    from vlmserve.models import qwen2_vl_image_processing as qip  # inside .to: the copy, then the finish
    wrap_before(qip.FastQwen2VLImageProcessor, "finish_on_device", lambda: m.mark("finish entered", event=True))
    wrap_after(qip, "resize_as_torchvision_on_cuda", lambda _: m.mark("resized (queued)", event=True))
    wrap_before(runner.model, "embed_multimodal", lambda: m.mark("embed_multimodal entered"))
    for cls in (encoder_graphs.EncoderGraphs, encoder_graphs.GridEncoderGraphs):
        wrap_before(cls, "__call__", lambda: m.mark("tower graphs entered", event=True))
    wrap_before(torch.cuda.CUDAGraph, "replay", lambda: m.mark("first graph replay called", event=True))
    wrap_after(ProcessedMedia, "finish_hashes", lambda _: m.mark("hashes done"))
    wrap_after(llm, "_prompt_token_ids", lambda _: m.mark("tokenized"))
    wrap_after(eng, "add_request", lambda _: m.mark("request added"))
    wrap_after(eng.scheduler, "schedule", lambda _: m.mark("scheduled"))


def profile_requests(llm, inputs: list, one, top: int) -> list[str]:
    """cProfile over these requests (one at a time): the `top` functions by own time, as text."""
    import cProfile
    import io
    import pstats

    prof = cProfile.Profile()
    for x in inputs:
        if CUDA:
            torch.cuda.synchronize()
        prof.enable()
        llm.generate(x, one, use_tqdm=False)
        prof.disable()
    buf = io.StringIO()
    pstats.Stats(prof, stream=buf).sort_stats("tottime").print_stats(top)
    return buf.getvalue().splitlines()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-shape", default="llava-1.5-7b")
    p.add_argument("--image-size", default="336x336")
    p.add_argument("--input-len", type=int, default=32)
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--model-dir", help="a checkpoint to run instead of --model-shape's random weights")
    p.add_argument("--out", default="ttft_timeline.json")
    p.add_argument("--fine", action="store_true", help="more marks on the path to the tower (add_fine_marks)")
    p.add_argument("--cprofile", type=int, default=0, metavar="N",
                   help="then N more requests under cProfile: the top functions by own time")
    args = p.parse_args()
    res: dict = {"model_shape": args.model_shape, "image_size": args.image_size,
                 "device": torch.cuda.get_device_name() if CUDA else "cpu"}
    with tempfile.TemporaryDirectory() as d:
        if args.model_dir:
            d = args.model_dir
        else:
            write_model_dir(d, args.model_shape)
        n = args.warmup + args.iters + 2 + args.cprofile
        prompts = tp.make_mm_prompts(d, n, args.input_len, 1, args.image_size)
        max_len = max(len(x["ids"]) for x in prompts) + 8
        llm = LLM(d, dtype="bfloat16" if CUDA else "float32", max_model_len=max_len, max_num_seqs=1,
                  load_format="auto" if args.model_dir else "dummy")
        inputs = [{"prompt": x["prompt"], "multi_modal_data": {"image": x["image"]}} for x in prompts]
        one = SamplingParams(temperature=0, max_tokens=1, ignore_eos=True)
        encode_text = getattr(llm.llm_engine, "encode_text", None)  # the backend's shortcut ("encode") or the call
        res["text_encoder"] = getattr(encode_text, "__name__", "tokenizer call")
        llm.generate(inputs[:2], one, use_tqdm=False)  # warm-up: compiles, captures graphs
        tl, m = Timeline(), Marks()
        instrument(llm, tl)
        add_marks(llm, m)
        if args.fine:
            add_fine_marks(llm, m)
        rows, ttft = [], []
        for i, x in enumerate(inputs[2:len(inputs) - args.cprofile]):
            if CUDA:
                torch.cuda.synchronize()
            m.reset()
            tl.reset()
            allocs = torch.cuda.memory_stats().get("num_device_alloc", 0) if CUDA else 0
            m.mark("call", event=True)
            llm.generate(x, one, use_tqdm=False)
            m.mark("generate returned")
            if CUDA:
                torch.cuda.synchronize()
            if i >= args.warmup:
                row = m.relative()
                if CUDA:  # cudaMalloc calls of the caching allocator during the request (a count, not ms)
                    row["count: cudaMalloc calls"] = torch.cuda.memory_stats().get("num_device_alloc", 0) - allocs
                row.update({f"stage: {k}": 1e3 * v for k, v in tl.acc.items()})
                rows.append(row)
                ttft.append(row["host: generate returned"])
        if args.cprofile:
            res["cprofile"] = profile_requests(llm, inputs[len(inputs) - args.cprofile:], one, 45)
    keys = sorted({k for r in rows for k in r}, key=lambda k: statistics.median([r.get(k, 0.0) for r in rows]))
    med = {k: statistics.median([r.get(k, 0.0) for r in rows]) for k in keys}
    if CUDA:
        med["device lead at the graph"] = statistics.median(
            [r["device: graph replay called"] - r["host: graph replay called"] for r in rows
             if "device: graph replay called" in r])
        med["host after the step"] = med["host: generate returned"] - med["device: step done"]
    res["median_ms"] = med
    res["ttft_ms_all"] = ttft
    res["stages"] = [s[0] for s in STAGES]
    for k, v in med.items():
        print(f"{v:9.3f}  {k}")
    print("text encoder:", res["text_encoder"])
    for line in res.get("cprofile", []):
        print(line)
    with open(args.out, "w") as f:
        json.dump(res, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
