"""POST /v1/chat/completions, streaming or not, with image parts."""
from __future__ import annotations

import asyncio
import json
import time

from fastapi import Request
from fastapi.responses import JSONResponse, StreamingResponse

from vlmserve.entrypoints.chat_utils import prepare_chat
from vlmserve.entrypoints.openai.logprobs_format import chat_logprobs
from vlmserve.entrypoints.openai.protocol import ChatCompletionRequest, random_id
from vlmserve.entrypoints.openai.state import APIError, ServerState, watch_disconnect
from vlmserve.entrypoints.openai.stream_deltas import StreamDeltas
from vlmserve.outputs import RequestOutput


async def prepare_chat_prompt(state: ServerState, req: ChatCompletionRequest):
    """-> (prompt text, token ids with placeholders expanded, multimodal items)."""
    text, ids, items = await prepare_chat(
        state.engine.engine, req.messages, req.chat_template or state.chat_template, state.content_format,
        state.media, req.add_generation_prompt, req.continue_final_message, req.mm_processor_kwargs)
    if len(ids) > state.max_model_len:
        raise APIError(f"This model's maximum context length is {state.max_model_len} tokens. However, "
                       f"your messages resulted in {len(ids)} tokens.", param="messages")
    return text, ids, items


async def create_chat_completion(state: ServerState, req: ChatCompletionRequest, raw: Request):
    state.check_model(req.model)
    if req.top_logprobs is not None and not 0 <= req.top_logprobs <= 20:
        raise APIError("top_logprobs must be between 0 and 20", param="top_logprobs")
    text, ids, items = await prepare_chat_prompt(state, req)
    requested = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
    max_tokens = state.max_tokens_for(len(ids), requested)
    logprobs = (req.top_logprobs or 0) if req.logprobs else None
    params = req.to_sampling_params(max_tokens, logprobs)
    request_id = random_id("chatcmpl")
    model = req.model or state.served_model_names[0]
    gen = state.engine.generate(request_id, ids, params, prompt=text, mm_items=items)
    if req.stream:
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        return StreamingResponse(_stream(state, gen, request_id, model, params, logprobs, include_usage),
                                 media_type="text/event-stream")

    async def consume() -> RequestOutput:
        last = None
        async for out in gen:
            last = out
        return last

    task = asyncio.ensure_future(consume())
    watcher = asyncio.ensure_future(watch_disconnect(raw, task))
    try:
        final = await task
    finally:
        watcher.cancel()
    return JSONResponse(_response(state, final, request_id, model, logprobs))


def _text_of(state: ServerState):
    return state.engine.engine.output_processor.token_text


def _response(state, out: RequestOutput, request_id, model, top_n) -> dict:
    choices = []
    for c in out.outputs:
        choices.append({
            "index": c.index, "message": {"role": "assistant", "content": c.text},
            "logprobs": chat_logprobs(state.tokenizer, c.token_ids, c.logprobs, top_n, _text_of(state))
            if top_n is not None else None,
            "finish_reason": c.finish_reason, "stop_reason": c.stop_reason,
        })
    n_prompt = len(out.prompt_token_ids)
    n_out = sum(len(c.token_ids) for c in out.outputs)
    return {"id": request_id, "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": choices,
            "usage": {"prompt_tokens": n_prompt, "completion_tokens": n_out, "total_tokens": n_prompt + n_out}}


def _sse(obj) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


async def _stream(state: ServerState, gen, request_id, model, params, top_n, include_usage):
    created = int(time.time())
    deltas = StreamDeltas(params.stop_strings)
    text_of = _text_of(state)

    def chunk(choices, usage=None):
        body = {"id": request_id, "object": "chat.completion.chunk", "created": created, "model": model,
                "choices": choices}
        if include_usage:
            body["usage"] = usage
        return _sse(body)

    for i in range(params.n):
        yield chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                      "finish_reason": None}])
    final = None
    try:
        async for out in gen:
            final = out
            for c in out.outputs:
                d = deltas.next(c.index, c, tokens_matter=top_n is not None)
                if d is None:
                    continue
                choice = {"index": c.index, "delta": {"content": d.text} if d.text else {},
                          "logprobs": None, "finish_reason": c.finish_reason if d.finished else None}
                if d.finished:
                    choice["stop_reason"] = c.stop_reason
                if top_n is not None and d.token_ids:
                    choice["logprobs"] = chat_logprobs(state.tokenizer, d.token_ids,
                                                       c.logprobs[d.first_token:], top_n, text_of)
                yield chunk([choice])
        if include_usage and final is not None:
            n_prompt = len(final.prompt_token_ids)
            n_out = sum(len(c.token_ids) for c in final.outputs)
            yield chunk([], {"prompt_tokens": n_prompt, "completion_tokens": n_out,
                             "total_tokens": n_prompt + n_out})
    except Exception as e:  # headers are sent: report the error in the stream
        yield _sse({"error": {"message": str(e), "type": "InternalServerError", "param": None, "code": 500}})
    yield "data: [DONE]\n\n"
