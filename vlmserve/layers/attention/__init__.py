from vlmserve.layers.attention.layer import Attention
from vlmserve.layers.attention.metadata import AttentionMetadata

__all__ = ["Attention", "AttentionMetadata"]
