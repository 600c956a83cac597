"""The multimodal processor: raw media of a request -> model inputs and placeholder tokens.

A model's processor subclasses `BaseMultiModalProcessor` and says:
- `placeholder_token_id(modality)`: the token that marks in a prompt where an item goes;
- `max_tokens_per_item(modality)`: the most tokens one item can take;
- `dummy_items(modality, count)`: raw items of that largest size, for memory profiling;
- `process_raw(modality, items, kwargs)`: raw items -> `ProcessedItem`s (encoder inputs and token count);
- optionally `process_embeds(modality, value)`: precomputed embeddings -> a `ProcessedItem`;
- optionally `prompt_positions(ids, items)`: positions that depend on the items (M-RoPE).
`process` does the rest of the media's part (input forms, limits, hashing), and `place` matches the
prompt's placeholders to the items and expands them; `apply` is both."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from vlmserve.config import ModelConfig, text_config
from vlmserve.multimodal.device_pixels import stage_all
from vlmserve.multimodal.hashing import SeenMedia, fingerprint, hash_item
from vlmserve.multimodal.image_utils import pil_bytes, shared_pil_bytes
from vlmserve.multimodal.inputs import EncoderInput, MultiModalItem


@dataclass
class ProcessedItem:
    data: dict[str, torch.Tensor]
    num_tokens: int


@dataclass
class PendingHash:
    """An item's content hash, left until its encoder has been launched (`ProcessedMedia.finish_hashes`)."""
    value: object
    extra: dict
    fingerprint: bytes
    pixels: object  # pil_bytes(value), read while processing it


@dataclass
class ProcessedMedia:
    """A request's items as model inputs, before they have places in its prompt: per modality, in
    prompt order, each item's inputs and its content hash (pending for items of new content, where
    the caller asked for that: see `fresh_inputs`)."""
    items: dict[str, list[ProcessedItem]]
    hashes: dict[str, list[str | PendingHash]]
    seen: SeenMedia | None = None

    def encoder_inputs(self) -> list[EncoderInput]:
        self.finish_hashes()
        return [EncoderInput(m, p.num_tokens, p.data, h)
                for m, group in self.items.items() for p, h in zip(group, self.hashes[m])]

    def fresh_inputs(self) -> list[EncoderInput]:
        """The items whose hashes are pending, as encoder inputs without a hash: content never seen
        (SeenMedia), which no cache can hold. finish_hashes gives their hashes, in this order."""
        return [EncoderInput(m, p.num_tokens, p.data, None) for m, group in self.items.items()
                for p, h in zip(group, self.hashes[m]) if isinstance(h, PendingHash)]

    def finish_hashes(self) -> list[str]:
        """Compute the pending hashes; returns them in the items' order (fresh_inputs')."""
        done = []
        for m in self.items:
            group = self.hashes[m]
            for i, h in enumerate(group):
                if isinstance(h, PendingHash):
                    with shared_pil_bytes([(h.value, h.pixels)]):
                        group[i] = hash_item(h.value, **h.extra)
                    done.append(group[i])
                    if self.seen is not None:
                        self.seen.add(h.fingerprint)
        return done

    def stage(self, threads: int = 1) -> None:
        """Stage the items' device pixels (multimodal/device_pixels.py) with up to `threads` threads each."""
        for group in self.items.values():
            for p in group:
                stage_all(p.data, threads)


class MultiModalInputError(ValueError):
    """Multimodal input that does not fit the model or the prompt."""


def _is_image_like(x) -> bool:
    if isinstance(x, Image.Image):
        return True
    if isinstance(x, np.ndarray):
        return x.ndim in (2, 3)
    if isinstance(x, torch.Tensor):
        return x.ndim in (2, 3) and (x.dtype == torch.uint8 or 3 in (x.shape[0], x.shape[-1]))
    return False


