"""Runs one engine step on the model: builds the flat batch (decodes first, then prefill chunks),
the attention metadata and the KV cache slots, runs the forward pass, and samples."""
from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from vlmserve.config import CacheConfig, ModelConfig, SchedulerConfig, text_config
from vlmserve.device_utils import pinned, to_device
from vlmserve.engine.scheduler import SchedulerOutput, ScheduledSeq
from vlmserve.engine.sequence import Sequence
from vlmserve.layers.attention import Attention, AttentionMetadata
from vlmserve.layers.attention.backends import get_attention_backend
from vlmserve.layers.rotary import MRotaryEmbedding
from vlmserve.models.interfaces import supports_multimodal
from vlmserve.worker.encoder_cache import EncoderCache
from vlmserve.worker.model_loader import load_model
from vlmserve.worker.positions import multirow_positions
from vlmserve.worker.sampler import SampledLogprobs, Sampler, gather_logprobs

logger = logging.getLogger(__name__)


@dataclass
class LaunchedStep:
    """A step whose forward pass and sampling are queued on the device. `ModelRunner.collect`
    waits for it and reads its results; until then the host may prepare and launch the next step,
    whose pending inputs (the tokens sampled here) it reads from `tokens` on the device."""
    items: list[ScheduledSeq]  # in the runner's order: decodes first
    sample_rows: list[int]  # index into items of the sequences that sample
    row_of: dict[int, int]  # seq id -> its row in tokens
    tokens: torch.Tensor | None = None  # [N] sampled ids, on the device
    tokens_host: torch.Tensor | None = None  # their copy on the host, valid once `done` is reached
    logprobs_host: SampledLogprobs | None = None
    prompt_logprobs_host: list[tuple[int, SampledLogprobs, int]] = field(default_factory=list)  # (item, rows, k)
    done: torch.cuda.Event | None = None  # recorded after the host copies (CUDA only)

    @property
    def sampled_seqs(self) -> list[Sequence]:
        return [self.items[i].seq for i in self.sample_rows]


@dataclass
class SeqStepResult:
    seq: Sequence
    token_id: int | None = None  # None: a prefill chunk that did not reach the end of the prompt
    logprobs: tuple | None = None  # (token logprob, rank, topk ids, topk logprobs) of the sampled token
    prompt_logprobs: list[tuple] | None = None  # per newly scored prompt position, the same tuple


