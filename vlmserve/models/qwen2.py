"""Qwen2: Llama-shaped, with a bias on the q, k, v projections (none on o_proj) and optional
sliding-window layers."""
from vlmserve.models.llama import LlamaAttention, LlamaDecoderLayer, LlamaForCausalLM, LlamaModel


class Qwen2Attention(LlamaAttention):
    @staticmethod
    def qkv_bias(config) -> bool:
        return True

    @staticmethod
    def o_bias(config) -> bool:
        return False


class Qwen2DecoderLayer(LlamaDecoderLayer):
    attention_cls = Qwen2Attention


class Qwen2Model(LlamaModel):
    layer_cls = Qwen2DecoderLayer


class Qwen2ForCausalLM(LlamaForCausalLM):
    model_cls = Qwen2Model
