"""Which multimodal processor serves which model class. A model file registers its processor:

    @MULTIMODAL_REGISTRY.register_processor(MyProcessor)
    class MyModelForConditionalGeneration(nn.Module): ...
"""
from __future__ import annotations


class MultiModalRegistry:
    def register_processor(self, processor_cls: type):
        def wrap(model_cls: type) -> type:
            model_cls.processor_cls = processor_cls
            return model_cls
        return wrap

    @staticmethod
    def processor_class(model_cls: type) -> type | None:
        return getattr(model_cls, "processor_cls", None)


MULTIMODAL_REGISTRY = MultiModalRegistry()
