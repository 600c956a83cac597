"""Host time before the model's forward in a batch-1 time-to-first-token request (`LLM.generate`
with max_tokens=1, as `vlmserve bench latency` runs it), on the CPU, for a LLaVA-1.5 shape (one
336x336 image, 577 tokens) and a Qwen2-VL shape (one 1024x1024 PIL image at the real max_pixels:
5476 patches, 1369 tokens), with tiny random-weight models so that host work is what shows.
Every request has a fresh random image (no prefix- or encoder-cache hit).

By default the processors hand over the uint8 image for the encoder's device to finish
(`DevicePixels`, as on a GPU engine; here the "device" is the CPU, so resizing and normalizing
run inside the encoder and are not counted); --host-preprocess keeps the CPU engine's own path
(resize and normalize on the host, counted in processing).

The stages (median ms per request) are timed by wrapping the engine's functions, from the generate
call to the launch of the language model's step; "other" is what the named stages leave of the
host's part of it. The encoders run inside it (a lone prompt's as soon as its media are processed,
before the prompt is tokenized): on the CPU they run there and then, on a GPU they are queued, and
the host work after they start ("host while encoding") runs while the device encodes. --cprofile N
prints a cProfile of N requests' host work (generate call to the step), sorted by own time.

    python scripts/cpu_ttft_host_profile.py [--models llava,qwen2_vl] [--iters 30] [--cprofile 20]"""
from __future__ import annotations

import argparse
import cProfile
import functools
import os
import pstats
import statistics
import sys
import tempfile
import time

import numpy as np
from PIL import Image

STAGES = [  # (label, owner, attribute): wrapped, timed per call
    ("tokenize", "llm", "_prompt_token_ids"),
    ("process media", "engine", "process_media"),
    ("  read pixels (tobytes)", "image_utils", "pil_bytes"),
    ("  process_raw", "proc", "process_raw"),
    ("staging copy", "device_pixels", "stage"),
    ("  hash_item", "processing", "hash_item"),
    ("place (expand placeholders)", "engine", "place_media"),
    ("validate_prompt", "engine", "validate_prompt"),
    ("add_request", "engine", "add_request"),
    ("  prompt_positions", "proc", "prompt_positions"),
    ("schedule", "scheduler", "schedule"),
    ("  block hashes", "block_manager", "_update_hashes"),
]


def make_models(root: str, which: list[str]) -> dict[str, str]:
    from vlmserve.testing.checkpoints import make_llava_checkpoint, make_qwen2_vl_checkpoint

    out = {}
    if "llava" in which:
        out["llava"] = make_llava_checkpoint(os.path.join(root, "llava"), image_size=336, patch_size=14,
                                             vision_overrides={"hidden_size": 32, "intermediate_size": 64,
                                                               "num_hidden_layers": 2},
                                             max_position_embeddings=2048)
    if "qwen2_vl" in which:
        out["qwen2_vl"] = make_qwen2_vl_checkpoint(os.path.join(root, "qwen2_vl"), min_pixels=56 * 56,
                                                   max_pixels=12845056, max_position_embeddings=4096)
    return out


class Timeline:
    """Per request: the time of each wrapped stage (summed over its calls) up to the launch of the
    language model's step (`launch`), and the span of the encoders (`_encode`) before it."""

    def __init__(self):
        self.t0 = None
        self.step_at = None
        self.encoder_spans: list[tuple[float, float]] = []
        self.acc: dict[str, float] = {}
        self.profiler: cProfile.Profile | None = None

    def reset(self, profiler=None):
        self.acc, self.step_at, self.encoder_spans, self.profiler = {}, None, [], profiler
        self.t0 = time.perf_counter()

    def wrap(self, label, fn):
        @functools.wraps(fn)
        def timed(*a, **kw):
            if self.step_at is not None:  # after the step's launch: not host work before it
                return fn(*a, **kw)
            t = time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:
                if self.step_at is None:
                    self.acc[label] = self.acc.get(label, 0.0) + time.perf_counter() - t
        return timed

    def mark_encoder(self, fn):
        @functools.wraps(fn)
        def encode(*a, **kw):
            t = time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:
                if self.step_at is None:
                    self.encoder_spans.append((t, time.perf_counter()))
        return encode

    def mark_step(self, fn):
        @functools.wraps(fn)
        def first(*a, **kw):
            if self.step_at is None:
                self.step_at = time.perf_counter()
                if self.profiler is not None:
                    self.profiler.disable()
            return fn(*a, **kw)
        return first

    def host_times(self) -> dict[str, float]:
        """Host time before the first encoder call, after it up to the step (encoders left out),
        and in all (the encoders left out)."""
        enc = sum(b - a for a, b in self.encoder_spans)
        start = self.encoder_spans[0][0] if self.encoder_spans else self.step_at
        before = start - self.t0
        return {"host before the encoders": before, "host while encoding": self.step_at - start - enc,
                "host before the step": self.step_at - self.t0 - enc, "encoders (CPU)": enc}


