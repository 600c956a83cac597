"""LLaVA-1.5 through vlmserve matches HF transformers on the same random weights: images of
several sizes and aspect ratios, two images in a prompt, embeddings in place of pixels, and
multimodal requests batched with text-only ones."""
import io

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoImageProcessor, LlavaForConditionalGeneration

from hf_reference import check_greedy_against_hf
from vlmserve import LLM, SamplingParams

GREEDY = SamplingParams(temperature=0.0, max_tokens=12, logprobs=5, ignore_eos=True)


def rand_image(w, h, seed):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def hf(llava_dir):
    return (LlavaForConditionalGeneration.from_pretrained(llava_dir, dtype=torch.float32).eval(),
            AutoImageProcessor.from_pretrained(llava_dir))


@pytest.fixture(scope="module")
def llm(llava_dir):
    return LLM(llava_dir, dtype="float32", max_model_len=512, limit_mm_per_prompt={"image": 2})


def images_of(prompt):
    if not isinstance(prompt, dict) or "multi_modal_data" not in prompt:
        return []
    im = prompt["multi_modal_data"]["image"]
    return im if isinstance(im, list) else [im]


def hf_check(hf, prompt_images, out):
    model, proc = hf
    ids = out.prompt_token_ids + out.outputs[0].token_ids
    kw = {}
    if prompt_images:
        kw["pixel_values"] = proc(images=prompt_images, return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids]), **kw).logits[0]
    check_greedy_against_hf(torch.log_softmax(logits.float(), -1), len(out.prompt_token_ids), out.outputs[0])


def test_images_of_many_sizes_batched_with_text(llm, hf):
    sizes = [(64, 64), (200, 120), (90, 300), (33, 47), (640, 480)]
    prompts = [{"prompt": f"the cat <image> runs to the river {i}",
                "multi_modal_data": {"image": rand_image(w, h, i)}} for i, (w, h) in enumerate(sizes)]
    prompts.insert(2, "a plain text prompt in the same batch")
    prompts.append({"prompt": "<image>\nWhat shape is this?",
                    "multi_modal_data": {"image": np.asarray(rand_image(120, 90, 9))}})  # numpy array
    encoded_before = llm.llm_engine.runner.encoder_cache.num_encoded_items
    outs = llm.generate(prompts, GREEDY, use_tqdm=False)
    # every image went through the tower once, all in the first step's batched call
    assert llm.llm_engine.runner.encoder_cache.num_encoded_items - encoded_before == 6
    for p, o in zip(prompts, outs):
        ims = images_of(p)
        ims = [Image.fromarray(i) if isinstance(i, np.ndarray) else i for i in ims]
        if ims:
            assert o.prompt_token_ids.count(llm.llm_engine.mm_processor.placeholder_token_id("image")) == 64
        hf_check(hf, ims, o)
    # different images behind the same text give different distributions
    lp0 = outs[0].outputs[0].logprobs[0]
    lp1 = outs[1].outputs[0].logprobs[0]
    assert lp0 != lp1


def test_two_images_in_one_prompt(llm, hf):
    a, b = rand_image(100, 80, 1), rand_image(80, 100, 2)
    prompts = [{"prompt": "<image> first and second <image> compare", "multi_modal_data": {"image": [a, b]}},
               {"prompt": "<image> first and second <image> compare", "multi_modal_data": {"image": [b, a]}}]
    outs = llm.generate(prompts, GREEDY, use_tqdm=False)
    for p, o in zip(prompts, outs):
        hf_check(hf, images_of(p), o)
    assert outs[0].outputs[0].logprobs[0] != outs[1].outputs[0].logprobs[0]  # order matters


def test_token_id_prompt_with_placeholder(llm, hf):
    tok = llm.get_tokenizer()
    img = rand_image(70, 70, 5)
    ids = tok("describe <image> now").input_ids
    out = llm.generate({"prompt_token_ids": ids, "multi_modal_data": {"image": img}}, GREEDY, use_tqdm=False)[0]
    text_out = llm.generate({"prompt": "describe <image> now", "multi_modal_data": {"image": img}},
                            GREEDY, use_tqdm=False)[0]
    assert out.outputs[0].token_ids == text_out.outputs[0].token_ids
    hf_check(hf, [img], out)


