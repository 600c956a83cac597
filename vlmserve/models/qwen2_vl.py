"""Qwen2-VL: a ViT over variable-size patch grids (2D rotary positions, images and videos at their
own resolution), a patch merger that folds each 2x2 block of patches into one token, and a Qwen2
language model with M-RoPE (three position rows: time, height, width).

The processor here turns images and videos into flat patch rows with HF's own image and video
processors (dynamic resolution within min_pixels..max_pixels) and computes each prompt's M-RoPE
positions, which the engine carries on the sequence without knowing what they are."""
from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Iterable
from typing import ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from vlmserve.config import ModelLoadError
from vlmserve.device_utils import to_device
from vlmserve.kernels.triton_fused import rotary_inplace
from vlmserve.layers.activation import get_act_fn
from vlmserve.layers.layernorm import LayerNorm, fused_kernels_enabled
from vlmserve.layers.vision_attention import Segments, graph_safe_segments, varlen_attention
from vlmserve.models.qwen2 import Qwen2ForCausalLM
from vlmserve.models.qwen2_vl_image_processing import FastQwen2VLImageProcessor
from vlmserve.models.weight_utils import load_weights
from vlmserve.multimodal import MULTIMODAL_REGISTRY, BaseMultiModalProcessor, ProcessedItem
from vlmserve.multimodal.inputs import VideoFrames
from vlmserve.multimodal.processing import MultiModalInputError
from vlmserve.multimodal.video import VIDEO_SAMPLING_KEYS

# Checkpoint names -> ours, in turn. Hub checkpoints (transformers 4.x): `model.` (the LM body),
# `visual.`, `lm_head.`; transformers 5 in memory: `model.language_model.`, `model.visual.`.
WEIGHT_RENAMES = [
    ("model.language_model.", "language_model.model."),
    ("model.visual.", "visual."),
    ("model.", "language_model.model."),
    ("lm_head.", "language_model.lm_head."),
]

# Frames given without their rate are taken as sampled at 2 per second: the rate qwen-vl-utils
# samples at and transformers 4.x's Qwen2.5-VL processor assumed (transformers 5 assumes 24).
DEFAULT_VIDEO_FPS = 2.0
# Memory profiling's video: this many frames (vLLM's Qwen2-VL profiles a similar clip), fewer when
# they would not fit in max_model_len.
DUMMY_VIDEO_FRAMES = 32
# mm_processor_kwargs this processor understands (per server and per request).
KNOWN_KWARGS = ("min_pixels", "max_pixels", "fps")
# The video loader's sampling keys (num_frames, max_frames): the frames that reach the processor
# are already sampled, so it accepts and ignores them wherever they were set.
IGNORED_KWARGS = tuple(k for k in VIDEO_SAMPLING_KEYS if k not in KNOWN_KWARGS)


