"""The state of one sequence (one of the `n` samples of a request) as it moves through the engine."""
from __future__ import annotations

import enum
import time

import torch

from vlmserve.outputs import PositionLogprobs
from vlmserve.sampling_params import SamplingParams


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


class Sequence:
    """Token ids (prompt then output), how many of them are in the KV cache, and output bookkeeping."""

    def __init__(self, seq_id: int, request_id: str, index: int, prompt_token_ids: list[int],
                 params: SamplingParams, arrival_time: float | None = None,
                 want_prompt_logprobs: bool = False, mm_items: list | None = None,
                 mrope_positions: torch.Tensor | None = None, mrope_position_delta: int = 0):
        self.seq_id = seq_id
        self.request_id = request_id
        self.index = index
        self.token_ids: list[int] = list(prompt_token_ids)
        self.num_prompt_tokens = len(prompt_token_ids)
        self.params = params
        self.arrival_time = arrival_time if arrival_time is not None else time.monotonic()
        self.status = SequenceStatus.WAITING
        self.mm_items = mm_items or []  # MultiModalItem, by prompt position
        # Models with multi-row positions (M-RoPE): the prompt's positions [rows, prompt_len], made
        # by the model's processor; token p >= prompt_len sits at p + mrope_position_delta in every row.
        self.mrope_positions = mrope_positions
        self.mrope_position_delta = mrope_position_delta

        # KV cache state, owned by the block manager and the scheduler.
        self.num_computed_tokens = 0
        # Tokens sampled by launched steps whose results are not processed yet (async scheduling):
        # counted in num_tokens, not yet in token_ids. The next step reads the last one on the device.
        self.num_pending_tokens = 0
        self.block_table: list[int] = []
        self.block_hashes: list[bytes] = []  # chain hashes of the full blocks of token_ids
        self.num_cached_blocks = 0  # leading blocks of block_table registered in the prefix cache
        self.num_cached_tokens = 0  # prompt tokens served from the prefix cache at admission
        self.num_preemptions = 0

        # Sampling state.
        self.generator: torch.Generator | None = None  # made from params.seed by the sampler, on its device
        self.want_prompt_logprobs = want_prompt_logprobs and params.prompt_logprobs is not None
        self.prompt_logprobs: list[PositionLogprobs | None] = [None] if self.want_prompt_logprobs else []

        # Output state, owned by the output processor.
        self.logprobs: list[PositionLogprobs] | None = [] if params.logprobs is not None else None
        self.cumulative_logprob = 0.0
        self.output_text = ""
        self.detok_prefix_offset = 0
        self.detok_read_offset = 0
        self.finish_reason: str | None = None
        self.stop_reason: int | str | None = None
        self.first_token_time: float | None = None

    @property
    def num_tokens(self) -> int:
        """Tokens known (token_ids) plus those pending from launched steps: what scheduling plans with."""
        return len(self.token_ids) + self.num_pending_tokens

    @property
    def num_output_tokens(self) -> int:
        """Output tokens before the one the next launched step samples (pending ones included)."""
        return self.num_tokens - self.num_prompt_tokens

    def will_stop_by_length(self, max_model_len: int) -> bool:
        """With its pending tokens, the sequence reaches max_tokens or max_model_len: it stops,
        whatever they are, so another step for it would be wasted."""
        max_tokens = self.params.max_tokens
        return (max_tokens is not None and self.num_output_tokens >= max_tokens) \
            or self.num_tokens >= max_model_len

    @property
    def prompt_token_ids(self) -> list[int]:
        return self.token_ids[: self.num_prompt_tokens]

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def is_finished(self) -> bool:
        return self.status == SequenceStatus.FINISHED

    @property
    def in_prefill(self) -> bool:
        """True while tokens other than the last sampled one are still missing from the KV cache."""
        return self.num_tokens - self.num_computed_tokens > 1

    def block_extra_keys(self, block_index: int, block_size: int) -> tuple:
        """Extra identity of a block beyond its token ids: the content hash of every multimodal item
        that has placeholder tokens in it, so another image behind the same tokens misses."""
        if not self.mm_items:
            return ()
        start, end = block_index * block_size, (block_index + 1) * block_size
        return tuple((it.hash, it.offset - start) for it in self.mm_items if it.offset < end and it.end > start)

    def reset_for_recompute(self) -> None:
        """Preemption by recompute: the KV cache is dropped; prompt and output tokens are kept."""
        self.num_computed_tokens = 0  # pending tokens stay pending: their results will come
        self.block_table = []
        self.num_cached_blocks = 0
        self.num_preemptions += 1
        self.status = SequenceStatus.WAITING
