"""The engine: requests in, a scheduler step and a model step at a time, outputs out."""
from __future__ import annotations

import itertools
import logging
import os
import time
from dataclasses import dataclass, field

import torch
from transformers import AutoTokenizer, GenerationConfig

from vlmserve.config import CacheConfig, ModelConfig, ModelLoadError, SchedulerConfig, text_config
from vlmserve.engine.block_manager import BlockManager
from vlmserve.engine.detokenizer import init_offsets
from vlmserve.engine.heap import freeze_startup_heap, release_frozen_heap
from vlmserve.engine.output_processor import OutputProcessor
from vlmserve.engine.scheduler import Scheduler
from vlmserve.engine.sequence import Sequence
from vlmserve.engine.text_encoder import text_encoder
from vlmserve.multimodal import MULTIMODAL_REGISTRY, MultiModalItem
from vlmserve.multimodal.device_pixels import device_preprocess_enabled
from vlmserve.multimodal.processing import MultiModalInputError, ProcessedMedia
from vlmserve.outputs import CompletionOutput, RequestOutput
from vlmserve.sampling_params import SamplingParams
from vlmserve.worker.model_runner import LaunchedStep, ModelRunner

logger = logging.getLogger(__name__)


@dataclass
class EngineStats:
    num_steps: int = 0
    num_prompt_tokens_computed: int = 0  # prompt tokens run through the model (recomputes included)
    num_cached_prompt_tokens: int = 0  # prompt tokens served from the prefix cache at admission
    num_generation_tokens: int = 0
    num_preemptions: int = 0
    max_batch_seqs: int = 0
    batch_sizes: list[int] = field(default_factory=list)  # sequences per step, most recent last (bounded)


@dataclass
class _Request:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    seqs: list[Sequence]
    arrival_time: float

    @property
    def finished(self) -> bool:
        return all(s.finish_reason is not None for s in self.seqs)


def _eos_ids(model_dir: str, hf_config, tokenizer) -> set[int]:
    ids: set[int] = set()

    def add(v):
        if isinstance(v, int):
            ids.add(v)
        elif isinstance(v, (list, tuple)):
            ids.update(i for i in v if isinstance(i, int))

    if os.path.isfile(os.path.join(model_dir, "generation_config.json")):
        try:
            add(GenerationConfig.from_pretrained(model_dir).eos_token_id)
        except Exception as e:
            raise ModelLoadError(f"cannot read generation_config.json in {model_dir!r}: {e}") from e
    if not ids:
        add(getattr(text_config(hf_config), "eos_token_id", None))
    add(tokenizer.eos_token_id)
    return ids


def async_scheduling_enabled(config: SchedulerConfig, device: torch.device) -> bool:
    """As configured; by default on for CUDA, where the device runs a step while the host prepares
    the next (VLMSERVE_ASYNC_SCHEDULING=0/1 changes the default, for A/B runs)."""
    if config.async_scheduling is not None:
        return config.async_scheduling
    env = os.environ.get("VLMSERVE_ASYNC_SCHEDULING")
    if env is not None:
        return env != "0"
    return device.type == "cuda"


def load_tokenizer(model_dir: str, trust_remote_code: bool = False):
    try:
        return AutoTokenizer.from_pretrained(model_dir, trust_remote_code=trust_remote_code)
    except Exception as e:
        raise ModelLoadError(f"cannot load the tokenizer of {model_dir!r}: {e}") from e


