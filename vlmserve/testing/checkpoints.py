"""Random-weight checkpoints of real architectures, saved as real checkpoints are.

Two key layouts: "v5" is what transformers 5 `save_pretrained` writes; "hub" is what checkpoints
on the hub were written with (transformers 4.x): top-level `rope_theta` / `rope_scaling` and
`torch_dtype` in config.json, rotary `inv_freq` buffers among the weights, shards with an index."""
from __future__ import annotations

import json
import os
import random

import torch
from safetensors.torch import save_file

_WORDS = ("the a an of to in is was for on with as by at from it this that be are were not but or "
          "cat dog bird fish tree house river mountain city road car train boat plane sun moon star "
          "red green blue yellow purple orange black white small large quick slow bright dark happy "
          "runs jumps flies swims sees finds makes takes gives tells asks walks sings reads writes "
          "image picture photo shape circle square triangle cross color describe what where who why "
          "one two three four five six seven eight nine ten hello world model engine token cache "
          "café naïve über 東京 こんにちは 😀 🚀").split()


def _corpus(n_lines: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    lines = []
    for _ in range(n_lines):
        words = [rng.choice(_WORDS) for _ in range(rng.randint(3, 16))]
        text = " ".join(words)
        if rng.random() < 0.3:
            text = text.capitalize() + rng.choice([".", "?", "!", ","])
        if rng.random() < 0.1:
            text += "\n" + str(rng.randint(0, 9999))
        lines.append(text)
    return lines


def train_tokenizer(out_dir: str, vocab_size: int = 512, seed: int = 0):
    """A byte-level BPE tokenizer trained here, saved as a transformers fast tokenizer, with a BOS
    token prepended as Llama's tokenizer does."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<unk>", "<s>", "</s>", "<pad>"]
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(_corpus(4000, seed), trainer)
    bos = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                       special_tokens=[("<s>", bos)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>", pad_token="<pad>")
    fast.save_pretrained(out_dir)
    return fast


def _config(arch: str, tokenizer, **overrides):
    from transformers import LlamaConfig, MistralConfig, Phi3Config, Qwen2Config

    cls = {"llama": LlamaConfig, "mistral": MistralConfig, "qwen2": Qwen2Config, "phi3": Phi3Config}[arch]
    kw = dict(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
              bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
              pad_token_id=tokenizer.pad_token_id, initializer_range=0.08, tie_word_embeddings=False)
    kw.update(overrides)
    return cls(**kw)


def make_text_checkpoint(out_dir: str, arch: str = "llama", layout: str = "v5", num_shards: int = 1,
                         seed: int = 0, tokenizer_vocab: int = 512, **config_overrides) -> str:
    """Write a random-weight causal LM of `arch` (llama, mistral, qwen2, phi3) to `out_dir`."""
    from transformers import AutoModelForCausalLM, GenerationConfig

    os.makedirs(out_dir, exist_ok=True)
    tokenizer = train_tokenizer(out_dir, tokenizer_vocab, seed)
    config = _config(arch, tokenizer, **config_overrides)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    GenerationConfig(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                     pad_token_id=tokenizer.pad_token_id).save_pretrained(out_dir)
    if layout == "v5":
        model.save_pretrained(out_dir, max_shard_size="200KB" if num_shards > 1 else "10GB")
    elif layout == "hub":
        _save_hub_layout(model, config, out_dir, num_shards)
    else:
        raise ValueError(f"unknown layout {layout!r}")
    return out_dir


def _save_hub_layout(model, config, out_dir: str, num_shards: int) -> None:
    from vlmserve.layers.rotary import rope_parameters

    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    if config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    rope = rope_parameters(config)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    dim = int(head_dim * rope["partial_rotary_factor"])
    inv_freq = 1.0 / (rope["rope_theta"] ** (torch.arange(0, dim, 2).float() / dim))
    for i in range(config.num_hidden_layers):  # 4.x checkpoints carried this buffer
        state[f"model.layers.{i}.self_attn.rotary_emb.inv_freq"] = inv_freq.clone()
    names = sorted(state)
    shards = [names[i::num_shards] for i in range(num_shards)]
    weight_map = {}
    for i, shard in enumerate(shards):
        fname = "model.safetensors" if num_shards == 1 else f"model-{i + 1:05d}-of-{num_shards:05d}.safetensors"
        save_file({k: state[k] for k in shard}, os.path.join(out_dir, fname), metadata={"format": "pt"})
        weight_map.update({k: fname for k in shard})
    if num_shards > 1:
        with open(os.path.join(out_dir, "model.safetensors.index.json"), "w") as f:
            json.dump({"metadata": {"total_size": sum(t.numel() * t.element_size() for t in state.values())},
                       "weight_map": weight_map}, f, indent=2)
    config.architectures = [type(model).__name__]
    cfg = config.to_diff_dict()
    for key in ("rope_parameters", "dtype", "transformers_version"):
        cfg.pop(key, None)
    cfg["rope_theta"] = rope["rope_theta"]
    scaling = {k: v for k, v in rope.items() if k not in ("rope_theta", "partial_rotary_factor")}
    if scaling.get("rope_type", "default") == "default":
        cfg["rope_scaling"] = None
    else:
        cfg["rope_scaling"] = {"type" if scaling["rope_type"] == "longrope" else "rope_type": scaling.pop("rope_type"),
                               **scaling}
        omp = scaling.get("original_max_position_embeddings")
        if omp and scaling is not None and config.model_type == "phi3":
            cfg["original_max_position_embeddings"] = omp
            cfg["rope_scaling"].pop("original_max_position_embeddings", None)
    if rope["partial_rotary_factor"] != 1.0:
        cfg["partial_rotary_factor"] = rope["partial_rotary_factor"]
    cfg["torch_dtype"] = "float32"
    cfg["transformers_version"] = "4.44.2"
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2)


# transformers 5 name prefix -> the prefix LLaVA checkpoints on the hub (4.x) have
_LLAVA_HUB_NAMES = [("model.language_model.", "language_model.model."), ("lm_head.", "language_model.lm_head."),
                    ("model.vision_tower.", "vision_tower.vision_model."),
                    ("model.multi_modal_projector.", "multi_modal_projector.")]


def make_llava_checkpoint(out_dir: str, layout: str = "hub", seed: int = 0, image_size: int = 64,
                          patch_size: int = 8, vision_feature_layer=-2,
                          vision_feature_select_strategy: str = "default", text_arch: str = "llama",
                          vision_overrides: dict | None = None, tokenizer_vocab: int = 512,
                          **text_overrides) -> str:
    """A random-weight LlavaForConditionalGeneration with a CLIP image processor and a tokenizer
    whose `<image>` token is the config's image_token_index."""
    from transformers import (CLIPImageProcessor, CLIPVisionConfig, GenerationConfig, LlavaConfig,
                              LlavaForConditionalGeneration)

    os.makedirs(out_dir, exist_ok=True)
    tokenizer = train_tokenizer(out_dir, tokenizer_vocab, seed)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<image>"]})
    tokenizer.save_pretrained(out_dir)
    image_token = tokenizer.convert_tokens_to_ids("<image>")
    text_cfg = _config(text_arch, tokenizer, **text_overrides)
    vkw = dict(hidden_size=48, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
               image_size=image_size, patch_size=patch_size, projection_dim=32)
    vkw.update(vision_overrides or {})
    config = LlavaConfig(vision_config=CLIPVisionConfig(**vkw), text_config=text_cfg,
                         image_token_index=image_token, vision_feature_layer=vision_feature_layer,
                         vision_feature_select_strategy=vision_feature_select_strategy,
                         image_seq_length=(image_size // patch_size) ** 2)
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config).eval()
    with torch.no_grad():  # larger projector weights, so that image content moves the logits
        for p in model.model.multi_modal_projector.parameters():
            p.mul_(4.0)
    CLIPImageProcessor(size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size},
                       image_mean=[0.48145466, 0.4578275, 0.40821073],
                       image_std=[0.26862954, 0.26130258, 0.27577711]).save_pretrained(out_dir)
    GenerationConfig(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                     pad_token_id=tokenizer.pad_token_id).save_pretrained(out_dir)
    if layout == "v5":
        model.save_pretrained(out_dir)
        return out_dir
    if layout != "hub":
        raise ValueError(f"unknown layout {layout!r}")
    state = {}
    # model.state_dict() has the names transformers 5 uses in memory.
    for k, v in model.state_dict().items():
        for new, old in _LLAVA_HUB_NAMES:
            if k.startswith(new):
                k = old + k[len(new):]
                break
        state[k] = v.contiguous()
    save_file(state, os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt"})
    config.architectures = ["LlavaForConditionalGeneration"]
    cfg = config.to_diff_dict()
    cfg.pop("transformers_version", None)
    tc = cfg.get("text_config", {})
    rope = tc.pop("rope_parameters", None) or {}
    tc["rope_theta"] = rope.get("rope_theta", 10000.0)
    tc.pop("dtype", None)
    cfg["torch_dtype"] = "float32"
    cfg["transformers_version"] = "4.44.2"
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2)
    return out_dir


# The chat template of the Qwen2-VL / Qwen2.5-VL instruct checkpoints.
QWEN2_VL_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}Picture {{ image_count.value }}: "
    "{% endif %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")

