"""Qwen2.5-VL: Qwen2-VL with a vision tower of RMSNorm / SwiGLU blocks that mostly attend within
windows of the patch grid (a few blocks attend over whole frames), and video positions aligned to
absolute time: temporal patch k of a video sits k * second_per_grid_t * tokens_per_second
positions after the first."""
from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from vlmserve.device_utils import to_device
from vlmserve.layers.activation import ActAndMul
from vlmserve.layers.layernorm import RMSNorm
from vlmserve.layers.linear import MergedLinear
from vlmserve.layers.vision_attention import Segments, graph_safe_segments
from vlmserve.models.qwen2_vl import (PatchEmbed, PatchMerger, Qwen2VLForConditionalGeneration,
                                      Qwen2VLMultiModalProcessor, VisionBlock, VisionRotary, _vision_rope_theta,
                                      frame_cu_seqlens, vision_positions)
from vlmserve.multimodal import MULTIMODAL_REGISTRY


class Qwen2_5_VLMultiModalProcessor(Qwen2VLMultiModalProcessor):
    def temporal_interval(self, item) -> float:
        if item.modality != "video":
            return 1.0
        sec = item.data.get("second_per_grid_t")
        # Embeddings given without a time step: the default frame rate's.
        sec = float(sec) if sec is not None else self.temporal_patch_size / 2.0
        return sec * self.hf_config.vision_config.tokens_per_second


def _rms_norm(dim: int) -> nn.Module:
    return RMSNorm(dim, eps=1e-6)


class SwiGLUMLP(nn.Module):
    """down(act(gate(x)) * up(x)), gate and up in one matmul (checkpoints store them apart)."""

    def __init__(self, dim: int, hidden: int, act: str):
        super().__init__()
        self.gate_up_proj = MergedLinear(dim, {"gate": hidden, "up": hidden}, bias=True)
        self.down_proj = nn.Linear(hidden, dim, bias=True)
        self.act = ActAndMul(act)

    def forward(self, x):
        return self.down_proj(self.act(self.gate_up_proj(x)))


def window_order(grids: list[tuple[int, int, int]], merge: int, window: int) -> tuple[torch.Tensor, list[int]]:
    """Window attention layout. Merged tokens (merge x merge patch blocks) are regrouped window by
    window: each frame's grid of merged tokens is tiled by window x window squares (clipped at the
    right and bottom edges), taken row by row. Returns the merged-token order (an index into the
    processor's order) and the windows' cumulative lengths in patches."""
    order, cu, offset = [], [0], 0
    for t, h, w in grids:
        gh, gw = h // merge, w // merge
        nh, nw = -(-gh // window), -(-gw // window)
        idx = torch.arange(t * gh * gw).view(t, gh, gw) + offset
        padded = F.pad(idx, (0, nw * window - gw, 0, nh * window - gh), value=-1)
        tiles = padded.view(t, nh, window, nw, window).permute(0, 1, 3, 2, 4).reshape(-1, window * window)
        sizes = (tiles >= 0).sum(-1)
        order.append(tiles[tiles >= 0])
        for n in sizes.tolist():
            if n:
                cu.append(cu[-1] + n * merge * merge)
        offset += t * gh * gw
    return torch.cat(order), cu


class Qwen2_5_VisionTransformer(nn.Module):
    def __init__(self, vcfg):
        super().__init__()
        dim, heads = vcfg.hidden_size, vcfg.num_heads
        self.merge, self.head_dim = vcfg.spatial_merge_size, dim // heads
        self.window = vcfg.window_size // self.merge // vcfg.patch_size  # in merged tokens
        self.full_blocks = set(vcfg.fullatt_block_indexes)
        self.patch_embed = PatchEmbed(vcfg.patch_size, vcfg.temporal_patch_size,
                                      getattr(vcfg, "in_channels", 3), dim)
        self.rotary = VisionRotary(dim // heads, _vision_rope_theta(vcfg))
        self.blocks = nn.ModuleList(
            VisionBlock(dim, heads, SwiGLUMLP(dim, vcfg.intermediate_size, vcfg.hidden_act), _rms_norm)
            for _ in range(vcfg.depth))
        self.merger = PatchMerger(vcfg.out_hidden_size, dim, self.merge, _rms_norm)

    @property
    def dtype(self) -> torch.dtype:
        return self.patch_embed.proj.weight.dtype

    def call_tables(self, grids: list[tuple[int, int, int]], device) -> tuple:
        """What forward(pixels, grids) reads besides the pixels, all on the device: the window order
        of the merged tokens and its inverse, the rotary tables in window order, and the bounds of
        the frames (full-attention blocks) and of the windows."""
        order, cu_windows = window_order(grids, self.merge, self.window)
        order = to_device(order, device)
        unit = self.merge * self.merge
        positions = to_device(vision_positions(grids, self.merge), device)
        cos_sin = self.rotary(positions.view(-1, unit, positions.shape[-1])[order].flatten(0, 1))
        frames = Segments(frame_cu_seqlens(grids), device, self.dtype, self.head_dim)  # windows never cross frames
        windows = Segments(cu_windows, device, self.dtype, self.head_dim)
        return order, torch.argsort(order), cos_sin, frames, windows

    def graph_safe(self, grids: list[tuple[int, int, int]]) -> bool:
        """Whether forward(pixels, grids, call_tables(grids)) queues device work only, so that a CUDA
        graph of it replays right (worker/encoder_graphs.py), for the frames' and the windows' bounds."""
        return graph_safe_segments(frame_cu_seqlens(grids), self.dtype, self.head_dim) \
            and graph_safe_segments(window_order(grids, self.merge, self.window)[1], self.dtype, self.head_dim)

    def forward(self, pixels: torch.Tensor, grids: list[tuple[int, int, int]],
                tables: tuple | None = None) -> torch.Tensor:
        """tables: call_tables(grids), where the caller holds them (CUDA graphs)."""
        unit = self.merge * self.merge
        x = self.patch_embed(pixels)
        order, inverse, cos_sin, frames, windows = tables if tables is not None else self.call_tables(grids, x.device)
        x = x.view(-1, unit, x.shape[-1])[order].flatten(0, 1)  # processor order -> window order, by merge block
        residual = None
        for i, blk in enumerate(self.blocks):
            x, residual = blk(x, cos_sin, frames if i in self.full_blocks else windows, residual)
        merged = self.merger(x + residual)
        return merged[inverse]


@MULTIMODAL_REGISTRY.register_processor(Qwen2_5_VLMultiModalProcessor)
class Qwen2_5_VLForConditionalGeneration(Qwen2VLForConditionalGeneration):
    vision_tower_cls: ClassVar[type] = Qwen2_5_VisionTransformer