class LLMEngine:
    def __init__(self, model_config: ModelConfig, cache_config: CacheConfig,
                 scheduler_config: SchedulerConfig, device: torch.device, tokenizer=None,
                 limit_mm_per_prompt: dict[str, int] | None = None, mm_processor_kwargs: dict | None = None):
        self.model_config = model_config
        self.cache_config = cache_config
        self.scheduler_config = scheduler_config
        self.device = device
        self.tokenizer = tokenizer or load_tokenizer(model_config.model, model_config.trust_remote_code)
        self.encode_text = text_encoder(self.tokenizer)  # (text, add_special_tokens=True) -> token ids
        self.eos_token_ids = _eos_ids(model_config.model, model_config.hf_config, self.tokenizer)
        self.vocab_size = text_config(model_config.hf_config).vocab_size

        t0 = time.perf_counter()
        self.runner = ModelRunner(model_config, cache_config, scheduler_config, device)
        proc_cls = MULTIMODAL_REGISTRY.processor_class(type(self.runner.model))
        self.mm_processor = proc_cls(model_config, self.tokenizer, mm_processor_kwargs) if proc_cls else None
        if self.mm_processor is not None and device_preprocess_enabled(device):
            self.mm_processor.media_device = device
        self.limit_mm_per_prompt = dict(limit_mm_per_prompt or {})
        if self.mm_processor is not None:
            unknown = set(self.limit_mm_per_prompt) - set(self.mm_processor.modalities)
            if unknown:
                raise ValueError(f"limit_mm_per_prompt names {sorted(unknown)}, which this model does not "
                                 f"take (it takes: {', '.join(self.mm_processor.modalities)})")
        dummy_items = []
        if self.mm_processor is not None:  # profile memory with the largest multimodal prompt allowed
            limits = {m: self.limit_mm_per_prompt.get(m, 1) for m in self.mm_processor.modalities}
            _, dummy_items = self.mm_processor.apply(*self.mm_processor.dummy_request(limits), limits)
        num_blocks = self.runner.determine_num_blocks(dummy_items)
        capacity = num_blocks * cache_config.block_size
        if capacity < model_config.max_model_len:
            raise ValueError(
                f"the KV cache holds {capacity} tokens ({num_blocks} blocks of {cache_config.block_size}), "
                f"fewer than max_model_len={model_config.max_model_len}: lower max_model_len or give "
                "the cache more blocks")
        self.runner.allocate_kv_cache(num_blocks)
        self.runner.warm_up_kernels()
        self.num_kv_blocks = num_blocks
        logger.info("loaded %s (%s, %s) on %s in %.1fs; KV cache: %d blocks of %d tokens",
                    model_config.model, model_config.architecture, model_config.dtype, device,
                    time.perf_counter() - t0, num_blocks, cache_config.block_size)

        self.block_manager = BlockManager(num_blocks, cache_config.block_size,
                                          cache_config.enable_prefix_caching)
        self.scheduler = Scheduler(scheduler_config, self.block_manager)
        self.output_processor = OutputProcessor(self.tokenizer, self.eos_token_ids,
                                                model_config.max_model_len)
        self.requests: dict[str, _Request] = {}
        self.stats = EngineStats()
        self.async_scheduling = async_scheduling_enabled(scheduler_config, device)
        self._in_flight: tuple | None = None  # (SchedulerOutput, LaunchedStep) launched, not yet read
        # An idle engine encodes the next request's media before scheduling its step, so that the
        # encoders run on the GPU while the host schedules and builds the step (time to first
        # token). With Qwen2-VL's tower in a CUDA graph, queueing it no longer keeps the host busy,
        # and on the H200 a 1024x1024 image's TTFT went 65.8 / 64.6 -> 63.4 / 63.9 ms (BENCHMARKS.md).
        # VLMSERVE_ENCODER_PREFETCH=0 turns it off.
        self.prefetch_encoders = os.environ.get("VLMSERVE_ENCODER_PREFETCH", "1") != "0"
        self._seq_ids = itertools.count()
        # out of the garbage collector's full walks (engine/heap.py): one idled the GPU 0.23-0.26 s in a run
        self._froze_heap = freeze_startup_heap()

    def __del__(self):
        if getattr(self, "_froze_heap", False):
            release_frozen_heap()

    # ---- requests ------------------------------------------------------------------------
    def validate_prompt(self, prompt_token_ids: list[int]) -> None:
        if not prompt_token_ids:
            raise ValueError("the prompt is empty: give at least one token")
        n = len(prompt_token_ids)
        if n > self.model_config.max_model_len:
            raise ValueError(f"the prompt has {n} tokens, more than max_model_len="
                             f"{self.model_config.max_model_len}")
        ids = prompt_token_ids
        if set(map(type, ids)) <= {int, bool} and min(ids) >= 0 and max(ids) < self.vocab_size:
            return  # the common case, checked at C speed (a Python loop took ~0.4 ms per 800 tokens)
        bad = [t for t in ids if not isinstance(t, int) or not 0 <= t < self.vocab_size]
        if bad:
            raise ValueError(f"prompt token ids out of the vocabulary (0..{self.vocab_size - 1}): {bad[:5]}")

    def placeholder_str(self, modality: str, index: int) -> str:
        """The prompt text that marks where item `index` of `modality` goes (for chat templates): what
        the model declares (`SupportsMultiModal.placeholder_str`), else its processor's placeholder."""
        model_placeholder = getattr(type(self.runner.model), "placeholder_str", None)
        if model_placeholder is not None:
            return model_placeholder(modality, index)
        return self.mm_processor.placeholder_text(modality)

    def process_multimodal(self, prompt_token_ids: list[int], mm_data: dict | None,
                           mm_processor_kwargs: dict | None = None) -> tuple[list[int], list[MultiModalItem]]:
        """Expand the placeholders of a prompt for its media and make the items' model inputs."""
        if not mm_data:
            if self.mm_processor is not None:
                # A prompt that names placeholders with no media is caught here too.
                return self.mm_processor.apply(prompt_token_ids, {}, self.limit_mm_per_prompt)
            return prompt_token_ids, []
        return self.place_media(prompt_token_ids, self.process_media(mm_data, mm_processor_kwargs))

    def process_media(self, mm_data: dict, mm_processor_kwargs: dict | None = None,
                      for_encode_ahead: bool = False) -> ProcessedMedia:
        """process_multimodal's first half, which needs no token ids: the items' model inputs and
        content hashes. for_encode_ahead: media of a latency-bound request for `encode_ahead`: the
        images are staged by several threads, and the hashes of new content are left pending, to be
        computed while the encoders run (multimodal/processing.py)."""
        if self.mm_processor is None:
            raise MultiModalInputError(f"{self.model_config.architecture} takes no multimodal input")
        return self.mm_processor.process(mm_data, self.limit_mm_per_prompt, mm_processor_kwargs,
                                         stage_threads=4 if for_encode_ahead else 1,
                                         encode_first=for_encode_ahead)

    def place_media(self, prompt_token_ids: list[int], media: ProcessedMedia) -> tuple[list[int], list[MultiModalItem]]:
        """process_multimodal's second half: the prompt's placeholders expanded for the items."""
        return self.mm_processor.place(prompt_token_ids, media)

    def encode_ahead(self, media: ProcessedMedia) -> int:
        """On an idle engine, start the encoders of a request's media now, before its prompt is
        tokenized and queued (call from the thread that steps the engine): on a GPU they run while
        the host does that work, and the request's step finds the embeddings in the encoder cache.
        Left to the step: items that a cached KV block holds (the prompt may need no encoder for
        them), and media larger than the encoder cache. Returns how many items went through an
        encoder. Off with VLMSERVE_ENCODER_PREFETCH=0.
        Media processed for it (`process_media(..., for_encode_ahead=True)`): images of content
        not seen lately are encoded before they are hashed; all hashes are known when this returns."""
        encoded: list[str] = []
        try:
            if not self.prefetch_encoders or self.requests or self._in_flight is not None:
                return 0
            limit = self.runner.encoder_cache.max_tokens
            fresh = media.fresh_inputs()
            if fresh and sum(it.length for it in fresh) <= limit:
                encoded += self.runner.encode_unhashed(fresh, media.finish_hashes)
            items = [it for it in media.encoder_inputs()
                     if it.hash not in encoded and not self.block_manager.may_hold_media(it.hash)]
            if items and sum(it.length for it in items) <= limit:
                encoded += self.runner.encode_ahead(items)
            return len(encoded)
        finally:
            media.finish_hashes()

    def add_request(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                    prompt: str | None = None, arrival_time: float | None = None,
                    mm_items: list[MultiModalItem] | None = None) -> None:
        if request_id in self.requests:
            raise ValueError(f"request id {request_id!r} is already in use")
        self.validate_prompt(prompt_token_ids)
        arrival = arrival_time if arrival_time is not None else time.monotonic()
        positions = self.mm_processor.prompt_positions(prompt_token_ids, mm_items or []) \
            if self.mm_processor is not None else None
        mrope, delta = positions if positions is not None else (None, 0)
        seqs = []
        for i in range(params.n):
            p = params if params.n == 1 or params.seed is None else params.clone(seed=params.seed + i)
            seq = Sequence(next(self._seq_ids), request_id, i, prompt_token_ids, p, arrival,
                           want_prompt_logprobs=(i == 0), mm_items=mm_items,
                           mrope_positions=mrope, mrope_position_delta=delta)
            init_offsets(seq)
            seqs.append(seq)
        self.requests[request_id] = _Request(request_id, prompt, list(prompt_token_ids), seqs, arrival)
        for seq in seqs:
            self.scheduler.add(seq)

    def abort_request(self, request_id: str) -> None:
        req = self.requests.pop(request_id, None)
        if req is None:
            return
        for seq in req.seqs:
            if seq.finish_reason is None:
                seq.finish_reason = "abort"
                self.scheduler.finish(seq)

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    @property
    def num_unfinished_requests(self) -> int:
        return len(self.requests)

    # ---- stepping ------------------------------------------------------------------------
    def step(self, include_unfinished: bool = False) -> list[RequestOutput]:
        """Run one scheduler + model step. Returns the outputs of requests that finished in it
        (and, with include_unfinished, of every request that made progress).

        With async scheduling, the step is launched before the previous one's results are read:
        the host schedules and prepares step n+1 while the device runs step n, and the outputs
        returned are those of step n. A sequence sampled in step n counts its token as pending;
        step n+1 reads it on the device. A sequence that stops on step n's token may be in step n+1
        too: that result is dropped. One that will stop by length is not scheduled again."""
        outputs: list[RequestOutput] = []
        if self._in_flight is not None and self._needs_results(self._in_flight[1]):
            outputs += self._finish_step(include_unfinished)
        if self.prefetch_encoders and self._in_flight is None:
            self._prefetch_encoders()
        sched = self.scheduler.schedule()
        st = self.stats
        st.num_preemptions = self.scheduler.num_preemptions
        st.num_cached_prompt_tokens = self.scheduler.num_cached_tokens
        launched = self._launch(sched) if sched else None
        if not self.async_scheduling:  # the text of the last step's tokens, while this one runs
            self.output_processor.flush_all_text()
        if launched is None and self._in_flight is None and self.scheduler.has_unfinished():
            raise RuntimeError("scheduler made no progress: a request cannot fit in the KV cache")
        if self._in_flight is not None:  # the previous step's results, while this one runs
            outputs += self._finish_step(include_unfinished)
        self._in_flight = launched
        if launched is not None and not self.async_scheduling:
            outputs += self._finish_step(include_unfinished)
        return outputs

    def _prefetch_encoders(self) -> None:
        """With nothing running, the first waiting sequence is the next step's first: encode the
        items its first chunk reaches past what the prefix cache holds."""
        sch = self.scheduler
        if sch.running or not sch.waiting or not sch.waiting[0].mm_items:
            return
        seq = sch.waiting[0]
        self.runner.prefetch_encoders(seq, self.block_manager.num_cached_prefix_tokens(seq),
                                      self.scheduler_config.max_num_batched_tokens)

    def _needs_results(self, step: LaunchedStep) -> bool:
        """Penalties read every earlier token of a sequence on the host: wait for them."""
        return any(seq.params.needs_penalties and seq.finish_reason is None for seq in step.sampled_seqs)

    def _launch(self, sched) -> tuple:
        st = self.stats
        stop_ids = {s.seq.seq_id: self.output_processor.stop_ids_for(s.seq)
                    for s in sched.scheduled if s.seq.params.min_tokens}
        for s in sched.scheduled:
            c = s.seq.num_computed_tokens
            st.num_prompt_tokens_computed += max(0, min(c + s.num_new_tokens, s.seq.num_prompt_tokens) - c)
        prev = self._in_flight[1] if self._in_flight is not None else None
        step = self.runner.launch(sched, stop_ids, prev)
        for s in sched.scheduled:
            s.seq.num_computed_tokens += s.num_new_tokens
            if s.num_new_tokens > 1:
                # A prompt chunk: hash and register its blocks while the device runs the step, not
                # after it, where a lone request's first token waits for them. A later step that
                # hits them runs after this one on the stream, so it reads them written.
                self.block_manager.hash_blocks(s.seq)
                self.block_manager.cache_computed_blocks(s.seq)
        for seq in step.sampled_seqs:
            seq.num_pending_tokens += 1
        st.num_steps += 1
        nseq = len(sched.scheduled)
        st.max_batch_seqs = max(st.max_batch_seqs, nseq)
        st.batch_sizes.append(nseq)
        if len(st.batch_sizes) > 4096:
            del st.batch_sizes[:2048]
        return sched, step

    def _finish_step(self, include_unfinished: bool) -> list[RequestOutput]:
        """Read the results of the step in flight and turn them into tokens, text and outputs."""
        sched, step = self._in_flight
        self._in_flight = None
        results = self.runner.collect(step)
        st = self.stats
        touched: dict[str, _Request] = {}
        for res in _align(sched.scheduled, results):
            seq = res.seq
            if res.token_id is not None:
                seq.num_pending_tokens -= 1
            if seq.finish_reason is not None:  # aborted, or stopped on an earlier step's token
                continue
            self.output_processor.process(res, defer_text=not include_unfinished)
            self.block_manager.cache_computed_blocks(seq)
            if res.token_id is not None:
                st.num_generation_tokens += 1
                if seq.first_token_time is None:
                    seq.first_token_time = time.monotonic()
            if seq.finish_reason is not None:
                self.scheduler.finish(seq)
            req = self.requests.get(seq.request_id)
            if req is not None:
                touched[seq.request_id] = req
        if self.async_scheduling:  # the text of this step's tokens, while the next step runs
            self.output_processor.flush_all_text()

        outputs = []
        for rid, req in touched.items():
            done = req.finished
            if done or include_unfinished:
                outputs.append(self._make_output(req, done))
            if done:
                del self.requests[rid]
        return outputs

    def _make_output(self, req: _Request, finished: bool) -> RequestOutput:
        for s in req.seqs:
            self.output_processor.flush_text(s)
        first = req.seqs[0]
        completions = [
            CompletionOutput(index=s.index, text=s.output_text, token_ids=list(s.output_token_ids),
                             cumulative_logprob=s.cumulative_logprob if s.logprobs is not None else None,
                             logprobs=list(s.logprobs) if s.logprobs is not None else None,
                             finish_reason=s.finish_reason, stop_reason=s.stop_reason)
            for s in req.seqs]
        return RequestOutput(
            request_id=req.request_id, prompt=req.prompt, prompt_token_ids=req.prompt_token_ids,
            prompt_logprobs=list(first.prompt_logprobs) if first.want_prompt_logprobs else None,
            outputs=completions, finished=finished, num_cached_tokens=first.num_cached_tokens,
            metrics={"arrival_time": req.arrival_time, "first_token_time": first.first_token_time})


def _align(scheduled, results):
    """The runner reorders sequences (decodes first); give results back in scheduling order."""
    by_id = {r.seq.seq_id: r for r in results}
    return [by_id[s.seq.seq_id] for s in scheduled]
