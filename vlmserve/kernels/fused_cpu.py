"""Fused elementwise ops of decoder layers on the CPU (csrc/fused_ops_cpu.cpp) and the torch
references they are tested against. The layers call `usable(x)` and fall back to the reference
(which is also their GPU path) where it is False."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from vlmserve.kernels.cpu_build import load_cpu_extension


def _load():
    return load_cpu_extension("vlmserve_fused_ops_cpu", "fused_ops_cpu.cpp")


def available() -> bool:
    return _load() is not None


def usable(x: torch.Tensor) -> bool:
    """For inference on CPU tensors of the kernels' dtypes (they record no autograd graph)."""
    return x.device.type == "cpu" and x.dtype in (torch.float32, torch.bfloat16) \
        and not torch.is_grad_enabled() and available()


# ---- kernels ------------------------------------------------------------------------------------
def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """weight * rmsnorm(x); x [T, n]."""
    return _load().rms_norm(x, weight, eps)


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float):
    """-> (weight * rmsnorm(x + residual), x + residual)."""
    return _load().add_rms_norm(x, residual, weight, eps)


def rotary_(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half rotary in place on x [T, H, D] (last dim contiguous) over its first
    cos.shape[-1] dims; cos, sin [T, rot] or [T, 1, rot], contiguous."""
    _load().rotary_(x, cos.reshape(cos.shape[0], -1), sin.reshape(sin.shape[0], -1), cos.shape[-1])
    return x


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up over x = [gate | up] of shape [T, 2I]."""
    return _load().silu_and_mul(x)


# ---- references ---------------------------------------------------------------------------------
def reference_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


def reference_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    rot = cos.shape[-1]
    cos, sin = cos.reshape(cos.shape[0], 1, rot), sin.reshape(sin.shape[0], 1, rot)
    x_rot, x_pass = x[..., :rot], x[..., rot:]
    x1, x2 = x_rot.chunk(2, dim=-1)
    rotated = x_rot * cos + torch.cat((-x2, x1), dim=-1) * sin
    return torch.cat((rotated, x_pass), dim=-1)


def reference_silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate) * up
