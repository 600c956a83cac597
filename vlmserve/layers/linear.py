"""Linear layers whose weight is several checkpoint tensors stacked (q|k|v, gate|up)."""
import torch
from torch import nn


class MergedLinear(nn.Linear):
    """One matmul for several projections; checkpoints may store them apart (named shards) or fused."""

    def __init__(self, in_features: int, shard_sizes: dict[str, int], bias: bool = False):
        super().__init__(in_features, sum(shard_sizes.values()), bias=bias)
        self.shard_offsets: dict[str, tuple[int, int]] = {}
        start = 0
        for name, size in shard_sizes.items():
            self.shard_offsets[name] = (start, size)
            start += size

    @torch.no_grad()
    def load_shard(self, param: nn.Parameter, shard: str, loaded: torch.Tensor) -> None:
        start, size = self.shard_offsets[shard]
        target = param.narrow(0, start, size)
        if target.shape != loaded.shape:
            raise ValueError(f"shard {shard!r}: checkpoint shape {tuple(loaded.shape)}, expected {tuple(target.shape)}")
        target.copy_(loaded)


def _onednn_linear_forward(self, x: torch.Tensor) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, "none", [], "")


def route_linears_through_onednn(model: nn.Module) -> int:
    """On the CPU, run every nn.Linear through oneDNN's matmul, which is 2-2.5x faster here than
    the default BLAS path for the shapes of LLM layers (see BENCHMARKS.md). Same weights, no copy.
    Returns how many layers were routed (0 where oneDNN is missing or VLMSERVE_DISABLE_CPU_KERNELS
    is set)."""
    import os
    import types

    if os.environ.get("VLMSERVE_DISABLE_CPU_KERNELS") or not torch.backends.mkldnn.is_available() \
            or not hasattr(torch.ops.mkldnn, "_linear_pointwise"):
        return 0
    n = 0
    for m in model.modules():
        if isinstance(m, nn.Linear) and m.weight.device.type == "cpu" \
                and m.weight.dtype in (torch.float32, torch.bfloat16):
            m.forward = types.MethodType(_onednn_linear_forward, m)
            n += 1
    return n


def _single_row_gemv_forward(self, x: torch.Tensor) -> torch.Tensor:
    from vlmserve.kernels import triton_gemv
    if triton_gemv.usable(x, self.weight):
        return triton_gemv.gemv(x, self.weight, self.bias)
    return nn.functional.linear(x, self.weight, self.bias)


def route_single_rows_through_triton_gemv(model: nn.Module) -> int:
    """On the GPU, linear layers take inputs of one row (triton_gemv.MAX_ROWS: single-stream decode) through
    the streaming GEMV of kernels/triton_gemv.py: by default on sm_90+ GPUs, where it was measured faster
    than cuBLAS (VLMSERVE_TRITON_GEMV=0 keeps cuBLAS). Larger inputs keep cuBLAS.
    Returns how many layers were routed."""
    import types

    from vlmserve.kernels import triton_gemv

    n = 0
    for m in model.modules():
        if isinstance(m, nn.Linear) and m.weight.is_cuda and m.weight.dtype in (torch.bfloat16, torch.float16) \
                and triton_gemv.enabled(m.weight.device):
            m.forward = types.MethodType(_single_row_gemv_forward, m)
            m.single_row_gemv = True  # for gated_act
            n += 1
    return n


def gated_act(gate_up: nn.Linear, act: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """act(gate_up(x)) for a gated MLP's [gate | up] projection and its ActAndMul. One row on the GPU, where
    gate_up takes the Triton GEMV and act is SiLU in its fused kernel, runs as one kernel: the GEMV's tiles pair
    gate and up rows and write silu(gate) * up (a launch fewer per layer of single-stream decode, the same
    rounding)."""
    if getattr(gate_up, "single_row_gemv", False) and x.is_cuda and act.fused_silu():
        from vlmserve.kernels import triton_gemv
        if triton_gemv.usable(x, gate_up.weight):
            return triton_gemv.gemv(x, gate_up.weight, gate_up.bias, silu_and_mul=True)
    return act(gate_up(x))