_QWEN2_VL_SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                            "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>"]

# transformers 5 names in memory -> the names hub Qwen2-VL checkpoints (4.x) have
_QWEN2_VL_HUB_NAMES = [("model.language_model.", "model."), ("model.visual.", "visual.")]


def qwen2_vl_tokenizer(out_dir: str, vocab: int, seed: int):
    """A tokenizer trained on the spot with Qwen2-VL's special tokens and chat template, saved in
    out_dir; -> (tokenizer, {special token: id})."""
    os.makedirs(out_dir, exist_ok=True)
    tok = train_tokenizer(out_dir, vocab, seed)
    tok.add_special_tokens({"additional_special_tokens": _QWEN2_VL_SPECIAL_TOKENS})
    tok.chat_template = QWEN2_VL_CHAT_TEMPLATE
    tok.save_pretrained(out_dir)
    return tok, {t: tok.convert_tokens_to_ids(t) for t in _QWEN2_VL_SPECIAL_TOKENS}


def write_qwen2_vl_preprocessor_config(out_dir: str, vision: dict, min_pixels: int, max_pixels: int,
                                       processor_class: str = "Qwen2VLProcessor") -> None:
    """preprocessor_config.json as hub Qwen2-VL checkpoints have it."""
    with open(os.path.join(out_dir, "preprocessor_config.json"), "w") as f:
        json.dump({"min_pixels": min_pixels, "max_pixels": max_pixels, "patch_size": vision["patch_size"],
                   "temporal_patch_size": vision["temporal_patch_size"], "merge_size": vision["spatial_merge_size"],
                   "image_mean": [0.48145466, 0.4578275, 0.40821073],
                   "image_std": [0.26862954, 0.26130258, 0.27577711],
                   "image_processor_type": "Qwen2VLImageProcessor", "processor_class": processor_class},
                  f, indent=2)


