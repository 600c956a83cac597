"""CUDA graphs of a vision encoder call: the CLIP tower of LLaVA runs ~370 small kernels for 0.6 ms
of FLOPs per image, so eagerly it is bound by launches (11 ms on an H100).

One graph per (image-count bucket, per-image input shape, dtype), captured into one shared memory
pool, at most `max_graphs` of them: at first use, or ahead of the first request by `warm_up` (every
bucket of the shapes met so far, i.e. in the engine's memory profiling). A call of n images replays
the pieces `split_count` gives, each the smallest bucket >= its images (the images are independent
in the tower, so the padded rows change nothing in the real ones).

Every count goes through graphs, because an eager call at a count not met before is slow once:
cuDNN's attention builds an execution plan per shape, ~70 ms on an H200 (scripts/gpu_alternatives.py
--parts sdpa_first), and a throughput run meets many counts past the buckets. New shapes once the
set is full, and everything after a failed capture, run eagerly. The output is copied out of the
graph's memory: the next replay of any graph in the pool may write over it."""
from __future__ import annotations

import logging
from collections.abc import Callable

import torch

from vlmserve.worker.cuda_graphs import graph_capture

logger = logging.getLogger(__name__)

COUNT_BUCKETS = (1, 2, 4, 8, 16)


def split_count(n: int, buckets: tuple[int, ...] = COUNT_BUCKETS) -> list[int]:
    """Images per replay for a call of n: the largest bucket while n exceeds it, then the rest in
    one padded piece where that is cheap (a bucket of up to 8 images, whose time hardly grows with
    its count, or padding of at most a quarter), else the largest bucket below it and so on."""
    pieces = []
    while n > 0:
        up = next((b for b in buckets if b >= n), None)
        if up is not None and (up <= 8 or 4 * (up - n) <= n):
            pieces.append(n)
            break
        down = max(b for b in buckets if b <= n)
        pieces.append(down)
        n -= down
    return pieces


def capture_on_side_stream(run: Callable[[], torch.Tensor], pool, stream: torch.cuda.Stream,
                           warm_up: bool = True):
    """(graph, output) of `run` captured on the side `stream` into `pool`, after one eager run there
    if `warm_up` (kernel selection, cuDNN's plans, Triton's compiles and allocations stay outside the
    graph). The current stream waits for the side stream whether or not the capture succeeds; a
    failure (the encoder syncs with the host, say) raises."""
    current = torch.cuda.current_stream(stream.device)
    stream.wait_stream(current)
    try:
        with torch.cuda.stream(stream):
            if warm_up:
                run()
            graph = torch.cuda.CUDAGraph()
            with graph_capture(graph, pool, stream):
                out = run()
    finally:
        current.wait_stream(stream)
    return graph, out


class EncoderGraphs:
    def __init__(self, encode: Callable[[torch.Tensor], torch.Tensor], device: torch.device,
                 count_buckets: tuple[int, ...] = COUNT_BUCKETS, max_graphs: int = 10):
        self.encode = encode
        self.device = device
        self.count_buckets = count_buckets
        self.max_graphs = max_graphs
        self.graphs: dict[tuple, tuple[torch.cuda.CUDAGraph, torch.Tensor, torch.Tensor]] = {}
        self.pool = None
        self.enabled = True
        self.num_replays = 0

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if not self.enabled or not x.is_cuda:
            return self.encode(x)
        entries = []
        for k in split_count(x.shape[0], self.count_buckets):
            entry = self._graph(next(b for b in self.count_buckets if b >= k), x)
            if entry is None:
                return self.encode(x)
            entries.append((k, entry))
        out, start = None, 0
        for k, (graph, static_in, static_out) in entries:
            static_in[:k].copy_(x[start:start + k])
            graph.replay()
            self.num_replays += 1
            if out is None:
                out = torch.empty((x.shape[0], *static_out.shape[1:]), dtype=static_out.dtype, device=x.device)
            out[start:start + k].copy_(static_out[:k])  # before the next replay writes over the pool
            start += k
        return out

    def _graph(self, bucket: int, x: torch.Tensor):
        key = (bucket, tuple(x.shape[1:]), x.dtype)
        entry = self.graphs.get(key)
        if entry is None and len(self.graphs) < self.max_graphs:
            entry = self._capture(key)
        return entry

    def warm_up(self) -> None:
        """Capture every bucket of the input shapes met so far, before requests arrive."""
        for shape, dtype in {(k[1], k[2]) for k in self.graphs}:
            for bucket in self.count_buckets:
                if self.enabled and (bucket, shape, dtype) not in self.graphs \
                        and len(self.graphs) < self.max_graphs:
                    self._capture((bucket, shape, dtype))

    @torch.inference_mode()
    def _capture(self, key: tuple):
        bucket, shape, dtype = key
        static_in = torch.zeros((bucket, *shape), dtype=dtype, device=self.device)
        try:
            graph, static_out = capture_on_side_stream(lambda: self.encode(static_in), self.pool,
                                                       torch.cuda.Stream(self.device))
        except Exception as e:  # an encoder that syncs with the host, say: stay eager from now on
            logger.warning("CUDA graph capture of the encoder failed (%s); encoding eagerly", e)
            self.enabled = False
            return None
        if self.pool is None:
            self.pool = graph.pool()
        self.graphs[key] = (graph, static_in, static_out)
        logger.info("captured a CUDA graph of the encoder for %d x %s %s", bucket, shape, dtype)
        return self.graphs[key]


