"""CUDA graphs of decode steps: one graph of the model's forward per batch-size bucket, captured at
startup (the runner's warm_up_kernels) into one shared memory pool (largest first, so smaller graphs
reuse its memory). A decode batch of n sequences replays the smallest bucket >= n; the padded rows
get slot -1 (the KV store skips them) and sequence length 0 (attention gives zeros), so they touch
nothing.

Static inputs: the rows [token ids, slot mapping, sequence lengths(, 1-D positions)] of one tensor,
M-RoPE positions ([3, T]: any leading dims) and block tables, written straight from the runner's
pinned host tensors by asynchronous copies (no wait, no staging on the device).
`LLM(enforce_eager=True)` / `--enforce-eager` turns graphs off."""
from __future__ import annotations

import logging

import torch

from vlmserve.layers.attention import AttentionMetadata

logger = logging.getLogger(__name__)


def batch_buckets(max_batch: int) -> list[int]:
    sizes = [1, 2, 4, 8, 16, 24, 32, 48, 64, 80, 96, 112, 128, 160, 192, 224, 256, 320, 384, 448, 512]
    out = [s for s in sizes if s < max_batch]
    return out + [max_batch]


def graph_capture(graph: torch.cuda.CUDAGraph, pool, stream: torch.cuda.Stream):
    """torch.cuda.graph in thread-local error mode. The prompt pipeline's media threads allocate
    pinned memory while the engine thread may be capturing; the default (global) mode forbids that
    from any thread, and on the H200 it failed both the capture and that thread's request."""
    return torch.cuda.graph(graph, pool=pool, stream=stream, capture_error_mode="thread_local")


class DecodeGraphs:
    def __init__(self, model, device: torch.device, max_batch: int, max_model_len: int, block_size: int,
                 positions_leading_shape: tuple[int, ...] = ()):
        self.model = model
        self.device = device
        self.block_size = block_size
        self.max_model_len = max_model_len
        self.buckets = batch_buckets(max_batch)
        n = self.buckets[-1]
        max_blocks = -(-max_model_len // block_size)
        self.vectors = torch.zeros((3 + (not positions_leading_shape), n), dtype=torch.long, device=device)
        self.input_ids, self.slot_mapping, self.seq_lens = self.vectors[0], self.vectors[1], self.vectors[2]
        self.positions = self.vectors[3] if not positions_leading_shape else \
            torch.zeros((*positions_leading_shape, n), dtype=torch.long, device=device)
        self.slot_mapping.fill_(-1)
        self.block_tables = torch.zeros((n, max_blocks), dtype=torch.long, device=device)
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.pool = None

    def _meta(self, bs: int) -> AttentionMetadata:
        # host-side seq_lens: the longest allowed, so that kernels pick launch shapes valid for any step
        return AttentionMetadata(
            num_decodes=bs, query_start_loc=list(range(bs + 1)), seq_lens=[self.max_model_len] * bs,
            slot_mapping=self.slot_mapping[:bs], block_tables=self.block_tables[:bs],
            seq_lens_tensor=self.seq_lens[:bs], block_size=self.block_size)

    @torch.inference_mode()
    def capture(self) -> None:
        self.slot_mapping.fill_(-1)
        self.seq_lens.fill_(1)  # reads one cache slot of block 0: harmless
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            for bs in reversed(self.buckets):
                meta = self._meta(bs)
                args = (self.input_ids[:bs], self.positions[..., :bs], meta)
                self.model(*args)  # warm-up: kernel compilation and allocations happen outside the graph
                graph = torch.cuda.CUDAGraph()
                with graph_capture(graph, self.pool, stream):
                    out = self.model(*args)
                if self.pool is None:
                    self.pool = graph.pool()
                self.graphs[bs] = (graph, out)
        torch.cuda.current_stream(self.device).wait_stream(stream)
        torch.cuda.synchronize(self.device)
        self.seq_lens.zero_()

    def bucket(self, n: int) -> int | None:
        return next((b for b in self.buckets if b >= n), None)

    @torch.inference_mode()
    def run(self, vectors: torch.Tensor, tables: torch.Tensor, positions: torch.Tensor | None,
            max_seq_len: int, fill_ids=None) -> torch.Tensor | None:
        """Hidden states [n, H] of a decode-only batch, or None where no graph fits (then run eagerly).
        vectors: [rows of self.vectors, n], tables [n, blocks], positions [..., n] or None (1-D
        positions are a row of vectors); host tensors, pinned for the copies to be asynchronous.
        fill_ids(ids), if given, then writes on the device the ids the host does not know yet."""
        n = vectors.shape[1]
        bs = self.bucket(n)
        if bs is None or vectors.shape[0] != self.vectors.shape[0] or max_seq_len > self.max_model_len \
                or (positions is not None and positions.shape[:-1] != self.positions.shape[:-1]) \
                or tables.shape[1] > self.block_tables.shape[1]:
            return None
        if not self.graphs:
            self.capture()
        self.vectors[:, :n].copy_(vectors, non_blocking=True)
        if fill_ids is not None:
            fill_ids(self.input_ids[:n])
        if positions is not None:
            self.positions[..., :n].copy_(positions, non_blocking=True)
        if n < bs:
            self.slot_mapping[n:bs].fill_(-1)
            self.seq_lens[n:bs].zero_()
        self.block_tables[:n, :tables.shape[1]].copy_(tables, non_blocking=True)
        graph, out = self.graphs[bs]
        graph.replay()
        return out[:n]
