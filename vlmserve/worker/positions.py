"""Positions of a step's tokens for models with several position rows (M-RoPE: time, height,
width). The model's processor gave each multimodal prompt its positions; the runner only slices
them, whatever the model."""
from __future__ import annotations

import numpy as np
import torch


def multirow_positions(items, positions, query_start_loc: list[int], rows: int) -> torch.Tensor:
    """[rows, T] positions of a flat batch. items: the step's ScheduledSeqs in batch order;
    positions: the plain position of each token (its index in its sequence), a list or an array.

    A sequence without its own positions (text-only) takes its plain positions in every row. One
    with `mrope_positions` takes them for its prompt tokens (prefill chunks, prefix-cache hits and
    recomputes after preemption slice the same stored table) and plain position + delta in every
    row for the tokens after the prompt."""
    # numpy, one thread: torch's copies and reductions of a 16k-token step's [3, T] go through its intra-op
    # pool, whose wake-ups took ms on a 16-core GPU host (BENCHMARKS.md)
    out = np.repeat(np.asarray(positions, dtype=np.int64)[None, :], rows, axis=0)
    for i, it in enumerate(items):
        seq = it.seq
        table = seq.mrope_positions
        if table is None:
            continue
        c, n, start = seq.num_computed_tokens, it.num_new_tokens, query_start_loc[i]
        prompt_len = table.shape[1]
        end = min(c + n, prompt_len)
        if c < end:
            out[:, start:start + end - c] = np.asarray(table[:, c:end])
        if c + n > prompt_len and seq.mrope_position_delta:
            first = max(c, prompt_len)
            out[:, start + first - c:start + n] += seq.mrope_position_delta
    return torch.from_numpy(out)
