"""CUDA graphs of single-sequence prefill steps: a lone request's prompt (or one chunk of it) runs
the whole model eagerly in ~15 kernel launches per layer, and at batch 1 the host's launching is
slower than the GPU's work (an H100 finished LLaVA-1.5-7B's 608-token prefill in 16 ms of kernels
but the step took 28 ms). That is time to first token at low load.

One graph per token-count bucket (multiples of 64 up to 512, of 128 up to `max_tokens`) and per
kind of chunk (a whole fresh prompt, or a chunk after cached context: the attention backend may
take different kernels for them), captured into one shared memory pool, at most `max_graphs`: those
of fresh prompts at startup (`warm_up`), the others on first use. A step of T tokens replays the
smallest bucket >= T: rows T.. get token 0, position 0 and slot -1 (the KV store skips them); the
prefill kernel reads the real length from the device-side query offsets and skips their tiles.
Each row of the other layers depends on its own input only, so padded rows change nothing in the
real ones. Multimodal models take their merged input embeddings (computed eagerly, with the vision
encoders) through a static buffer; text models their token ids.

The graph's output lives in the pool: the runner reads it (logits, prompt logprobs) before the
next replay."""
from __future__ import annotations

import logging

import torch

from vlmserve.layers.attention import AttentionMetadata
from vlmserve.worker.cuda_graphs import graph_capture

logger = logging.getLogger(__name__)


def token_buckets(max_tokens: int) -> list[int]:
    sizes = list(range(64, 513, 64)) + list(range(640, max_tokens + 1, 128))
    return [s for s in sizes if s <= max_tokens]


class PrefillGraphs:
    def __init__(self, model, device: torch.device, max_tokens: int, max_model_len: int, block_size: int,
                 hidden_size: int | None, dtype: torch.dtype, positions_leading_shape: tuple[int, ...] = (),
                 max_graphs: int = 48):
        self.model = model
        self.device = device
        self.block_size = block_size
        self.buckets = token_buckets(max_tokens)
        self.max_graphs = max_graphs
        n = self.buckets[-1] if self.buckets else 0
        self.input_ids = torch.zeros(n, dtype=torch.long, device=device)
        self.positions = torch.zeros((*positions_leading_shape, n), dtype=torch.long, device=device)
        self.slot_mapping = torch.full((n,), -1, dtype=torch.long, device=device)
        self.seq_lens = torch.zeros(1, dtype=torch.long, device=device)
        self.query_start_loc = torch.zeros(2, dtype=torch.int32, device=device)
        self.block_tables = torch.zeros((1, -(-max_model_len // block_size)), dtype=torch.long, device=device)
        # multimodal models: the merged embeddings go in instead of the ids
        self.embeds = torch.zeros((n, hidden_size), dtype=dtype, device=device) if hidden_size else None
        self.graphs: dict[tuple[int, bool], tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.pool = None
        self.enabled = bool(self.buckets)

    def bucket(self, n: int) -> int | None:
        return next((b for b in self.buckets if b >= n), None)

    def _meta(self, bs: int, fresh: bool) -> AttentionMetadata:
        return AttentionMetadata(
            num_decodes=0, query_start_loc=[0, bs], seq_lens=[bs], slot_mapping=self.slot_mapping[:bs],
            block_tables=self.block_tables, seq_lens_tensor=self.seq_lens, block_size=self.block_size,
            query_start_loc_tensor=self.query_start_loc, prefill_without_context=fresh,
            padded_to_bucket=True)

    def _forward(self, bs: int, fresh: bool) -> torch.Tensor:
        embeds = self.embeds[:bs] if self.embeds is not None else None
        return self.model(self.input_ids[:bs], self.positions[..., :bs], self._meta(bs, fresh), inputs_embeds=embeds)

    @torch.inference_mode()
    def _capture(self, bs: int, fresh: bool) -> None:
        # a harmless step to record: one real row at slot -1, reading one cache slot of block 0
        self.slot_mapping.fill_(-1)
        self.seq_lens.fill_(1)
        self.query_start_loc[1:].fill_(1)
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            self._forward(bs, fresh)  # warm-up: kernel compilation and allocations happen outside the graph
            graph = torch.cuda.CUDAGraph()
            with graph_capture(graph, self.pool, stream):
                out = self._forward(bs, fresh)
        if self.pool is None:
            self.pool = graph.pool()
        torch.cuda.current_stream(self.device).wait_stream(stream)
        torch.cuda.synchronize(self.device)
        self.graphs[bs, fresh] = (graph, out)
        logger.info("captured a CUDA graph of prefill steps up to %d tokens%s (%d graphs)", bs,
                    " without cached context" if fresh else "", len(self.graphs))

    def warm_up(self) -> None:
        """Capture the graphs of fresh prompts (no cached context), every bucket, before requests
        arrive; chunks after cached context keep capturing at first use."""
        for bs in self.buckets:
            if (bs, True) not in self.graphs and not self._try_capture(bs, True):
                return

    def _try_capture(self, bs: int, fresh: bool) -> bool:
        """Capture one graph if the set has room; a failed capture turns the graphs off."""
        if not self.enabled or len(self.graphs) >= self.max_graphs:
            return False
        try:
            self._capture(bs, fresh)
        except Exception as e:  # a model whose forward syncs with the host, say
            logger.warning("prefill CUDA graph capture failed (%s); prefill steps run eagerly", e)
            self.enabled = False
            return False
        return True

    @torch.inference_mode()
    def run(self, ids: torch.Tensor, slots: torch.Tensor, positions: torch.Tensor, seq_len: int,
            table: torch.Tensor, embeds: torch.Tensor | None) -> torch.Tensor | None:
        """Hidden states [T, H] of one prefill chunk, or None where no graph serves it (then run
        eagerly). ids, slots [T], positions [..., T] and table [blocks]: host tensors, pinned for
        asynchronous copies; embeds [T, H] on the device for multimodal models, else None."""
        T = ids.shape[0]
        bs = self.bucket(T)
        if not self.enabled or bs is None or (embeds is None) != (self.embeds is None) \
                or table.shape[0] > self.block_tables.shape[1] or positions.shape[:-1] != self.positions.shape[:-1]:
            return None
        fresh = seq_len == T  # nothing cached before this chunk: the attention needs no cache reads
        if (bs, fresh) not in self.graphs and not self._try_capture(bs, fresh):
            return None
        self.input_ids[:T].copy_(ids, non_blocking=True)
        self.slot_mapping[:T].copy_(slots, non_blocking=True)
        self.positions[..., :T].copy_(positions, non_blocking=True)
        if T < bs:
            self.input_ids[T:bs].zero_()
            self.positions[..., T:bs].zero_()
            self.slot_mapping[T:bs].fill_(-1)
        self.seq_lens.fill_(seq_len)
        self.query_start_loc[1:].fill_(T)  # a kernel argument: item assignment would copy and wait
        self.block_tables[0, :table.shape[0]].copy_(table, non_blocking=True)
        if embeds is not None:
            self.embeds[:T].copy_(embeds)
        graph, out = self.graphs[bs, fresh]
        graph.replay()
        return out[:T]
