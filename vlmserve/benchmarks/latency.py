"""Latency of one batch (default: a single request): time to first token (generate with one output
token) and the whole generation (--output-len tokens, EOS ignored), medians over --num-iters-ttft and
--num-iters runs after warm-ups, each run on new prompts and new images (so neither the prefix cache
nor the encoder cache serves them); the TTFT's 10th and 90th percentiles too. Decode speed is
(output_len - 1) / (latency - TTFT) tokens per second per sequence. Takes the model and workload
options of `vlmserve bench throughput` (--num-prompts and the HF batch sizes are not used);
--backends vlmserve,hf runs HF `generate` on the same inputs."""
from __future__ import annotations

import argparse
import datetime
import gc
import json
import shutil
import statistics
import sys
import tempfile
import time

from vlmserve.benchmarks import throughput as tp


def add_cli_args(p: argparse.ArgumentParser) -> None:
    tp.add_cli_args(p)
    g = p.add_argument_group("latency")
    g.add_argument("--batch-size", type=int, default=1)
    g.add_argument("--num-iters", type=int, default=5, help="timed runs of the whole generation")
    g.add_argument("--num-iters-ttft", type=int, default=None,
                   help="timed TTFT runs (default: --num-iters); each is one short request, so more are cheap")
    g.add_argument("--num-iters-warmup", type=int, default=2, help="untimed runs before each kind")


def _timed(fn, runs: int, warm: int) -> list[float]:
    times = []
    for i in range(warm + runs):
        t0 = time.perf_counter()
        fn(i)
        if i >= warm:
            times.append(time.perf_counter() - t0)
    return times


def _summary(name: str, ttft: list[float], full: list[float], output_len: int, **extra) -> dict:
    t, f = statistics.median(ttft), statistics.median(full)
    p10, p90 = _percentiles(ttft, (10, 90))
    return {"backend": name, "ttft_ms": 1e3 * t, "ttft_p10_ms": 1e3 * p10, "ttft_p90_ms": 1e3 * p90,
            "latency_s": f, "ttft_all_ms": [1e3 * x for x in ttft],
            "latency_all_s": full,
            "decode_tok_per_s": (output_len - 1) / (f - t) if output_len > 1 and f > t else None, **extra}


def _percentiles(xs: list[float], ps: tuple[int, ...]) -> list[float]:
    """Linear-interpolated percentiles (statistics.quantiles' 'inclusive' method); one value: itself."""
    if len(xs) == 1:
        return [xs[0]] * len(ps)
    cuts = statistics.quantiles(xs, n=100, method="inclusive")
    return [cuts[p - 1] for p in ps]


def _ttft_runs(args) -> int:
    return args.num_iters if args.num_iters_ttft is None else args.num_iters_ttft


def run_vlmserve(args, model_dir, batches) -> dict:
    import torch

    from vlmserve import LLM, SamplingParams

    llm = LLM(model_dir, dtype=args.dtype, seed=args.seed, max_model_len=args.max_model_len,
              max_num_seqs=max(args.batch_size, 1), max_num_batched_tokens=args.max_num_batched_tokens,
              load_format="dummy" if getattr(args, "dummy_weights", False) else "auto",
              enforce_eager=args.enforce_eager)
    inputs = [[{"prompt": p["prompt"], "multi_modal_data": {"image": p["image"]}} if isinstance(p, dict)
               else {"prompt_token_ids": p} for p in b] for b in batches]

    def gen(n):
        def run(i):
            outs = llm.generate(inputs[i + (0 if n == 1 else _ttft_runs(args) + args.num_iters_warmup)],
                                SamplingParams(temperature=0, max_tokens=n, ignore_eos=True), use_tqdm=False)
            assert all(len(o.outputs[0].token_ids) == n for o in outs)
        return run

    ttft = _timed(gen(1), _ttft_runs(args), args.num_iters_warmup)
    full = _timed(gen(args.output_len), args.num_iters, args.num_iters_warmup)
    pre = None
    if isinstance(batches[0][0], dict):  # the CPU image preprocessing inside each TTFT
        engine = llm.llm_engine
        tok = engine.tokenizer(batches[0][0]["prompt"]).input_ids
        image = batches[0][0]["image"]
        engine.process_multimodal(tok, {"image": image})  # a first call in this thread sets up its pools
        times = []
        for _ in range(5):
            t0 = time.perf_counter()
            engine.process_multimodal(tok, {"image": image})
            times.append(time.perf_counter() - t0)
        pre = statistics.median(times) * 1e3
    graphs = llm.llm_engine.runner.decode_graphs is not None
    res = _summary("vlmserve", ttft, full, args.output_len, preprocess_ms_per_request=pre,
                   cuda_graphs=graphs, notes=("CUDA graphs" if graphs else "eager"))
    del llm
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return res


