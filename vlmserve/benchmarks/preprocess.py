"""Image preprocessing time per image: vlmserve's Qwen2-VL processor path (`process_raw`, which
takes PIL images through its fast path) against the checkpoint's HF image processor
(`AutoImageProcessor`), on a seeded random-noise RGB PIL image of each --sizes, one image per
call. The default pixel bounds are those of the Qwen2-VL-*-Instruct checkpoints'
preprocessor_config.json (min_pixels 3136, max_pixels 12845056). Each time is the median of
--num-iters calls after --num-warmup, the two backends alternating call by call; every size is
also checked: the same grid, pixel values within 1e-5 (the "match" column)."""
from __future__ import annotations

import argparse
import datetime
import json
import os
import shlex
import shutil
import statistics
import sys
import tempfile
import time

DEFAULT_SIZES = "448x448,1024x1024,2048x2048,1280x720"
QWEN2_VL_MIN_PIXELS, QWEN2_VL_MAX_PIXELS = 56 * 56, 28 * 28 * 16384  # Qwen2-VL-*-Instruct on the hub


def _sizes(text: str) -> list[tuple[int, int]]:
    try:
        out = [tuple(int(v) for v in s.lower().split("x")) for s in text.split(",") if s.strip()]
    except ValueError:
        out = []
    if not out or any(len(s) != 2 or min(s) < 1 for s in out):
        raise argparse.ArgumentTypeError("sizes are WxH,WxH,... (e.g. 448x448,1280x720)")
    return out


def add_cli_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help="a Qwen2-VL / Qwen2.5-VL checkpoint directory (its config and "
                   "preprocessor_config.json); default: a Qwen2-VL-7B-shaped directory written here, "
                   "with --min-pixels / --max-pixels")
    p.add_argument("--min-pixels", type=int, default=QWEN2_VL_MIN_PIXELS)
    p.add_argument("--max-pixels", type=int, default=QWEN2_VL_MAX_PIXELS)
    p.add_argument("--sizes", type=_sizes, default=_sizes(DEFAULT_SIZES), help="source images, WxH,...")
    p.add_argument("--num-iters", type=int, default=10)
    p.add_argument("--num-warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads for both (default: the CPUs this process may use)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output-json", help="write settings, machine and results here")


def _write_model_dir(out_dir: str, min_pixels: int, max_pixels: int) -> str:
    from vlmserve.benchmarks.gpu_models import write_model_dir

    write_model_dir(out_dir, "qwen2-vl-7b", tokenizer_vocab=512)
    path = os.path.join(out_dir, "preprocessor_config.json")
    with open(path) as f:
        cfg = json.load(f)
    cfg.update(min_pixels=min_pixels, max_pixels=max_pixels)
    with open(path, "w") as f:
        json.dump(cfg, f, indent=2)
    return out_dir


def _processors(model_dir: str):
    """(vlmserve's multimodal processor, HF's image processor) of a checkpoint directory."""
    import torch
    from transformers import AutoImageProcessor

    from vlmserve.config import ModelConfig
    from vlmserve.models.registry import ModelRegistry
    from vlmserve.multimodal import MULTIMODAL_REGISTRY

    config = ModelConfig.create(model_dir, "float32", None, 0, False, torch.device("cpu"))
    proc_cls = MULTIMODAL_REGISTRY.processor_class(ModelRegistry.resolve(config.architecture))
    if proc_cls is None or "image" not in proc_cls.modalities:
        raise SystemExit(f"{config.architecture} takes no images")
    return proc_cls(config, tokenizer=None), AutoImageProcessor.from_pretrained(model_dir)


def _median_ms(times: list[float]) -> float:
    return 1e3 * statistics.median(times)


