"""What a model declares so that the engine can feed it images (and other media)."""
from __future__ import annotations

from typing import ClassVar, Protocol, runtime_checkable

import torch


@runtime_checkable
class SupportsMultiModal(Protocol):
    """A model that takes multimodal items besides tokens.

    - `supports_multimodal = True` and `placeholder_str(modality, i)`: the text a user puts in a
      prompt where item i goes (e.g. "<image>"), which the processor expands to the item's tokens.
    - `embed_multimodal(modality, items)`: a list of processed items (dicts of tensors, as the
      model's processor made them) -> one [num_tokens, hidden] tensor per item, in one batched call.
      Floating-point tensors arrive on the model's device; integer ones (grid shapes, sizes) stay
      on the host, so that reading them does not wait for the device.
    - `forward(input_ids, positions, meta, inputs_embeds)`: takes the token embeddings with the item
      embeddings already merged in at the placeholder positions (`embed_input_ids` makes the former).
    """

    supports_multimodal: ClassVar[bool]

    @classmethod
    def placeholder_str(cls, modality: str, i: int) -> str: ...

    def embed_multimodal(self, modality: str, items: list[dict[str, torch.Tensor]]) -> list[torch.Tensor]: ...

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor: ...


def supports_multimodal(model) -> bool:
    return bool(getattr(model, "supports_multimodal", False))
