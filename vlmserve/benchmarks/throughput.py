"""Offline throughput. The same prompts (random token ids from a seeded RNG, no special tokens) and
the same output length (EOS ignored) go through each chosen backend in turn: vlmserve, Hugging Face
`generate` (batched, left-padded, greedy) and vLLM's CPU build (in its own interpreter, through
vlmserve/benchmarks/vllm_peer_throughput.py). Each backend gets a warm-up on a few other prompts,
then one timed run, which must give every request exactly --output-len tokens."""
from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import json
import os
import platform
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
                     help="write a random-weight llama checkpoint of the shape below and use it")
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

    w = p.add_argument_group("workload")
    w.add_argument("--num-prompts", type=int, default=256)
    w.add_argument("--input-len", type=int, default=128)
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
    e.add_argument("--max-num-batched-tokens", type=int, default=8192)
    e.add_argument("--kv-cache-gib", type=int, default=4,
                   help="CPU KV cache space of vlmserve and vLLM (VLMSERVE_/VLLM_CPU_KVCACHE_SPACE)")
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
    from vlmserve.testing.checkpoints import make_text_checkpoint

    overrides = {"hidden_size": args.hidden_size, "intermediate_size": args.intermediate_size,
                 "num_hidden_layers": args.num_layers, "num_attention_heads": args.num_heads,
                 "num_key_value_heads": args.num_kv_heads, "head_dim": args.head_dim,
                 "max_position_embeddings": max(2048, args.input_len + args.output_len)}
    if args.vocab_size:
        overrides["vocab_size"] = args.vocab_size
    return make_text_checkpoint(out_dir, arch="llama", layout="v5", seed=args.seed,
                                tokenizer_vocab=args.tokenizer_vocab, **overrides)


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


def _result(backend: str, prompts: list[list[int]], output_lens: list[int], elapsed: float,
            expected_len: int, **extra) -> dict:
    n_in = sum(map(len, prompts))
    n_out = sum(output_lens)
    bad = [i for i, n in enumerate(output_lens) if n != expected_len]
    return {"backend": backend, "num_requests": len(prompts), "prompt_tokens": n_in,
            "output_tokens": n_out, "elapsed_s": elapsed, "requests_per_s": len(prompts) / elapsed,
            "output_tokens_per_s": n_out / elapsed, "total_tokens_per_s": (n_in + n_out) / elapsed,
            "outputs_ok": not bad and len(output_lens) == len(prompts),
            "bad_output_lengths": {i: output_lens[i] for i in bad[:10]}, **extra}


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
                  max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens)
    load_s = time.perf_counter() - t0

    def params(n):
        return SamplingParams(temperature=0, max_tokens=n, ignore_eos=True)

    llm.generate([{"prompt_token_ids": p} for p in warmup], params(args.warmup_output_len), use_tqdm=False)
    engine = llm.llm_engine
    steps0, pre0, cached0 = (engine.stats.num_steps, engine.stats.num_preemptions,
                             engine.stats.num_cached_prompt_tokens)
    t0 = time.perf_counter()
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params(args.output_len), use_tqdm=False)
    elapsed = time.perf_counter() - t0
    st = engine.stats
    res = _result("vlmserve", prompts, [len(o.outputs[0].token_ids) for o in outs], elapsed,
                  args.output_len, load_s=load_s, num_steps=st.num_steps - steps0,
                  num_preemptions=st.num_preemptions - pre0,
                  cached_prompt_tokens=st.num_cached_prompt_tokens - cached0,
                  max_batch_seqs=st.max_batch_seqs, num_kv_blocks=engine.num_kv_blocks,
                  notes=f"max batch {st.max_batch_seqs} seqs, {st.num_steps - steps0} steps")
    return res


