"""`LLM.generate` with the prompts' media off the critical path: each prompt's items go through
the model's multimodal processor in a thread pool (image decoding, resizing and normalizing
release the GIL), and the engine starts stepping as soon as the first prompts are ready, queueing
the others in prompt order as they come, while it runs.

Contract kept from the serial version: a bad prompt raises an error of the same type whose
message starts with "prompt <index>: ", and leaves the engine clean (every request this call
queued is aborted, work not started is cancelled)."""
from __future__ import annotations

import os
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor, wait

from vlmserve.outputs import RequestOutput


def media_workers() -> int:
    """Threads for media processing: VLMSERVE_MEDIA_WORKERS (0: none, every prompt processed in
    the calling thread before it is queued), else the CPUs less one for the engine loop, at most 8."""
    env = os.environ.get("VLMSERVE_MEDIA_WORKERS")
    if env:
        return max(0, int(env))
    return min(8, max(1, len(os.sched_getaffinity(0)) - 1))


_pools: dict[int, ThreadPoolExecutor] = {}
_pools_lock = threading.Lock()


def shared_pool(workers: int) -> ThreadPoolExecutor:
    """One long-lived pool per size: its threads (and their torch/OpenMP state) are made once,
    not at every generate call."""
    with _pools_lock:
        if workers not in _pools:
            _pools[workers] = ThreadPoolExecutor(workers, thread_name_prefix="vlmserve-media")
        return _pools[workers]


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
        self.futures: list[Future] = []
        pooled = [i for i in range(n) if not inline(i)]
        workers = media_workers()
        # one prompt with media (a latency-bound call) is processed here: no hand-off to a thread
        pool = shared_pool(workers) if workers and len(pooled) > 1 else None
        for i in range(n):
            if pool is None or inline(i):
                self.futures.append(done_future(lambda i=i: prepare(i)))
            else:
                self.futures.append(pool.submit(prepare, i))

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
        """Cancel what has not started and wait for what has: no work of this call outlives it."""
        for f in self.futures:
            f.cancel()
        wait(self.futures)


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
