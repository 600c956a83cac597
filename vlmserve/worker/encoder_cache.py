"""Embeddings of multimodal items by content hash, so each item goes through its encoder once even
when its placeholder tokens are prefilled over several steps, and again never while it stays cached
(another request with the same image reuses them). Least recently used entries go first once the
cache holds more than `max_tokens` embeddings."""
from __future__ import annotations

from collections import OrderedDict

import torch


class EncoderCache:
    def __init__(self, max_tokens: int):
        self.max_tokens = max_tokens
        self.entries: OrderedDict[str, torch.Tensor] = OrderedDict()
        self.num_tokens = 0
        self.num_encoded_items = 0  # items that went through an encoder (misses)

    def get(self, key: str) -> torch.Tensor | None:
        t = self.entries.get(key)
        if t is not None:
            self.entries.move_to_end(key)
        return t

    def put(self, key: str, emb: torch.Tensor, keep: set[str]) -> None:
        if key in self.entries:
            return
        self.entries[key] = emb
        self.num_tokens += emb.shape[0]
        for old in list(self.entries):
            if self.num_tokens <= self.max_tokens:
                break
            if old in keep:  # needed by the step being built
                continue
            self.num_tokens -= self.entries.pop(old).shape[0]
