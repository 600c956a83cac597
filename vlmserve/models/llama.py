"""Llama, and the checkpoints that share its architecture: Mistral (sliding-window attention) and
Phi-3 (fused qkv / gate_up weights, partial rotary, longrope), which the registry maps here."""
from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from vlmserve.layers.activation import ActAndMul
from vlmserve.layers.attention import Attention, AttentionMetadata
from vlmserve.layers.layernorm import RMSNorm
from vlmserve.layers.linear import MergedLinear, gated_act
from vlmserve.layers.rotary import RotaryEmbedding, get_rope, rope_parameters
from vlmserve.models.weight_utils import load_weights


def layer_sliding_window(config, layer_idx: int) -> int | None:
    window = getattr(config, "sliding_window", None)
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None:
        return window if layer_types[layer_idx] == "sliding_attention" else None
    if getattr(config, "use_sliding_window", True) is False:
        return None
    return window


class LlamaMLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        inter, bias = config.intermediate_size, getattr(config, "mlp_bias", False)
        self.gate_up_proj = MergedLinear(config.hidden_size, {"gate": inter, "up": inter}, bias=bias)
        self.down_proj = nn.Linear(inter, config.hidden_size, bias=bias)
        self.act = ActAndMul(config.hidden_act)

    def forward(self, x):
        return self.down_proj(gated_act(self.gate_up_proj, self.act, x))


class LlamaAttention(nn.Module):
    def __init__(self, config, layer_idx: int, rotary: RotaryEmbedding):
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = getattr(config, "num_key_value_heads", None) or self.num_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.num_heads
        q, kv = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        self.qkv_proj = MergedLinear(config.hidden_size, {"q": q, "k": kv, "v": kv}, bias=self.qkv_bias(config))
        self.o_proj = nn.Linear(q, config.hidden_size, bias=self.o_bias(config))
        self.q_size, self.kv_size = q, kv
        self.rotary = rotary
        self.attn = Attention(self.num_heads, self.head_dim, self.num_kv_heads, self.head_dim ** -0.5,
                              sliding_window=layer_sliding_window(config, layer_idx))

    @staticmethod
    def qkv_bias(config) -> bool:
        return bool(getattr(config, "attention_bias", False))

    @staticmethod
    def o_bias(config) -> bool:
        return bool(getattr(config, "attention_bias", False))

    def forward(self, cos_sin, x, meta: AttentionMetadata):
        q, k, v = self.qkv_proj(x).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        T = x.shape[0]
        q, k = q.view(T, self.num_heads, self.head_dim), k.view(T, self.num_kv_heads, self.head_dim)
        if self.attn.rotates_in_kv_store(q, self.rotary):  # the Triton backend: rotary and store, one kernel
            store_cos_sin = cos_sin
        else:
            q, k = self.rotary(cos_sin, q, k)
            store_cos_sin = None
        return self.o_proj(self.attn(q.reshape(T, -1), k.reshape(T, -1), v, meta, cos_sin=store_cos_sin))


class LlamaDecoderLayer(nn.Module):
    attention_cls = LlamaAttention
    mlp_cls = LlamaMLP

    def __init__(self, config, layer_idx: int, rotary: RotaryEmbedding):
        super().__init__()
        self.self_attn = self.attention_cls(config, layer_idx, rotary)
        self.mlp = self.mlp_cls(config)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, cos_sin, x, residual, meta):
        if residual is None:
            residual = x
            x = self.input_layernorm(x)
        else:
            x, residual = self.input_layernorm(x, residual)
        x = self.self_attn(cos_sin, x, meta)
        x, residual = self.post_attention_layernorm(x, residual)
        return self.mlp(x), residual


class LlamaModel(nn.Module):
    layer_cls = LlamaDecoderLayer

    def __init__(self, config, max_model_len: int):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        max_pos = max(max_model_len, config.max_position_embeddings)
        rotary = get_rope(head_dim, max_pos, rope_parameters(config), config.max_position_embeddings)
        self.layers = nn.ModuleList(self.layer_cls(config, i, rotary) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary = rotary

    def forward(self, input_ids, positions, meta, inputs_embeds=None):
        x = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        cos_sin = self.rotary.lookup(positions, x.dtype)
        residual = None
        for layer in self.layers:
            x, residual = layer(cos_sin, x, residual, meta)
        x, _ = self.norm(x, residual)
        return x


class LlamaForCausalLM(nn.Module):
    model_cls = LlamaModel
    # checkpoint name prefix -> ours, for layouts other than the plain one
    weight_renames: list[tuple[str, str]] = []

    def __init__(self, config, max_model_len: int):
        super().__init__()
        self.config = config
        self.model = self.model_cls(config, max_model_len)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.tie_word_embeddings = bool(getattr(config, "tie_word_embeddings", False))
        if self.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model.embed_tokens(input_ids)

    def forward(self, input_ids, positions, meta, inputs_embeds=None) -> torch.Tensor:
        return self.model(input_ids, positions, meta, inputs_embeds)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        skip = ("lm_head.",) if self.tie_word_embeddings else ()
        load_weights(self, weights, renames=self.weight_renames, skip_prefixes=skip)
