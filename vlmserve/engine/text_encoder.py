"""Text to token ids, as `tokenizer(text, add_special_tokens=...).input_ids` gives them, without the
Python that the call wraps around the Rust encoder where that is all it does: a lone request's prompt
is tokenized on its way to the first token."""
from __future__ import annotations

from collections.abc import Callable

TextEncoder = Callable[..., list[int]]


def text_encoder(tokenizer) -> TextEncoder:
    """A function (text, add_special_tokens=True) -> the ids of `tokenizer(text, add_special_tokens=
    ...).input_ids`. A transformers 5 `TokenizersBackend` whose call path no subclass overrides pads,
    truncates and splits special tokens by settings it keeps on its `tokenizers` backend, then runs
    the backend's encoder; with those settings as a plain call leaves them (checked at every call),
    the backend's `encode` alone gives the same ids, in about a third of the time. Any other
    tokenizer, or text, goes through the tokenizer's call."""

    def call(text, add_special_tokens: bool = True) -> list[int]:
        return tokenizer(text, add_special_tokens=add_special_tokens).input_ids

    try:
        import tokenizers
        from transformers.tokenization_utils_base import PreTrainedTokenizerBase
        from transformers.tokenization_utils_tokenizers import TokenizersBackend
    except ImportError:  # another transformers layout: no shortcut
        return call
    cls = type(tokenizer)
    backend = getattr(tokenizer, "_tokenizer", None)
    if not (isinstance(tokenizer, TokenizersBackend) and isinstance(backend, tokenizers.Tokenizer)
            and cls.__call__ is PreTrainedTokenizerBase.__call__
            and cls._encode_plus is TokenizersBackend._encode_plus
            and cls._get_padding_truncation_strategies is PreTrainedTokenizerBase._get_padding_truncation_strategies):
        return call

    def encode(text, add_special_tokens: bool = True) -> list[int]:
        if (type(text) is str and backend.truncation is None and backend.padding is None
                and backend.encode_special_tokens == tokenizer.split_special_tokens
                and not getattr(tokenizer, "_in_target_context_manager", False)):
            return backend.encode(text, add_special_tokens=add_special_tokens).ids
        return call(text, add_special_tokens)

    return encode
