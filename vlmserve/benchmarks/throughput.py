"""Offline throughput. The same prompts (random token ids from a seeded RNG, no special tokens) and
the same output length (EOS ignored) go through each chosen backend in turn: vlmserve, Hugging Face
`generate` (batched, left-padded, greedy) and vLLM's CPU build (in its own interpreter, through
vlmserve/benchmarks/vllm_peer_throughput.py). Each backend gets a warm-up on a few other prompts,
then one timed run, which must give every request exactly --output-len tokens.

With a LLaVA or Qwen2-VL model (--random-model-arch llava / qwen2_vl, or a --model whose config is
"llava" / "qwen2_vl") each request is one seeded random-noise image plus a text prompt of random
words holding one image placeholder (`<image>`, `<|vision_start|><|image_pad|><|vision_end|>`); every backend
gets the same text and the same pixels and resizes them with its own processor (in the timed run),
and the prompt token ids each backend ran (placeholder expanded) are checked against the expected
ones."""
from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import json
import os
import platform
import random
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time

BACKENDS = ("vlmserve", "hf", "vllm")
PEER_SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "vllm_peer_throughput.py")
PEER_RESULT_PREFIX = "VLLM_PEER_RESULT "
# Environment that changes what the backends do; recorded with the results, and shown in the command.
RELEVANT_ENV = ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "LD_PRELOAD", "VLMSERVE_CPU_KVCACHE_SPACE",
                "VLLM_CPU_KVCACHE_SPACE", "VLLM_CPU_OMP_THREADS_BIND", "CUDA_VISIBLE_DEVICES")
DEFAULT_VLLM_PYTHON = "/tmp/vllm-peer/bin/python"


