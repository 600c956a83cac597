import torch
import torch.nn.functional as F
from torch import nn

from vlmserve.kernels import fused_cpu

def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    """CLIP's and Qwen2-VL's vision activation; on CUDA one Triton kernel (kernels/triton_fused.py)."""
    if x.is_cuda:
        from vlmserve.layers.layernorm import fused_kernels_enabled
        if fused_kernels_enabled():
            from vlmserve.kernels.triton_fused import quick_gelu as fused
            return fused(x)
    return quick_gelu_torch(x)


def quick_gelu_torch(x: torch.Tensor) -> torch.Tensor:
    """HF's QuickGELUActivation: the reference of the fused kernel."""
    return x * torch.sigmoid(1.702 * x)


_ACTS = {"quick_gelu": quick_gelu, "silu": F.silu, "swish": F.silu, "gelu": F.gelu,
         "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
         "gelu_new": lambda x: F.gelu(x, approximate="tanh"), "relu": F.relu}


def get_act_fn(name: str):
    if name not in _ACTS:
        raise ValueError(f"unsupported activation {name!r}")
    return _ACTS[name]


class ActAndMul(nn.Module):
    """act(gate) * up over a fused [gate | up] projection."""

    def __init__(self, act: str = "silu"):
        super().__init__()
        self.act = get_act_fn(act)

    def fused_silu(self) -> bool:
        """Whether CUDA inputs take SiLU-and-mul's Triton kernel (kernels/triton_fused.py)."""
        from vlmserve.layers.layernorm import fused_kernels_enabled
        return self.act is F.silu and fused_kernels_enabled()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.is_cuda and self.act is F.silu:
            if self.fused_silu():
                from vlmserve.kernels.triton_fused import silu_and_mul
                return silu_and_mul(x)
        elif self.act is F.silu and x.dim() == 2 and x.stride(-1) == 1 and fused_cpu.usable(x):
            return fused_cpu.silu_and_mul(x)  # one pass instead of three (kernels/csrc/fused_ops_cpu.cpp)
        return self.forward_torch(x)

    def forward_torch(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = x.chunk(2, dim=-1)
        return self.act(gate) * up
