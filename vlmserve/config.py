"""Engine configuration: what the model is, how the KV cache and the scheduler are sized."""
from __future__ import annotations

import json
import os
from dataclasses import dataclass

import torch
from transformers import AutoConfig, PretrainedConfig

_DTYPES = {
    "float32": torch.float32, "float": torch.float32, "fp32": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "half": torch.float16, "fp16": torch.float16,
}


class ModelLoadError(ValueError):
    """A model directory that cannot be served: missing files, malformed config or weights."""


def resolve_dtype(dtype: str | torch.dtype, hf_config: PretrainedConfig, device: torch.device) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype != "auto":
        if dtype not in _DTYPES:
            raise ValueError(f"unknown dtype {dtype!r}; use auto, float32, bfloat16 or float16")
        return _DTYPES[dtype]
    cfg_dtype = getattr(hf_config, "dtype", None) or getattr(hf_config, "torch_dtype", None)
    if isinstance(cfg_dtype, str):
        cfg_dtype = _DTYPES.get(cfg_dtype, torch.float32)
    if cfg_dtype is None:
        cfg_dtype = torch.float32
    if device.type == "cpu" and cfg_dtype == torch.float16:
        return torch.bfloat16  # fp16 matmuls are slow or missing on CPUs
    if device.type == "cuda" and cfg_dtype == torch.float32:
        return torch.bfloat16
    return cfg_dtype


def load_hf_config(model_dir: str, trust_remote_code: bool = False) -> PretrainedConfig:
    if not os.path.isdir(model_dir):
        raise ModelLoadError(f"model directory {model_dir!r} does not exist (no model hub here: pass a local directory)")
    cfg_path = os.path.join(model_dir, "config.json")
    if not os.path.isfile(cfg_path):
        raise ModelLoadError(f"{model_dir!r} has no config.json")
    try:
        with open(cfg_path) as f:
            json.load(f)
    except json.JSONDecodeError as e:
        raise ModelLoadError(f"{cfg_path} is not valid JSON: {e}") from e
    try:
        return AutoConfig.from_pretrained(model_dir, trust_remote_code=trust_remote_code)
    except Exception as e:  # transformers raises several kinds here
        raise ModelLoadError(f"cannot read the config in {model_dir!r}: {e}") from e


def text_config(hf_config: PretrainedConfig) -> PretrainedConfig:
    """The language model's config (the config itself for text-only models)."""
    get = getattr(hf_config, "get_text_config", None)
    return get() if get is not None else hf_config


@dataclass
class ModelConfig:
    model: str
    hf_config: PretrainedConfig
    dtype: torch.dtype
    max_model_len: int
    seed: int = 0
    trust_remote_code: bool = False
    enforce_eager: bool = False  # True: no CUDA graphs for decode steps
    load_format: str = "auto"  # "dummy": random weights made on the device, no checkpoint read

    @property
    def architecture(self) -> str:
        archs = getattr(self.hf_config, "architectures", None) or []
        if not archs:
            raise ModelLoadError(f"config.json of {self.model!r} names no architecture (field 'architectures')")
        return archs[0]

    @classmethod
    def create(cls, model: str, dtype, max_model_len: int | None, seed: int,
               trust_remote_code: bool, device: torch.device) -> "ModelConfig":
        from vlmserve.plugins import load_plugins
        load_plugins()  # installed packages may register the config class and architecture of this model
        hf_config = load_hf_config(model, trust_remote_code)
        tcfg = text_config(hf_config)
        limit = getattr(tcfg, "max_position_embeddings", None) or 2048
        if max_model_len is None:
            max_model_len = limit
        elif max_model_len < 1:
            raise ValueError(f"max_model_len must be positive, got {max_model_len}")
        return cls(model=model, hf_config=hf_config, dtype=resolve_dtype(dtype, hf_config, device),
                   max_model_len=int(max_model_len), seed=seed, trust_remote_code=trust_remote_code)


@dataclass
class CacheConfig:
    block_size: int = 16
    num_kv_blocks: int | None = None  # None: size from memory
    gpu_memory_utilization: float = 0.9
    cpu_kv_cache_bytes: int = 4 << 30  # KV cache budget on CPU when num_kv_blocks is not given
    enable_prefix_caching: bool = True

    def __post_init__(self):
        if self.block_size < 1:
            raise ValueError(f"block_size must be positive, got {self.block_size}")
        if self.num_kv_blocks is not None and self.num_kv_blocks < 1:
            raise ValueError(f"num_kv_blocks must be positive, got {self.num_kv_blocks}")
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}")


def default_max_num_batched_tokens(device: torch.device, max_num_seqs: int) -> int:
    """Tokens per step for offline runs when not given. On a GPU with 70 GiB or more, 16384: fewer,
    larger prefill steps (on an H100, +3% LLaVA-1.5 and +7% Qwen2-VL offline throughput against
    8192, BENCHMARKS.md), at the cost of longer mixed steps, which the server's latency would feel
    (the server keeps its own default). Elsewhere 8192. At least max_num_seqs."""
    big = device.type == "cuda" and torch.cuda.is_available() and \
        torch.cuda.get_device_properties(device).total_memory >= 70 * (1 << 30)
    return max(16384 if big else 8192, max_num_seqs)


@dataclass
class SchedulerConfig:
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 8192
    max_model_len: int = 2048
    # schedule and launch step n+1 before reading step n's results (None: on for CUDA)
    async_scheduling: bool | None = None

    def __post_init__(self):
        if self.max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be positive, got {self.max_num_seqs}")
        if self.max_num_batched_tokens < 1:
            raise ValueError(f"max_num_batched_tokens must be positive, got {self.max_num_batched_tokens}")
