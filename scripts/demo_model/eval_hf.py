"""Evaluate the ``vlmserve-demo`` checkpoint with HF transformers ``generate`` (greedy).

    nice -n 10 python scripts/demo_model/eval_hf.py [--model vlmserve/demo_model] [--per-kind 120]

Uses a held-out stream (``data.eval_stream``) that training never draws from:
images 64..1024 px, aspect ratios up to 1.4 (both orientations), PNG and JPEG
round trips, blur, tinted backgrounds, colour jitter, rotation, image before or
after the question, one- and two-image prompts. Prompts are built with the
checkpoint's own chat template through ``AutoProcessor``. Exits 1 if any
question kind is below ``--min-acc``.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import Counter
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import data  # noqa: E402

from transformers import AutoProcessor, LlavaForConditionalGeneration  # noqa: E402
from transformers.utils import logging as hf_logging  # noqa: E402

REPO = Path(__file__).resolve().parents[2]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=REPO / "vlmserve" / "demo_model")
    ap.add_argument("--per-kind", type=int, default=120)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--min-acc", type=float, default=0.95)
    ap.add_argument("--show-errors", type=int, default=10)
    args = ap.parse_args()

    torch.set_num_threads(1)
    hf_logging.set_verbosity_error()
    t0 = time.time()
    processor = AutoProcessor.from_pretrained(args.model)
    model = LlavaForConditionalGeneration.from_pretrained(args.model, dtype=torch.float32).eval()
    tok = processor.tokenizer

    rng = data.eval_stream(args.seed)
    samples = data.make_eval_set(rng, args.per_kind, data.EVAL_DIST)
    print(f"{len(samples)} samples ({args.per_kind} per kind); images: "
          f"{min(min(i.size) for s in samples for i in s['images'])}.."
          f"{max(max(i.size) for s in samples for i in s['images'])} px", flush=True)

    right, total = Counter(), Counter()
    by_order = Counter()
    errors = []
    for i, s in enumerate(samples):
        prompt = processor.apply_chat_template(s["messages"], add_generation_prompt=True, tokenize=False)
        inputs = processor(text=prompt, images=s["images"], return_tensors="pt")
        with torch.no_grad():
            out = model.generate(**inputs, do_sample=False, max_new_tokens=8)
        gen = out[0, inputs["input_ids"].shape[1]:]
        text = tok.decode(gen, skip_special_tokens=True).strip()
        ended = tok.eos_token_id in gen.tolist()
        ok = ended and text == s["answer"]
        right[s["kind"]] += ok
        total[s["kind"]] += 1
        by_order[(s["image_first"], ok)] += 1
        if not ok and len(errors) < args.show_errors:
            errors.append((s["kind"], [im.size for im in s["images"]], repr(prompt), s["answer"], text, ended))
        if (i + 1) % 100 == 0:
            print(f"  {i + 1}/{len(samples)} done ({time.time() - t0:.0f}s)", flush=True)

    print("\nkind           correct/total  accuracy")
    failed = False
    for k in data.KINDS:
        acc = right[k] / total[k]
        failed |= acc < args.min_acc
        print(f"{k:<14} {right[k]:>4}/{total[k]:<4}       {acc * 100:6.2f}%")
    n_ok, n = sum(right.values()), sum(total.values())
    print(f"{'all':<14} {n_ok:>4}/{n:<4}       {n_ok / n * 100:6.2f}%")
    for first in (True, False):
        r, w = by_order[(first, True)], by_order[(first, False)]
        print(f"  image {'before' if first else 'after '} text: {r}/{r + w}")
    for e in errors:
        print("  ERROR kind=%s sizes=%s prompt=%s want=%r got=%r eos=%s" % e)
    print(f"time {time.time() - t0:.0f}s")
    if failed:
        print(f"FAIL: some kind below {args.min_acc:.0%}")
        return 1
    print("PASS")
    return 0


if __name__ == "__main__":
    sys.exit(main())
