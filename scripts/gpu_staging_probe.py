"""Host time for an image to reach the GPU, on the GPU host: the ways a lone prompt's image can take
before its vision encoder starts (BENCHMARKS.md, 2026-12-01 15:39-16:10 UTC).

For fresh RGB PIL images (1024x1024: 4 MB in Pillow's memory with its padding byte; 336x336), median
over --iters images, each:
- stage, one thread: the pinned staging copy as the prompt pipeline's media threads make it;
- stage, 4 threads: `copy_in_parallel`, as a lone prompt's images are staged;
- then the asynchronous copy to the GPU is queued (host time only);
- pageable: the image's memory copied to the GPU directly (synchronous: the host waits for it);
- fingerprint and content hash (hashing.py).

    python scripts/gpu_staging_probe.py [--iters 50] [--out probe.json]"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np
import torch
from PIL import Image

from vlmserve.device_utils import copy_by_one_thread, copy_in_parallel
from vlmserve.multimodal.hashing import fingerprint, hash_item
from vlmserve.multimodal.image_utils import pil_bytes


def timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return (time.perf_counter() - t) * 1e3


def probe(side: int, iters: int) -> dict[str, float]:
    rng = np.random.default_rng(side)
    rows: dict[str, list[float]] = {}
    for i in range(iters + 3):  # the first three: warm-up (pinned cache, thread pool)
        img = Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8))
        view = torch.from_numpy(pil_bytes(img))
        got = {}
        for name, copy in (("stage, one thread", copy_by_one_thread),
                           ("stage, 4 threads", lambda d, s: copy_in_parallel(d, s, 4))):
            dst = torch.empty(view.shape, dtype=view.dtype, pin_memory=True)
            got[name] = timed(lambda: copy(dst, view))
            got[name + " + queue the copy"] = got[name] + timed(lambda: dst.to("cuda", non_blocking=True))
        torch.cuda.synchronize()
        got["pageable copy to the GPU (synchronous)"] = timed(lambda: view.to("cuda", non_blocking=True))
        torch.cuda.synchronize()
        got["fingerprint"] = timed(lambda: fingerprint(img, modality="image"))
        got["content hash"] = timed(lambda: hash_item(img, modality="image"))
        if i >= 3:
            for k, v in got.items():
                rows.setdefault(k, []).append(v)
    return {k: statistics.median(v) for k, v in rows.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--iters", type=int, default=50)
    ap.add_argument("--out")
    args = ap.parse_args()
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "iters": args.iters,
              "ms_median": {f"{side}x{side}": probe(side, args.iters) for side in (1024, 336)}}
    for size, rows in result["ms_median"].items():
        print(f"{size}:")
        for k, v in rows.items():
            print(f"  {k:45s} {v:7.3f} ms")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
