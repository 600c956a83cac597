"""The OpenAI-compatible HTTP server: `vlmserve serve [MODEL]`."""
from __future__ import annotations

import argparse
import hmac
import json
import logging
import os

import torch
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response

from vlmserve.config import CacheConfig, ModelConfig, SchedulerConfig
from vlmserve.engine.async_engine import AsyncLLMEngine, EngineDeadError
from vlmserve.engine.llm_engine import LLMEngine
from vlmserve.entrypoints.chat_utils import (detect_content_format, load_chat_template, model_chat_template,
                                            parse_messages, placeholder_for, render_chat)
from vlmserve.entrypoints.llm import DEMO_MODEL_NAME, default_device, resolve_model_path
from vlmserve.entrypoints.openai.metrics import ServerMetrics
from vlmserve.entrypoints.openai.protocol import (ChatCompletionRequest, CompletionRequest, DetokenizeRequest,
                                                   ModelCard, ModelList, TokenizeRequest)
from vlmserve.entrypoints.openai.serving_chat import create_chat_completion
from vlmserve.entrypoints.openai.serving_completion import create_completion
from vlmserve.entrypoints.openai.state import APIError, ServerState
from vlmserve.multimodal.media import MediaConnector
from vlmserve.version import __version__

logger = logging.getLogger("vlmserve.server")


def _error(message: str, status: int, type_: str, param: str | None = None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": type_, "param": param, "code": status}},
                        status_code=status)


def build_app(state: ServerState) -> FastAPI:
    app = FastAPI(title="vlmserve", version=__version__)
    app.state.vlm = state

    @app.middleware("http")
    async def authenticate(request: Request, call_next):
        if state.api_key and request.url.path.startswith("/v1"):
            header = request.headers.get("authorization", "")
            expected = f"Bearer {state.api_key}"
            if not hmac.compare_digest(header.encode(), expected.encode()):
                return _error("Invalid API key", 401, "AuthenticationError")
        return await call_next(request)

    @app.exception_handler(APIError)
    async def api_error(_, e: APIError):
        return _error(e.message, e.status, e.type, e.param)

    @app.exception_handler(RequestValidationError)
    async def validation_error(_, e: RequestValidationError):
        errs = e.errors()
        first = errs[0] if errs else {}
        loc = ".".join(str(x) for x in first.get("loc", ()) if x != "body")
        return _error(f"invalid request: {loc}: {first.get('msg', 'malformed')}", 400, "BadRequestError",
                      loc or None)

    @app.exception_handler(ValueError)
    async def value_error(_, e: ValueError):  # bad input found below the HTTP layer
        return _error(str(e), 400, "BadRequestError")

    @app.exception_handler(EngineDeadError)
    async def engine_dead(_, e):
        return _error(str(e), 503, "ServiceUnavailableError")

    @app.exception_handler(Exception)
    async def internal(_, e: Exception):
        logger.exception("internal error")
        return _error(f"internal error: {type(e).__name__}", 500, "InternalServerError")

    @app.get("/health")
    async def health():
        if not state.engine.is_healthy:
            return _error("the engine has stopped", 503, "ServiceUnavailableError")
        return Response(status_code=200)

    @app.get("/version")
    async def version():
        return {"version": __version__}

    @app.get("/v1/models")
    async def models():
        return ModelList(data=[ModelCard(id=n, root=state.engine.engine.model_config.model,
                                         max_model_len=state.max_model_len)
                               for n in state.served_model_names])

    @app.post("/v1/chat/completions")
    async def chat(req: ChatCompletionRequest, raw: Request):
        return await create_chat_completion(state, req, raw)

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest, raw: Request):
        return await create_completion(state, req, raw)

    @app.post("/v1/embeddings")
    async def embeddings(raw: Request):
        raise APIError(f"the model `{state.served_model_names[0]}` generates text; it does not serve "
                       "embeddings (start an embedding model with --task embed)")

    @app.post("/tokenize")
    async def tokenize(req: TokenizeRequest):
        state.check_model(req.model)
        tok = state.tokenizer
        if req.messages is not None:
            parsed = parse_messages(req.messages, state.content_format, placeholder_for(state.engine.engine))
            text = render_chat(tok, parsed.conversation, state.chat_template, req.add_generation_prompt)
            ids = tok(text, add_special_tokens=False).input_ids
        elif req.prompt is not None:
            ids = tok(req.prompt, add_special_tokens=req.add_special_tokens).input_ids
        else:
            raise APIError("give 'prompt' or 'messages'")
        return {"tokens": ids, "count": len(ids), "max_model_len": state.max_model_len}

    @app.post("/detokenize")
    async def detokenize(req: DetokenizeRequest):
        state.check_model(req.model)
        vocab = state.engine.engine.vocab_size
        if any(not 0 <= t < vocab for t in req.tokens):
            raise APIError(f"token ids must be in 0..{vocab - 1}", param="tokens")
        return {"prompt": state.tokenizer.decode(req.tokens)}

    @app.get("/metrics")
    async def metrics():
        return Response(state.metrics.render(state.engine.engine), media_type="text/plain; version=0.0.4")

    return app


