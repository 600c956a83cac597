"""Rotary position embeddings (neox layout, as HF's Llama family) with the scaling schemes of the
supported checkpoints: default, linear, llama3 and longrope (Phi-3)."""
from __future__ import annotations

import math

import torch
from torch import nn


def rope_parameters(config) -> dict:
    """The rope settings of a config, whether written by transformers 5 (`rope_parameters`) or 4.x
    (`rope_theta` and `rope_scaling`)."""
    params = dict(getattr(config, "rope_parameters", None) or {})
    if not params:
        params = dict(getattr(config, "rope_scaling", None) or {})
    params.setdefault("rope_theta", getattr(config, "rope_theta", 10000.0))
    rope_type = params.get("rope_type") or params.get("type") or "default"
    params["rope_type"] = {"su": "longrope"}.get(rope_type, rope_type)
    params.setdefault("partial_rotary_factor", getattr(config, "partial_rotary_factor", 1.0) or 1.0)
    if "original_max_position_embeddings" not in params:
        omp = getattr(config, "original_max_position_embeddings", None)
        if omp:
            params["original_max_position_embeddings"] = omp
    return params


def _base_inv_freq(base: float, dim: int) -> torch.Tensor:
    return 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))


def _llama3_inv_freq(inv_freq: torch.Tensor, p: dict) -> torch.Tensor:
    factor, low, high = p["factor"], p["low_freq_factor"], p["high_freq_factor"]
    old_len = p["original_max_position_embeddings"]
    low_wavelen, high_wavelen = old_len / low, old_len / high
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
    return torch.where(medium, smoothed, scaled)


class RotaryEmbedding(nn.Module):
    def __init__(self, head_dim: int, max_position: int, params: dict, max_position_embeddings: int):
        super().__init__()
        self.head_dim = head_dim
        self.rotary_dim = int(head_dim * params.get("partial_rotary_factor", 1.0))
        base, dim, kind = params["rope_theta"], self.rotary_dim, params["rope_type"]
        scaling = 1.0
        self.long_start: int | None = None  # longrope: positions from here on use the long factors
        inv_freq = _base_inv_freq(base, dim)
        long_inv_freq = None
        if kind == "default":
            pass
        elif kind == "linear":
            inv_freq = inv_freq / params["factor"]
        elif kind == "llama3":
            inv_freq = _llama3_inv_freq(inv_freq, params)
        elif kind == "longrope":
            orig = params.get("original_max_position_embeddings") or max_position_embeddings
            factor = max_position_embeddings / orig if params.get("original_max_position_embeddings") \
                else params.get("factor", 1.0)
            scaling = params.get("attention_factor") or (
                1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(orig)))
            shape = torch.arange(0, dim, 2, dtype=torch.int64).float() / dim
            short = torch.tensor(params["short_factor"], dtype=torch.float32)
            long = torch.tensor(params["long_factor"], dtype=torch.float32)
            inv_freq = 1.0 / (short * base ** shape)
            long_inv_freq = 1.0 / (long * base ** shape)
            self.long_start = orig
        else:
            raise ValueError(f"unsupported rope type {kind!r}")
        self.cos, self.sin = self._cache(inv_freq, max_position, scaling)
        self.long_cos = self.long_sin = None
        if long_inv_freq is not None:
            self.long_cos, self.long_sin = self._cache(long_inv_freq, max_position, scaling)

    @staticmethod
    def _cache(inv_freq: torch.Tensor, max_position: int, scaling: float):
        t = torch.arange(max_position, dtype=torch.float32)
        freqs = torch.outer(t, inv_freq)
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos() * scaling, emb.sin() * scaling

    def _apply(self, fn, recurse=True):
        # Keep the float32 tables on the module's device whatever dtype the weights take.
        super()._apply(fn, recurse)
        probe = fn(torch.empty(0))
        for name in ("cos", "sin", "long_cos", "long_sin"):
            t = getattr(self, name)
            if t is not None:
                setattr(self, name, t.to(probe.device))
        return self

    def lookup(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin for the tokens of a forward pass, [T, 1, rotary_dim]; looked up once per
        pass and shared by all layers."""
        cos_t, sin_t = self.cos, self.sin
        if self.long_start is not None and int(positions.max()) >= self.long_start:
            # Like HF, longrope switches the whole forward to the long factors once a position
            # passes the original context length.
            cos_t, sin_t = self.long_cos, self.long_sin
        return cos_t[positions].unsqueeze(1).to(dtype), sin_t[positions].unsqueeze(1).to(dtype)

    def forward(self, cos_sin: tuple[torch.Tensor, torch.Tensor], q: torch.Tensor, k: torch.Tensor):
        """q: [T, Hq, D], k: [T, Hk, D]; cos_sin from `lookup`."""
        cos, sin = cos_sin
        if q.is_cuda and self.rotary_dim == q.shape[-1] and q.stride(-1) == 1 and k.stride(-1) == 1:
            from vlmserve.layers.layernorm import fused_kernels_enabled
            if fused_kernels_enabled():  # one Triton kernel for q and k, in place
                from vlmserve.kernels.triton_fused import rotary_inplace
                rotary_inplace(q, k, cos, sin)
                return q, k
        return _rotate(q, cos, sin, self.rotary_dim), _rotate(k, cos, sin, self.rotary_dim)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, rotary_dim: int) -> torch.Tensor:
    if rotary_dim == x.shape[-1]:
        return x * cos + _rotate_half(x) * sin
    x_rot, x_pass = x[..., :rotary_dim], x[..., rotary_dim:]
    return torch.cat((x_rot * cos + _rotate_half(x_rot) * sin, x_pass), dim=-1)