class BaseMultiModalProcessor:
    modalities: tuple[str, ...] = ("image",)

    def __init__(self, model_config: ModelConfig, tokenizer, mm_processor_kwargs: dict | None = None):
        self.model_config = model_config
        self.hf_config = model_config.hf_config
        self.tokenizer = tokenizer
        self.mm_processor_kwargs = dict(mm_processor_kwargs or {})
        self.hidden_size = text_config(self.hf_config).hidden_size
        # Set by the engine on a GPU: processors may then leave resizing and normalizing to that
        # device, handing over DevicePixels (multimodal/device_pixels.py) instead of pixel values.
        self.media_device: torch.device | None = None
        self.seen_media = SeenMedia()  # fingerprints of the items hashed lately

    # ---- what a model's processor provides ------------------------------------------------
    def placeholder_token_id(self, modality: str) -> int:
        raise NotImplementedError

    def max_tokens_per_item(self, modality: str) -> int:
        raise NotImplementedError

    def dummy_items(self, modality: str, count: int) -> list:
        raise NotImplementedError

    def process_raw(self, modality: str, items: list, kwargs: dict) -> list[ProcessedItem]:
        raise NotImplementedError

    def process_embeds(self, modality: str, value) -> ProcessedItem:
        """Precomputed embeddings [num_tokens, hidden] for models whose items have a fixed size."""
        if not isinstance(value, torch.Tensor) or value.ndim != 2:
            raise MultiModalInputError(f"{modality} embeddings must be a tensor of shape "
                                       f"(n_items, {self.max_tokens_per_item(modality)}, {self.hidden_size})")
        expected = (self.max_tokens_per_item(modality), self.hidden_size)
        if tuple(value.shape) != expected:
            raise MultiModalInputError(
                f"{modality} embeddings have shape (n_items, {value.shape[0]}, {value.shape[1]}), "
                f"the model takes (n_items, {expected[0]}, {expected[1]})")
        return ProcessedItem({f"{modality}_embeds": value}, value.shape[0])

    # ---- input forms ---------------------------------------------------------------------
    def _split_items(self, modality: str, value) -> list[tuple[str, object]]:
        """-> [("raw", item) | ("embeds", value)] in prompt order."""
        if isinstance(value, dict):
            return [("embeds", value)]
        if isinstance(value, torch.Tensor) and value.is_floating_point() and value.shape[-1] == self.hidden_size \
                and value.ndim in (2, 3):
            return [("embeds", e) for e in (value if value.ndim == 3 else [value])]
        if _is_image_like(value) or not isinstance(value, (list, tuple)):
            value = [value]
        out = []
        for i, v in enumerate(value):
            if isinstance(v, (dict, torch.Tensor)) and not _is_image_like(v):
                out.extend(self._split_items(modality, v))
            elif self.is_raw_item(modality, v):
                out.append(("raw", v))
            else:
                raise MultiModalInputError(f"{modality} {i}: unsupported type {type(v).__name__}; give a "
                                           "PIL image, an image array, or embeddings as a tensor")
        return out

    def is_raw_item(self, modality: str, v) -> bool:
        return _is_image_like(v)

    # ---- the whole request ---------------------------------------------------------------
    def apply(self, prompt_token_ids: list[int], mm_data: dict, limits: dict[str, int],
              request_kwargs: dict | None = None) -> tuple[list[int], list[MultiModalItem]]:
        return self.place(prompt_token_ids, self.process(mm_data, limits, request_kwargs))

    def process(self, mm_data: dict, limits: dict[str, int], request_kwargs: dict | None = None,
                stage_threads: int = 1, encode_first: bool = False) -> ProcessedMedia:
        """A request's media -> model inputs and content hashes, before they are placed in its prompt
        (which needs no token ids: the engine may start the encoders before the prompt is tokenized).
        stage_threads: the threads that copy each image's device pixels out of the caller's memory.
        encode_first: the hashes of images of content not seen lately are left pending, to be
        computed while their encoders run (`ProcessedMedia.fresh_inputs`)."""
        with shared_pil_bytes():  # processing and hashing read each PIL image's pixels once
            media = self._process(mm_data, limits, request_kwargs, encode_first)
        media.stage(stage_threads)
        return media

    def _process(self, mm_data: dict, limits: dict[str, int], request_kwargs: dict | None,
                 encode_first: bool = False) -> ProcessedMedia:
        kwargs = {**self.mm_processor_kwargs, **(request_kwargs or {})}
        media = ProcessedMedia({}, {}, self.seen_media)
        fingerprints = set()  # of this request: an image given twice is hashed at once
        for modality, value in mm_data.items():
            if modality not in self.modalities:
                raise MultiModalInputError(f"this model does not take {modality!r} input "
                                           f"(it takes: {', '.join(self.modalities)})")
            parts = self._split_items(modality, value)
            limit = limits.get(modality, 1)
            if len(parts) > limit:
                raise MultiModalInputError(
                    f"{len(parts)} {modality}s in one prompt, more than the limit of {limit} "
                    f"(raise limit_mm_per_prompt={{'{modality}': {len(parts)}}})")
            raw = [v for kind, v in parts if kind == "raw"]
            try:
                processed_raw = iter(self.process_raw(modality, raw, kwargs) if raw else [])
            except MultiModalInputError:
                raise
            except Exception as e:
                raise MultiModalInputError(f"cannot process the {modality}: {type(e).__name__}: {e}") from e
            items, item_hashes = [], []
            for kind, v in parts:
                items.append(next(processed_raw) if kind == "raw" else self.process_embeds(modality, v))
                extra = {"modality": modality, **kwargs}
                key = fingerprint(v, **extra) if kind == "raw" else None
                if encode_first and key is not None and key not in fingerprints and key not in self.seen_media:
                    item_hashes.append(PendingHash(v, extra, key, pil_bytes(v)))
                else:
                    item_hashes.append(hash_item(v, **extra))
                    if key is not None:
                        self.seen_media.add(key)
                fingerprints.add(key)
            media.items[modality], media.hashes[modality] = items, item_hashes
        return media

    def place(self, ids: list[int], media: ProcessedMedia) -> tuple[list[int], list[MultiModalItem]]:
        """Each placeholder token of the prompt expanded for its item, in order: the expanded ids and
        the items with their places in them."""
        media.finish_hashes()
        per_modality, hashes = media.items, media.hashes
        placeholder_of = {self.placeholder_token_id(m): m for m in self.modalities}
        # where the placeholders are, found by list.index (C speed; the prompt may be long)
        at: list[tuple[int, str]] = []
        for ph, m in placeholder_of.items():
            i = -1
            while True:
                try:
                    i = ids.index(ph, i + 1)
                except ValueError:
                    break
                at.append((i, m))
        at.sort()
        found: dict[str, int] = {m: 0 for m in self.modalities}
        for _, m in at:
            found[m] += 1
        for m in self.modalities:
            given = len(per_modality.get(m, []))
            if found[m] != given:
                raise MultiModalInputError(
                    f"the prompt has {found[m]} {m} placeholder(s) but {given} {m}(s) were given; "
                    f"put one {self.placeholder_text(m)} in the prompt for each {m}")
        out: list[int] = []
        items: list[MultiModalItem] = []
        seen = {m: 0 for m in self.modalities}
        prev = 0
        for i, m in at:
            out.extend(ids[prev:i])
            prev = i + 1
            k = seen[m]
            seen[m] += 1
            p = per_modality[m][k]
            expansion = self.expand_placeholder(m, p)
            items.append(MultiModalItem(m, len(out), len(expansion), p.data, hashes[m][k]))
            out.extend(expansion)
        out.extend(ids[prev:])
        return out, items

    def expand_placeholder(self, modality: str, item: ProcessedItem) -> list[int]:
        return [self.placeholder_token_id(modality)] * item.num_tokens

    def placeholder_text(self, modality: str) -> str:
        return self.tokenizer.decode([self.placeholder_token_id(modality)])

    def prompt_positions(self, prompt_token_ids: list[int], items: list[MultiModalItem]
                         ) -> tuple[torch.Tensor, int] | None:
        """Model-specific rotary positions of an expanded prompt, for models whose positions depend
        on its items (M-RoPE): ([rows, prompt_len] positions, delta), token p >= prompt_len then
        sitting at p + delta in every row. None: the plain positions 0, 1, 2, ..."""
        return None

    def dummy_request(self, limits: dict[str, int]) -> tuple[list[int], dict]:
        """The largest multimodal prompt the limits allow: every item at its largest."""
        ids, data = [], {}
        for m in self.modalities:
            n = limits.get(m, 1)
            if n:
                data[m] = self.dummy_items(m, n)
                ids.extend([self.placeholder_token_id(m)] * n)
        return ids or [0], data
