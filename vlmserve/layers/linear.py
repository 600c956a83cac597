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
