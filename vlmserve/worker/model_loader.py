"""Builds the model of a checkpoint directory on the target device and fills in its weights."""
from __future__ import annotations

import contextlib

import torch
from torch import nn

from vlmserve.config import ModelConfig
from vlmserve.layers.linear import route_linears_through_onednn, route_single_rows_through_triton_gemv
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
    if model_config.load_format == "dummy":
        init_dummy_weights(model, model_config.seed)
    else:
        model.load_weights(iterate_weights(model_config.model))
    if device.type == "cpu":
        route_linears_through_onednn(model)
    elif device.type == "cuda":
        route_single_rows_through_triton_gemv(model)  # sm_90+ by default; VLMSERVE_TRITON_GEMV=0: off
    return model.eval()


@torch.no_grad()
def init_dummy_weights(model: nn.Module, seed: int = 0) -> None:
    """Random weights made where the parameters live (the GPU: seconds for 7B, no checkpoint):
    matrices N(0, 0.02) as HF initializes them, biases zero, norm weights as constructed (ones)."""
    gen = None
    for name, p in model.named_parameters():
        if gen is None or gen.device != p.device:
            gen = torch.Generator(device=p.device).manual_seed(seed)
        if name.endswith("bias"):
            p.zero_()
        elif p.dim() >= 2 or not name.endswith("weight"):  # matrices, CLIP's class embedding
            p.normal_(0.0, 0.02, generator=gen)