def test_image_embeddings_in_place_of_pixels(llm, hf):
    model, proc = hf
    imgs = [rand_image(90, 60, 11), rand_image(64, 64, 12)]
    with torch.no_grad():
        feats = model.model.get_image_features(pixel_values=proc(images=imgs, return_tensors="pt")["pixel_values"])
    feats = getattr(feats, "pooler_output", feats)  # an output object in newer transformers
    if isinstance(feats, (list, tuple)):
        feats = torch.stack(list(feats))
    assert feats.shape == (2, 64, 64)
    prompt = "<image> and <image> together"
    by_pixels = llm.generate({"prompt": prompt, "multi_modal_data": {"image": imgs}}, GREEDY, use_tqdm=False)[0]
    by_embeds = llm.generate({"prompt": prompt, "multi_modal_data": {"image": feats}}, GREEDY, use_tqdm=False)[0]
    assert by_pixels.outputs[0].token_ids == by_embeds.outputs[0].token_ids
    for a, b in zip(by_pixels.outputs[0].logprobs, by_embeds.outputs[0].logprobs):
        for t in a:
            assert abs(a[t].logprob - b[t].logprob) < 1e-4
    hf_check(hf, imgs, by_embeds)


def test_prefix_cache_knows_images(llava_dir):
    llm = LLM(llava_dir, dtype="float32", max_model_len=512)
    stats = llm.llm_engine.stats
    img, other = rand_image(64, 64, 21), rand_image(64, 64, 22)
    prompt = "<image> " + "the cat runs to the river " * 4

    def run(image):
        before = stats.num_prompt_tokens_computed
        out = llm.generate({"prompt": prompt, "multi_modal_data": {"image": image}}, GREEDY, use_tqdm=False)[0]
        return out, stats.num_prompt_tokens_computed - before

    first, n_first = run(img)
    again, n_again = run(img.copy())  # same pixels, another object
    miss, n_miss = run(other)
    assert n_again < n_first and again.num_cached_tokens > 64
    assert again.outputs[0].token_ids == first.outputs[0].token_ids
    assert n_miss == n_first and miss.num_cached_tokens == 0  # the image sits in the first block


def test_chunked_prefill_through_an_image(llava_dir, hf):
    llm = LLM(llava_dir, dtype="float32", max_model_len=512, max_num_batched_tokens=24)
    img = rand_image(150, 100, 31)
    out = llm.generate({"prompt": "look <image> here", "multi_modal_data": {"image": img}}, GREEDY, use_tqdm=False)[0]
    assert llm.llm_engine.runner.encoder_cache.num_encoded_items == 1  # once, though split over 3+ steps
    hf_check(hf, [img], out)


# ---- bad input ---------------------------------------------------------------------------
def test_more_images_than_the_limit(llava_dir):
    llm = LLM(llava_dir, dtype="float32", max_model_len=512)  # default limit: 1 image
    imgs = [rand_image(64, 64, 1), rand_image(64, 64, 2)]
    with pytest.raises(ValueError, match="2 images in one prompt, more than the limit of 1"):
        llm.generate({"prompt": "<image> <image>", "multi_modal_data": {"image": imgs}}, use_tqdm=False)


def test_placeholders_must_match_items(llm):
    img = rand_image(64, 64, 1)
    with pytest.raises(ValueError, match="2 image placeholder.*1 image"):
        llm.generate({"prompt": "<image> <image>", "multi_modal_data": {"image": img}}, use_tqdm=False)
    with pytest.raises(ValueError, match="0 image placeholder.*1 image"):
        llm.generate({"prompt": "no placeholder", "multi_modal_data": {"image": img}}, use_tqdm=False)
    with pytest.raises(ValueError, match="1 image placeholder.*0 image"):
        llm.generate("a placeholder <image> with no image", use_tqdm=False)


def test_corrupt_image(llm, tmp_path):
    buf = io.BytesIO()
    rand_image(64, 64, 3).save(buf, format="PNG")
    path = tmp_path / "broken.png"
    path.write_bytes(buf.getvalue()[:200])
    broken = Image.open(path)  # lazily decoded: fails when the pixels are read
    with pytest.raises(ValueError, match="cannot process the image"):
        llm.generate({"prompt": "<image>", "multi_modal_data": {"image": broken}}, use_tqdm=False)
    with pytest.raises(ValueError, match="unsupported type bytes"):
        llm.generate({"prompt": "<image>", "multi_modal_data": {"image": b"not an image"}}, use_tqdm=False)
    # the engine is unharmed
    assert llm.generate("the cat", SamplingParams(max_tokens=2), use_tqdm=False)[0].outputs[0].token_ids


