"""LLaVA-1.5: a CLIP vision tower, a two-layer projector, and a Llama-family language model.
Each image becomes `(image_size / patch_size)^2` embeddings (plus CLS with the "full" strategy)
placed where the prompt's `<image>` placeholder was expanded."""
from __future__ import annotations

from collections.abc import Iterable
from typing import ClassVar

import torch
from torch import nn

from vlmserve.config import ModelLoadError
from vlmserve.layers.activation import get_act_fn
from vlmserve.models.clip import CLIPVisionModel
from vlmserve.models.clip_image_processing import FastCLIPImageProcessor
from vlmserve.models.registry import text_model_class
from vlmserve.models.weight_utils import load_weights
from vlmserve.multimodal import MULTIMODAL_REGISTRY, BaseMultiModalProcessor, ProcessedItem

# Checkpoint names -> ours, applied in turn. Hub checkpoints (transformers 4.x) have
# `language_model.model.`, `language_model.lm_head.`, `vision_tower.vision_model.`,
# `multi_modal_projector.`; transformers 5 keeps `model.`-prefixed names in memory and drops
# `vision_model.` from CLIP.
_WEIGHT_RENAMES = [
    ("model.language_model.", "language_model.model."),
    ("model.vision_tower.", "vision_tower."),
    ("model.multi_modal_projector.", "multi_modal_projector."),
    ("lm_head.", "language_model.lm_head."),
    ("vision_tower.vision_model.", "vision_tower."),
]


class LlavaProcessor(BaseMultiModalProcessor):
    """Images through the checkpoint's own HF image processor (RGB, resize, centre crop, rescale,
    normalize), PIL images through a reproduction of it without HF's per-call overhead
    (clip_image_processing.py); each `<image>` expands to a fixed number of tokens."""

    def __init__(self, model_config, tokenizer, mm_processor_kwargs=None):
        super().__init__(model_config, tokenizer, mm_processor_kwargs)
        from transformers import AutoImageProcessor
        try:
            self.image_processor = AutoImageProcessor.from_pretrained(model_config.model)
        except Exception as e:
            raise ModelLoadError(f"cannot load the image processor of {model_config.model!r} "
                                 f"(preprocessor_config.json): {e}") from e
        self.fast_image_processor = FastCLIPImageProcessor.from_hf(self.image_processor)
        self.num_image_tokens = LlavaForConditionalGeneration.tokens_per_image(self.hf_config)

    def placeholder_token_id(self, modality: str) -> int:
        return self.hf_config.image_token_index

    def max_tokens_per_item(self, modality: str) -> int:
        return self.num_image_tokens

    def dummy_items(self, modality: str, count: int) -> list:
        from PIL import Image
        size = self.hf_config.vision_config.image_size
        return [Image.new("RGB", (size, size), (128, 128, 128))] * count

    def process_raw(self, modality: str, items: list, kwargs: dict) -> list[ProcessedItem]:
        fast = self.fast_image_processor if not kwargs else None  # kwargs override HF's settings
        if fast is None:
            pixels = [None] * len(items)
        elif self.media_device is not None:  # resized and normalized on the GPU, as the encoder runs
            pixels = [fast.device_pixels(item, self.media_device) or fast(item) for item in items]
        else:
            pixels = [fast(item) for item in items]
        rest = [i for i, p in enumerate(pixels) if p is None]
        if rest:
            out = self.image_processor(images=[items[i] for i in rest], return_tensors="pt", **kwargs)
            for i, p in zip(rest, out["pixel_values"]):
                pixels[i] = p
        return [ProcessedItem({"pixel_values": p}, self.num_image_tokens) for p in pixels]


class LlavaMultiModalProjector(nn.Module):
    def __init__(self, in_dim: int, out_dim: int, act: str, bias: bool):
        super().__init__()
        self.linear_1 = nn.Linear(in_dim, out_dim, bias=bias)
        self.act = get_act_fn(act)
        self.linear_2 = nn.Linear(out_dim, out_dim, bias=bias)

    def forward(self, x):
        return self.linear_2(self.act(self.linear_1(x)))