def measure(ours, hf, image, iters: int, warmup: int) -> dict:
    """Alternating calls (so that load on a shared machine falls on both), then one check."""
    t_ours, t_hf = [], []
    for i in range(warmup + iters):
        t0 = time.perf_counter()
        mine = ours.process_raw("image", [image], {})
        t1 = time.perf_counter()
        ref = hf(images=[image], return_tensors="pt")
        t2 = time.perf_counter()
        if i >= warmup:
            t_ours.append(t1 - t0)
            t_hf.append(t2 - t1)
    item = mine[0]
    grid = item.data["image_grid_thw"].reshape(-1).tolist()
    same_grid = grid == ref["image_grid_thw"].reshape(-1).tolist()
    pixels = item.data["pixel_values"]
    diff = float((pixels - ref["pixel_values"]).abs().max()) if same_grid and \
        pixels.shape == ref["pixel_values"].shape else float("inf")
    patch = ours.patch_size
    return {"source": f"{image.width}x{image.height}", "resized": f"{grid[2] * patch}x{grid[1] * patch}",
            "grid_thw": grid, "tokens": item.num_tokens, "hf_ms": _median_ms(t_hf), "vlmserve_ms": _median_ms(t_ours),
            "hf_all_ms": [1e3 * t for t in t_hf], "vlmserve_all_ms": [1e3 * t for t in t_ours],
            "speedup": statistics.median(t_hf) / statistics.median(t_ours), "max_abs_diff": diff,
            "match": same_grid and diff <= 1e-5,
            "fast_path": ours.fast_image_processor is not None}


def format_table(rows: list[dict]) -> str:
    head = ("image", "resized", "grid t,h,w", "tokens", "HF ms", "vlmserve ms", "speedup", "match")
    cells = [(r["source"], r["resized"], ",".join(map(str, r["grid_thw"])), str(r["tokens"]),
              f"{r['hf_ms']:.2f}", f"{r['vlmserve_ms']:.2f}", f"{r['speedup']:.2f}x",
              "ok" if r["match"] else f"NO ({r['max_abs_diff']:.2g})") for r in rows]
    widths = [max(len(x) for x in col) for col in zip(head, *cells)]

    def line(cs) -> str:
        return "| " + " | ".join(c.ljust(w) for c, w in zip(cs, widths)) + " |"

    return "\n".join([line(head), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, cells)])


def main(args: argparse.Namespace) -> int:
    import numpy as np
    import torch
    from PIL import Image

    from vlmserve.benchmarks.throughput import machine_info
    from vlmserve.version import __version__

    threads = args.threads or len(os.sched_getaffinity(0))
    torch.set_num_threads(threads)
    argv = sys.argv[3:] if sys.argv[1:3] == ["bench", "preprocess"] else sys.argv[1:]
    command = " ".join(["vlmserve bench preprocess", shlex.join(argv)]).strip()
    started = datetime.datetime.now().astimezone()
    load_start = os.getloadavg()
    tmp_dir = None
    model_dir = args.model or _write_model_dir(tmp_dir := tempfile.mkdtemp(prefix="vlmserve-bench-pre-"),
                                               args.min_pixels, args.max_pixels)
    try:
        ours, hf = _processors(model_dir)
        lo, hi = ours.image_pixels
        print(f"== {type(hf).__name__} (min_pixels {lo}, max_pixels {hi}) vs vlmserve "
              f"({'fast path' if ours.fast_image_processor is not None else 'HF processor'}), "
              f"{threads} threads, median of {args.num_iters}", file=sys.stderr, flush=True)
        rng = np.random.default_rng(args.seed)
        rows = []
        for w, h in args.sizes:
            image = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
            rows.append(measure(ours, hf, image, args.num_iters, args.num_warmup))
            print(f"   {w}x{h}: HF {rows[-1]['hf_ms']:.2f} ms, vlmserve {rows[-1]['vlmserve_ms']:.2f} ms",
                  file=sys.stderr, flush=True)
    finally:
        if tmp_dir:
            shutil.rmtree(tmp_dir, ignore_errors=True)
    load_end = os.getloadavg()
    machine = machine_info(threads)
    print()
    print(command)
    print(f"{started:%Y-%m-%d %H:%M %Z}; {machine['cpu']}, {threads} threads; torch {machine['torch']}, "
          f"transformers {machine['transformers']}; vlmserve {__version__}; min_pixels {lo}, max_pixels {hi}; "
          f"load average {load_start[0]:.2f} at start, {load_end[0]:.2f} at end")
    print(format_table(rows))
    if args.output_json:
        settings = {k: v for k, v in vars(args).items() if k not in ("func", "command", "benchmark")}
        with open(args.output_json, "w") as f:
            json.dump({"command": command, "date": started.isoformat(timespec="seconds"),
                       "vlmserve_version": __version__, "machine": machine, "min_pixels": lo, "max_pixels": hi,
                       "loadavg_start": load_start, "loadavg_end": load_end, "settings": settings,
                       "results": rows}, f, indent=2)
    return 0 if all(r["match"] for r in rows) else 1


if __name__ == "__main__":
    from vlmserve.entrypoints.cli import main as cli_main

    sys.exit(cli_main(["bench", "preprocess", *sys.argv[1:]]))
