"""CLIP vision transformer (the image tower of LLaVA-1.5), returning the hidden states of a chosen
layer. Images of one size are batched; attention is full (no cache)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from vlmserve.layers.activation import get_act_fn
from vlmserve.layers.layernorm import LayerNorm
from vlmserve.layers.linear import MergedLinear


class CLIPVisionEmbeddings(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.patch_size = cfg.patch_size
        self.class_embedding = nn.Parameter(torch.empty(cfg.hidden_size))
        self.patch_embedding = nn.Conv2d(cfg.num_channels, cfg.hidden_size, cfg.patch_size,
                                         stride=cfg.patch_size, bias=False)
        num_positions = (cfg.image_size // cfg.patch_size) ** 2 + 1
        self.position_embedding = nn.Embedding(num_positions, cfg.hidden_size)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        patches = self.embed_patches(pixel_values)
        cls = self.class_embedding.expand(patches.shape[0], 1, -1)
        return torch.cat([cls, patches], dim=1) + self.position_embedding.weight

    def embed_patches(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """[B, C, H, W] -> [B, patches, D]: the stride-p conv as one matmul over the patches' pixels
        (on an H200, cuDNN's conv took ~90 us of a 336x336 image's tower, the matmul a few)."""
        w = self.patch_embedding.weight  # [D, C, p, p]
        p = self.patch_size
        B, C, H, W = pixel_values.shape
        nh, nw = H // p, W // p  # as the conv: rows and columns past the last whole patch are dropped
        grid = pixel_values[:, :, :nh * p, :nw * p].view(B, C, nh, p, nw, p).permute(0, 2, 4, 1, 3, 5)
        rows = torch.empty((B, nh, nw, C, p, p), dtype=w.dtype, device=w.device).copy_(grid)  # one pass: cast and order
        return F.linear(rows.view(B, nh * nw, C * p * p), w.view(w.shape[0], -1))


class CLIPAttention(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.num_heads = cfg.num_attention_heads
        self.head_dim = cfg.hidden_size // self.num_heads
        self.scale = self.head_dim ** -0.5
        d = cfg.hidden_size
        # q|k|v in one matmul (the checkpoint's q_proj, k_proj and v_proj load as its shards): three
        # of width d over an image's few hundred rows left most of a large GPU's SMs idle
        self.qkv_proj = MergedLinear(d, {"q": d, "k": d, "v": d}, bias=True)
        self.out_proj = nn.Linear(d, d)

    def forward(self, x):
        b, n, _ = x.shape
        q, k, v = self.qkv_proj(x).view(b, n, 3, self.num_heads, self.head_dim).transpose(1, 3).unbind(2)
        o = F.scaled_dot_product_attention(q, k, v, scale=self.scale)
        return self.out_proj(o.transpose(1, 2).reshape(b, n, -1))


class CLIPMLP(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.act = get_act_fn(cfg.hidden_act)
        self.fc1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.fc2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class CLIPEncoderLayer(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.layer_norm1 = LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.self_attn = CLIPAttention(cfg)
        self.layer_norm2 = LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.mlp = CLIPMLP(cfg)

    def forward(self, x, residual=None):
        """The layer's input is x + residual (residual None: x alone), its output the returned pair's
        sum: each residual add happens inside the next norm's pass, not as a pass of its own."""
        if residual is None:
            h, residual = self.layer_norm1(x), x
        else:
            h, residual = self.layer_norm1(x, residual)
        h, residual = self.layer_norm2(self.self_attn(h), residual)
        return self.mlp(h), residual


class CLIPEncoder(nn.Module):
    def __init__(self, cfg, num_layers: int):
        super().__init__()
        self.layers = nn.ModuleList(CLIPEncoderLayer(cfg) for _ in range(num_layers))


class CLIPVisionModel(nn.Module):
    """Only the layers up to the deepest one whose output is used are built (and loaded).
    Parameter names are transformers 5's (`embeddings.`, `pre_layrnorm.`, `encoder.layers.N.`);
    4.x checkpoints nest them under `vision_model.`, which `WEIGHT_RENAMES` strips."""

    def __init__(self, cfg, feature_layers: list[int]):
        super().__init__()
        total = cfg.num_hidden_layers
        # HF's hidden_states[i]: i = 0 is the embeddings (after pre_layrnorm), i = k the k-th layer's output.
        self.feature_layers = [l if l >= 0 else total + 1 + l for l in feature_layers]
        if not all(0 <= l <= total for l in self.feature_layers):
            raise ValueError(f"vision_feature_layer {feature_layers} is out of range for {total} layers")
        self.num_layers = max(self.feature_layers)
        self.embeddings = CLIPVisionEmbeddings(cfg)
        self.pre_layrnorm = LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.encoder = CLIPEncoder(cfg, self.num_layers)

    def unused_weight_prefixes(self, prefix: str, total_layers: int) -> tuple[str, ...]:
        unused = [f"{prefix}encoder.layers.{i}." for i in range(self.num_layers, total_layers)]
        return tuple(unused) + (f"{prefix}post_layernorm.", f"{prefix}embeddings.position_ids")

    def forward(self, pixel_values: torch.Tensor) -> list[torch.Tensor]:
        """[B, 3, H, W] -> the hidden states of each feature layer, [B, 1 + patches, D] each."""
        h = self.pre_layrnorm(self.embeddings(pixel_values))
        states = {0: h}
        residual = None
        for i, layer in enumerate(self.encoder.layers, 1):
            h, residual = layer(h, residual)
            if i in self.feature_layers:
                states[i] = h + residual
        return [states[l] for l in self.feature_layers]
