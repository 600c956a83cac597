"""Host time of reading and hashing one image, as the engine's preprocessing does it (issue 5's
time to first token): PIL's tobytes(), whose result is kept (fresh memory each time, as in a
request) or dropped (memory reused), and sha256 against blake3 on one thread and on its thread
pool, for a LLaVA-sized (336x336) and a Qwen2-VL-sized (1024x1024) RGB image. Median of --reps
runs each, in ms.

    python scripts/cpu_media_bench.py"""
from __future__ import annotations

import argparse
import hashlib
import json
import platform
import statistics
import time

import numpy as np
from blake3 import blake3
from PIL import Image



def median_ms(fn, reps: int) -> float:
    fn()
    out = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        out.append(1e3 * (time.perf_counter() - t0))
    return statistics.median(out)


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--reps", type=int, default=50)
    args = p.parse_args()
    rows = []
    for side in (336, 1024):
        img = Image.fromarray(np.random.default_rng(side).integers(0, 256, (side, side, 3), dtype=np.uint8))
        buf = img.tobytes()
        kept = []
        row = {"image": f"{side}x{side}", "bytes": len(buf),
               "tobytes_dropped_ms": median_ms(img.tobytes, args.reps),
               "tobytes_kept_ms": median_ms(lambda: kept.append(img.tobytes()), min(args.reps, 20)),
               "sha256_ms": median_ms(lambda: hashlib.sha256(buf).digest(), args.reps),
               "blake3_one_thread_ms": median_ms(lambda: blake3(buf).digest(), args.reps),
               "blake3_pool_ms": median_ms(lambda: blake3(buf, max_threads=blake3.AUTO).digest(), args.reps)}
        kept.clear()
        rows.append(row)
        print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in row.items()}))
    print(json.dumps({"cpu": platform.processor() or platform.machine()}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
