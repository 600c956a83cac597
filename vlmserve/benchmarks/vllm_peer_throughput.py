"""The vLLM side of `vlmserve bench throughput`, run by vLLM's own interpreter (a separate venv):
vlmserve is not importable there and does not import vLLM. Loads the model through vLLM's public
`LLM` API, runs a warm-up and then the timed batch, and prints one line:
`VLLM_PEER_RESULT {"elapsed_s": ..., "output_lens": [...], "prompt_token_ids": [[...]], ...}`.

Text prompts come as token ids. Multimodal (LLaVA, Qwen2-VL) prompts come as text with one image
placeholder each and the paths of PNG files, one image per prompt, with the engine arguments they
need (`limit_mm_per_prompt`, `mm_processor_kwargs`); the images are read before the timed run, and
vLLM's own processor resizes them and expands the placeholder.

Thread binding and KV cache size come from the environment (VLLM_CPU_OMP_THREADS_BIND,
VLLM_CPU_KVCACHE_SPACE), set by the caller."""
from __future__ import annotations

import argparse
import json
import os
import time

RESULT_PREFIX = "VLLM_PEER_RESULT "


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", required=True)
    p.add_argument("--prompts", required=True,
                   help='JSON file: {"prompts": [[ids]], "warmup_prompts": [[ids]]}, or, multimodal, '
                   '{"prompts": [text], "images": [png path], "warmup_prompts": [text], "warmup_images": [...], '
                   '"engine_args": {"limit_mm_per_prompt": ..., "mm_processor_kwargs": ...}}')
    p.add_argument("--output-len", type=int, required=True)
    p.add_argument("--warmup-output-len", type=int, default=16)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--max-model-len", type=int, required=True)
    p.add_argument("--max-num-seqs", type=int, default=256)
    p.add_argument("--max-num-batched-tokens", type=int, default=8192)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--enforce-eager", action="store_true")
    args = p.parse_args()

    import torch
    import vllm
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    with open(args.prompts) as f:
        data = json.load(f)
    extra = {}
    if "images" in data:
        from PIL import Image

        def load(path):
            with Image.open(path) as im:
                return im.convert("RGB")  # decoded here, outside the timed run

        def mm_prompts(texts, paths):
            if len(texts) != len(paths):
                raise ValueError(f"{len(texts)} prompts but {len(paths)} images")
            return [{"prompt": t, "multi_modal_data": {"image": load(p)}} for t, p in zip(texts, paths)]

        prompts = mm_prompts(data["prompts"], data["images"])
        warmup = mm_prompts(data["warmup_prompts"], data["warmup_images"])
        # limit_mm_per_prompt, and for Qwen2-VL the processor's min/max pixels, from the caller
        extra.update(data.get("engine_args") or {"limit_mm_per_prompt": {"image": 1}})
    else:
        prompts = [TokensPrompt(prompt_token_ids=ids) for ids in data["prompts"]]
        warmup = [TokensPrompt(prompt_token_ids=ids) for ids in data["warmup_prompts"]]

    t0 = time.perf_counter()
    llm = LLM(model=args.model, dtype=args.dtype, max_model_len=args.max_model_len, seed=args.seed,
              max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
              enforce_eager=args.enforce_eager, **extra)
    load_s = time.perf_counter() - t0

    def params(n: int) -> SamplingParams:
        return SamplingParams(temperature=0, max_tokens=n, ignore_eos=True)

    llm.generate(warmup, params(args.warmup_output_len), use_tqdm=False)
    t0 = time.perf_counter()
    outs = llm.generate(prompts, params(args.output_len), use_tqdm=False)
    elapsed = time.perf_counter() - t0

    result = {"elapsed_s": elapsed, "load_s": load_s,
              "output_lens": [len(o.outputs[0].token_ids) for o in outs],
              "prompt_token_ids": [list(o.prompt_token_ids) for o in outs],
              "vllm_version": vllm.__version__, "torch_version": torch.__version__,
              "settings": {k: os.environ.get(k) for k in
                           ("VLLM_CPU_OMP_THREADS_BIND", "VLLM_CPU_KVCACHE_SPACE", "OMP_NUM_THREADS")}
              | {"enforce_eager": args.enforce_eager}}
    print(RESULT_PREFIX + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
