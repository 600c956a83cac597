"""Builds the model of a checkpoint directory on the target device and fills in its weights."""
from __future__ import annotations

import contextlib

import torch
from torch import nn

from vlmserve.config import ModelConfig
from vlmserve.layers.linear import route_linears_through_onednn
from vlmserve.models.registry import ModelRegistry
from vlmserve.models.weight_utils import iterate_weights


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype):
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def load_model(model_config: ModelConfig, device: torch.device) -> nn.Module:
    cls = ModelRegistry.resolve(model_config.architecture)
    with _default_dtype(model_config.dtype), torch.device(device):
        model = cls(model_config.hf_config, model_config.max_model_len)
    model.load_weights(iterate_weights(model_config.model))
    if device.type == "cpu":
        route_linears_through_onednn(model)
    return model.eval()
