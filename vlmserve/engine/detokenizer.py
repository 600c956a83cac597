"""Incremental detokenization: each new token's text is the difference between decoding a short
window that ends with it and the same window without it, so multi-byte characters and word-initial
spaces come out right and each step costs O(1)."""
from __future__ import annotations

from vlmserve.engine.sequence import Sequence

_CONTEXT = 5  # prompt tokens decoded with the first output tokens, for their leading spaces


def init_offsets(seq: Sequence) -> None:
    seq.detok_prefix_offset = max(seq.num_prompt_tokens - _CONTEXT, 0)
    seq.detok_read_offset = seq.num_prompt_tokens


def decode_new_text(tokenizer, seq: Sequence, skip_special_tokens: bool) -> str:
    ids = seq.token_ids
    prefix = tokenizer.decode(ids[seq.detok_prefix_offset:seq.detok_read_offset],
                              skip_special_tokens=skip_special_tokens)
    full = tokenizer.decode(ids[seq.detok_prefix_offset:], skip_special_tokens=skip_special_tokens)
    if len(full) > len(prefix) and not full.endswith("\ufffd"):
        seq.detok_prefix_offset = seq.detok_read_offset
        seq.detok_read_offset = len(ids)
        return full[len(prefix):]
    return ""  # an incomplete character: wait for the next token
