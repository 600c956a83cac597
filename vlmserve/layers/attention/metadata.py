from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class AttentionMetadata:
    """How a flat batch of tokens splits into sequences and where their KV entries live.

    The batch holds `num_decodes` single-token decode sequences first, then prefill chunks.
    Token i of the batch is written to cache slot `slot_mapping[i]` (block * block_size + offset).
    """
    num_decodes: int
    query_start_loc: list[int]  # B + 1 offsets into the flat token batch
    seq_lens: list[int]  # tokens in the cache for each sequence once this step's are written
    slot_mapping: torch.Tensor  # [T] int64
    block_tables: torch.Tensor  # [B, max_blocks] int32/int64, padded with 0
    seq_lens_tensor: torch.Tensor  # [B] int64, on the device
    block_size: int
    # query_start_loc on the device, where the caller keeps it there (a CUDA graph's static input);
    # else backends that need it make it from the list
    query_start_loc_tensor: torch.Tensor | None = None
    # Whether every prefill chunk starts at its sequence's first token (nothing cached before it),
    # which lets a backend attend over the step's own k, v instead of the paged cache. None: the
    # backend works it out from the host-side lengths. A CUDA graph sets it, so that a replay
    # takes the path its capture took.
    prefill_without_context: bool | None = None
    # Whether the batch is padded to one of a few token-count buckets (a CUDA graph's). Kernels
    # specialized per shape pay their setup once per bucket then, where eager steps meet a new
    # shape at nearly every length: cuDNN's attention builds a plan per shape (~70 ms on an H200).
    padded_to_bucket: bool = False

    @property
    def num_seqs(self) -> int:
        return len(self.seq_lens)