# ---- M-RoPE positions of a prompt ------------------------------------------------------------
def mrope_positions(prompt_len: int, spans: list[tuple[int, int, tuple[int, int, int], float]]
                    ) -> tuple[torch.Tensor, int]:
    """The [3, prompt_len] M-RoPE positions of a prompt and the delta decoding continues from.

    spans: (offset, length, merged grid (t, h, w), temporal interval) per vision item, in prompt
    order. Text tokens take the next position in all three rows; a vision item's tokens take
    (start + t * interval, start + row, start + column), and the text after it starts one past the
    largest position the item used (as the Qwen models were trained; transformers 5's
    `get_rope_index` advances by max(h, w) instead, the same unless a video's time span exceeds its
    height and width in tokens). Token p >= prompt_len decodes at position p + delta."""
    # numpy, written in place: the torch version's ~20 small ops took ~0.25 ms of the request's host
    # work before its first step
    positions = np.empty((3, max([prompt_len] + [o + n for o, n, _, _ in spans])), dtype=np.int64)
    cursor, prev_end = 0, 0
    for offset, length, (t, h, w), interval in spans:
        if offset < prev_end:
            raise ValueError("multimodal items overlap in the prompt")
        if t * h * w != length:
            raise ValueError(f"an item of grid {t}x{h}x{w} has {length} placeholder tokens")
        if offset > prev_end:
            positions[:, prev_end:offset] = np.arange(cursor, cursor + offset - prev_end)
            cursor += offset - prev_end
        block = positions[:, offset:offset + length].reshape(3, t, h, w)
        tt = (np.arange(t, dtype=np.float64) * interval).astype(np.int64)  # truncated, as torch's .long()
        block[0] = tt.reshape(t, 1, 1) + cursor
        block[1] = np.arange(cursor, cursor + h).reshape(1, h, 1)
        block[2] = np.arange(cursor, cursor + w).reshape(1, 1, w)
        cursor += max(int(tt.max()), h - 1, w - 1) + 1  # one past the block's largest
        prev_end = offset + length
    if prompt_len > prev_end:
        positions[:, prev_end:] = np.arange(cursor, cursor + prompt_len - prev_end)
        cursor += prompt_len - prev_end
    return torch.from_numpy(positions), cursor - prompt_len


# ---- the processor ---------------------------------------------------------------------------
def _pixel_bounds(proc) -> tuple[int, int]:
    """(min_pixels, max_pixels) of an HF Qwen2-VL image or video processor, any version."""
    size = getattr(proc, "size", None)

    def field(name):  # size is a dict or, in transformers 5, a SizeDict
        return size.get(name) if isinstance(size, dict) else getattr(size, name, None)

    lo = field("shortest_edge") or field("min_pixels") or getattr(proc, "min_pixels", None)
    hi = field("longest_edge") or field("max_pixels") or getattr(proc, "max_pixels", None)
    if not lo or not hi:
        raise ModelLoadError(f"the {type(proc).__name__} of this checkpoint names no min/max pixels")
    return int(lo), int(hi)


def _is_frame(x) -> bool:
    return isinstance(x, Image.Image) or (isinstance(x, (np.ndarray, torch.Tensor)) and x.ndim == 3)


def _is_video(x) -> bool:
    if isinstance(x, VideoFrames):
        return True
    if isinstance(x, (np.ndarray, torch.Tensor)):
        return x.ndim == 4
    return isinstance(x, (list, tuple)) and len(x) > 0 and all(_is_frame(f) for f in x)


def _as_video_frames(x) -> VideoFrames:
    if isinstance(x, VideoFrames):
        return x
    if isinstance(x, torch.Tensor):
        x = x.cpu().numpy()
    if isinstance(x, np.ndarray):
        return VideoFrames(x)
    return VideoFrames(np.stack([np.asarray(f.convert("RGB")) if isinstance(f, Image.Image) else np.asarray(f)
                                 for f in x]))


