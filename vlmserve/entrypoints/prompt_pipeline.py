"""`LLM.generate` with the prompts' media off the critical path: each prompt's items go through
the model's multimodal processor in a thread pool (image decoding, resizing and normalizing
release the GIL), and the engine starts stepping as soon as the first prompts are ready, queueing
the others in prompt order as they come, while it runs.

Contract kept from the serial version: a bad prompt raises an error of the same type whose
message starts with "prompt <index>: ", and leaves the engine clean (every request this call
queued is aborted, work not started is cancelled)."""
from __future__ import annotations

import os
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor

from vlmserve.outputs import RequestOutput


def media_workers() -> int:
    """Threads for media processing: VLMSERVE_MEDIA_WORKERS, else the CPUs less one for the engine
    loop, at most 8."""
    env = os.environ.get("VLMSERVE_MEDIA_WORKERS")
    if env:
        return max(1, int(env))
    return min(8, max(1, len(os.sched_getaffinity(0)) - 1))


def named_error(e: BaseException, index: int) -> BaseException:
    """The error of prompt `index`, its message prefixed with the prompt's index, same type."""
    if not isinstance(e, Exception) or str(e).startswith(f"prompt {index}: "):
        return e
    try:
        named = type(e)(f"prompt {index}: {e}")
    except Exception:  # a type that takes other arguments: keep it, with a note
        e.add_note(f"(in prompt {index})")
        return e
    return named


def done_future(fn: Callable[[], object]) -> Future:
    """A finished future holding fn()'s result or its exception (work done in this thread)."""
    f: Future = Future()
    try:
        f.set_result(fn())
    except Exception as e:
        f.set_exception(e)
    return f


class PreparedPrompts:
    """Runs `prepare(i)` for the prompts that need it in a pool (`inline(i)` says which run here,
    at once); `take(i)` gives prompt i's result or raises its error, named."""

    def __init__(self, n: int, prepare: Callable[[int], tuple], inline: Callable[[int], bool]):
        self.pool = None
        self.futures: list[Future] = []
        for i in range(n):
            if inline(i):
                self.futures.append(done_future(lambda i=i: prepare(i)))
            else:
                if self.pool is None:
                    self.pool = ThreadPoolExecutor(media_workers(), thread_name_prefix="vlmserve-media")
                self.futures.append(self.pool.submit(prepare, i))

    def ready(self, i: int) -> bool:
        return self.futures[i].done()

    def take(self, i: int) -> tuple:
        try:
            return self.futures[i].result()
        except Exception as e:
            err = named_error(e, i)
            if err is e:
                raise
            raise err from e

    def close(self) -> None:
        """Cancel what has not started and wait for what has: no worker outlives the call."""
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)


def run_pipelined(engine, prepared: PreparedPrompts, params: list, new_request_id: Callable[[], str],
                  on_output: Callable[[RequestOutput], None] | None = None) -> list[RequestOutput]:
    """Queue prompts in order as they are ready and step the engine meanwhile; outputs in prompt
    order. prepared.take(i) gives (token ids, multimodal items, prompt text)."""
    n = len(params)
    request_ids: list[str] = []
    done: dict[str, RequestOutput] = {}
    try:
        while len(request_ids) < n or engine.has_unfinished_requests():
            # queue every prompt that is ready; wait for the next one only when the engine is idle
            while len(request_ids) < n and (prepared.ready(len(request_ids)) or
                                            not engine.has_unfinished_requests()):
                i = len(request_ids)
                ids, items, text = prepared.take(i)
                rid = new_request_id()
                try:
                    engine.add_request(rid, ids, params[i], prompt=text, mm_items=items)
                except Exception as e:
                    err = named_error(e, i)
                    if err is e:
                        raise
                    raise err from e
                request_ids.append(rid)
            if engine.has_unfinished_requests():
                for out in engine.step():
                    done[out.request_id] = out
                    if on_output is not None:
                        on_output(out)
    except BaseException:
        for rid in request_ids:
            engine.abort_request(rid)
        raise
    finally:
        prepared.close()
    return [done[rid] for rid in request_ids]
