"""POST /v1/completions: text or token-id prompts (one or a list), streaming or not."""
from __future__ import annotations

import asyncio
import json
import time

from fastapi import Request
from fastapi.responses import JSONResponse, StreamingResponse

from vlmserve.entrypoints.openai.logprobs_format import completion_logprobs
from vlmserve.entrypoints.openai.protocol import CompletionRequest, random_id
from vlmserve.entrypoints.openai.state import APIError, ServerState, watch_disconnect
from vlmserve.entrypoints.openai.stream_deltas import StreamDeltas


def _prompts(state: ServerState, prompt) -> list[tuple[str | None, list[int]]]:
    if isinstance(prompt, str):
        prompt = [prompt]
    elif prompt and all(isinstance(t, int) for t in prompt):
        prompt = [prompt]
    if not prompt:
        raise APIError("the prompt is empty", param="prompt")
    out = []
    for p in prompt:
        if isinstance(p, str):
            if not p:
                raise APIError("the prompt is empty", param="prompt")
            out.append((p, state.tokenizer(p).input_ids))
        else:
            if not p:
                raise APIError("the prompt is empty", param="prompt")
            out.append((None, list(p)))
    return out


async def create_completion(state: ServerState, req: CompletionRequest, raw: Request):
    state.check_model(req.model)
    if req.logprobs is not None and not 0 <= req.logprobs <= 20:
        raise APIError("logprobs must be between 0 and 20", param="logprobs")
    prompts = _prompts(state, req.prompt)
    engine = state.engine.engine
    gens, metas = [], []
    base_id = random_id("cmpl")
    model = req.model or state.served_model_names[0]
    for k, (text, ids) in enumerate(prompts):
        ids, items = engine.process_multimodal(ids, None)
        engine.validate_prompt(ids)
        max_tokens = state.max_tokens_for(len(ids), req.max_tokens)
        params = req.to_sampling_params(max_tokens, req.logprobs,
                                        req.prompt_logprobs if not req.echo else (req.logprobs or 0))
        metas.append((text, ids, params))
    for k, (text, ids, params) in enumerate(metas):
        gens.append(state.engine.generate(f"{base_id}-{k}", ids, params, prompt=text))
    n = metas[0][2].n
    if req.stream:
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        return StreamingResponse(_stream(state, gens, base_id, model, metas, req, include_usage),
                                 media_type="text/event-stream")

    async def consume(gen):
        last = None
        async for out in gen:
            last = out
        return last

    task = asyncio.ensure_future(asyncio.gather(*(consume(g) for g in gens)))
    watcher = asyncio.ensure_future(watch_disconnect(raw, task))
    try:
        finals = await task
    finally:
        watcher.cancel()
    text_of = engine.output_processor.token_text
    choices, n_prompt, n_out = [], 0, 0
    for k, out in enumerate(finals):
        n_prompt += len(out.prompt_token_ids)
        for c in out.outputs:
            n_out += len(c.token_ids)
            text, lp = c.text, None
            if req.echo:
                prompt_text = metas[k][0] if metas[k][0] is not None else state.tokenizer.decode(out.prompt_token_ids)
                text = prompt_text + text
            if req.logprobs is not None:
                if req.echo:
                    pl = completion_logprobs(out.prompt_token_ids, out.prompt_logprobs, req.logprobs, text_of)
                    gl = completion_logprobs(c.token_ids, c.logprobs, req.logprobs, text_of,
                                             start_offset=len(text) - len(c.text))
                    lp = {key: pl[key] + gl[key] for key in pl}
                else:
                    lp = completion_logprobs(c.token_ids, c.logprobs, req.logprobs, text_of)
            choices.append({"index": k * n + c.index, "text": text, "logprobs": lp,
                            "finish_reason": c.finish_reason, "stop_reason": c.stop_reason})
    return JSONResponse({"id": base_id, "object": "text_completion", "created": int(time.time()),
                         "model": model, "choices": choices,
                         "usage": {"prompt_tokens": n_prompt, "completion_tokens": n_out,
                                   "total_tokens": n_prompt + n_out}})


async def _stream(state, gens, base_id, model, metas, req, include_usage):
    created = int(time.time())
    text_of = state.engine.engine.output_processor.token_text
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(k, gen):
        try:
            async for out in gen:
                await queue.put((k, out))
        except Exception as e:
            await queue.put((k, e))
        finally:
            await queue.put((k, None))

    tasks = [asyncio.ensure_future(pump(k, g)) for k, g in enumerate(gens)]
    deltas = [StreamDeltas(meta[2].stop_strings) for meta in metas]
    finals = {}
    remaining = len(gens)
    n = metas[0][2].n
    try:
        while remaining:
            k, out = await queue.get()
            if out is None:
                remaining -= 1
                continue
            if isinstance(out, Exception):
                yield f"data: {json.dumps({'error': {'message': str(out), 'type': 'InternalServerError', 'param': None, 'code': 500}})}\n\n"
                continue
            finals[k] = out
            for c in out.outputs:
                d = deltas[k].next(c.index, c, tokens_matter=req.logprobs is not None)
                if d is None:
                    continue
                lp = completion_logprobs(d.token_ids, c.logprobs[d.first_token:], req.logprobs, text_of) \
                    if req.logprobs is not None else None
                body = {"id": base_id, "object": "text_completion", "created": created, "model": model,
                        "choices": [{"index": k * n + c.index, "text": d.text, "logprobs": lp,
                                     "finish_reason": c.finish_reason if d.finished else None,
                                     "stop_reason": c.stop_reason if d.finished else None}]}
                if include_usage:
                    body["usage"] = None
                yield f"data: {json.dumps(body, ensure_ascii=False)}\n\n"
        if include_usage:
            n_prompt = sum(len(o.prompt_token_ids) for o in finals.values())
            n_out = sum(len(c.token_ids) for o in finals.values() for c in o.outputs)
            body = {"id": base_id, "object": "text_completion", "created": created, "model": model,
                    "choices": [], "usage": {"prompt_tokens": n_prompt, "completion_tokens": n_out,
                                             "total_tokens": n_prompt + n_out}}
            yield f"data: {json.dumps(body)}\n\n"
        yield "data: [DONE]\n\n"
    finally:
        for t in tasks:
            t.cancel()
