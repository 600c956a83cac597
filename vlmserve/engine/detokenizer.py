"""Incremental detokenization: each new token's text is the difference between decoding a short
window that ends with it and the same window without it, so multi-byte characters and word-initial
spaces come out right and each step costs O(1)."""
from __future__ import annotations

from collections.abc import Callable

from vlmserve.engine.sequence import Sequence

_CONTEXT = 5  # prompt tokens decoded with the first output tokens, for their leading spaces


def init_offsets(seq: Sequence) -> None:
    seq.detok_prefix_offset = max(seq.num_prompt_tokens - _CONTEXT, 0)
    seq.detok_read_offset = seq.num_prompt_tokens


def make_decode(tokenizer) -> Callable[[list[int], bool], str]:
    """decode(ids, skip_special_tokens) -> text, as `tokenizer.decode` gives it. For a fast tokenizer
    that does not clean up spaces, HF's decode is its Rust backend's decode: call that directly, as
    HF's Python wrapper around it costs several times the decoding (two calls per token per step)."""
    backend = getattr(tokenizer, "_tokenizer", None)
    if backend is not None and hasattr(backend, "decode") and not getattr(tokenizer, "clean_up_tokenization_spaces", True):
        return lambda ids, skip: backend.decode(ids, skip_special_tokens=skip)
    return lambda ids, skip: tokenizer.decode(ids, skip_special_tokens=skip)


def decode_new_text(decode: Callable[[list[int], bool], str], seq: Sequence, skip_special_tokens: bool,
                    end: int | None = None) -> str:
    """The new text of the sequence's tokens up to `end` (default: all of them), with `decode` from
    make_decode; a later call with each step's `end` in turn gives exactly the text the calls at
    those steps would have given."""
    ids = seq.token_ids
    end = len(ids) if end is None else end
    prefix = decode(ids[seq.detok_prefix_offset:seq.detok_read_offset], skip_special_tokens)
    full = decode(ids[seq.detok_prefix_offset:end], skip_special_tokens)
    if len(full) > len(prefix) and not full.endswith("\ufffd"):
        seq.detok_prefix_offset = seq.detok_read_offset
        seq.detok_read_offset = end
        return full[len(prefix):]
    return ""  # an incomplete character: wait for the next token