class Qwen2VLMultiModalProcessor(BaseMultiModalProcessor):
    """Images and videos through the checkpoint's HF image / video processors; each
    `<|image_pad|>` (`<|video_pad|>`) of the prompt expands to the item's merged patches."""

    modalities = ("image", "video")

    def __init__(self, model_config, tokenizer, mm_processor_kwargs=None):
        super().__init__(model_config, tokenizer, mm_processor_kwargs)
        from transformers import AutoImageProcessor
        model_dir = model_config.model
        try:
            self.image_processor = AutoImageProcessor.from_pretrained(model_dir)
        except Exception as e:
            raise ModelLoadError(f"cannot load the image processor of {model_dir!r} "
                                 f"(preprocessor_config.json): {e}") from e
        self.video_processor = self._load_video_processor(model_dir)
        vcfg = self.hf_config.vision_config
        self.merge_size = vcfg.spatial_merge_size
        self.patch_size = vcfg.patch_size
        self.temporal_patch_size = vcfg.temporal_patch_size
        self._check_kwargs(self.mm_processor_kwargs)
        # The engine's pixel bounds: the checkpoint's, or what the engine's mm_processor_kwargs set.
        # Memory profiling sizes items by these, so a request may lower max_pixels but not raise it.
        engine_size = self._size(self.mm_processor_kwargs, _pixel_bounds(self.image_processor), check_max=False)
        self.image_pixels = (engine_size["shortest_edge"], engine_size["longest_edge"])
        self.video_pixels = self.image_pixels
        if self.video_processor is not None:
            video_size = self._size(self.mm_processor_kwargs, _pixel_bounds(self.video_processor), check_max=False)
            self.video_pixels = (video_size["shortest_edge"], video_size["longest_edge"])
        # PIL images take this path (HF's numbers, less time); None: HF's processor for everything
        self.fast_image_processor = FastQwen2VLImageProcessor.from_hf(
            self.image_processor, self.patch_size, self.merge_size, self.temporal_patch_size)

    @staticmethod
    def _load_video_processor(model_dir: str):
        # Checkpoints without video_preprocessor_config.json get one from preprocessor_config.json.
        try:
            from transformers import AutoVideoProcessor
            return AutoVideoProcessor.from_pretrained(model_dir)
        except Exception:  # no torchvision, or an older transformers: videos fail when given
            return None

    # ---- what the engine asks ------------------------------------------------------------
    def placeholder_token_id(self, modality: str) -> int:
        return self.hf_config.image_token_id if modality == "image" else self.hf_config.video_token_id

    def placeholder_text(self, modality: str) -> str:
        return Qwen2VLForConditionalGeneration.placeholder_str(modality, 0)

    def _largest_grid(self, max_pixels: int, max_tokens: int | None = None) -> tuple[int, int]:
        """(h, w) in merged tokens of the largest image smart_resize can make within max_pixels
        (and max_tokens), aspect ratio under 200."""
        factor = self.patch_size * self.merge_size
        n = max(1, max_pixels // (factor * factor))
        if max_tokens is not None:
            n = max(1, min(n, max_tokens))
        best = (1, 1)
        for h in range(1, math.isqrt(n) + 1):
            w = n // h
            if w / h < 200 and h * w > best[0] * best[1]:
                best = (h, w)
        return best

    def _dummy_video_shape(self) -> tuple[int, int, int]:
        """(frames, h, w in merged tokens) of the profiling video."""
        tps, budget = self.temporal_patch_size, self.model_config.max_model_len
        h, w = self._largest_grid(self.video_pixels[1], budget // 2)
        frames = DUMMY_VIDEO_FRAMES
        while frames > tps and (frames // tps) * h * w > budget:
            frames -= tps
        return frames, h, w

    def max_tokens_per_item(self, modality: str) -> int:
        if modality == "image":
            h, w = self._largest_grid(self.image_pixels[1])
            return h * w
        frames, h, w = self._dummy_video_shape()
        return -(-frames // self.temporal_patch_size) * h * w

    def dummy_items(self, modality: str, count: int) -> list:
        factor = self.patch_size * self.merge_size
        if modality == "image":
            h, w = self._largest_grid(self.image_pixels[1])
            return [Image.new("RGB", (w * factor, h * factor), (128, 128, 128))] * count
        frames, h, w = self._dummy_video_shape()
        return [VideoFrames(np.full((frames, h * factor, w * factor, 3), 128, dtype=np.uint8))] * count

    # ---- input forms ---------------------------------------------------------------------
    def is_raw_item(self, modality: str, v) -> bool:
        return _is_video(v) if modality == "video" else super().is_raw_item(modality, v)

    def _split_items(self, modality: str, value) -> list[tuple[str, object]]:
        if isinstance(value, dict):
            return [("embeds", d) for d in self._split_embeds(modality, value)]
        if modality == "video":
            videos = [value] if _is_video(value) else value
            if not isinstance(videos, (list, tuple)):
                videos = [videos]
            out = []
            for i, v in enumerate(videos):
                if isinstance(v, dict):
                    out.extend(("embeds", d) for d in self._split_embeds(modality, v))
                elif _is_video(v):
                    out.append(("raw", v))
                else:
                    raise MultiModalInputError(
                        f"video {i}: unsupported type {type(v).__name__}; give a list of PIL frames, an "
                        "array (frames, height, width, 3), a VideoFrames, or {'video_embeds': ..., "
                        "'video_grid_thw': ...}")
            return out
        return super()._split_items(modality, value)

    def _split_embeds(self, modality: str, value: dict) -> list[dict]:
        """{"image_embeds": [N_tokens_total, hidden], "image_grid_thw": [n_items, 3]} -> one dict
        per item, split by the grids."""
        ek, gk = f"{modality}_embeds", f"{modality}_grid_thw"
        if set(value) != {ek, gk}:
            raise MultiModalInputError(f"precomputed {modality} embeddings are given as {{'{ek}': tensor "
                                       f"[tokens, {self.hidden_size}], '{gk}': tensor [n_{modality}s, 3]}}; "
                                       f"got keys {sorted(value)}")
        embeds, grid = value[ek], value[gk]
        if not isinstance(embeds, torch.Tensor) or embeds.ndim != 2 or embeds.shape[1] != self.hidden_size:
            shape = tuple(embeds.shape) if isinstance(embeds, torch.Tensor) else type(embeds).__name__
            raise MultiModalInputError(f"{ek} must be a tensor [tokens, {self.hidden_size}], got {shape}")
        grid = torch.as_tensor(grid)
        if grid.ndim == 1:
            grid = grid[None]
        if grid.ndim != 2 or grid.shape[1] != 3 or grid.is_floating_point() or bool((grid <= 0).any()):
            raise MultiModalInputError(f"{gk} must hold positive integers (t, h, w) per {modality}, "
                                       f"shape [n_{modality}s, 3]; got {tuple(grid.shape)}")
        m2 = self.merge_size ** 2
        if bool((grid[:, 1] % self.merge_size).any() or (grid[:, 2] % self.merge_size).any()):
            raise MultiModalInputError(f"{gk}: h and w must be multiples of the merge size {self.merge_size}")
        counts = (grid.prod(-1) // m2).tolist()
        if sum(counts) != embeds.shape[0]:
            raise MultiModalInputError(
                f"{ek} has {embeds.shape[0]} rows but {gk} {grid.tolist()} makes {sum(counts)} tokens "
                f"(t*h*w/{m2} per {modality})")
        return [{ek: e, gk: g} for e, g in zip(embeds.split(counts), grid)]

    def process_embeds(self, modality: str, value) -> ProcessedItem:
        if not isinstance(value, dict):
            raise MultiModalInputError(
                f"Qwen2-VL {modality} embeddings need their grids: give {{'{modality}_embeds': tensor "
                f"[tokens, {self.hidden_size}], '{modality}_grid_thw': tensor [n_{modality}s, 3]}}")
        return ProcessedItem(dict(value), value[f"{modality}_embeds"].shape[0])

    # ---- raw items -----------------------------------------------------------------------
    def _check_kwargs(self, kwargs: dict) -> None:
        unknown = sorted(set(kwargs) - set(KNOWN_KWARGS) - set(IGNORED_KWARGS))
        if unknown:
            raise MultiModalInputError(f"unknown mm_processor_kwargs {unknown} for this model "
                                       f"(it takes: {', '.join(KNOWN_KWARGS + IGNORED_KWARGS)})")

    @staticmethod
    def _size(kwargs: dict, bounds: tuple[int, int], check_max: bool = True) -> dict:
        lo, hi = int(kwargs.get("min_pixels", bounds[0])), int(kwargs.get("max_pixels", bounds[1]))
        if not 0 < lo <= hi:
            raise MultiModalInputError(f"min_pixels {lo} and max_pixels {hi}: need 0 < min_pixels <= max_pixels")
        if check_max and hi > bounds[1]:
            raise MultiModalInputError(
                f"max_pixels {hi} is above this engine's {bounds[1]}, for which memory was profiled; "
                "start the engine with a larger max_pixels in mm_processor_kwargs (--mm-processor-kwargs)")
        return {"shortest_edge": lo, "longest_edge": hi}

    def process_raw(self, modality: str, items: list, kwargs: dict) -> list[ProcessedItem]:
        self._check_kwargs(kwargs)
        m2 = self.merge_size ** 2
        if modality == "image":
            return [ProcessedItem({"pixel_values": p, "image_grid_thw": g}, int(g.prod()) // m2)
                    for p, g in self._process_images(items, self._size(kwargs, self.image_pixels))]
        if self.video_processor is None:
            raise MultiModalInputError("video input needs transformers' video processor (install torchvision)")
        videos = [_as_video_frames(v) for v in items]
        extra = {"cap_pixels_per_frame": False} if hasattr(self.video_processor, "cap_pixels_per_frame") else {}
        out = self.video_processor(videos=[v.frames for v in videos], size=self._size(kwargs, self.video_pixels),
                                   do_sample_frames=False, return_tensors="pt", **extra)
        pixels, grids = out["pixel_values_videos"], out["video_grid_thw"]
        rows = grids.prod(-1).tolist()
        result = []
        for v, p, g, n in zip(videos, pixels.split(rows), grids, rows):
            fps = v.fps or kwargs.get("fps") or DEFAULT_VIDEO_FPS
            data = {"pixel_values_videos": p, "video_grid_thw": g,
                    "second_per_grid_t": torch.tensor(self.temporal_patch_size / float(fps))}
            result.append(ProcessedItem(data, n // m2))
        return result

    def _process_images(self, images: list, size: dict) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """-> (pixel values, grid [t, h, w]) per image: the fast path where it applies, HF's
        processor (in one call) for the others."""
        fast, lo, hi = self.fast_image_processor, size["shortest_edge"], size["longest_edge"]
        if fast is None:
            out = [None] * len(images)
        elif self.media_device is not None:  # resized and normalized on the GPU, as the encoder runs
            out = [fast.device_pixels(im, lo, hi, self.media_device) for im in images]
        else:
            out = [fast(im, lo, hi) for im in images]
        rest = [i for i, o in enumerate(out) if o is None]
        if rest:
            hf = self.image_processor(images=[images[i] for i in rest], size=size, return_tensors="pt")
            grids = hf["image_grid_thw"]
            for i, p, g in zip(rest, hf["pixel_values"].split(grids.prod(-1).tolist()), grids):
                out[i] = (p, g[None])
        return [(p, g[0]) for p, g in out]

    # ---- positions -----------------------------------------------------------------------
    def temporal_interval(self, item) -> float:
        """Position step between consecutive temporal patches of an item (Qwen2-VL: 1)."""
        return 1.0

    def prompt_positions(self, prompt_token_ids: list[int], items: list) -> tuple[torch.Tensor, int] | None:
        if not items:
            return None  # plain positions: 0, 1, 2, ... in all three rows
        spans = []
        for it in sorted(items, key=lambda it: it.offset):
            t, h, w = (int(x) for x in it.data[f"{it.modality}_grid_thw"].reshape(-1).tolist())
            spans.append((it.offset, it.length, (t, h // self.merge_size, w // self.merge_size),
                          self.temporal_interval(it)))
        return mrope_positions(len(prompt_token_ids), spans)


# ---- the vision tower ------------------------------------------------------------------------
class VisionRotary(nn.Module):
    """2D rotary positions of patches: the first half of each head's rotary frequencies turn with
    the patch's row, the second half with its column."""

    def __init__(self, head_dim: int, theta: float):
        super().__init__()
        dim = head_dim // 2
        self.register_buffer("inv_freq", 1.0 / theta ** (torch.arange(0, dim, 2, dtype=torch.float) / dim),
                             persistent=False)

    def forward(self, pos_hw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """pos_hw: [N, 2] (row, column) -> cos, sin [N, 1, head_dim] in float32."""
        freqs = (pos_hw[..., None].float() * self.inv_freq).flatten(1)  # [N, head_dim / 2]
        emb = torch.cat((freqs, freqs), dim=-1)[:, None, :]
        return emb.cos(), emb.sin()


def _rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_vision_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    xf = x.float()
    return (xf * cos + _rotate_half(xf) * sin).to(x.dtype)


def vision_positions(grids: list[tuple[int, int, int]], merge: int) -> torch.Tensor:
    """(row, column) of every patch, [N, 2], in the order the processor lays patches out: merge x
    merge blocks one after another, frame by frame."""
    out = []
    for t, h, w in grids:
        hh = torch.arange(h).view(h // merge, merge, 1, 1).expand(-1, -1, w // merge, merge)
        ww = torch.arange(w).view(1, 1, w // merge, merge).expand(h // merge, merge, -1, -1)
        pos = torch.stack([hh.transpose(1, 2).flatten(), ww.transpose(1, 2).flatten()], dim=-1)
        out.append(pos.repeat(t, 1))
    return torch.cat(out)


def frame_cu_seqlens(grids: list[tuple[int, int, int]]) -> list[int]:
    """Attention segments: every frame (temporal patch) of every item attends within itself."""
    cu = [0]
    for t, h, w in grids:
        start = cu[-1]
        cu.extend(start + h * w * (i + 1) for i in range(t))
    return cu


class PatchEmbed(nn.Module):
    """A Conv3d whose kernel is the whole patch: one matmul over the flattened patch rows."""

    def __init__(self, patch_size: int, temporal_patch_size: int, in_channels: int, embed_dim: int):
        super().__init__()
        k = (temporal_patch_size, patch_size, patch_size)
        self.proj = nn.Conv3d(in_channels, embed_dim, kernel_size=k, stride=k, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.proj.weight
        return F.linear(x.to(w.dtype), w.view(w.shape[0], -1))


class VisionAttention(nn.Module):
    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=True)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x, cos_sin, segments: list[int] | Segments):
        n = x.shape[0]
        q, k, v = self.qkv(x).view(n, 3, self.num_heads, self.head_dim).unbind(1)
        if q.is_cuda and fused_kernels_enabled():  # one kernel for q and k, in place, float32 inside
            rotary_inplace(q, k, *cos_sin)
        else:
            q, k = apply_vision_rotary(q, *cos_sin), apply_vision_rotary(k, *cos_sin)
        o = varlen_attention(q, k, v, segments, self.head_dim ** -0.5)
        return self.proj(o.reshape(n, -1))


class VisionMLP(nn.Module):
    def __init__(self, dim: int, hidden: int, act: str):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(dim, hidden), nn.Linear(hidden, dim)
        self.act = get_act_fn(act)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class VisionBlock(nn.Module):
    def __init__(self, dim: int, num_heads: int, mlp: nn.Module, norm):
        super().__init__()
        self.norm1, self.norm2 = norm(dim), norm(dim)
        self.attn = VisionAttention(dim, num_heads)
        self.mlp = mlp

    def forward(self, x, cos_sin, segments, residual=None):
        """Pre-norm block whose residual adds go into the norms' kernels: takes the previous
        block's (h, residual) (residual None: x is the input) and returns its own; the block's
        output is h + residual."""
        h, residual = (self.norm1(x), x) if residual is None else self.norm1(x, residual)
        h, residual = self.norm2(self.attn(h, cos_sin, segments), residual)
        return self.mlp(h), residual


class PatchMerger(nn.Module):
    """Each merge x merge block of patches (consecutive rows) -> one token of the LM's width."""

    def __init__(self, out_dim: int, dim: int, merge: int, norm):
        super().__init__()
        self.hidden = dim * merge * merge
        self.ln_q = norm(dim)
        self.mlp = nn.Sequential(nn.Linear(self.hidden, self.hidden), nn.GELU(), nn.Linear(self.hidden, out_dim))

    def forward(self, x):
        return self.mlp(self.ln_q(x).view(-1, self.hidden))


def _layer_norm(dim: int) -> nn.Module:
    return LayerNorm(dim, eps=1e-6)


def _vision_rope_theta(vcfg) -> float:
    return float((getattr(vcfg, "rope_parameters", None) or {}).get("rope_theta", 10000.0))


class Qwen2VisionTransformer(nn.Module):
    """Patch rows of any number of images / videos, packed -> merged tokens, one call."""

    def __init__(self, vcfg):
        super().__init__()
        dim, heads = vcfg.embed_dim, vcfg.num_heads
        self.merge, self.head_dim = vcfg.spatial_merge_size, dim // heads
        self.patch_embed = PatchEmbed(vcfg.patch_size, vcfg.temporal_patch_size,
                                      getattr(vcfg, "in_channels", 3), dim)
        self.rotary = VisionRotary(dim // heads, _vision_rope_theta(vcfg))
        hidden = int(dim * vcfg.mlp_ratio)
        self.blocks = nn.ModuleList(VisionBlock(dim, heads, VisionMLP(dim, hidden, vcfg.hidden_act), _layer_norm)
                                    for _ in range(vcfg.depth))
        self.merger = PatchMerger(vcfg.hidden_size, dim, self.merge, _layer_norm)
        self._frame_rotary: OrderedDict[tuple, tuple[torch.Tensor, torch.Tensor]] = OrderedDict()

    @property
    def dtype(self) -> torch.dtype:
        return self.patch_embed.proj.weight.dtype

    def rotary_tables(self, grids: list[tuple[int, int, int]], device) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin [N, 1, head_dim] of every patch of `grids`, as self.rotary(vision_positions(...)).
        A frame's table depends on its (h, w) alone and images of one size repeat, so it is built once
        per size on the device (the 8 sizes used last are kept): building it on the host per call
        (~0.35 ms for a 1024x1024 image) left the GPU idle before the first block."""
        cos, sin = [], []
        for t, h, w in grids:
            key = (h, w, str(device))
            hit = self._frame_rotary.get(key)
            if hit is None:
                hit = self.rotary(to_device(vision_positions([(1, h, w)], self.merge), device))
                self._frame_rotary[key] = hit
                if len(self._frame_rotary) > 8:
                    self._frame_rotary.popitem(last=False)
            self._frame_rotary.move_to_end(key)
            cos += [hit[0]] * t
            sin += [hit[1]] * t
        return (cos[0], sin[0]) if len(cos) == 1 else (torch.cat(cos), torch.cat(sin))

    def call_tables(self, grids: list[tuple[int, int, int]], device) -> tuple[tuple, Segments]:
        """What forward(pixels, grids) reads besides the pixels: the rotary tables, and the frames'
        bounds (on the device too where the Triton attention takes them)."""
        return self.rotary_tables(grids, device), Segments(frame_cu_seqlens(grids), device, self.dtype, self.head_dim)

    def graph_safe(self, grids: list[tuple[int, int, int]]) -> bool:
        """Whether forward(pixels, grids, call_tables(grids)) queues device work only (no host
        copies), so that a CUDA graph of it replays right (worker/encoder_graphs.py)."""
        return graph_safe_segments(frame_cu_seqlens(grids), self.dtype, self.head_dim)

    def forward(self, pixels: torch.Tensor, grids: list[tuple[int, int, int]],
                tables: tuple[tuple, Segments] | None = None) -> torch.Tensor:
        """tables: call_tables(grids), where the caller holds them (CUDA graphs)."""
        x = self.patch_embed(pixels)
        cos_sin, segments = tables if tables is not None else self.call_tables(grids, x.device)
        residual = None
        for blk in self.blocks:
            x, residual = blk(x, cos_sin, segments, residual)
        return self.merger(x + residual)


# ---- the model -------------------------------------------------------------------------------
@MULTIMODAL_REGISTRY.register_processor(Qwen2VLMultiModalProcessor)
class Qwen2VLForConditionalGeneration(nn.Module):
    supports_multimodal: ClassVar[bool] = True
    position_rows: ClassVar[int] = 3  # M-RoPE: the runner passes [3, T] positions
    vision_tower_cls: ClassVar[type] = Qwen2VisionTransformer

    def __init__(self, config, max_model_len: int):
        super().__init__()
        self.config = config
        tcfg = config.get_text_config()
        self.visual = self.vision_tower_cls(config.vision_config)
        # CUDA graphs of the tower per call layout (worker/encoder_graphs.py), set by the runner on a
        # GPU for towers that can be captured; False: this tower can't
        self.vision_graphs = None if hasattr(self.visual, "graph_safe") else False
        self.language_model = Qwen2ForCausalLM(tcfg, max_model_len)
        # transformers 5 keeps the tying flag on the outer config (4.x configs are flat).
        if getattr(config, "tie_word_embeddings", False) and not self.language_model.tie_word_embeddings:
            self.language_model.lm_head.weight = self.language_model.model.embed_tokens.weight
            self.language_model.tie_word_embeddings = True
        self.image_token_id, self.video_token_id = config.image_token_id, config.video_token_id

    @classmethod
    def placeholder_str(cls, modality: str, i: int) -> str:
        if modality not in ("image", "video"):
            raise ValueError(f"Qwen2-VL takes images and videos, not {modality}")
        return f"<|vision_start|><|{modality}_pad|><|vision_end|>"

    # ---- multimodal ----------------------------------------------------------------------
    def embed_multimodal(self, modality: str, items: list[dict[str, torch.Tensor]]) -> list[torch.Tensor]:
        """All pixel items of the call go through the vision tower in one packed pass."""
        dtype = self.visual.dtype
        pix_key, grid_key = ("pixel_values", "image_grid_thw") if modality == "image" \
            else ("pixel_values_videos", "video_grid_thw")
        out: list[torch.Tensor | None] = [None] * len(items)
        rows = []
        for i, it in enumerate(items):
            if f"{modality}_embeds" in it:
                out[i] = it[f"{modality}_embeds"].to(dtype)
            else:
                rows.append(i)
        if rows:
            grids = [tuple(int(x) for x in items[i][grid_key].reshape(-1).tolist()) for i in rows]
            pixels = torch.cat([items[i][pix_key] for i in rows]) if len(rows) > 1 else items[rows[0]][pix_key]
            merged = (self.vision_graphs or self.visual)(pixels, grids)
            m2 = self.visual.merge ** 2
            for i, emb in zip(rows, merged.split([t * h * w // m2 for t, h, w in grids])):
                out[i] = emb
        return out

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        ph = (input_ids == self.image_token_id) | (input_ids == self.video_token_id)
        return self.language_model.embed_input_ids(input_ids.masked_fill(ph, 0))

    def forward(self, input_ids, positions, meta, inputs_embeds=None):
        """positions: [T], or [3, T] M-RoPE positions when the batch holds multimodal prompts."""
        if inputs_embeds is None:
            inputs_embeds = self.embed_input_ids(input_ids)
        return self.language_model(input_ids, positions, meta, inputs_embeds)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.language_model.compute_logits(hidden)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        skip = ("language_model.lm_head.",) if self.language_model.tie_word_embeddings else ()
        load_weights(self, weights, renames=WEIGHT_RENAMES, skip_prefixes=skip)