def instrument(llm, tl: Timeline) -> None:
    import vlmserve.multimodal.device_pixels as device_pixels
    import vlmserve.multimodal.hashing as hashing
    import vlmserve.multimodal.image_utils as image_utils
    import vlmserve.multimodal.processing as processing

    eng = llm.llm_engine
    owners = {"llm": llm, "engine": eng, "proc": eng.mm_processor, "scheduler": eng.scheduler,
              "block_manager": eng.block_manager, "image_utils": image_utils,
              "device_pixels": device_pixels.DevicePixels, "processing": processing}
    for label, owner, attr in STAGES:
        obj = owners[owner]
        setattr(obj, attr, tl.wrap(label, getattr(obj, attr)))
    # the hash reads pixels through image_utils.pil_bytes, as do the processors' RGB readers
    hashing.pil_bytes = image_utils.pil_bytes
    eng.runner._encode = tl.mark_encoder(eng.runner._encode)
    eng.runner.launch = tl.mark_step(eng.runner.launch)


def prompt_text(model: str, tok, n_tokens: int, rng) -> str:
    from vlmserve.benchmarks.throughput import _PROMPT_WORDS, IMAGE_PLACEHOLDERS

    text = IMAGE_PLACEHOLDERS[model] + "\nDescribe"
    while len(tok(text).input_ids) < n_tokens:
        text += " " + rng.choice(_PROMPT_WORDS)
    return text


def run(model: str, model_dir: str, args) -> dict[str, float]:
    import random

    import torch

    from vlmserve import LLM, SamplingParams

    llm = LLM(model_dir, dtype="float32", max_model_len=2048, num_kv_blocks=256)
    proc = llm.llm_engine.mm_processor
    if not args.host_preprocess:
        proc.media_device = torch.device("cpu")  # DevicePixels, finished "on the device" as on a GPU
    tl = Timeline()
    instrument(llm, tl)
    side = {"llava": 336, "qwen2_vl": 1024}[model]
    rng, np_rng = random.Random(0), np.random.default_rng(0)
    text = prompt_text(model, llm.get_tokenizer(), args.input_len, rng)
    params = SamplingParams(temperature=0, max_tokens=1, ignore_eos=True)
    rows: list[dict[str, float]] = []
    prof = cProfile.Profile() if args.cprofile else None
    n = args.warmup + args.iters + args.cprofile
    for i in range(n):
        image = Image.fromarray(np_rng.integers(0, 256, (side, side, 3), dtype=np.uint8))
        profiling = i >= args.warmup + args.iters
        tl.reset(prof if profiling else None)
        if profiling:
            prof.enable()
        t = time.perf_counter()
        out = llm.generate({"prompt": text, "multi_modal_data": {"image": image}}, params, use_tqdm=False)
        total = time.perf_counter() - t
        assert len(out[0].outputs[0].token_ids) == 1
        if profiling:
            prof.disable()
        if args.warmup <= i < args.warmup + args.iters:
            row = dict(tl.acc)
            row.update(tl.host_times())
            named = [label for label, _, _ in STAGES if not label.startswith(" ")]
            row["other"] = row["host before the step"] - sum(row.get(k, 0.0) for k in named)
            row["generate (whole, incl. model)"] = total
            rows.append(row)
    med = {}
    for label in [s[0] for s in STAGES] + ["other", "host before the encoders", "host while encoding",
                                           "host before the step", "encoders (CPU)", "generate (whole, incl. model)"]:
        vals = [r.get(label, 0.0) for r in rows]
        med[label] = 1e3 * statistics.median(vals)
    print(f"\n== {model}: prompt {len(out[0].prompt_token_ids)} tokens, image {side}x{side}, "
          f"{'host' if args.host_preprocess else 'device'} preprocessing, median of {args.iters}", flush=True)
    for label, ms in med.items():
        print(f"| {label} | {ms:.3f} |")
    if prof is not None:
        print(f"\n-- cProfile of {args.cprofile} requests (host work before the forward), by own time")
        pstats.Stats(prof, stream=sys.stdout).sort_stats("tottime").print_stats(args.top)
    return med


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="llava,qwen2_vl")
    p.add_argument("--iters", type=int, default=30)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--input-len", type=int, default=64, help="text tokens of the prompt (placeholder included)")
    p.add_argument("--host-preprocess", action="store_true",
                   help="resize and normalize on the host (the CPU engine's path) instead of DevicePixels")
    p.add_argument("--cprofile", type=int, default=0, help="requests to profile after the timed ones")
    p.add_argument("--top", type=int, default=30)
    p.add_argument("--model-dir", help="keep the checkpoints here (made once)")
    p.add_argument("--torch-threads", type=int, default=1,
                   help="torch's CPU threads for the forward (1: their spinning after it does not take the "
                        "cores from the next request's host work, as on a GPU host, where the CPU is idle)")
    args = p.parse_args()
    import torch

    torch.set_num_threads(args.torch_threads)
    which = args.models.split(",")
    root = args.model_dir or tempfile.mkdtemp(prefix="vlmserve-ttft-")
    dirs = {m: os.path.join(root, m) for m in which}
    if not all(os.path.isfile(os.path.join(d, "config.json")) for d in dirs.values()):
        dirs = make_models(root, which)
    results = {m: run(m, dirs[m], args) for m in which}
    labels = list(next(iter(results.values())))
    print("\n| stage (ms, median) | " + " | ".join(which) + " |\n|---|" + "---|" * len(which))
    for label in labels:
        print(f"| {label} | " + " | ".join(f"{results[m][label]:.3f}" for m in which) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