# ---- command line ------------------------------------------------------------------------
def parse_limit_mm(value: str) -> dict[str, int]:
    value = value.strip()
    if value.startswith("{"):
        try:
            d = json.loads(value)
        except json.JSONDecodeError as e:
            raise argparse.ArgumentTypeError(f"--limit-mm-per-prompt: bad JSON: {e}") from e
    else:
        d = {}
        for part in value.split(","):
            key, sep, num = part.partition("=")
            if not sep:
                raise argparse.ArgumentTypeError("--limit-mm-per-prompt takes image=2[,video=1] or JSON")
            d[key.strip()] = num.strip()
    try:
        return {k: int(v) for k, v in d.items()}
    except (TypeError, ValueError) as e:
        raise argparse.ArgumentTypeError(f"--limit-mm-per-prompt: counts must be integers: {e}") from e


def _json_dict(value: str) -> dict:
    try:
        d = json.loads(value)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"not valid JSON: {e}") from e
    if not isinstance(d, dict):
        raise argparse.ArgumentTypeError("expected a JSON object")
    return d


def add_serve_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", nargs="?", default=None,
                   help=f"a local HF model directory (default: the built-in {DEMO_MODEL_NAME})")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--task", default="generate", choices=["generate"])
    p.add_argument("--dtype", default="auto")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-model-len", type=int, default=None)
    p.add_argument("--max-num-seqs", type=int, default=256)
    p.add_argument("--max-num-batched-tokens", type=int, default=None)
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--num-kv-blocks", type=int, default=None)
    p.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    p.add_argument("--no-enable-prefix-caching", dest="enable_prefix_caching", action="store_false")
    p.add_argument("--limit-mm-per-prompt", type=parse_limit_mm, default=None)
    p.add_argument("--mm-processor-kwargs", type=_json_dict, default=None)
    p.add_argument("--chat-template", default=None, help="a file or an inline Jinja template")
    p.add_argument("--chat-template-content-format", choices=["auto", "string", "openai"], default="auto")
    p.add_argument("--allowed-local-media-path", default=None)
    p.add_argument("--allowed-media-domains", nargs="*", default=None,
                   help="hosts whose URLs may resolve to non-public addresses")
    p.add_argument("--api-key", default=os.environ.get("VLMSERVE_API_KEY"))
    p.add_argument("--served-model-name", nargs="*", default=None)
    p.add_argument("--trust-remote-code", action="store_true")
    p.add_argument("--tensor-parallel-size", type=int, default=1)
    p.add_argument("--enforce-eager", action="store_true")
    p.add_argument("--async-scheduling", action=argparse.BooleanOptionalAction, default=None,
                   help="prepare step n+1 on the host while the device runs step n (default: on for CUDA)")
    p.add_argument("--device", default=None)
    p.add_argument("--log-interval", type=float, default=10.0, help="seconds between throughput logs")


def build_state(args) -> ServerState:
    if args.tensor_parallel_size != 1:
        raise SystemExit("--tensor-parallel-size > 1 is not supported yet")
    dev = torch.device(args.device) if args.device else default_device()
    path = resolve_model_path(args.model)
    model_config = ModelConfig.create(path, args.dtype, args.max_model_len, args.seed,
                                      args.trust_remote_code, dev)
    model_config.enforce_eager = args.enforce_eager
    batched = args.max_num_batched_tokens or max(2048, args.max_num_seqs)
    engine = LLMEngine(model_config,
                       CacheConfig(block_size=args.block_size, num_kv_blocks=args.num_kv_blocks,
                                   gpu_memory_utilization=args.gpu_memory_utilization,
                                   enable_prefix_caching=args.enable_prefix_caching),
                       SchedulerConfig(max_num_seqs=args.max_num_seqs, max_num_batched_tokens=batched,
                                       max_model_len=model_config.max_model_len,
                                       async_scheduling=args.async_scheduling),
                       dev, limit_mm_per_prompt=args.limit_mm_per_prompt,
                       mm_processor_kwargs=args.mm_processor_kwargs)
    names = args.served_model_name or [DEMO_MODEL_NAME if args.model in (None, DEMO_MODEL_NAME) else args.model]
    template = load_chat_template(args.chat_template) or model_chat_template(path, engine.tokenizer)
    fmt = args.chat_template_content_format
    if fmt == "auto":
        fmt = detect_content_format(template) if template else "string"
    async_engine = AsyncLLMEngine(engine, log_interval_s=args.log_interval)
    metrics = ServerMetrics(names[0])
    async_engine.on_step = lambda outs, dt: metrics.on_step(engine, outs, dt)
    return ServerState(engine=async_engine, served_model_names=names, chat_template=template,
                       content_format=fmt, media=MediaConnector(args.allowed_local_media_path,
                                                                args.allowed_media_domains),
                       metrics=metrics, api_key=args.api_key)


def run_server(args) -> None:
    import uvicorn

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    state = build_state(args)
    logger.info("serving %s on http://%s:%d (chat content format: %s)",
                ", ".join(state.served_model_names), args.host, args.port, state.content_format)
    try:
        uvicorn.run(build_app(state), host=args.host, port=args.port, log_level="info")
    finally:
        state.engine.shutdown()