def run_hf(args, model_dir, batches) -> dict:
    import torch

    dummy = getattr(args, "dummy_weights", False)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if dummy:
        from vlmserve.benchmarks.gpu_models import make_hf_model
        model = make_hf_model(model_dir, getattr(torch, args.dtype), device)
    else:
        from transformers import AutoModelForCausalLM, LlavaForConditionalGeneration
        cls = LlavaForConditionalGeneration if isinstance(batches[0][0], dict) else AutoModelForCausalLM
        model = cls.from_pretrained(model_dir, dtype=getattr(torch, args.dtype)).to(device).eval()
    processor = None
    if isinstance(batches[0][0], dict):
        from transformers import AutoProcessor
        processor = AutoProcessor.from_pretrained(model_dir)
        processor.tokenizer.padding_side = "left"
    pad = model.generation_config.pad_token_id or 0

    @torch.inference_mode()
    def gen(n):
        def run(i):
            batch = batches[i + (0 if n == 1 else _ttft_runs(args) + args.num_iters_warmup)]
            if processor is not None:
                enc = processor(text=[p["prompt"] for p in batch], images=[p["image"] for p in batch],
                                return_tensors="pt", padding=True).to(device)
            else:
                ids = torch.tensor(batch, device=device)
                enc = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
            out = model.generate(**enc, do_sample=False, max_new_tokens=n, min_new_tokens=n, pad_token_id=pad)
            assert out.shape[1] - enc["input_ids"].shape[1] == n
            if device == "cuda":
                torch.cuda.synchronize()
        return run

    ttft = _timed(gen(1), _ttft_runs(args), args.num_iters_warmup)
    full = _timed(gen(args.output_len), args.num_iters, args.num_iters_warmup)
    res = _summary("hf", ttft, full, args.output_len, notes="generate, SDPA")
    del model
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
    return res


def main(args: argparse.Namespace) -> int:
    import torch

    if args.dtype is None:
        args.dtype = "bfloat16" if torch.cuda.is_available() else "float32"
    started = datetime.datetime.now().astimezone()
    argv = sys.argv[3:] if sys.argv[1:3] == ["bench", "latency"] else sys.argv[1:]
    command = "vlmserve bench latency " + " ".join(argv)
    tmp_dir = None
    model_dir = args.model
    if args.random_model:
        model_dir = args.random_model_dir or (tmp_dir := tempfile.mkdtemp(prefix="vlmserve-bench-model-"))
        tp.make_random_model(args, model_dir)
    try:
        n_batches = _ttft_runs(args) + args.num_iters + 2 * args.num_iters_warmup  # TTFT runs, then full runs: all new
        n = n_batches * args.batch_size
        if tp.is_llava(model_dir):
            prompts = tp.make_mm_prompts(model_dir, n, args.input_len, args.seed, args.source_image_size)
        else:
            prompts = tp.make_prompts(model_dir, n, args.input_len, args.seed)
        batches = [prompts[i:i + args.batch_size] for i in range(0, n, args.batch_size)]
        args.max_model_len = max(len(tp.prompt_ids(p)) for p in prompts) + args.output_len
        results = []
        for name in args.backends:
            if name == "vllm":
                continue
            print(f"== {name}: batch {args.batch_size}, {args.output_len} tokens out", file=sys.stderr, flush=True)
            try:
                results.append({"vlmserve": run_vlmserve, "hf": run_hf}[name](args, model_dir, batches))
            except Exception as e:
                results.append({"backend": name, "error": f"{type(e).__name__}: {e}"})
                print(f"   {name} failed: {results[-1]['error']}", file=sys.stderr, flush=True)
    finally:
        if tmp_dir:
            shutil.rmtree(tmp_dir, ignore_errors=True)
    dev = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    print(f"\n{command}\n{started:%Y-%m-%d %H:%M %Z}; {dev}; torch {torch.__version__}")
    print("| backend | TTFT ms (p10-p90) | latency s | decode tok/s per seq | notes |\n|---|---|---|---|---|")
    for r in results:
        if "error" in r:
            print(f"| {r['backend']} | - | - | - | ERROR {r['error'][:60]} |")
        else:
            dec = f"{r['decode_tok_per_s']:.1f}" if r["decode_tok_per_s"] else "-"
            ttft = f"{r['ttft_ms']:.1f} ({r['ttft_p10_ms']:.1f}-{r['ttft_p90_ms']:.1f})"
            print(f"| {r['backend']} | {ttft} | {r['latency_s']:.3f} | {dec} | {r['notes']} |")
    if args.output_json:
        settings = {k: v for k, v in vars(args).items() if k not in ("func", "command", "benchmark")}
        with open(args.output_json, "w") as f:
            json.dump({"command": command, "date": started.isoformat(timespec="seconds"), "device": dev,
                       "torch": torch.__version__, "settings": settings, "results": results}, f, indent=2,
                      default=str)
    return 0 if all("error" not in r for r in results) else 1
