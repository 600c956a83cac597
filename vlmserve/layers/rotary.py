"""Rotary position embeddings (neox layout, as HF's Llama family) with the scaling schemes of the
supported checkpoints: default, linear, llama3 and longrope (Phi-3); and M-RoPE (Qwen2-VL), whose
tokens have three position rows."""
from __future__ import annotations

import math

import torch
from torch import nn

from vlmserve.kernels import fused_cpu


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
        elif q.stride(-1) == 1 and k.stride(-1) == 1 and cos.is_contiguous() and sin.is_contiguous() \
                and fused_cpu.usable(q) and cos.dtype == q.dtype:
            # in place, one pass per tensor (kernels/csrc/fused_ops_cpu.cpp)
            return fused_cpu.rotary_(q, cos, sin), fused_cpu.rotary_(k, cos, sin)
        return _rotate(q, cos, sin, self.rotary_dim), _rotate(k, cos, sin, self.rotary_dim)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, rotary_dim: int) -> torch.Tensor:
    if rotary_dim == x.shape[-1]:
        return x * cos + _rotate_half(x) * sin
    x_rot, x_pass = x[..., :rotary_dim], x[..., rotary_dim:]
    return torch.cat((x_rot * cos + _rotate_half(x_rot) * sin, x_pass), dim=-1)


def _on_host(t: torch.Tensor) -> bool:
    return t.device.type == "cpu"


class MRotaryEmbedding(RotaryEmbedding):
    """Multimodal rotary embedding (M-RoPE, Qwen2-VL): each token has three positions (temporal,
    height, width) and the rotary frequencies are split into `mrope_section` groups, group i
    rotating by position row i. Text tokens carry three equal positions, which makes this plain
    RoPE for them; a [T] position tensor is taken as such."""

    def __init__(self, head_dim: int, max_position: int, params: dict, max_position_embeddings: int):
        params = dict(params)
        section = [int(s) for s in params.pop("mrope_section")]
        if params.get("rope_type") == "mrope":  # the 4.x spelling of default frequencies + sections
            params["rope_type"] = "default"
        if params["rope_type"] != "default":
            raise ValueError(f"M-RoPE with rope type {params['rope_type']!r} is not supported")
        super().__init__(head_dim, max_position, params, max_position_embeddings)
        if sum(section) * 2 != self.rotary_dim:
            raise ValueError(f"mrope_section {section} covers {2 * sum(section)} rotary dims, "
                             f"the heads have {self.rotary_dim}")
        self.inv_freq = _base_inv_freq(params["rope_theta"], self.rotary_dim)
        # Row (0 temporal, 1 height, 2 width) whose position drives each of the rotary dims;
        # the two halves of the neox layout repeat the same frequencies.
        half = torch.cat([torch.full((s,), i % 3, dtype=torch.long) for i, s in enumerate(section)])
        self.row_of_dim = torch.cat((half, half))

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        self.row_of_dim = self.row_of_dim.to(self.cos.device)
        return self

    def _grow(self, max_position: int) -> None:
        # Vision positions (time-scaled video ones) can pass the table built for max_model_len.
        inv_freq = self.inv_freq.to(self.cos.device)
        self.cos, self.sin = self._cache(inv_freq, max_position, 1.0)

    def reserve(self, max_position: int) -> bool:
        """Make the tables cover positions up to `max_position`, which the caller knows on the host
        (the runner reads it off the step's positions before they go to the GPU). True when they
        grew: the old tables are freed, so whatever captured them (CUDA graphs) must capture again."""
        if max_position < self.cos.shape[0]:
            return False
        self._grow(2 * max_position + 1)
        return True

    def lookup(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """positions: [T] (text only) or [3, T]; -> cos, sin of [T, 1, rotary_dim]. Positions on
        the CPU grow the tables here; device positions are never read on the host (no sync, so a
        decode step can be a CUDA graph): `reserve` first."""
        if _on_host(positions) and positions.numel():
            self.reserve(int(positions.max()))
        if positions.ndim == 1:
            return super().lookup(positions, dtype)
        index = self.row_of_dim.view(1, 1, -1).expand(1, positions.shape[1], -1)
        cos = self.cos[positions].gather(0, index).squeeze(0)  # [3, T, D] -> [T, D]
        sin = self.sin[positions].gather(0, index).squeeze(0)
        return cos.unsqueeze(1).to(dtype), sin.unsqueeze(1).to(dtype)


def get_rope(head_dim: int, max_position: int, params: dict, max_position_embeddings: int) -> RotaryEmbedding:
    """The rotary embedding a config asks for: M-RoPE where it names `mrope_section`."""
    if params.get("mrope_section"):
        return MRotaryEmbedding(head_dim, max_position, params, max_position_embeddings)
    return RotaryEmbedding(head_dim, max_position, params, max_position_embeddings)
