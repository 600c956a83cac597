"""Host time of one request's image preprocessing on the GPU machine (the part of time to first token
spent before the step, issue 5): the processor's `apply` for a LLaVA-1.5 (336x336) or Qwen2-VL
(1024x1024) image, timed whole and by piece, with the torch thread pool at its default size and at
1 thread, and profiled (cProfile, top entries by cumulative time).

    python scripts/gpu_preprocess_profile.py --model-shape llava-1.5-7b --image-size 336x336"""
from __future__ import annotations

import argparse
import cProfile
import io
import json
import pstats
import statistics
import tempfile
import time

import torch

from vlmserve.benchmarks import throughput as tp
from vlmserve.benchmarks.gpu_models import write_model_dir
from vlmserve.config import ModelConfig
from vlmserve.engine.llm_engine import load_tokenizer
from vlmserve.multimodal import MULTIMODAL_REGISTRY
from vlmserve.multimodal.hashing import hash_item
from vlmserve.models.registry import ModelRegistry


def median_ms(f, n: int = 30) -> float:
    f()
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        f()
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--model-shape", default="llava-1.5-7b")
    p.add_argument("--image-size", default="336x336")
    p.add_argument("--out", default="preprocess_profile.json")
    args = p.parse_args()
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    d = tempfile.mkdtemp()
    write_model_dir(d, args.model_shape)
    prompt = tp.make_mm_prompts(d, 1, 32, 0, args.image_size)[0]
    image = prompt["image"]
    mc = ModelConfig.create(d, "bfloat16", 4096, 0, False, dev)
    tok = load_tokenizer(d)
    proc = MULTIMODAL_REGISTRY.processor_class(ModelRegistry.resolve(mc.architecture))(mc, tok, None)
    proc.media_device = dev if dev.type == "cuda" else None
    ids = tok(prompt["prompt"]).input_ids
    apply = lambda: proc.apply(ids, {"image": image}, {"image": 1})  # noqa: E731
    res = {"model_shape": args.model_shape, "image_size": args.image_size, "device": str(dev),
           "torch_threads": torch.get_num_threads(),
           "apply_ms": median_ms(apply), "hash_ms": median_ms(lambda: hash_item(image, modality="image")),
           "pinned_alloc_ms": median_ms(lambda: torch.empty(image.size[0] * image.size[1] * 3, dtype=torch.uint8,
                                                            pin_memory=dev.type == "cuda"))}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    res["apply_1_thread_ms"] = median_ms(apply)
    torch.set_num_threads(threads)
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(20):
        apply()
    prof.disable()
    s = io.StringIO()
    pstats.Stats(prof, stream=s).sort_stats("cumtime").print_stats(25)
    res["profile_20_calls"] = s.getvalue()
    print(json.dumps({k: v for k, v in res.items() if k != "profile_20_calls"}, indent=1))
    print(res["profile_20_calls"])
    with open(args.out, "w") as f:
        json.dump(res, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
