"""Online serving benchmark against any OpenAI-compatible server (vlmserve's or vLLM's): chat
requests with one image each, sent at a request rate (Poisson arrivals) or with a fixed number in
flight, streamed, with a fixed output length. Reports what vLLM's serving benchmark reports: request
throughput, output tokens/s, time to first token (TTFT), time per output token after the first
(TPOT) and inter-token latency (ITL), each as mean, median and p99."""
from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import random
import statistics
import time

import httpx


def add_cli_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--base-url", default="http://127.0.0.1:8000", help="the server, without /v1")
    p.add_argument("--model", default=None, help="model name (default: the server's first)")
    p.add_argument("--api-key", default=None)
    p.add_argument("--num-prompts", type=int, default=64)
    p.add_argument("--request-rate", type=float, default=float("inf"), help="requests/s (inf: all at once)")
    p.add_argument("--max-concurrency", type=int, default=None, help="requests in flight at most")
    p.add_argument("--output-len", type=int, default=64)
    p.add_argument("--image-size", default="320x240", help="WxH of the random images")
    p.add_argument("--prompt", default="Describe the image.")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output-json", default=None)


def _image_url(w: int, h: int, rng: random.Random) -> str:
    from PIL import Image

    img = Image.frombytes("RGB", (w, h), bytes(rng.getrandbits(8) for _ in range(w * h * 3)))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


async def _one(client: httpx.AsyncClient, url: str, body: dict, headers: dict) -> dict:
    t0 = time.perf_counter()
    ttft, stamps, n_tokens, error = None, [], 0, None
    try:
        async with client.stream("POST", url, json=body, headers=headers) as r:
            if r.status_code != 200:
                return {"ok": False, "error": f"HTTP {r.status_code}: {(await r.aread())[:200]!r}"}
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if chunk.get("usage"):
                    n_tokens = chunk["usage"]["completion_tokens"]
                choices = chunk.get("choices") or []
                if choices and choices[0].get("delta", {}).get("content"):
                    now = time.perf_counter()
                    if ttft is None:
                        ttft = now - t0
                    stamps.append(now)
    except httpx.HTTPError as e:
        error = f"{type(e).__name__}: {e}"
    end = time.perf_counter()
    if error or ttft is None:
        return {"ok": False, "error": error or "no tokens"}
    itl = [b - a for a, b in zip(stamps, stamps[1:])]
    tpot = (end - t0 - ttft) / (n_tokens - 1) if n_tokens > 1 else 0.0
    return {"ok": True, "ttft": ttft, "tpot": tpot, "itl": itl, "latency": end - t0, "output_tokens": n_tokens}


def _stats(values: list[float]) -> dict:
    if not values:
        return {"mean": 0.0, "median": 0.0, "p99": 0.0}
    s = sorted(values)
    return {"mean": statistics.fmean(s), "median": statistics.median(s),
            "p99": s[min(len(s) - 1, int(round(0.99 * (len(s) - 1))))]}


async def run(args) -> dict:
    rng = random.Random(args.seed)
    w, h = (int(x) for x in args.image_size.lower().split("x"))
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    async with httpx.AsyncClient(timeout=httpx.Timeout(600.0), limits=httpx.Limits(max_connections=None)) as client:
        model = args.model or (await client.get(args.base_url + "/v1/models", headers=headers)).json()["data"][0]["id"]
        bodies = [{"model": model, "stream": True, "stream_options": {"include_usage": True},
                   "max_tokens": args.output_len, "min_tokens": args.output_len, "ignore_eos": True,
                   "temperature": 0,
                   "messages": [{"role": "user", "content": [
                       {"type": "image_url", "image_url": {"url": _image_url(w, h, rng)}},
                       {"type": "text", "text": args.prompt}]}]} for _ in range(args.num_prompts)]
        sem = asyncio.Semaphore(args.max_concurrency) if args.max_concurrency else None
        url = args.base_url + "/v1/chat/completions"

        async def send(body):
            if sem is None:
                return await _one(client, url, body, headers)
            async with sem:
                return await _one(client, url, body, headers)

        t0 = time.perf_counter()
        tasks = []
        for body in bodies:
            tasks.append(asyncio.ensure_future(send(body)))
            if args.request_rate != float("inf"):
                await asyncio.sleep(rng.expovariate(args.request_rate))
        results = await asyncio.gather(*tasks)
        duration = time.perf_counter() - t0
    ok = [r for r in results if r["ok"]]
    out_tokens = sum(r["output_tokens"] for r in ok)
    return {"model": model, "num_prompts": args.num_prompts, "completed": len(ok),
            "failed": len(results) - len(ok), "errors": [r["error"] for r in results if not r["ok"]][:3],
            "duration_s": duration, "request_throughput": len(ok) / duration,
            "output_throughput": out_tokens / duration, "total_output_tokens": out_tokens,
            "ttft_ms": {k: v * 1000 for k, v in _stats([r["ttft"] for r in ok]).items()},
            "tpot_ms": {k: v * 1000 for k, v in _stats([r["tpot"] for r in ok]).items()},
            "itl_ms": {k: v * 1000 for k, v in _stats([x for r in ok for x in r["itl"]]).items()},
            "request_rate": args.request_rate, "max_concurrency": args.max_concurrency,
            "output_len": args.output_len, "image_size": args.image_size}


def format_report(res: dict) -> str:
    lines = [f"model {res['model']}: {res['completed']}/{res['num_prompts']} completed in {res['duration_s']:.2f} s",
             f"request throughput {res['request_throughput']:.2f} req/s, output {res['output_throughput']:.1f} tok/s",
             "metric      mean     median   p99"]
    for name in ("ttft_ms", "tpot_ms", "itl_ms"):
        s = res[name]
        lines.append(f"{name:<10} {s['mean']:8.1f} {s['median']:8.1f} {s['p99']:8.1f}")
    if res["failed"]:
        lines.append(f"FAILED {res['failed']}: {res['errors']}")
    return "\n".join(lines)


def main(args) -> int:
    res = asyncio.run(run(args))
    print(format_report(res))
    if args.output_json:
        with open(args.output_json, "w") as f:
            json.dump(res, f, indent=2)
    return 1 if res["failed"] else 0