def make_qwen2_vl_checkpoint(out_dir: str, arch: str = "qwen2_vl", layout: str = "hub", seed: int = 0,
                             min_pixels: int = 28 * 28 * 4, max_pixels: int = 28 * 28 * 20,
                             tie_word_embeddings: bool = False, merger_scale: float = 4.0,
                             vision_overrides: dict | None = None, tokenizer_vocab: int = 512,
                             **text_overrides) -> str:
    """A random-weight Qwen2VLForConditionalGeneration (arch "qwen2_vl") or
    Qwen2_5_VLForConditionalGeneration ("qwen2_5_vl"): tiny LM with M-RoPE, a 2-block vision tower
    with the real patch size (14) and merge size (2), a preprocessor_config.json whose small
    min/max_pixels give images of 4..20 tokens, a tokenizer with Qwen's special tokens, and the
    Qwen chat template. layout "hub": flat config.json and `model.` / `visual.` weight names as hub
    checkpoints have; "v5": nested config and the `model.language_model.` / `model.visual.` names
    of transformers 5."""
    import transformers
    from transformers import GenerationConfig

    if arch not in ("qwen2_vl", "qwen2_5_vl"):
        raise ValueError(f"unknown arch {arch!r}: qwen2_vl or qwen2_5_vl")
    if layout not in ("hub", "v5"):
        raise ValueError(f"unknown layout {layout!r}")
    tok, ids = qwen2_vl_tokenizer(out_dir, tokenizer_vocab, seed)
    text = dict(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                rms_norm_eps=1e-6, initializer_range=0.08, bos_token_id=tok.bos_token_id,
                eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                 "mrope_section": [2, 3, 3]})  # sums to head_dim (16) / 2
    text.update(text_overrides)
    vision = dict(depth=2, num_heads=4, patch_size=14, spatial_merge_size=2, temporal_patch_size=2,
                  initializer_range=0.05)
    if arch == "qwen2_vl":
        vision.update(embed_dim=32, mlp_ratio=2, hidden_size=text["hidden_size"])
        cfg_cls, model_cls = transformers.Qwen2VLConfig, transformers.Qwen2VLForConditionalGeneration
    else:  # window attention in block 0 (windows of 2x2 merged tokens), full attention in block 1
        vision.update(hidden_size=32, intermediate_size=48, out_hidden_size=text["hidden_size"],
                      window_size=56, fullatt_block_indexes=[1], tokens_per_second=2, hidden_act="silu")
        cfg_cls, model_cls = transformers.Qwen2_5_VLConfig, transformers.Qwen2_5_VLForConditionalGeneration
    vision.update(vision_overrides or {})
    config = cfg_cls(text_config=text, vision_config=vision, image_token_id=ids["<|image_pad|>"],
                     video_token_id=ids["<|video_pad|>"], vision_start_token_id=ids["<|vision_start|>"],
                     vision_end_token_id=ids["<|vision_end|>"], tie_word_embeddings=tie_word_embeddings)
    torch.manual_seed(seed)
    model = model_cls(config).eval()
    with torch.no_grad():  # so that image content visibly moves the logits
        for p in model.model.visual.merger.parameters():
            p.mul_(merger_scale)
    GenerationConfig(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                     pad_token_id=tok.pad_token_id).save_pretrained(out_dir)
    write_qwen2_vl_preprocessor_config(out_dir, vision, min_pixels, max_pixels,
                                       "Qwen2_5_VLProcessor" if arch == "qwen2_5_vl" else "Qwen2VLProcessor")
    state = {k: v.contiguous() for k, v in model.state_dict().items()}  # transformers 5 names
    if tie_word_embeddings:
        state.pop("lm_head.weight", None)
    config.architectures = [model_cls.__name__]
    if layout == "v5":
        save_file(state, os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt"})
        config.save_pretrained(out_dir)
        return out_dir
    hub = {}
    for k, v in state.items():
        for new, old in _QWEN2_VL_HUB_NAMES:
            if k.startswith(new):
                k = old + k[len(new):]
                break
        hub[k] = v
    save_file(hub, os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt"})
    _save_flat_qwen2_vl_config(config, out_dir)
    return out_dir


def _save_flat_qwen2_vl_config(config, out_dir: str) -> None:
    """config.json as hub Qwen2-VL checkpoints have it: the text settings at the top level, M-RoPE
    as `rope_scaling: {"type": "mrope", ...}`, 4.x field names."""
    drop = {"model_type", "rope_parameters", "layer_types", "dtype", "torch_dtype", "transformers_version",
            "architectures", "output_hidden_states", "return_dict", "use_return_dict"}
    tc = config.text_config.to_dict()
    rope = tc.get("rope_parameters") or {}
    cfg = {k: v for k, v in tc.items() if k not in drop}
    vc = {k: v for k, v in config.vision_config.to_dict().items() if k not in drop}
    vc["in_chans"] = vc.pop("in_channels", 3)
    cfg.update(architectures=config.architectures, model_type=config.model_type,
               image_token_id=config.image_token_id, video_token_id=config.video_token_id,
               vision_start_token_id=config.vision_start_token_id, vision_end_token_id=config.vision_end_token_id,
               tie_word_embeddings=config.tie_word_embeddings, vision_config=vc,
               rope_theta=rope.get("rope_theta", 1000000.0),
               rope_scaling={"type": "mrope", "mrope_section": list(rope["mrope_section"])},
               torch_dtype="float32", transformers_version="4.49.0")
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2)
