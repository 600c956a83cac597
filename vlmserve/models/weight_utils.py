"""Reading checkpoints: safetensors files (one, or shards with an index) and loading them into a
model by name, with stacked projections (q|k|v, gate|up) filled shard by shard."""
from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable, Iterator

import torch
from safetensors import safe_open
from torch import nn

from vlmserve.config import ModelLoadError

logger = logging.getLogger(__name__)

# (our parameter's name part, the checkpoint's name part, shard) for projections fused at load time.
STACKED_QKV_GATE_UP = [
    (".qkv_proj.", ".q_proj.", "q"),
    (".qkv_proj.", ".k_proj.", "k"),
    (".qkv_proj.", ".v_proj.", "v"),
    (".gate_up_proj.", ".gate_proj.", "gate"),
    (".gate_up_proj.", ".up_proj.", "up"),
]

# Buffers that older checkpoints carry and that are recomputed here.
IGNORED_SUFFIXES = ("rotary_emb.inv_freq", "rotary_emb.cos_cached", "rotary_emb.sin_cached")


def safetensors_files(model_dir: str) -> list[str]:
    index = os.path.join(model_dir, "model.safetensors.index.json")
    if os.path.isfile(index):
        try:
            with open(index) as f:
                weight_map = json.load(f)["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise ModelLoadError(f"malformed {index}: {e}") from e
        files = sorted(set(weight_map.values()))
        missing = [f for f in files if not os.path.isfile(os.path.join(model_dir, f))]
        if missing:
            raise ModelLoadError(f"{index} names shard files that are missing: {missing}")
        return [os.path.join(model_dir, f) for f in files]
    single = os.path.join(model_dir, "model.safetensors")
    if os.path.isfile(single):
        return [single]
    files = sorted(f for f in os.listdir(model_dir) if f.endswith(".safetensors"))
    if files:
        return [os.path.join(model_dir, f) for f in files]
    if any(f.endswith(".bin") for f in os.listdir(model_dir)):
        raise ModelLoadError(f"{model_dir!r} has only PyTorch .bin weights; vlmserve loads safetensors "
                             "(convert with transformers: model.save_pretrained(dir, safe_serialization=True))")
    raise ModelLoadError(f"no safetensors weights found in {model_dir!r}")


def iterate_weights(model_dir: str) -> Iterator[tuple[str, torch.Tensor]]:
    for path in safetensors_files(model_dir):
        try:
            with safe_open(path, framework="pt") as f:
                for name in f.keys():
                    yield name, f.get_tensor(name)
        except ModelLoadError:
            raise
        except Exception as e:
            raise ModelLoadError(f"cannot read weights from {path}: {e}") from e


def load_weights(model: nn.Module, weights: Iterable[tuple[str, torch.Tensor]],
                 stacked=STACKED_QKV_GATE_UP, renames: list[tuple[str, str]] = (),
                 skip_prefixes: tuple[str, ...] = ()) -> None:
    """Copy checkpoint tensors into `model`'s parameters; every parameter must be filled.

    `renames` maps checkpoint name prefixes to ours, each rule applied in turn, which is how both
    the transformers 4.x hub layout and the transformers 5 layout of a checkpoint load."""
    params = dict(model.named_parameters())
    modules = dict(model.named_modules())
    filled: dict[str, set[str] | bool] = {}
    unexpected = []
    for ckpt_name, tensor in weights:
        name = ckpt_name
        for old, new in renames:
            if name.startswith(old):
                name = new + name[len(old):]
        if name.endswith(IGNORED_SUFFIXES) or name.startswith(skip_prefixes):
            continue
        for ours, theirs, shard in stacked:
            if theirs in name:
                pname = name.replace(theirs, ours)
                if pname not in params:
                    continue
                module = modules[pname.rsplit(".", 1)[0]]
                try:
                    module.load_shard(params[pname], shard, tensor)
                except ValueError as e:
                    raise ModelLoadError(f"weight {ckpt_name!r}: {e}") from e
                got = filled.setdefault(pname, set())
                if isinstance(got, set):
                    got.add(shard)
                break
        else:
            if name not in params:
                unexpected.append(ckpt_name)
                continue
            p = params[name]
            if p.shape != tensor.shape:
                raise ModelLoadError(f"weight {ckpt_name!r} has shape {tuple(tensor.shape)}, "
                                     f"the model expects {tuple(p.shape)} (does config.json match the weights?)")
            with torch.no_grad():
                p.copy_(tensor)
            filled[name] = True
    missing = []
    for pname in params:
        got = filled.get(pname)
        if got is True:
            continue
        module = modules.get(pname.rsplit(".", 1)[0])
        shards = getattr(module, "shard_offsets", None)
        if isinstance(got, set) and shards is not None and got >= set(shards):
            continue
        missing.append(pname)
    if missing:
        raise ModelLoadError(f"the checkpoint lacks {len(missing)} weights the model needs, e.g. {missing[:5]}")
    if unexpected:
        logger.warning("ignored %d checkpoint tensors the model has no place for, e.g. %s",
                       len(unexpected), unexpected[:5])