class GridEncoderGraphs:
    """CUDA graphs of a packed vision tower (Qwen2-VL's and Qwen2.5-VL's ViTs: `tower(pixels, grids,
    tables)`, `tower.call_tables(grids, device)`, `tower.graph_safe(grids)`), one per call layout,
    i.e. the (frames, rows, columns) grid of each item in the call.

    Why: eagerly, a lone 1024x1024 image (5476 patches, 32 blocks) takes the host about as long to
    queue as the GPU to run (~28 ms each on an H200 host: cuBLAS's and cuDNN's per-call host work,
    Triton's launcher), so the GPU waits on launches through the tower in a request's time to first
    token; smaller images wait more. Larger calls (a throughput step's dozen images) keep the GPU
    ahead of the host and gain nothing, so only calls of at most `max_patches` patches are graphed.

    Sizes vary in real traffic, and a capture costs about an eager pass, so a layout is captured the
    second time it is met, never the first (only the first capture warms up with an eager pass: the
    layout's first sight has chosen and compiled its kernels); at most `max_graphs` of them
    (then eager). The graphs share one memory pool and one input buffer (they replay one at a
    time, on the runner's stream); the output is copied out before the next replay. A layout whose
    capture fails (a host sync or copy in the tower) stays eager. The tables the tower takes (rotary
    tables, the segments' bounds on the device, Qwen2.5-VL's window order) are made outside the
    capture and kept with its graph, so no cache eviction can free them."""

    def __init__(self, tower, device: torch.device, max_patches: int = 8192, max_graphs: int = 8,
                 max_remembered: int = 1024):
        self.tower = tower
        self.device = device
        self.max_patches = max_patches
        self.max_graphs = max_graphs
        self.max_remembered = max_remembered
        self.graphs: dict[tuple, tuple] = {}
        self.seen: dict[tuple, int] = {}  # layouts met eagerly: how often
        self.failed: set[tuple] = set()
        self.inputs: dict[tuple, torch.Tensor] = {}  # (dtype, row width) -> the shared input buffer
        self.pool = None
        self.stream = None  # captures run on one side stream: its freed blocks are reused, not multiplied
        self.num_replays = 0

    def __call__(self, pixels: torch.Tensor, grids: list[tuple[int, int, int]]) -> torch.Tensor:
        key = (tuple(grids), pixels.dtype, pixels.shape[1])
        entry = self.graphs.get(key)
        if entry is None:
            if not self._wants_graph(key, pixels):
                return self.tower(pixels, grids)
            entry = self._capture(key, pixels)
            if entry is None:
                return self.tower(pixels, grids)
        graph, static_in, static_out, _ = entry
        static_in.copy_(pixels)
        graph.replay()
        self.num_replays += 1
        return static_out.clone()  # before the next replay writes over the pool

    def _wants_graph(self, key: tuple, pixels: torch.Tensor) -> bool:
        if not pixels.is_cuda or pixels.shape[0] > self.max_patches or key in self.failed \
                or len(self.graphs) >= self.max_graphs or not self.tower.graph_safe(list(key[0])):
            return False
        if len(self.seen) >= self.max_remembered:  # every size different (real traffic): start over
            self.seen.clear()
        self.seen[key] = self.seen.get(key, 0) + 1
        return self.seen[key] >= 2

    @torch.inference_mode()
    def _capture(self, key: tuple, pixels: torch.Tensor):
        grids, dtype, width = key
        buf = self.inputs.get((dtype, width))
        if buf is None:
            buf = self.inputs[(dtype, width)] = torch.zeros((self.max_patches, width), dtype=dtype, device=self.device)
        static_in = buf[:pixels.shape[0]]
        static_in.copy_(pixels)
        grids = list(grids)
        tables = self.tower.call_tables(grids, self.device)
        if self.stream is None:
            self.stream = torch.cuda.Stream(self.device)
        run = lambda: self.tower(static_in, grids, tables)  # noqa: E731
        try:
            try:
                # The layout's eager pass (its first sight) chose its kernels and compiled them, and the
                # side stream is warm after the first capture: a warm-up pass would only add its time
                # to the request that meets the layout a second time.
                graph, static_out = capture_on_side_stream(run, self.pool, self.stream, warm_up=not self.graphs)
            except Exception:  # noqa: BLE001 - something still lazy: once more, warmed up
                if not self.graphs:
                    raise
                graph, static_out = capture_on_side_stream(run, self.pool, self.stream)
        except Exception as e:  # noqa: BLE001 - a host sync or copy in the tower: this layout stays eager
            logger.warning("CUDA graph capture of the vision tower failed for %s (%s); encoding it eagerly",
                           grids, e)
            self.failed.add(key)
            return None
        if self.pool is None:
            self.pool = graph.pool()
        self.graphs[key] = (graph, static_in, static_out, tables)
        self.seen.pop(key, None)
        logger.info("captured a CUDA graph of the vision tower for grids %s", grids)
        return self.graphs[key]