def test_wrong_embedding_shape(llm):
    with pytest.raises(ValueError, match=r"embeddings have shape \(n_items, 10, 64\), the model takes \(n_items, 64, 64\)"):
        llm.generate({"prompt": "<image>", "multi_modal_data": {"image": torch.zeros(1, 10, 64)}}, use_tqdm=False)


def test_text_model_refuses_images(text_model_dir):
    llm = LLM(text_model_dir("llama_tied"), dtype="float32", max_model_len=64)
    with pytest.raises(ValueError, match="takes no multimodal input"):
        llm.generate({"prompt": "hi", "multi_modal_data": {"image": rand_image(8, 8, 0)}}, use_tqdm=False)


def test_profiling_items_are_the_largest_allowed(llm):
    """The dummy multimodal prompt that sizes the KV cache on a GPU: as many items as the limit allows,
    each at its largest, through the vision tower in one call."""
    engine = llm.llm_engine
    proc = engine.mm_processor
    ids, items = proc.apply(*proc.dummy_request({"image": 2}), {"image": 2})
    assert len(items) == 2 and all(it.length == proc.max_tokens_per_item("image") for it in items)
    embeds = engine.runner.encode_dummy_items(items)
    assert [tuple(e.shape) for e in embeds] == [(64, 64), (64, 64)]


def test_chat_template_from_the_processor_files(llava_dir, tmp_path):
    """LLaVA checkpoints on the hub keep their template in chat_template.json; without any template a
    chat request gets an error that says what to do."""
    import json
    import shutil

    from shapes import data_url

    d = tmp_path / "m"
    shutil.copytree(llava_dir, d)
    img = rand_image(64, 64, 3)
    messages = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url(img)}},
                                             {"type": "text", "text": "what is it"}]}]
    llm = LLM(str(d), dtype="float32", max_model_len=512)
    with pytest.raises(ValueError, match="no chat template"):
        llm.chat(messages, use_tqdm=False)
    template = ("{% for m in messages %}USER: {% for p in m['content'] %}{% if p['type'] == 'image' %}<image>\n"
                "{% else %}{{ p['text'] }}{% endif %}{% endfor %}{% endfor %} ASSISTANT:")
    (d / "chat_template.json").write_text(json.dumps({"chat_template": template}))
    llm = LLM(str(d), dtype="float32", max_model_len=512)
    chat = llm.chat(messages, GREEDY, use_tqdm=False)[0]
    gen = llm.generate({"prompt": "USER: <image>\nwhat is it ASSISTANT:", "multi_modal_data": {"image": img}},
                       GREEDY, use_tqdm=False)[0]
    bos = llm.get_tokenizer().bos_token_id
    # chat prompts are tokenized without special tokens (the template owns them), as HF does
    assert [bos] + chat.prompt_token_ids == gen.prompt_token_ids
    assert len(chat.outputs[0].token_ids) == GREEDY.max_tokens


@pytest.mark.parametrize("hw", [(28, 28), (30, 29), (35, 21)])
def test_patch_embedding_as_one_matmul_is_the_conv(hw):
    """CLIP's patch embedding runs as a matmul over the patches' pixels: the same as the stride-p
    conv of the checkpoint's weight, also where the image is no whole number of patches."""
    from transformers import CLIPVisionConfig

    from vlmserve.models.clip import CLIPVisionEmbeddings

    torch.manual_seed(0)
    emb = CLIPVisionEmbeddings(CLIPVisionConfig(hidden_size=64, image_size=28, patch_size=7, num_attention_heads=4))
    torch.nn.init.normal_(emb.patch_embedding.weight)
    x = torch.randn(2, 3, *hw)
    ref = emb.patch_embedding(x).flatten(2).transpose(1, 2)
    torch.testing.assert_close(emb.embed_patches(x), ref, rtol=1e-5, atol=1e-4)
