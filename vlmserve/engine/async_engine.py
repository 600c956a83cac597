"""The engine for the server: a background thread steps the engine while the event loop takes
requests, so that concurrent requests are batched together. Each request gets an async stream of
its outputs; a request whose client goes away is aborted and its KV blocks freed."""
from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

from vlmserve.engine.llm_engine import LLMEngine
from vlmserve.outputs import RequestOutput
from vlmserve.sampling_params import SamplingParams

logger = logging.getLogger(__name__)


@dataclass
class _NewRequest:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    prompt: str | None
    mm_items: list
    stream: asyncio.Queue
    loop: asyncio.AbstractEventLoop


class EngineDeadError(RuntimeError):
    pass


class AsyncLLMEngine:
    def __init__(self, engine: LLMEngine, log_interval_s: float = 10.0):
        self.engine = engine
        self._inbox: queue.Queue = queue.Queue()
        self._streams: dict[str, tuple[asyncio.Queue, asyncio.AbstractEventLoop]] = {}
        self._wake = threading.Event()
        self._stop = False
        self._dead: BaseException | None = None
        self._log_interval_s = log_interval_s
        self.on_step = None  # callback(outputs, step_seconds), for metrics
        self._thread = threading.Thread(target=self._loop, name="vlmserve-engine", daemon=True)
        self._thread.start()

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    # ---- the engine thread ---------------------------------------------------------------
    def _loop(self) -> None:
        eng = self.engine
        last_log, last_prompt, last_gen = time.monotonic(), 0, 0
        while not self._stop:
            self._drain_inbox()
            if not eng.has_unfinished_requests():
                self._wake.wait(timeout=0.5)
                self._wake.clear()
                continue
            t0 = time.perf_counter()
            try:
                outputs = eng.step(include_unfinished=True)
            except BaseException as e:  # the engine is broken: fail every request, stop
                logger.exception("engine step failed")
                self._dead = e
                for rid, (q, loop) in list(self._streams.items()):
                    loop.call_soon_threadsafe(q.put_nowait, e)
                self._streams.clear()
                return
            dt = time.perf_counter() - t0
            for out in outputs:
                entry = self._streams.get(out.request_id)
                if entry is None:
                    continue
                q, loop = entry
                loop.call_soon_threadsafe(q.put_nowait, out)
                if out.finished:
                    del self._streams[out.request_id]
            if self.on_step is not None:
                self.on_step(outputs, dt)
            now = time.monotonic()
            if now - last_log >= self._log_interval_s:
                st = eng.stats
                span = now - last_log
                logger.info("prompt throughput: %.1f tokens/s, generation throughput: %.1f tokens/s, "
                            "running: %d, waiting: %d, KV cache usage: %.1f%%",
                            (st.num_prompt_tokens_computed - last_prompt) / span,
                            (st.num_generation_tokens - last_gen) / span,
                            len(eng.scheduler.running), eng.scheduler.num_waiting,
                            100 * eng.block_manager.usage)
                last_log, last_prompt, last_gen = now, st.num_prompt_tokens_computed, st.num_generation_tokens

    def _drain_inbox(self) -> None:
        while True:
            try:
                item = self._inbox.get_nowait()
            except queue.Empty:
                return
            if isinstance(item, str):  # an abort
                self.engine.abort_request(item)
                self._streams.pop(item, None)
                continue
            try:
                self.engine.add_request(item.request_id, item.prompt_token_ids, item.params,
                                        prompt=item.prompt, mm_items=item.mm_items)
            except Exception as e:
                item.loop.call_soon_threadsafe(item.stream.put_nowait, e)
                continue
            self._streams[item.request_id] = (item.stream, item.loop)

    # ---- the event loop side -------------------------------------------------------------
    async def generate(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                       prompt: str | None = None, mm_items: list | None = None) -> AsyncIterator[RequestOutput]:
        """Outputs of one request as it progresses; the last has finished=True. Cancelling the
        consumer (e.g. the client disconnected) aborts the request."""
        if self._dead is not None:
            raise EngineDeadError(f"the engine has stopped: {self._dead}")
        self.engine.validate_prompt(prompt_token_ids)
        stream: asyncio.Queue = asyncio.Queue()
        self._inbox.put(_NewRequest(request_id, prompt_token_ids, params, prompt, mm_items or [],
                                    stream, asyncio.get_running_loop()))
        self._wake.set()
        finished = False
        try:
            while True:
                item = await stream.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
                if item.finished:
                    finished = True
                    return
        finally:
            if not finished:
                self.abort(request_id)

    def abort(self, request_id: str) -> None:
        self._inbox.put(request_id)
        self._wake.set()

    def shutdown(self) -> None:
        self._stop = True
        self._wake.set()
        self._thread.join(timeout=10)

    @property
    def is_healthy(self) -> bool:
        return self._dead is None and self._thread.is_alive()