def _int_list(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def _backend_list(text: str) -> list[str]:
    names = [x.strip() for x in text.split(",") if x.strip()]
    bad = [n for n in names if n not in BACKENDS]
    if bad or not names:
        raise argparse.ArgumentTypeError(f"backends are a comma-separated subset of {','.join(BACKENDS)}")
    return list(dict.fromkeys(names))


def add_cli_args(p: argparse.ArgumentParser) -> None:
    m = p.add_argument_group("model")
    src = m.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", help="a local Hugging Face model directory")
    src.add_argument("--random-model", action="store_true",
                     help="write a random-weight checkpoint of the shape below and use it")
    m.add_argument("--random-model-arch", choices=("llama", "llava", "qwen2_vl"), default="llama",
                   help="llama: the text model below; llava: a CLIP vision tower (--vision-*) in front of it; "
                   "qwen2_vl: a Qwen2-VL ViT (--vision-*, --min/max-pixels) in front of a Qwen2 LM of that "
                   "shape with M-RoPE, hub key layout")
    m.add_argument("--model-shape", default=None,
                   help="with --random-model: the shape of a real model (llava-1.5-7b, qwen2-vl-7b, llama-2-7b; "
                   "vlmserve/benchmarks/gpu_models.py) with weights made on the GPU, no checkpoint "
                   "written; the size options below are then ignored")
    m.add_argument("--random-model-dir", help="where to write it (default: a temporary directory, "
                   "removed afterwards)")
    m.add_argument("--num-layers", type=int, default=6)
    m.add_argument("--hidden-size", type=int, default=512)
    m.add_argument("--head-dim", type=int, default=64)
    m.add_argument("--num-heads", type=int, default=8)
    m.add_argument("--num-kv-heads", type=int, default=8)
    m.add_argument("--intermediate-size", type=int, default=1376)
    m.add_argument("--vocab-size", type=int, default=None,
                   help="rows of the embedding and LM head (default: the tokenizer's size); prompts "
                   "only use ids the tokenizer knows")
    m.add_argument("--tokenizer-vocab", type=int, default=4096,
                   help="target vocabulary of the tokenizer trained for the random model (its corpus "
                   "caps it near 1300)")

    v = p.add_argument_group("vision tower of --random-model-arch llava (LLaVA-1.5 shaped: CLIP, "
                             "2-layer projector, feature layer -2, 'default' strategy) or qwen2_vl (ViT "
                             "with 2D rotary, 2x2 patch merger; --image-size unused)")
    v.add_argument("--vision-layers", type=int, default=4)
    v.add_argument("--vision-hidden", type=int, default=256)
    v.add_argument("--vision-heads", type=int, default=4)
    v.add_argument("--vision-intermediate", type=int, default=1024)
    v.add_argument("--image-size", type=int, default=224, help="the tower's input (px)")
    v.add_argument("--patch-size", type=int, default=14,
                   help="(image-size / patch-size)^2 image tokens per image")
    v.add_argument("--min-pixels", type=int, default=56 * 56,
                   help="qwen2_vl: the image processor's min_pixels (Qwen2-VL's default)")
    v.add_argument("--max-pixels", type=int, default=448 * 448,
                   help="qwen2_vl: the image processor's max_pixels (448x448: 256 image tokens)")

    w = p.add_argument_group("workload")
    w.add_argument("--num-prompts", type=int, default=256)
    w.add_argument("--input-len", type=int, default=128,
                   help="prompt tokens; with a LLaVA model, the text tokens (BOS and the one <image> "
                   "placeholder included), to which the image adds its tokens")
    w.add_argument("--source-image-size", default="320x240",
                   help="WxH of the random images of a LLaVA workload, before each engine's processor")
    w.add_argument("--output-len", type=int, default=128)
    w.add_argument("--num-warmup-prompts", type=int, default=4)
    w.add_argument("--warmup-output-len", type=int, default=16)
    w.add_argument("--seed", type=int, default=0)

    e = p.add_argument_group("engines (the same settings for every backend)")
    e.add_argument("--backends", type=_backend_list, default=["vlmserve"],
                   help=f"comma-separated subset of {','.join(BACKENDS)}, run in that order")
    e.add_argument("--dtype", default=None, help="float32 (default on CPU), bfloat16 or float16")
    e.add_argument("--threads", type=int, default=None,
                   help="CPU threads for every backend (default: the CPUs this process may use)")
    e.add_argument("--max-num-seqs", type=int, default=256)
    e.add_argument("--max-num-batched-tokens", type=int, default=None,
                   help="tokens per step (default: the engine's, vlmserve.config.default_max_num_batched_tokens)")
    e.add_argument("--kv-cache-gib", type=int, default=4,
                   help="CPU KV cache space of vlmserve and vLLM (VLMSERVE_/VLLM_CPU_KVCACHE_SPACE)")
    e.add_argument("--enforce-eager", action="store_true", help="vlmserve without CUDA graphs")
    e.add_argument("--hf-batch-size", type=_int_list, default=[64],
                   help="batch size(s) of HF generate, comma-separated; the best is reported")
    e.add_argument("--vllm-python", default=DEFAULT_VLLM_PYTHON,
                   help="the interpreter of the venv where vLLM is installed")
    e.add_argument("--vllm-enforce-eager", action="store_true",
                   help="run vLLM without torch.compile (its CPU default compiles with inductor)")
    e.add_argument("--vllm-timeout", type=float, default=1800, help="seconds before vLLM is given up")

    p.add_argument("--output-json", help="write settings, machine and results here")


# ---- workload ----------------------------------------------------------------------------------
def make_random_model(args, out_dir: str) -> str:
    from vlmserve.testing.checkpoints import make_llava_checkpoint, make_text_checkpoint

    if getattr(args, "model_shape", None):
        from vlmserve.benchmarks.gpu_models import write_model_dir
        args.dummy_weights = True  # each backend makes its weights on the GPU
        return write_model_dir(out_dir, args.model_shape, seed=args.seed, tokenizer_vocab=args.tokenizer_vocab)
    image_tokens = {"llava": (args.image_size // args.patch_size) ** 2,
                    "qwen2_vl": args.max_pixels // (2 * args.patch_size) ** 2}.get(args.random_model_arch, 0)
    overrides = {"hidden_size": args.hidden_size, "intermediate_size": args.intermediate_size,
                 "num_hidden_layers": args.num_layers, "num_attention_heads": args.num_heads,
                 "num_key_value_heads": args.num_kv_heads, "head_dim": args.head_dim,
                 "max_position_embeddings": max(2048, args.input_len + image_tokens + args.output_len)}
    if args.vocab_size:
        overrides["vocab_size"] = args.vocab_size
    if args.random_model_arch == "llama":
        return make_text_checkpoint(out_dir, arch="llama", layout="v5", seed=args.seed,
                                    tokenizer_vocab=args.tokenizer_vocab, **overrides)
    vision = {"hidden_size": args.vision_hidden, "intermediate_size": args.vision_intermediate,
              "num_hidden_layers": args.vision_layers, "num_attention_heads": args.vision_heads}
    if args.random_model_arch == "qwen2_vl":
        return make_random_qwen2_vl(args, out_dir, overrides)
    make_llava_checkpoint(out_dir, layout="hub", seed=args.seed, image_size=args.image_size,
                          patch_size=args.patch_size, vision_overrides=vision,
                          tokenizer_vocab=args.tokenizer_vocab, **overrides)
    write_llava_processor_config(out_dir)
    return out_dir


def write_llava_processor_config(model_dir: str) -> None:
    """processor_config.json, as LLaVA-1.5 checkpoints on the hub carry it: HF's `LlavaProcessor`
    (which HF users and vLLM's LLaVA processing call) takes the patch size, the feature strategy and
    the CLS token count from it to expand `<image>` into the same number of tokens as the model
    produces. vlmserve does not read it."""
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(model_dir)
    with open(os.path.join(model_dir, "processor_config.json"), "w") as f:
        json.dump({"processor_class": "LlavaProcessor", "image_token": "<image>",
                   "patch_size": cfg.vision_config.patch_size, "num_additional_image_tokens": 1,
                   "vision_feature_select_strategy": cfg.vision_feature_select_strategy}, f, indent=2)


def make_random_qwen2_vl(args, out_dir: str, text: dict) -> str:
    """A random-weight Qwen2-VL checkpoint in the hub key layout: the ViT of the --vision-* options
    (14 px patches by default, 2x2 merge), the LM shape of `text`, M-RoPE sections in Qwen2-VL's
    proportions (16:24:24 of 64), and the image processor's --min/--max-pixels."""
    from vlmserve.testing.checkpoints import make_qwen2_vl_checkpoint

    if args.hidden_size != args.num_heads * args.head_dim:
        raise SystemExit(f"qwen2_vl: --hidden-size ({args.hidden_size}) must be --num-heads x --head-dim "
                         f"({args.num_heads} x {args.head_dim}); HF's Qwen2-VL has no separate head_dim")
    if args.vision_hidden % args.vision_heads or args.vision_intermediate % args.vision_hidden:
        raise SystemExit("qwen2_vl: --vision-hidden must be a multiple of --vision-heads, and "
                         "--vision-intermediate a multiple of --vision-hidden (mlp_ratio)")
    half = args.head_dim // 2
    t = half // 4
    h = (half - t) // 2
    text = {k: v for k, v in text.items() if k != "head_dim"}
    text["rope_parameters"] = {"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [half - 2 * h, h, h]}
    vision = {"depth": args.vision_layers, "embed_dim": args.vision_hidden, "num_heads": args.vision_heads,
              "mlp_ratio": args.vision_intermediate // args.vision_hidden, "patch_size": args.patch_size}
    return make_qwen2_vl_checkpoint(out_dir, layout="hub", seed=args.seed, min_pixels=args.min_pixels,
                                    max_pixels=args.max_pixels, merger_scale=1.0, vision_overrides=vision,
                                    tokenizer_vocab=args.tokenizer_vocab, **text)


# Multimodal model types the benchmarks drive, with the text a prompt holds for one image.
IMAGE_PLACEHOLDERS = {"llava": "<image>", "qwen2_vl": "<|vision_start|><|image_pad|><|vision_end|>"}


def is_llava(model_dir: str) -> bool:
    """A multimodal model (LLaVA or Qwen2-VL): the workload is one image + text per request."""
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(model_dir).model_type in IMAGE_PLACEHOLDERS


def _image_tokens(model_dir: str, cfg, image) -> tuple[int, int]:
    """(placeholder token id, tokens one image of this size takes) for the model of `cfg`."""
    if cfg.model_type == "qwen2_vl":  # dynamic resolution: the HF processor's grid, merged 2x2
        from transformers import AutoImageProcessor
        grid = AutoImageProcessor.from_pretrained(model_dir)(images=[image], return_tensors="pt")["image_grid_thw"]
        return cfg.image_token_id, int(grid.prod()) // cfg.vision_config.spatial_merge_size ** 2
    v = cfg.vision_config
    return cfg.image_token_index, (v.image_size // v.patch_size) ** 2 + (cfg.vision_feature_select_strategy == "full")


def prompt_ids(p) -> list[int]:
    """The token ids a request should run: a text prompt's ids, or a LLaVA prompt's expanded ids."""
    return p["ids"] if isinstance(p, dict) else p


# Words the random tokenizers were trained on (vlmserve.testing.checkpoints), ASCII only.
_PROMPT_WORDS = ("the a an of to in is was for on with as by at from it this that be are were not but or "
                 "cat dog bird fish tree house river mountain city road car train boat plane sun moon star "
                 "red green blue yellow purple orange black white small large quick slow bright dark happy "
                 "runs jumps flies swims sees finds makes takes gives tells asks walks sings reads writes "
                 "image picture photo shape circle square triangle cross color describe what where who why").split()


def make_mm_prompts(model_dir: str, num: int, input_len: int, seed: int, source_size: str) -> list[dict]:
    """`num` LLaVA requests: {"prompt": text, "image": PIL image, "ids": expected token ids}. The text
    is `<image>` and a newline, then seeded random words up to `input_len` tokens (BOS and the
    placeholder included); the image is seeded RGB noise of `source_size` (WxH). "ids" has the
    placeholder expanded to the model's image tokens."""
    import numpy as np
    from PIL import Image
    from transformers import AutoConfig, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    cfg = AutoConfig.from_pretrained(model_dir)
    width, height = (int(x) for x in source_size.lower().split("x"))
    image_id, n_image = _image_tokens(model_dir, cfg, Image.new("RGB", (width, height)))
    placeholder = IMAGE_PLACEHOLDERS[cfg.model_type]
    rng, np_rng = random.Random(seed), np.random.default_rng(seed)
    out = []
    for _ in range(num):
        text = placeholder + "\n"
        n = len(tok(text).input_ids)
        tries = 0
        while n < input_len and tries < 200:  # a word that would overshoot is skipped
            cand = text + ("" if text.endswith("\n") else " ") + rng.choice(_PROMPT_WORDS)
            n_cand = len(tok(cand).input_ids)
            tries += 1
            if n_cand <= input_len:
                text, n = cand, n_cand
        ids = tok(text).input_ids
        if ids.count(image_id) != 1:
            raise RuntimeError(f"the prompt {text!r} does not tokenize to one {placeholder}")
        k = ids.index(image_id)
        expanded = ids[:k] + [image_id] * n_image + ids[k + 1:]
        image = Image.fromarray(np_rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
        out.append({"prompt": text, "image": image, "ids": expanded})
    return out


def make_prompts(model_dir: str, num: int, input_len: int, seed: int) -> list[list[int]]:
    """`num` prompts of `input_len` token ids, uniform over the ids both the tokenizer and the model
    know, special tokens excluded."""
    import numpy as np
    from transformers import AutoConfig, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    vocab = AutoConfig.from_pretrained(model_dir).get_text_config().vocab_size
    special = set(tok.all_special_ids) | {int(i) for i in tok.added_tokens_decoder}
    allowed = np.array([i for i in range(min(len(tok), vocab)) if i not in special])
    rng = np.random.default_rng(seed)
    return allowed[rng.integers(0, len(allowed), size=(num, input_len))].tolist()


def _result(backend: str, prompts: list, output_lens: list[int], elapsed: float,
            expected_len: int, ran_prompt_ids: list[list[int]] | None = None, **extra) -> dict:
    """ran_prompt_ids: the prompt token ids the backend reports it ran, checked against the expected."""
    n_in = sum(len(prompt_ids(p)) for p in prompts)
    n_out = sum(output_lens)
    bad = [i for i, n in enumerate(output_lens) if n != expected_len]
    res = {"backend": backend, "num_requests": len(prompts), "prompt_tokens": n_in,
           "output_tokens": n_out, "elapsed_s": elapsed, "requests_per_s": len(prompts) / elapsed,
           "output_tokens_per_s": n_out / elapsed, "total_tokens_per_s": (n_in + n_out) / elapsed,
           "outputs_ok": not bad and len(output_lens) == len(prompts),
           "bad_output_lengths": {i: output_lens[i] for i in bad[:10]}}
    if ran_prompt_ids is not None:
        wrong = [i for i, p in enumerate(prompts)
                 if i >= len(ran_prompt_ids) or list(ran_prompt_ids[i]) != prompt_ids(p)]
        res["prompt_ids_ok"] = not wrong and len(ran_prompt_ids) == len(prompts)
        res["wrong_prompt_ids"] = wrong[:10]
    return {**res, **extra}


@contextlib.contextmanager
def _env(**values: str):
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


# ---- backends ----------------------------------------------------------------------------------
def run_vlmserve(args, model_dir: str, prompts, warmup) -> dict:
    from vlmserve import LLM, SamplingParams

    t0 = time.perf_counter()
    with _env(VLMSERVE_CPU_KVCACHE_SPACE=str(args.kv_cache_gib)):
        llm = LLM(model_dir, dtype=args.dtype, seed=args.seed, max_model_len=args.max_model_len,
                  max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
                  load_format="dummy" if getattr(args, "dummy_weights", False) else "auto",
                  enforce_eager=getattr(args, "enforce_eager", False))
    load_s = time.perf_counter() - t0

    def params(n):
        return SamplingParams(temperature=0, max_tokens=n, ignore_eos=True)

    def inputs(ps):  # a LLaVA request goes in as text + PIL image: the engine tokenizes and processes
        return [{"prompt": p["prompt"], "multi_modal_data": {"image": p["image"]}} if isinstance(p, dict)
                else {"prompt_token_ids": p} for p in ps]

    llm.generate(inputs(warmup), params(args.warmup_output_len), use_tqdm=False)
    engine = llm.llm_engine
    steps0, pre0, cached0 = (engine.stats.num_steps, engine.stats.num_preemptions,
                             engine.stats.num_cached_prompt_tokens)
    t0 = time.perf_counter()
    outs = llm.generate(inputs(prompts), params(args.output_len), use_tqdm=False)
    elapsed = time.perf_counter() - t0
    st = engine.stats
    res = _result("vlmserve", prompts, [len(o.outputs[0].token_ids) for o in outs], elapsed,
                  args.output_len, ran_prompt_ids=[o.prompt_token_ids for o in outs],
                  load_s=load_s, num_steps=st.num_steps - steps0,
                  num_preemptions=st.num_preemptions - pre0,
                  cached_prompt_tokens=st.num_cached_prompt_tokens - cached0,
                  max_batch_seqs=st.max_batch_seqs, num_kv_blocks=engine.num_kv_blocks,
                  async_scheduling=engine.async_scheduling,
                  max_num_batched_tokens=engine.scheduler_config.max_num_batched_tokens,
                  notes=f"max batch {st.max_batch_seqs} seqs, {engine.scheduler_config.max_num_batched_tokens} "
                        f"tokens/step, {st.num_steps - steps0} steps"
                        + (", async scheduling" if engine.async_scheduling else ""))
    return res


def run_hf(args, model_dir: str, prompts, warmup) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    device = "cuda" if torch.cuda.is_available() else "cpu"
    mm = isinstance(prompts[0], dict)
    t0 = time.perf_counter()
    processor = None
    if mm:
        from transformers import AutoProcessor

        processor = AutoProcessor.from_pretrained(model_dir)
        processor.tokenizer.padding_side = "left"
    if getattr(args, "dummy_weights", False):  # a --model-shape model: built on the GPU from its config
        from vlmserve.benchmarks.gpu_models import make_hf_model

        model = make_hf_model(model_dir, getattr(torch, args.dtype), device)
    elif mm:
        model = hf_mm_class(model_dir).from_pretrained(model_dir, dtype=getattr(torch, args.dtype))
    else:
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, args.dtype))
    model = model.to(device).eval()
    load_s = time.perf_counter() - t0
    gen_cfg = model.generation_config
    eos = gen_cfg.eos_token_id if isinstance(gen_cfg.eos_token_id, list) else [gen_cfg.eos_token_id]
    eos = [e for e in eos if e is not None]
    pad = gen_cfg.pad_token_id if gen_cfg.pad_token_id is not None else (eos[0] if eos else 0)

    @torch.inference_mode()
    def generate(batch: list, n: int) -> tuple[list[int], list[list[int]]]:
        """-> output lengths, and the prompt ids that ran (padding dropped)."""
        extra = {}
        if mm:  # the processor expands <image>, left-pads the batch and makes the pixel values
            enc = processor(text=[p["prompt"] for p in batch], images=[p["image"] for p in batch],
                            return_tensors="pt", padding=True)
            ids, mask = enc["input_ids"], enc["attention_mask"]
            extra = {k: v.to(device) for k, v in enc.items() if k not in ("input_ids", "attention_mask")}
        else:
            width = max(map(len, batch))
            ids = torch.full((len(batch), width), pad, dtype=torch.long)
            mask = torch.zeros((len(batch), width), dtype=torch.long)
            for i, p in enumerate(batch):  # left padding
                ids[i, width - len(p):] = torch.tensor(p)
                mask[i, width - len(p):] = 1
        width = ids.shape[1]
        out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), do_sample=False,
                             max_new_tokens=n, min_new_tokens=n, pad_token_id=pad, **extra)
        new = out[:, width:].cpu()
        lens = []
        for row in new.tolist():  # up to and including the first EOS, if any came out
            stop = next((j for j, t in enumerate(row) if t in eos), None)
            lens.append(len(row) if stop is None else stop + 1)
        return lens, [r[m.bool()].tolist() for r, m in zip(ids, mask)]

    runs, failed = [], []
    for bs in args.hf_batch_size:
        lens: list[int] = []
        ran: list[list[int]] = []
        try:
            generate(warmup[:bs], args.warmup_output_len)
            t0 = time.perf_counter()
            for i in range(0, len(prompts), bs):
                batch_lens, batch_ids = generate(prompts[i:i + bs], args.output_len)
                lens += batch_lens
                ran += batch_ids
        except torch.OutOfMemoryError:  # a batch size too large for the device: the others still count
            failed.append({"batch_size": bs, "error": "out of memory"})
            print(f"  hf batch {bs}: out of memory", file=sys.stderr, flush=True)
            gc.collect()
            if device == "cuda":
                torch.cuda.empty_cache()
            continue
        elapsed = time.perf_counter() - t0
        runs.append(_result("hf", prompts, lens, elapsed, args.output_len, ran_prompt_ids=ran,
                            load_s=load_s, batch_size=bs, notes=f"generate, batch {bs}"))
        print(f"  hf batch {bs}: {runs[-1]['output_tokens_per_s']:.1f} output tok/s in {elapsed:.1f}s",
              file=sys.stderr, flush=True)
    if not runs:
        raise RuntimeError("HF generate ran out of memory at every batch size: "
                           + ",".join(map(str, args.hf_batch_size)))
    best = max(runs, key=lambda r: (r["outputs_ok"] and r.get("prompt_ids_ok", True), r["output_tokens_per_s"]))
    best = dict(best, all_batch_sizes=[{k: r[k] for k in ("batch_size", "elapsed_s", "output_tokens_per_s")}
                                       for r in runs] + failed)
    if len(args.hf_batch_size) > 1:
        best["notes"] += " (best of " + ",".join(map(str, args.hf_batch_size)) + \
            "".join(f"; {f['batch_size']}: out of memory" for f in failed) + ")"
    return best


def hf_mm_class(model_dir: str):
    """HF's class of a multimodal checkpoint the benchmarks drive (LLaVA or Qwen2-VL)."""
    import transformers
    from transformers import AutoConfig

    name = {"llava": "LlavaForConditionalGeneration",
            "qwen2_vl": "Qwen2VLForConditionalGeneration"}[AutoConfig.from_pretrained(model_dir).model_type]
    return getattr(transformers, name)


def vllm_mm_settings(model_dir: str) -> dict:
    """vLLM's limit_mm_per_prompt and mm_processor_kwargs for a one-image workload: no video
    (nor its profiling), and Qwen2-VL's min/max pixels as the checkpoint's preprocessor_config.json
    names them, so that vLLM resizes to the same grid whichever way its processor reads them."""
    from transformers import AutoConfig

    if AutoConfig.from_pretrained(model_dir).model_type != "qwen2_vl":
        return {"limit_mm_per_prompt": {"image": 1}}
    with open(os.path.join(model_dir, "preprocessor_config.json")) as f:
        pre = json.load(f)
    return {"limit_mm_per_prompt": {"image": 1, "video": 0},
            "mm_processor_kwargs": {k: pre[k] for k in ("min_pixels", "max_pixels") if k in pre}}


def _forward_peer_output(stream, lines: list[str]) -> None:
    for line in stream:
        lines.append(line)
        if not line.startswith(PEER_RESULT_PREFIX):
            print("  [vllm] " + line, end="", file=sys.stderr, flush=True)


def _cpu_list(threads: int) -> str:
    cpus = sorted(os.sched_getaffinity(0))[:threads]
    return ",".join(map(str, cpus))


def run_vllm(args, model_dir: str, prompts, warmup) -> dict:
    if not os.path.exists(args.vllm_python):
        raise FileNotFoundError(f"no vLLM interpreter at {args.vllm_python} (see --vllm-python; "
                                "shared/peers/setup-vllm-cpu.sh sets one up)")
    with tempfile.TemporaryDirectory(prefix="vlmserve-bench-") as td:
        path = os.path.join(td, "prompts.json")
        if isinstance(prompts[0], dict):  # LLaVA: the text, and the pixels as lossless PNG files
            def save(ps, tag):
                paths = []
                for i, p in enumerate(ps):
                    paths.append(os.path.join(td, f"{tag}-{i:05d}.png"))
                    p["image"].save(paths[-1])
                return paths
            data = {"prompts": [p["prompt"] for p in prompts], "images": save(prompts, "image"),
                    "warmup_prompts": [p["prompt"] for p in warmup], "warmup_images": save(warmup, "warmup"),
                    "engine_args": vllm_mm_settings(model_dir)}
        else:
            data = {"prompts": prompts, "warmup_prompts": warmup}
        with open(path, "w") as f:
            json.dump(data, f)
        cmd = [args.vllm_python, PEER_SCRIPT, "--model", model_dir, "--prompts", path,
               "--output-len", str(args.output_len), "--warmup-output-len", str(args.warmup_output_len),
               "--dtype", args.dtype, "--max-model-len", str(args.max_model_len), "--seed", str(args.seed),
               "--max-num-seqs", str(args.max_num_seqs),
               "--max-num-batched-tokens", str(args.max_num_batched_tokens or max(8192, args.max_num_seqs))]  # the CPU default
        if args.vllm_enforce_eager:
            cmd.append("--enforce-eager")
        env = dict(os.environ)
        # vLLM's "auto" binding keeps one core for its engine process: bind the same cores as the others.
        env.setdefault("VLLM_CPU_OMP_THREADS_BIND", _cpu_list(args.threads))
        env["VLLM_CPU_KVCACHE_SPACE"] = str(args.kv_cache_gib)
        env["OMP_NUM_THREADS"] = str(args.threads)
        env.pop("PYTHONPATH", None)  # its venv, not ours
        print(f"  [vllm] {shlex.join(cmd)}", file=sys.stderr, flush=True)
        # Its own session, so that a timeout ends vLLM's engine and worker processes with it.
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                bufsize=1, start_new_session=True)
        lines: list[str] = []
        reader = threading.Thread(target=_forward_peer_output, args=(proc.stdout, lines), daemon=True)
        reader.start()
        try:
            proc.wait(timeout=args.vllm_timeout)
        except BaseException as e:  # a timeout, or Ctrl-C: end the whole group
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            if isinstance(e, subprocess.TimeoutExpired):
                raise TimeoutError(f"vLLM ran past --vllm-timeout={args.vllm_timeout:g}s") from None
            raise
        reader.join(timeout=10)
    results = [ln for ln in lines if ln.startswith(PEER_RESULT_PREFIX)]
    result = json.loads(results[-1][len(PEER_RESULT_PREFIX):]) if results else None
    if proc.returncode != 0 or result is None:
        raise RuntimeError(f"vLLM exited with {proc.returncode}:\n" + "".join(lines[-15:]))
    return _result("vllm", prompts, result["output_lens"], result["elapsed_s"], args.output_len,
                   ran_prompt_ids=result.get("prompt_token_ids"), load_s=result["load_s"], vllm_version=result["vllm_version"],
                   torch_version=result["torch_version"], peer_settings=result.get("settings"),
                   notes=f"vLLM {result['vllm_version']} CPU" + (", eager" if args.vllm_enforce_eager else ""))


RUNNERS = {"vlmserve": run_vlmserve, "hf": run_hf, "vllm": run_vllm}


# ---- report ------------------------------------------------------------------------------------
def format_table(results: list[dict]) -> str:
    head = ("backend", "req/s", "output tok/s", "total tok/s", "elapsed s", "outputs", "notes")
    rows = []
    for r in results:
        if "error" in r:
            rows.append((r["backend"], "-", "-", "-", "-", "ERROR", r["error"].splitlines()[0][:60]))
            continue
        rows.append((r["backend"], f"{r['requests_per_s']:.2f}", f"{r['output_tokens_per_s']:.1f}",
                     f"{r['total_tokens_per_s']:.1f}", f"{r['elapsed_s']:.2f}",
                     "WRONG LENGTH" if not r["outputs_ok"] else
                     "WRONG PROMPT" if not r.get("prompt_ids_ok", True) else "ok", r.get("notes", "")))
    widths = [max(len(str(x)) for x in col) for col in zip(head, *rows)]

    def line(cells) -> str:
        return "| " + " | ".join(str(c).ljust(w) for c, w in zip(cells, widths)) + " |"

    return "\n".join([line(head), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, rows)])


def machine_info(threads: int) -> dict:
    import torch
    import transformers

    cpu = platform.processor()
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
    return {"cpu": cpu, "cpus_available": len(os.sched_getaffinity(0)), "threads": threads,
            "torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version(), "platform": platform.platform(),
            "cuda": torch.cuda.is_available()}


def main(args: argparse.Namespace) -> int:
    import torch

    from vlmserve.version import __version__

    if args.dtype is None:
        args.dtype = "bfloat16" if torch.cuda.is_available() else "float32"
    if args.threads is None:
        args.threads = len(os.sched_getaffinity(0))
    if args.num_warmup_prompts < 1:
        raise SystemExit("--num-warmup-prompts must be at least 1")
    torch.set_num_threads(args.threads)
    env = {k: os.environ[k] for k in RELEVANT_ENV if k in os.environ}
    argv = sys.argv[3:] if sys.argv[1:3] == ["bench", "throughput"] else sys.argv[1:]
    command = " ".join([*(f"{k}={shlex.quote(v)}" for k, v in env.items()), "vlmserve bench throughput",
                        shlex.join(argv)])
    started = datetime.datetime.now().astimezone()
    load_start = os.getloadavg()

    tmp_dir = None
    model_dir = args.model
    if args.random_model:
        model_dir = args.random_model_dir or (tmp_dir := tempfile.mkdtemp(prefix="vlmserve-bench-model-"))
        print(f"writing a random-weight {args.random_model_arch} checkpoint to {model_dir}",
              file=sys.stderr, flush=True)
        make_random_model(args, model_dir)
    try:
        n_all = args.num_prompts + args.num_warmup_prompts
        mm = is_llava(model_dir)
        if mm:
            everything = make_mm_prompts(model_dir, n_all, args.input_len, args.seed, args.source_image_size)
        else:
            everything = make_prompts(model_dir, n_all, args.input_len, args.seed)
        prompts, warmup = everything[:args.num_prompts], everything[args.num_prompts:]
        lens = [len(prompt_ids(p)) for p in everything]
        args.max_model_len = max(lens) + max(args.output_len, args.warmup_output_len)
        shape = (f"{min(lens)}-{max(lens)}" if min(lens) != max(lens) else f"{lens[0]}") + " tokens"
        if mm:
            shape += f" (1 image {args.source_image_size} + text)"
        results = []
        for name in args.backends:
            print(f"== {name}: {len(prompts)} prompts x {shape} in -> {args.output_len} out, "
                  f"{args.dtype}, {args.threads} threads", file=sys.stderr, flush=True)
            before = os.getloadavg()
            try:
                res = RUNNERS[name](args, model_dir, prompts, warmup)
            except Exception as e:  # record it and go on with the other backends
                res = {"backend": name, "error": f"{type(e).__name__}: {e}"}
            gc.collect()  # the backend's model and KV cache go before the next one loads
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            res["loadavg_before"] = before
            res["loadavg_after"] = os.getloadavg()
            results.append(res)
            if "error" in res:
                print(f"   {name} failed: {res['error']}", file=sys.stderr, flush=True)
            else:
                print(f"   {name}: {res['output_tokens_per_s']:.1f} output tok/s, {res['elapsed_s']:.1f}s",
                      file=sys.stderr, flush=True)
    finally:
        if tmp_dir:
            shutil.rmtree(tmp_dir, ignore_errors=True)

    table = format_table(results)
    load_end = os.getloadavg()
    machine = machine_info(args.threads)
    print()
    print(f"{command}")
    print(f"{started:%Y-%m-%d %H:%M %Z}; {machine['cpu']}, {args.threads} threads; torch {machine['torch']}; "
          f"vlmserve {__version__}; load average {load_start[0]:.2f} at start, {load_end[0]:.2f} at end")
    print(table)
    if args.output_json:
        settings = {k: v for k, v in vars(args).items() if k not in ("func", "command", "benchmark")}
        with open(args.output_json, "w") as f:
            json.dump({"command": command, "date": started.isoformat(timespec="seconds"),
                       "vlmserve_version": __version__, "machine": machine, "env": env,
                       "loadavg_start": load_start, "loadavg_end": load_end,
                       "settings": settings, "results": results}, f, indent=2)
    return 0 if all("error" not in r and r["outputs_ok"] for r in results) else 1


if __name__ == "__main__":
    from vlmserve.entrypoints.cli import main as cli_main

    sys.exit(cli_main(["bench", "throughput", *sys.argv[1:]]))
