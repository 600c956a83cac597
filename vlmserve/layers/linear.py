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
