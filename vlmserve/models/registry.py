"""Architecture name (config.json "architectures") -> model class, imported on first use.
Out-of-tree models register with `ModelRegistry.register_model`."""
from __future__ import annotations

import importlib

from vlmserve.config import ModelLoadError

_BUILTIN: dict[str, tuple[str, str]] = {
    "LlamaForCausalLM": ("llama", "LlamaForCausalLM"),
    "MistralForCausalLM": ("llama", "LlamaForCausalLM"),
    "Phi3ForCausalLM": ("llama", "LlamaForCausalLM"),
    "Qwen2ForCausalLM": ("qwen2", "Qwen2ForCausalLM"),
    "LlavaForConditionalGeneration": ("llava", "LlavaForConditionalGeneration"),
    "Qwen2VLForConditionalGeneration": ("qwen2_vl", "Qwen2VLForConditionalGeneration"),
    "Qwen2_5_VLForConditionalGeneration": ("qwen2_5_vl", "Qwen2_5_VLForConditionalGeneration"),
}

# The language model inside a multimodal checkpoint, by its text config's model_type.
_TEXT_BY_MODEL_TYPE = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
                       "qwen2": "Qwen2ForCausalLM", "phi3": "Phi3ForCausalLM"}


class _ModelRegistry:
    def __init__(self):
        self._custom: dict[str, type] = {}

    def register_model(self, architecture: str, model_cls: type) -> None:
        self._custom[architecture] = model_cls

    def unregister_model(self, architecture: str) -> None:
        """Undo `register_model` (a built-in architecture registered over comes back)."""
        if architecture not in self._custom:
            raise KeyError(f"{architecture!r} was not registered with register_model")
        del self._custom[architecture]

    def supported_architectures(self) -> list[str]:
        return sorted(set(_BUILTIN) | set(self._custom))

    def resolve(self, architecture: str) -> type:
        if architecture in self._custom:
            return self._custom[architecture]
        if architecture not in _BUILTIN:
            raise ModelLoadError(f"unsupported architecture {architecture!r}; vlmserve supports: "
                                 f"{', '.join(self.supported_architectures())}")
        module, name = _BUILTIN[architecture]
        return getattr(importlib.import_module(f"vlmserve.models.{module}"), name)


ModelRegistry = _ModelRegistry()


def text_model_class(text_config) -> type:
    model_type = getattr(text_config, "model_type", None)
    if model_type not in _TEXT_BY_MODEL_TYPE:
        raise ModelLoadError(f"unsupported language model type {model_type!r} inside a multimodal model")
    return ModelRegistry.resolve(_TEXT_BY_MODEL_TYPE[model_type])
