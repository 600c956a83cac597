"""docs/adding_a_model.md, followed literally: its example code registers a toy VLM out of tree, and
the engine serves it with the same logits as a plain computation on the same weights."""
import os
import re
import types

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file
from transformers import GenerationConfig, LlamaForCausalLM, LlavaConfig

from hf_reference import check_greedy_against_hf
from vlmserve import LLM, SamplingParams
from vlmserve.testing.checkpoints import _config, train_tokenizer

DOC = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs", "adding_a_model.md")
GREEDY = SamplingParams(temperature=0, max_tokens=10, logprobs=5, ignore_eos=True)


@pytest.fixture(scope="module")
def toy():
    """The doc's example code, run as a module."""
    blocks = re.findall(r"```python example\n(.*?)```", open(DOC).read(), re.S)
    assert len(blocks) == 1
    mod = types.ModuleType("toy_vlm_from_doc")
    exec(compile(blocks[0], DOC, "exec"), mod.__dict__)
    return mod


@pytest.fixture(scope="module")
def toy_dir(toy, tmp_path_factory):
    d = str(tmp_path_factory.mktemp("toy_vlm"))
    tok = train_tokenizer(d, 512)
    tok.add_special_tokens({"additional_special_tokens": ["<image>"]})
    tok.save_pretrained(d)
    text_cfg = _config("llama", tok)
    cfg = LlavaConfig(text_config=text_cfg, image_token_index=tok.convert_tokens_to_ids("<image>"))
    cfg.architectures = ["ToyVLMForConditionalGeneration"]
    cfg.save_pretrained(d)
    GenerationConfig(eos_token_id=tok.eos_token_id).save_pretrained(d)
    torch.manual_seed(0)
    lm = LlamaForCausalLM(text_cfg)  # HF names; vlmserve fuses q|k|v and gate|up on load
    proj = torch.nn.Linear(3 * toy.PATCH * toy.PATCH, text_cfg.hidden_size)
    state = {f"language_model.{k}": v.contiguous() for k, v in lm.state_dict().items()}
    state.update({f"patch_proj.{k}": v for k, v in proj.state_dict().items()})
    save_file(state, os.path.join(d, "model.safetensors"))
    return d, lm.eval(), proj


def image(seed):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (48, 40, 3), dtype=np.uint8))


def reference_logprobs(toy, lm, proj, ids, images, image_token):
    """The toy network computed directly: HF Llama on embeddings with the projected patches."""
    proc = toy.ToyVLMProcessor.__new__(toy.ToyVLMProcessor)
    feats = [proj(toy.patchify(p.data["pixel_values"])) for p in proc.process_raw("image", images, {})]
    ids_t = torch.tensor(ids)
    with torch.no_grad():
        emb = lm.model.embed_tokens(ids_t.masked_fill(ids_t == image_token, 0))
        pos = (ids_t == image_token).nonzero().flatten()
        emb[pos] = torch.cat(feats)
        logits = lm(inputs_embeds=emb[None]).logits[0]
    return torch.log_softmax(logits.float(), -1)


def test_the_doc_model_serves_with_reference_logits(toy, toy_dir):
    d, lm, proj = toy_dir
    llm = LLM(d, dtype="float32", max_model_len=256, limit_mm_per_prompt={"image": 2})
    image_token = llm.llm_engine.mm_processor.placeholder_token_id("image")
    prompts = [{"prompt": "what is in <image> this picture", "multi_modal_data": {"image": image(1)}},
               {"prompt": "what is in <image> this picture", "multi_modal_data": {"image": image(2)}},
               {"prompt": "<image> and <image> compared", "multi_modal_data": {"image": [image(3), image(4)]}}]
    outs = llm.generate(prompts, GREEDY, use_tqdm=False)
    for p, out in zip(prompts, outs):
        imgs = p["multi_modal_data"]["image"]
        imgs = imgs if isinstance(imgs, list) else [imgs]
        assert out.prompt_token_ids.count(image_token) == toy.TOKENS_PER_IMAGE * len(imgs)
        ref = reference_logprobs(toy, lm, proj, out.prompt_token_ids + out.outputs[0].token_ids, imgs, image_token)
        check_greedy_against_hf(ref, len(out.prompt_token_ids), out.outputs[0], tol=1e-4)
    assert outs[0].outputs[0].logprobs[0] != outs[1].outputs[0].logprobs[0]  # the image matters

    with pytest.raises(ValueError, match="more than the limit of 2"):
        llm.generate({"prompt": "<image><image><image>", "multi_modal_data": {"image": [image(0)] * 3}},
                     use_tqdm=False)