def run_hf(args, model_dir: str, prompts, warmup) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    device = "cuda" if torch.cuda.is_available() else "cpu"
    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, args.dtype)).to(device).eval()
    load_s = time.perf_counter() - t0
    gen_cfg = model.generation_config
    eos = gen_cfg.eos_token_id if isinstance(gen_cfg.eos_token_id, list) else [gen_cfg.eos_token_id]
    eos = [e for e in eos if e is not None]
    pad = gen_cfg.pad_token_id if gen_cfg.pad_token_id is not None else (eos[0] if eos else 0)

    @torch.inference_mode()
    def generate(batch: list[list[int]], n: int) -> list[int]:
        width = max(map(len, batch))
        ids = torch.full((len(batch), width), pad, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for i, p in enumerate(batch):  # left padding
            ids[i, width - len(p):] = torch.tensor(p)
            mask[i, width - len(p):] = 1
        out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), do_sample=False,
                             max_new_tokens=n, min_new_tokens=n, pad_token_id=pad)
        new = out[:, width:].cpu()
        lens = []
        for row in new.tolist():  # up to and including the first EOS, if any came out
            stop = next((j for j, t in enumerate(row) if t in eos), None)
            lens.append(len(row) if stop is None else stop + 1)
        return lens

    runs = []
    for bs in args.hf_batch_size:
        generate(warmup[:bs], args.warmup_output_len)
        t0 = time.perf_counter()
        lens: list[int] = []
        for i in range(0, len(prompts), bs):
            lens += generate(prompts[i:i + bs], args.output_len)
        elapsed = time.perf_counter() - t0
        runs.append(_result("hf", prompts, lens, elapsed, args.output_len, load_s=load_s, batch_size=bs,
                            notes=f"generate, batch {bs}"))
        print(f"  hf batch {bs}: {runs[-1]['output_tokens_per_s']:.1f} output tok/s in {elapsed:.1f}s",
              file=sys.stderr, flush=True)
    best = max(runs, key=lambda r: (r["outputs_ok"], r["output_tokens_per_s"]))
    best = dict(best, all_batch_sizes=[{k: r[k] for k in ("batch_size", "elapsed_s", "output_tokens_per_s")}
                                       for r in runs])
    if len(runs) > 1:
        best["notes"] += " (best of " + ",".join(map(str, args.hf_batch_size)) + ")"
    return best


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
        with open(path, "w") as f:
            json.dump({"prompts": prompts, "warmup_prompts": warmup}, f)
        cmd = [args.vllm_python, PEER_SCRIPT, "--model", model_dir, "--prompts", path,
               "--output-len", str(args.output_len), "--warmup-output-len", str(args.warmup_output_len),
               "--dtype", args.dtype, "--max-model-len", str(args.max_model_len), "--seed", str(args.seed),
               "--max-num-seqs", str(args.max_num_seqs),
               "--max-num-batched-tokens", str(args.max_num_batched_tokens)]
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
                   load_s=result["load_s"], vllm_version=result["vllm_version"],
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
                     "ok" if r["outputs_ok"] else "WRONG LENGTH", r.get("notes", "")))
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
    args.max_model_len = args.input_len + args.output_len
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
        print(f"writing a random-weight llama checkpoint to {model_dir}", file=sys.stderr, flush=True)
        make_random_model(args, model_dir)
    try:
        n_all = args.num_prompts + args.num_warmup_prompts
        everything = make_prompts(model_dir, n_all, args.input_len, args.seed)
        prompts, warmup = everything[:args.num_prompts], everything[args.num_prompts:]
        results = []
        for name in args.backends:
            print(f"== {name}: {len(prompts)} prompts x {args.input_len} in -> {args.output_len} out, "
                  f"{args.dtype}, {args.threads} threads", file=sys.stderr, flush=True)
            before = os.getloadavg()
            try:
                res = RUNNERS[name](args, model_dir, prompts, warmup)
            except Exception as e:  # record it and go on with the other backends
                res = {"backend": name, "error": f"{type(e).__name__}: {e}"}
            gc.collect()  # the backend's model and KV cache go before the next one loads
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
