"""Random-weight models of real architectures' shapes for GPU benchmarks, with nothing to download:
a model directory holds the config, a small tokenizer trained here, the image processor's config
and no weights. vlmserve makes the weights on the GPU (`LLM(load_format="dummy")`), and HF builds its
model from the same config on the GPU (`make_hf_model`), so both run the same architecture and shape
(the random values differ; with EOS ignored, the work does not)."""
from __future__ import annotations

import os

# LLaVA-1.5-7B: CLIP ViT-L/14 at 336 px (576 image tokens, feature layer -2) + Llama-2-7B.
LLAMA_2_7B = dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                  num_key_value_heads=32, vocab_size=32064, max_position_embeddings=4096, rms_norm_eps=1e-5)
CLIP_VIT_L_14_336 = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                         image_size=336, patch_size=14, projection_dim=768, hidden_act="quick_gelu")
# Qwen2-VL-7B(-Instruct): a 675M-parameter ViT (32 blocks of 1280, 14 px patches, 2x2 merge) +
# Qwen2-7B with M-RoPE; images at their own resolution within min..max_pixels.
QWEN2_7B = dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                num_key_value_heads=4, vocab_size=152064, max_position_embeddings=32768, rms_norm_eps=1e-6,
                rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [16, 24, 24]})
QWEN2_VL_VISION = dict(depth=32, embed_dim=1280, num_heads=16, mlp_ratio=4, hidden_size=3584, patch_size=14,
                       spatial_merge_size=2, temporal_patch_size=2, in_channels=3, hidden_act="quick_gelu")
QWEN2_VL_PIXELS = dict(min_pixels=56 * 56, max_pixels=28 * 28 * 16384)
MODEL_SHAPES = {
    "llava-1.5-7b": {"arch": "llava", "text": LLAMA_2_7B, "vision": CLIP_VIT_L_14_336},
    "llama-2-7b": {"arch": "llama", "text": LLAMA_2_7B},
    "qwen2-vl-7b": {"arch": "qwen2_vl", "text": QWEN2_7B, "vision": QWEN2_VL_VISION},
}


def write_model_dir(out_dir: str, shape: str, seed: int = 0, tokenizer_vocab: int = 4096) -> str:
    """Config, tokenizer, processor configs of `shape` (a MODEL_SHAPES key); no weights."""
    from transformers import (CLIPImageProcessor, CLIPVisionConfig, GenerationConfig, LlamaConfig,
                              LlavaConfig)

    from vlmserve.benchmarks.throughput import write_llava_processor_config
    from vlmserve.testing.checkpoints import train_tokenizer

    spec = MODEL_SHAPES[shape]
    if spec["arch"] == "qwen2_vl":
        return _write_qwen2_vl_dir(out_dir, spec, seed, tokenizer_vocab)
    os.makedirs(out_dir, exist_ok=True)
    tok = train_tokenizer(out_dir, tokenizer_vocab, seed)
    ids = dict(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    text = LlamaConfig(**spec["text"], **ids, tie_word_embeddings=False)
    if spec["arch"] == "llama":
        text.architectures = ["LlamaForCausalLM"]
        text.save_pretrained(out_dir)
    else:
        tok.add_special_tokens({"additional_special_tokens": ["<image>"]})
        tok.save_pretrained(out_dir)
        v = spec["vision"]
        cfg = LlavaConfig(vision_config=CLIPVisionConfig(**v), text_config=text,
                          image_token_index=tok.convert_tokens_to_ids("<image>"), vision_feature_layer=-2,
                          vision_feature_select_strategy="default", projector_hidden_act="gelu",
                          image_seq_length=(v["image_size"] // v["patch_size"]) ** 2)
        cfg.architectures = ["LlavaForConditionalGeneration"]
        cfg.save_pretrained(out_dir)
        size = v["image_size"]
        CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size},
                           image_mean=[0.48145466, 0.4578275, 0.40821073],
                           image_std=[0.26862954, 0.26130258, 0.27577711]).save_pretrained(out_dir)
        write_llava_processor_config(out_dir)
    GenerationConfig(**ids).save_pretrained(out_dir)
    return out_dir


def _write_qwen2_vl_dir(out_dir: str, spec: dict, seed: int, tokenizer_vocab: int) -> str:
    """A Qwen2-VL directory as the hub has it (nested config of transformers 5, Qwen's special
    tokens and chat template, the image processor's min/max pixels); no weights."""
    from transformers import GenerationConfig, Qwen2VLConfig

    from vlmserve.testing.checkpoints import qwen2_vl_tokenizer, write_qwen2_vl_preprocessor_config

    tok, ids = qwen2_vl_tokenizer(out_dir, tokenizer_vocab, seed)
    special = dict(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    cfg = Qwen2VLConfig(text_config={**spec["text"], **special}, vision_config=dict(spec["vision"]),
                        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
                        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
                        tie_word_embeddings=False)
    cfg.architectures = ["Qwen2VLForConditionalGeneration"]
    cfg.save_pretrained(out_dir)
    write_qwen2_vl_preprocessor_config(out_dir, spec["vision"], **QWEN2_VL_PIXELS)
    GenerationConfig(**special).save_pretrained(out_dir)
    return out_dir


def make_hf_model(model_dir: str, dtype, device: str = "cuda"):
    """HF's model of a directory written above, random weights made on `device`, SDPA attention."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, LlavaForConditionalGeneration

    cfg = AutoConfig.from_pretrained(model_dir)
    if cfg.model_type == "llava":
        make = LlavaForConditionalGeneration._from_config
    elif cfg.model_type == "qwen2_vl":
        from transformers import Qwen2VLForConditionalGeneration
        make = Qwen2VLForConditionalGeneration._from_config
    else:
        make = AutoModelForCausalLM.from_config
    with torch.device(device):
        model = make(cfg, dtype=dtype, attn_implementation="sdpa")
    return model.eval()