class ModelRunner:
    def __init__(self, model_config: ModelConfig, cache_config: CacheConfig,
                 scheduler_config: SchedulerConfig, device: torch.device):
        self.model_config = model_config
        self.cache_config = cache_config
        self.scheduler_config = scheduler_config
        self.device = device
        self.model = load_model(model_config, device)
        self.attn_layers = [m for m in self.model.modules() if isinstance(m, Attention)]
        self.attn_backend = get_attention_backend(device)  # the Triton kernels on CUDA
        for a in self.attn_layers:
            a.backend = self.attn_backend
        # decode steps replay CUDA graphs (captured at the first decode step) unless enforce_eager
        self.decode_graphs = None
        # lone prefill chunks (time to first token at low load) replay graphs of token-count buckets
        # up to VLMSERVE_PREFILL_GRAPH_TOKENS (default 2048; 0: eager)
        self.prefill_graphs = None
        self.prefill_graph_tokens = min(int(os.environ.get("VLMSERVE_PREFILL_GRAPH_TOKENS", "2048")),
                                        scheduler_config.max_num_batched_tokens)
        self.use_cuda_graphs = (device.type == "cuda" and self.attn_backend.name == "triton"
                                and not model_config.enforce_eager)
        # the vision tower replays CUDA graphs too (VLMSERVE_ENCODER_GRAPHS=0: eager, for A/B runs):
        # LLaVA's per image count, Qwen2-VL's per layout of a call's images (worker/encoder_graphs.py)
        if device.type == "cuda" and not model_config.enforce_eager \
                and os.environ.get("VLMSERVE_ENCODER_GRAPHS", "1") != "0":
            from vlmserve.worker.encoder_graphs import EncoderGraphs, GridEncoderGraphs

            if getattr(self.model, "image_encoder", False) is None:
                self.model.image_encoder = EncoderGraphs(self.model.encode_images, device)
            if getattr(self.model, "vision_graphs", False) is None:
                self.model.vision_graphs = GridEncoderGraphs(self.model.visual, device)
        self.sampler = Sampler(device, model_config.seed)
        self.kv_caches: list[torch.Tensor] = []
        self.block_size = cache_config.block_size
        self.is_multimodal = supports_multimodal(self.model)
        self.position_rows = getattr(self.model, "position_rows", 1)  # 3 for M-RoPE models
        self.position_tables = [m for m in self.model.modules() if isinstance(m, MRotaryEmbedding)]
        self.encoder_cache = EncoderCache(max(16384, scheduler_config.max_num_batched_tokens))
        self.num_prefetched_items = 0  # encoded by encode_ahead, before their step

    # ---- KV cache ------------------------------------------------------------------------
    def kv_bytes_per_block(self) -> int:
        elem = torch.empty((), dtype=self.model_config.dtype).element_size()
        return sum(2 * self.block_size * a.num_kv_heads * a.head_dim * elem for a in self.attn_layers)

    def determine_num_blocks(self, dummy_mm_items: list | None = None) -> int:
        """KV cache blocks: as given, or what memory leaves after the largest step (on CUDA, measured
        with `dummy_mm_items`, the items of the largest multimodal prompt, through their encoders)."""
        cfg = self.cache_config
        if cfg.num_kv_blocks is not None:
            return cfg.num_kv_blocks
        per_block = self.kv_bytes_per_block()
        if self.device.type == "cuda":
            budget = self._profile_cuda_budget(dummy_mm_items or [])
        else:
            gib = os.environ.get("VLMSERVE_CPU_KVCACHE_SPACE")
            budget = int(float(gib) * (1 << 30)) if gib else cfg.cpu_kv_cache_bytes
        blocks_per_seq = -(-self.model_config.max_model_len // self.block_size)
        enough = self.scheduler_config.max_num_seqs * blocks_per_seq
        num = min(budget // per_block, enough)
        if num < 1:
            raise RuntimeError("no memory is left for the KV cache; lower max_model_len or free memory")
        return int(num)

    @torch.inference_mode()
    def encode_dummy_items(self, items: list) -> list[torch.Tensor]:
        """Run the encoders on profiling items, all of a modality in one call, as a step would."""
        out = []
        by_modality: dict[str, list] = {}
        for mm in items:
            by_modality.setdefault(mm.modality, []).append(mm)
        for modality, mms in by_modality.items():
            data = [items_to_device(mm.data, self.device) for mm in mms]
            out.extend(self.model.embed_multimodal(modality, data))
        return out

    def _profile_cuda_budget(self, dummy_mm_items: list) -> int:
        """Run the largest step the scheduler can make, then give the KV cache what is left of
        gpu_memory_utilization."""
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(self.device)
        n = min(self.scheduler_config.max_num_batched_tokens, self.model_config.max_model_len)
        nblocks = -(-n // self.block_size)
        self.allocate_kv_cache(nblocks)
        seq_ids = torch.zeros(n, dtype=torch.long, device=self.device)
        meta = AttentionMetadata(
            num_decodes=0, query_start_loc=[0, n], seq_lens=[n],
            slot_mapping=torch.arange(n, device=self.device),
            block_tables=torch.arange(nblocks, device=self.device)[None, :],
            seq_lens_tensor=torch.tensor([n], device=self.device), block_size=self.block_size)
        encoded = self.encode_dummy_items(dummy_mm_items)  # kept alive through the LM pass, as in a step
        hidden = self.model(seq_ids, torch.arange(n, device=self.device), meta)
        del encoded
        self.model.compute_logits(hidden[-min(n, self.scheduler_config.max_num_seqs):])
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated(self.device)
        self.kv_caches = []
        for a in self.attn_layers:
            a.kv_cache = None
        torch.cuda.empty_cache()
        free, total = torch.cuda.mem_get_info(self.device)
        used_by_others = total - free - torch.cuda.memory_allocated(self.device)
        return int(total * self.cache_config.gpu_memory_utilization - peak - used_by_others)

    def allocate_kv_cache(self, num_blocks: int) -> None:
        backend = self.attn_backend
        self.kv_caches = []
        for a in self.attn_layers:
            shape = backend.kv_cache_shape(num_blocks, self.block_size, a.num_kv_heads, a.head_dim)
            cache = torch.zeros(shape, dtype=self.model_config.dtype, device=self.device)
            a.kv_cache = cache
            self.kv_caches.append(cache)

    @torch.inference_mode()
    def warm_up_kernels(self) -> None:
        """Compile the attention backend's kernel variants, and capture the vision tower's graphs of
        every image-count bucket, the prefill graphs of fresh prompts and the decode graphs, before the
        first request (CUDA)."""
        warm_up = getattr(self.attn_backend, "warm_up", None)
        if warm_up is not None and self.kv_caches:
            warm_up(self.attn_layers)
            torch.cuda.synchronize(self.device)
        encoder_warm_up = getattr(getattr(self.model, "image_encoder", None), "warm_up", None)
        if encoder_warm_up is not None:
            encoder_warm_up()
            torch.cuda.synchronize(self.device)
        if self.use_cuda_graphs and self.prefill_graph_tokens > 0 and self.kv_caches:
            # a lone fresh prompt's graph: captured at first use, it cost the H200 ~0.4 s at the
            # start of a throughput run (cuDNN's plan, the eager pass, the capture)
            self._get_prefill_graphs().warm_up()
        if self.use_cuda_graphs and self.kv_caches:
            # captured at the first decode step, they held that step for the capture, and compiled the
            # decode GEMV's SiLU-and-mul variant mid-run (tests/test_kernel_warmup.py, a fresh process)
            self._get_decode_graphs()
        self._warm_up_logits()

    def _warm_up_logits(self) -> None:
        """Run the LM head and greedy sampling at every row count a step can sample (1..max_num_seqs). The first
        GEMM whose shape takes a cuBLAS kernel the process has not run yet waits for all the work queued on the
        device (H200, torch 2.11; with CUDA_MODULE_LOADING=EAGER too). Prefill steps sample a new count of rows
        now and then: their LM head held the host until the GPU had run the whole step (~550 ms for Qwen2-VL's),
        and the GPU then idled while the host built the next step (BENCHMARKS.md)."""
        if self.device.type != "cuda":
            return
        hidden = text_config(self.model_config.hf_config).hidden_size
        x = torch.zeros((self.scheduler_config.max_num_seqs, hidden), dtype=self.model_config.dtype,
                        device=self.device)
        for m in range(1, x.shape[0] + 1):
            self.model.compute_logits(x[:m]).float().argmax(dim=-1)
        torch.cuda.synchronize(self.device)

    # ---- one step ------------------------------------------------------------------------
    @torch.inference_mode()
    def launch(self, sched: SchedulerOutput, stop_ids: dict[int, list[int]],
               prev: LaunchedStep | None = None) -> LaunchedStep:
        """Queue the step's forward pass and sampling on the device without waiting for it. A decode
        whose input token is still pending (sampled by `prev`, not collected yet) reads it from
        prev's tokens on the device."""
        items = sorted(sched.scheduled, key=lambda s: s.num_new_tokens != 1)  # decodes first
        bs = self.block_size
        # decodes (first in items) append to these lists; prefill chunks add their positions and slots
        # as numpy pieces after them, so that a long prompt's never become Python ints
        input_ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        chunk_positions: list[np.ndarray] = []
        chunk_slots: list[np.ndarray] = []
        qsl = [0]
        seq_lens = []
        sample_rows: list[int] = []  # index into items
        sample_idx: list[int] = []  # index into the flat batch
        prompt_lp: list[tuple[int, int, int]] = []  # (item, first position, last position)
        pending_at: list[int] = []  # flat positions whose token id is pending: read from prev.tokens
        pending_rows: list[int] = []  # ... at these rows
        num_decodes = 0
        for i, it in enumerate(items):
            seq, n = it.seq, it.num_new_tokens
            c = seq.num_computed_tokens
            table = seq.block_table
            if n == 1:
                num_decodes += 1
                if c < len(seq.token_ids):
                    input_ids.append(seq.token_ids[c])
                else:  # sampled by the step in flight
                    if prev is None or seq.seq_id not in prev.row_of:
                        raise RuntimeError(f"sequence {seq.seq_id} has a pending token but no launched step")
                    pending_at.append(len(input_ids))
                    pending_rows.append(prev.row_of[seq.seq_id])
                    input_ids.append(0)
                positions.append(c)
                slots.append(table[c // bs] * bs + c % bs)
            else:  # a prefill chunk: its slots in one vectorized expression, not a loop per token
                input_ids.extend(seq.token_ids[c:c + n])
                pos = np.arange(c, c + n, dtype=np.int64)
                chunk_positions.append(pos)
                chunk_slots.append(np.asarray(table, dtype=np.int64)[pos // bs] * bs + pos % bs)
            if seq.want_prompt_logprobs:
                first = max(c, len(seq.prompt_logprobs) - 1)
                last = min(c + n - 1, seq.num_prompt_tokens - 2)
                if first <= last:
                    prompt_lp.append((i, first, last))
            qsl.append(qsl[-1] + n)
            seq_lens.append(c + n)
            if c + n == seq.num_tokens:
                sample_rows.append(i)
                sample_idx.append(qsl[-1] - 1)

        dev = self.device
        on_gpu = dev.type == "cuda"
        T, B = qsl[-1], len(items)
        max_blocks = max(len(it.seq.block_table) for it in items)
        # Every int input of the step in one host tensor, pinned on CUDA, and one asynchronous copy:
        # a torch.tensor(..., device=cuda) per input waits for its copy, five times a step.
        # Layout: ids [T], slots [T], seq_lens [B], positions [T] (one row only), block tables [B, max_blocks],
        # then the pending inputs' flat positions [P] and rows in prev.tokens [P]; for a decode-only
        # step (T == B) its head is the rows of the decode graphs' static inputs.
        multirow = self.position_rows > 1
        positions = np.concatenate([np.array(positions, dtype=np.int64), *chunk_positions])
        tables_pending: list[int] = []
        for it in items:
            table = it.seq.block_table
            tables_pending += table
            tables_pending += [0] * (max_blocks - len(table))
        tables_pending += pending_at
        tables_pending += pending_rows
        # np.array(list): ~4x faster than torch.tensor(list)
        pieces = [np.array(input_ids, dtype=np.int64), np.array(slots, dtype=np.int64), *chunk_slots,
                  np.array(seq_lens, dtype=np.int64)]
        if not multirow:
            pieces.append(positions)
        pieces.append(np.array(tables_pending, dtype=np.int64))
        host = torch.from_numpy(np.concatenate(pieces))
        if on_gpu:
            host = pinned(host)
        num_vectors = 3 + (not multirow)
        tables_at = num_vectors * T + B - T
        pending_from = tables_at + B * max_blocks
        host_tables = host[tables_at:pending_from].view(B, max_blocks)

        def fill_pending(ids: torch.Tensor, pending: torch.Tensor | None = None) -> None:
            """Write the pending input ids into `ids` (on the device), in stream order after prev."""
            if pending_at:
                if pending is None:
                    pending = host[pending_from:].to(dev, non_blocking=True)
                P = len(pending_at)
                ids.index_copy_(0, pending[:P], prev.tokens.index_select(0, pending[P:]))

        pos_host = None
        if multirow:  # M-RoPE: [rows, T], from the sequences' own prompt positions
            pos_host = multirow_positions(items, positions, qsl, self.position_rows)
            self._reserve_positions(int(pos_host.numpy().max()))  # on the host, not the GPU; numpy: one thread
            if on_gpu:
                pos_host = pinned(pos_host)
        hidden = None
        if self.use_cuda_graphs and num_decodes == B and \
                all(it.seq.num_computed_tokens >= it.seq.num_prompt_tokens for it in items):
            hidden = self._replay_decode_graph(host[:num_vectors * T].view(num_vectors, T), host_tables,
                                               pos_host, seq_lens, fill_pending)
        elif self.use_cuda_graphs and B == 1 and num_decodes == 0 and self.prefill_graph_tokens:
            hidden = self._replay_prefill_graph(host, T, seq_lens[0], host_tables[0], pos_host, items, multirow)
        if hidden is None:
            dev_flat = host.to(dev, non_blocking=True)
            ids_t = dev_flat[:T]
            fill_pending(ids_t, dev_flat[pending_from:])
            meta = AttentionMetadata(
                num_decodes=num_decodes, query_start_loc=qsl, seq_lens=seq_lens,
                slot_mapping=dev_flat[T:2 * T], block_tables=dev_flat[tables_at:pending_from].view(B, max_blocks),
                seq_lens_tensor=dev_flat[2 * T:2 * T + B], block_size=bs)
            pos_t = pos_host.to(dev, non_blocking=True) if multirow else dev_flat[2 * T + B:3 * T + B]
            hidden = self._forward(ids_t, pos_t, meta, items)

        seqs = [items[i].seq for i in sample_rows]
        step = LaunchedStep(items, sample_rows, {s.seq_id: j for j, s in enumerate(seqs)})
        if sample_rows:
            lo = sample_idx[0]
            if sample_idx[-1] - lo == len(sample_idx) - 1:  # a contiguous run (always, for decodes)
                rows = hidden[lo:lo + len(sample_idx)]
            else:  # indexing with a list would copy it to the GPU and wait
                rows = hidden[to_device(sample_idx, dev, torch.long)]
            logits = self.model.compute_logits(rows)
            step.tokens, lp = self.sampler(logits, seqs, [stop_ids.get(s.seq_id, []) for s in seqs])
            step.tokens_host = step.tokens.to("cpu", non_blocking=True)
            if lp is not None:
                step.logprobs_host = lp.to_host()
        for i, first, last in prompt_lp:
            seq = items[i].seq
            start = qsl[i] + first - seq.num_computed_tokens
            h = hidden[start:start + last - first + 1]
            logprobs = torch.log_softmax(self.model.compute_logits(h).float(), dim=-1)
            targets = to_device(seq.token_ids[first + 1:last + 2], dev, torch.long)
            k = seq.params.prompt_logprobs
            lp = gather_logprobs(logprobs, targets, k)
            step.prompt_logprobs_host.append((i, lp.to_host(), k))
        if on_gpu:
            step.done = torch.cuda.Event()
            step.done.record()
        return step

    def collect(self, step: LaunchedStep) -> list[SeqStepResult]:
        """Wait for a launched step and give its results, one per item, in the step's order."""
        if step.done is not None:
            step.done.synchronize()
        results = [SeqStepResult(it.seq) for it in step.items]
        if step.sample_rows:
            seqs = step.sampled_seqs
            tokens = step.tokens_host.tolist()
            lp_rows = _logprob_rows(step.logprobs_host, [s.params.logprobs for s in seqs]) \
                if step.logprobs_host is not None else None
            for j, i in enumerate(step.sample_rows):
                results[i].token_id = tokens[j]
                if lp_rows is not None and seqs[j].params.logprobs is not None:
                    results[i].logprobs = lp_rows[j]
        for i, lp, k in step.prompt_logprobs_host:
            results[i].prompt_logprobs = _logprob_rows(lp, [k] * lp.token_logprobs.shape[0])
        return results

    def _reserve_positions(self, max_position: int) -> None:
        """Grow the M-RoPE tables to cover a step's positions before its forward, which looks
        them up without a host sync; graphs captured against the old tables are dropped."""
        grew = False
        for rope in self.position_tables:
            grew |= rope.reserve(max_position)
        if grew and (self.decode_graphs is not None or self.prefill_graphs is not None):
            logger.info("M-RoPE tables grew to position %d: capturing the CUDA graphs again", max_position)
            self.decode_graphs = None
            self.prefill_graphs = None

    def _replay_decode_graph(self, vectors, tables, positions, seq_lens, fill_pending) -> torch.Tensor | None:
        """vectors: the host rows [ids, slots, seq_lens(, positions)] of a decode-only step; tables
        [B, max_blocks] and M-RoPE positions [rows, B] (else None) on the host too; fill_pending
        writes the pending input ids into the graph's ids."""
        graphs = self._get_decode_graphs()
        if graphs is None:
            return None
        return graphs.run(vectors, tables, positions, max(seq_lens), fill_pending)

    def _get_decode_graphs(self):
        """The decode steps' CUDA graphs, every batch bucket, captured when first asked for: at startup
        (warm_up_kernels), or again after the M-RoPE tables grew. None where graphs are off, or the capture
        failed (then decode runs eagerly from now on)."""
        if self.decode_graphs is None and self.use_cuda_graphs:
            from vlmserve.worker.cuda_graphs import DecodeGraphs

            graphs = DecodeGraphs(self.model, self.device, self.scheduler_config.max_num_seqs,
                                  self.model_config.max_model_len, self.block_size,
                                  (self.position_rows,) if self.position_rows > 1 else ())
            try:
                graphs.capture()
            except Exception as e:  # a model whose decode step syncs with the host, say
                logger.warning("CUDA graph capture failed (%s); decoding eagerly", e)
                self.use_cuda_graphs = False
                return None
            self.decode_graphs = graphs
        return self.decode_graphs

    def _get_prefill_graphs(self):
        if self.prefill_graphs is None:
            from vlmserve.worker.prefill_graphs import PrefillGraphs

            hidden_size = text_config(self.model_config.hf_config).hidden_size if self.is_multimodal else None
            self.prefill_graphs = PrefillGraphs(
                self.model, self.device, self.prefill_graph_tokens, self.model_config.max_model_len,
                self.block_size, hidden_size, self.model_config.dtype,
                (self.position_rows,) if self.position_rows > 1 else ())
        return self.prefill_graphs

    def _replay_prefill_graph(self, host, T: int, seq_len: int, table, pos_host, items, multirow: bool):
        """One sequence's prefill chunk through a CUDA graph of its token-count bucket (host:
        the step's pinned inputs, laid out as in launch); None: run it eagerly."""
        graphs = self._get_prefill_graphs()
        if not graphs.enabled or graphs.bucket(T) is None:
            return None
        embeds = None
        if self.is_multimodal:  # the vision encoders run eagerly (or in their own graphs) first
            ids = host[:T].to(self.device, non_blocking=True)
            embeds = self._merged_embeddings(ids, [0, T], items)
            if embeds is None:
                embeds = self.model.embed_input_ids(ids)
        positions = pos_host if multirow else host[2 * T + 1:3 * T + 1]
        return graphs.run(host[:T], host[T:2 * T], positions, seq_len, table, embeds)

    def _forward(self, input_ids, positions, meta, items: list[ScheduledSeq]) -> torch.Tensor:
        embeds = self._merged_embeddings(input_ids, meta.query_start_loc, items) if self.is_multimodal else None
        return self.model(input_ids, positions, meta, inputs_embeds=embeds)

    def _merged_embeddings(self, input_ids, query_start_loc: list[int],
                           items: list[ScheduledSeq]) -> torch.Tensor | None:
        """Token embeddings with the embeddings of multimodal items written over their placeholder
        positions. Items not in the encoder cache are encoded first, all of a modality in one call."""
        spans = []  # (flat start, item, first item token, last item token + 1)
        for i, it in enumerate(items):
            c, n = it.seq.num_computed_tokens, it.num_new_tokens
            for mm in it.seq.mm_items:
                lo, hi = max(c, mm.offset), min(c + n, mm.end)
                if lo < hi:
                    spans.append((query_start_loc[i] + lo - c, mm, lo - mm.offset, hi - mm.offset))
        if not spans:
            return None
        cache = self.encoder_cache
        self._encode_missing([mm for _, mm, _, _ in spans])
        embeds = self.model.embed_input_ids(input_ids)
        for dst, mm, lo, hi in spans:
            embeds[dst:dst + hi - lo] = cache.get(mm.hash)[lo:hi].to(embeds.dtype)
        return embeds

    def _encode(self, mms: list) -> list[torch.Tensor]:
        """The items' embeddings (MultiModalItems or EncoderInputs), all of a modality in one
        encoder call, in the items' order."""
        by_modality: dict[str, list[int]] = {}
        for i, mm in enumerate(mms):
            by_modality.setdefault(mm.modality, []).append(i)
        out: list = [None] * len(mms)
        for modality, idx in by_modality.items():
            data = [items_to_device(mms[i].data, self.device) for i in idx]
            for i, emb in zip(idx, self.model.embed_multimodal(modality, data)):
                if emb.shape[0] != mms[i].length:
                    raise RuntimeError(f"the encoder gave {emb.shape[0]} embeddings for a {modality} "
                                       f"with {mms[i].length} placeholder tokens")
                out[i] = emb
        return out

    def _encode_missing(self, mms: list) -> list[str]:
        """Encode the items (MultiModalItems or EncoderInputs) not in the encoder cache and cache
        their embeddings (kept while the cache makes room). Returns the hashes of those that went
        through an encoder."""
        cache = self.encoder_cache
        keep = {mm.hash for mm in mms}
        missing: dict[str, object] = {}
        for mm in mms:
            if mm.hash not in missing and cache.get(mm.hash) is None:
                missing[mm.hash] = mm
        group = list(missing.values())
        for mm, emb in zip(group, self._encode(group)):
            cache.put(mm.hash, emb, keep)
            cache.num_encoded_items += 1
        return list(missing)

    @torch.inference_mode()
    def encode_unhashed(self, mms: list, hashes: Callable[[], list[str]]) -> list[str]:
        """Encode items of new content (EncoderInputs without hashes; no cache holds them) before
        their hashes are known: the encoders are launched first, and on a GPU they run while
        `hashes()` computes those (in the items' order); the embeddings are then cached under them.
        Returns the hashes."""
        embs = self._encode(mms) if self.is_multimodal else []
        keys = hashes()
        cache, keep = self.encoder_cache, set(keys)
        for key, emb in zip(keys, embs):
            cache.put(key, emb, keep)
            cache.num_encoded_items += 1
        self.num_prefetched_items += len(embs)
        return keys if embs else []

    def prefetch_encoders(self, seq: Sequence, first_token: int, budget: int) -> int:
        """Encode the items of `seq` that its next chunk (budget tokens from first_token) will need,
        before that step is scheduled and built: on a GPU the encoders run while the host does that
        work, instead of after it. The step finds the embeddings in the encoder cache. Returns how
        many items went through an encoder."""
        end = first_token + budget
        return len(self.encode_ahead([mm for mm in seq.mm_items if mm.end > first_token and mm.offset < end]))

    @torch.inference_mode()
    def encode_ahead(self, mms: list) -> list[str]:
        """Encode these items (MultiModalItems or EncoderInputs) now, if not cached, ahead of the
        step that takes them, which will find them in the encoder cache. Returns the hashes of those
        that went through an encoder."""
        if not self.is_multimodal:
            return []
        encoded = self._encode_missing(mms)
        self.num_prefetched_items += len(encoded)
        return encoded


def items_to_device(data: dict, device: torch.device) -> dict:
    """A multimodal item's tensors for its encoder: the data on the device, copied without waiting
    for the device (the step before may still run there); integer tensors (grid shapes, sizes)
    stay on the host, where models read them."""
    return {k: v if isinstance(v, torch.Tensor) and not v.is_floating_point() else v.to(device, non_blocking=True)
            for k, v in data.items()}


def _logprob_rows(lp: SampledLogprobs, ks: list[int | None]) -> list[tuple]:
    tok = lp.token_logprobs.tolist()
    ranks = lp.token_ranks.tolist()
    ids = lp.topk_ids.tolist()
    vals = lp.topk_logprobs.tolist()
    return [(tok[r], ranks[r], ids[r][:k or 0], vals[r][:k or 0]) for r, k in enumerate(ks)]
