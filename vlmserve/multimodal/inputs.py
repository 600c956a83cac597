from __future__ import annotations

from dataclasses import dataclass

import numpy as np
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


@dataclass
class EncoderInput:
    """An item as its encoder takes it, before it has a place in a prompt (the engine may encode it
    ahead of tokenizing the prompt). The model runner's encoder path reads these four fields, which
    a MultiModalItem has too."""
    modality: str
    length: int  # embeddings the encoder gives for it
    data: dict[str, torch.Tensor]
    hash: str | None  # None: not computed yet (see ProcessedMedia.fresh_inputs)


@dataclass
class VideoFrames:
    """A decoded video as it reaches a model's processor: the sampled frames and their rate.
    `multimodal/video.py` makes these from video files and URLs; a user may also pass frames
    directly (a list of PIL images or an array [T, H, W, 3]), which have no known rate."""
    frames: np.ndarray  # [T, H, W, 3] uint8 RGB
    fps: float | None = None  # rate of the sampled frames (not of the source), for time-aligned positions

    def __len__(self) -> int:
        return int(self.frames.shape[0])
