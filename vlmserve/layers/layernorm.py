import os

import torch
from torch import nn

from vlmserve.kernels import fused_cpu


def fused_kernels_enabled() -> bool:
    """Whether CUDA tensors go through the Triton kernels of kernels/triton_fused.py
    (VLMSERVE_DISABLE_FUSED_KERNELS=1 keeps the torch code)."""
    if os.environ.get("VLMSERVE_DISABLE_FUSED_KERNELS"):
        return False
    from vlmserve.kernels import triton_fused
    return triton_fused.available()


class RMSNorm(nn.Module):
    """RMSNorm computed in float32 as HF does; optionally adds the residual first (pre-norm blocks)."""

    def __init__(self, hidden_size: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        if x.is_cuda and fused_kernels_enabled():  # one Triton kernel instead of ~8 (kernels/triton_fused.py)
            from vlmserve.kernels.triton_fused import rms_norm
            return rms_norm(x, self.weight, self.eps, residual)
        if x.dim() == 2 and x.stride(-1) == 1 and fused_cpu.usable(x) and self.weight.dtype == x.dtype:
            # one pass over the rows instead of ~8 torch ops (kernels/csrc/fused_ops_cpu.cpp)
            if residual is None:
                return fused_cpu.rms_norm(x, self.weight, self.eps)
            if residual.stride(-1) == 1 and residual.shape == x.shape:
                return fused_cpu.add_rms_norm(x, residual, self.weight, self.eps)
        return self.forward_torch(x, residual)

    def forward_torch(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        """The reference the fused kernel is checked against."""
        if residual is not None:
            x = x + residual
            residual = x
        dtype = x.dtype
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        out = self.weight * h.to(dtype)
        return out if residual is None else (out, residual)


class LayerNorm(nn.LayerNorm):
    """nn.LayerNorm over the last dim (same parameters) that can add the residual first, as RMSNorm
    does: norm(x, residual) -> (normed(x + residual), x + residual). On the GPU one Triton kernel
    does both (torch's own layer norm read and wrote at ~1.7 TB/s on an H200, and the add was a
    pass of its own)."""

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        if (x.is_cuda and fused_kernels_enabled() and len(self.normalized_shape) == 1
                and self.weight is not None and self.bias is not None):
            from vlmserve.kernels.triton_fused import layer_norm
            return layer_norm(x, self.weight, self.bias, self.eps, residual)
        return self.forward_torch(x, residual)

    def forward_torch(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        """The reference the fused kernel is checked against."""
        if residual is None:
            return super().forward(x)
        x = x + residual
        return super().forward(x), x