@MULTIMODAL_REGISTRY.register_processor(LlavaProcessor)
class LlavaForConditionalGeneration(nn.Module):
    supports_multimodal: ClassVar[bool] = True

    def __init__(self, config, max_model_len: int):
        super().__init__()
        self.config = config
        vcfg, tcfg = config.vision_config, config.text_config
        layers = config.vision_feature_layer
        self.feature_layers = [layers] if isinstance(layers, int) else list(layers)
        self.select_strategy = config.vision_feature_select_strategy
        if self.select_strategy not in ("default", "full"):
            raise ValueError(f"unsupported vision_feature_select_strategy {self.select_strategy!r}")
        self.vision_tower = CLIPVisionModel(vcfg, self.feature_layers)
        self.multi_modal_projector = LlavaMultiModalProjector(
            vcfg.hidden_size * len(self.feature_layers), tcfg.hidden_size, config.projector_hidden_act,
            getattr(config, "multimodal_projector_bias", True))
        self.language_model = text_model_class(tcfg)(tcfg, max_model_len)
        self.image_token_id = config.image_token_index
        # set by the runner to a CUDA-graph wrapper of encode_images (worker/encoder_graphs.py)
        self.image_encoder = None

    @classmethod
    def placeholder_str(cls, modality: str, i: int) -> str:
        if modality != "image":
            raise ValueError(f"LLaVA takes images, not {modality}")
        return "<image>"

    @staticmethod
    def tokens_per_image(config) -> int:
        v = config.vision_config
        n = (v.image_size // v.patch_size) ** 2
        return n + 1 if config.vision_feature_select_strategy == "full" else n

    # ---- multimodal ----------------------------------------------------------------------
    def embed_multimodal(self, modality: str, items: list[dict[str, torch.Tensor]]) -> list[torch.Tensor]:
        dtype = self.multi_modal_projector.linear_1.weight.dtype
        out: list[torch.Tensor | None] = [None] * len(items)
        pixel_rows = [i for i, it in enumerate(items) if "pixel_values" in it]
        for i, it in enumerate(items):
            if "image_embeds" in it:
                out[i] = it["image_embeds"].to(dtype)
        # One tower call per image size (LLaVA-1.5's processor gives one size).
        by_shape: dict[tuple, list[int]] = {}
        for i in pixel_rows:
            by_shape.setdefault(tuple(items[i]["pixel_values"].shape), []).append(i)
        encode = self.image_encoder or self.encode_images
        for rows in by_shape.values():
            feats = encode(torch.stack([items[i]["pixel_values"] for i in rows]))
            for j, i in enumerate(rows):
                out[i] = feats[j]
        return out

    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """[B, 3, H, W] -> [B, tokens per image, LM hidden]: the tower, then the projector."""
        states = self.vision_tower(pixels)
        if self.select_strategy == "default":
            states = [s[:, 1:] for s in states]
        return self.multi_modal_projector(states[0] if len(states) == 1 else torch.cat(states, dim=-1))

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        # The placeholder id may lie past the LM's embedding table; those rows are overwritten.
        safe = input_ids.masked_fill(input_ids == self.image_token_id, 0)
        return self.language_model.embed_input_ids(safe)

    def forward(self, input_ids, positions, meta, inputs_embeds=None):
        if inputs_embeds is None:
            inputs_embeds = self.embed_input_ids(input_ids)
        return self.language_model(input_ids, positions, meta, inputs_embeds)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.language_model.compute_logits(hidden)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        skip = self.vision_tower.unused_weight_prefixes("vision_tower.", self.config.vision_config.num_hidden_layers)
        if self.language_model.tie_word_embeddings:
            skip += ("language_model.lm_head.",)
        load_weights(self, weights, renames=_WEIGHT_RENAMES, skip_prefixes=skip)
