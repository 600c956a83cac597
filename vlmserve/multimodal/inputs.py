from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class MultiModalItem:
    """One image (or other item) of a request after processing: where its placeholder tokens sit
    in the prompt, what the model's encoder takes, and a content hash for caching."""
    modality: str
    offset: int  # first placeholder position in the prompt
    length: int  # number of placeholder tokens
    data: dict[str, torch.Tensor]  # e.g. {"pixel_values": ...} or {"image_embeds": ...}
    hash: str

    @property
    def end(self) -> int:
        return self.offset + self.length
