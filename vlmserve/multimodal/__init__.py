from vlmserve.multimodal.inputs import MultiModalItem
from vlmserve.multimodal.processing import BaseMultiModalProcessor, ProcessedItem
from vlmserve.multimodal.registry import MULTIMODAL_REGISTRY

__all__ = ["MultiModalItem", "BaseMultiModalProcessor", "ProcessedItem", "MULTIMODAL_REGISTRY"]
