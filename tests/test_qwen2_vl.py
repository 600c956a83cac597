"""Qwen2-VL and Qwen2.5-VL through vlmserve match HF transformers on the same random weights:
images of several sizes and aspect ratios, two images in a prompt, a video, precomputed image
embeddings, all batched with a text-only prompt; M-RoPE positions (and the delta decoding
continues from) as HF's get_rope_index computes them; preprocessing equal to HF's processors;
chunked prefill and the prefix cache through an image; and the errors for bad input."""
import numpy as np
import pytest
import torch
import transformers
from PIL import Image
from transformers import AutoImageProcessor, AutoVideoProcessor

from hf_reference import check_greedy_against_hf
from vlmserve import LLM, SamplingParams
from vlmserve.multimodal.inputs import VideoFrames
from vlmserve.testing.checkpoints import make_qwen2_vl_checkpoint

GREEDY = SamplingParams(temperature=0.0, max_tokens=8, logprobs=5, ignore_eos=True)
ARCHS = ["qwen2_vl", "qwen2_5_vl"]
HF_CLASSES = {"qwen2_vl": "Qwen2VLForConditionalGeneration", "qwen2_5_vl": "Qwen2_5_VLForConditionalGeneration"}
IMAGE = "<|vision_start|><|image_pad|><|vision_end|>"
VIDEO = "<|vision_start|><|video_pad|><|vision_end|>"


def chat(content: str) -> str:
    return f"<|im_start|>user\n{content}<|im_end|>\n<|im_start|>assistant\n"


def rand_image(w, h, seed):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def rand_video(frames, w, h, seed):
    return np.random.default_rng(seed).integers(0, 256, (frames, h, w, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    made = {}

    def get(arch, layout="hub"):
        if (arch, layout) not in made:
            made[arch, layout] = make_qwen2_vl_checkpoint(str(tmp_path_factory.mktemp(f"{arch}_{layout}")),
                                                          arch=arch, layout=layout)
        return made[arch, layout]
    return get


@pytest.fixture(scope="module")
def hf(ckpt):
    made = {}

    def get(arch):
        if arch not in made:
            d = ckpt(arch)
            model = getattr(transformers, HF_CLASSES[arch]).from_pretrained(d, dtype=torch.float32).eval()
            made[arch] = (model, AutoImageProcessor.from_pretrained(d), AutoVideoProcessor.from_pretrained(d))
        return made[arch]
    return get


@pytest.fixture(scope="module")
def llms(ckpt):
    made = {}

    def get(arch):
        if arch not in made:
            made[arch] = LLM(ckpt(arch), dtype="float32", max_model_len=512,
                             limit_mm_per_prompt={"image": 2, "video": 1})
        return made[arch]
    return get


def hf_inputs(hf_parts, ids, images=(), videos=(), fps=None):
    """HF's forward kwargs for a prompt + completion: its own processors' outputs and the token
    types its get_rope_index reads."""
    model, image_proc, video_proc = hf_parts
    ids_t = torch.tensor([ids])
    types = torch.zeros_like(ids_t)
    types[ids_t == model.config.image_token_id] = 1
    types[ids_t == model.config.video_token_id] = 2
    kw = {"input_ids": ids_t, "mm_token_type_ids": types}
    if images:
        kw.update(image_proc(images=list(images), return_tensors="pt"))
    if videos:
        kw.update(video_proc(videos=list(videos), return_tensors="pt", do_sample_frames=False,
                             cap_pixels_per_frame=False))
        if "Qwen2_5" in type(model).__name__:
            kw["second_per_grid_ts"] = torch.tensor([2 / (fps or 2.0)] * len(videos))
    return kw


def hf_check(hf_parts, out, images=(), videos=(), fps=None):
    ids = out.prompt_token_ids + out.outputs[0].token_ids
    with torch.no_grad():
        logits = hf_parts[0](**hf_inputs(hf_parts, ids, images, videos, fps)).logits[0]
    check_greedy_against_hf(torch.log_softmax(logits.float(), -1), len(out.prompt_token_ids), out.outputs[0])


# ---- parity ------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ARCHS)
def test_images_video_embeddings_and_text_in_one_batch(arch, llms, hf):
    llm, parts = llms(arch), hf(arch)
    model, image_proc, _ = parts
    one = rand_image(120, 90, 1)
    wide, tall = rand_image(300, 70, 2), rand_image(60, 200, 3)  # different sizes and aspect ratios
    video = rand_video(4, 140, 112, 4)
    fps = 1.0  # time-aligned positions (Qwen2.5-VL): 2 s per temporal patch
    emb_images = [rand_image(100, 100, 5), rand_image(150, 60, 6)]
    pix = image_proc(images=emb_images, return_tensors="pt")
    with torch.no_grad():
        feats = model.model.get_image_features(pixel_values=pix["pixel_values"], image_grid_thw=pix["image_grid_thw"])
    embeds = torch.cat(list(getattr(feats, "pooler_output", feats)))
    prompts = [
        {"prompt": chat(f"{IMAGE}what is this"), "multi_modal_data": {"image": one}},
        {"prompt": chat(f"first {IMAGE} then {IMAGE} compare"), "multi_modal_data": {"image": [wide, tall]}},
        chat("a plain text prompt in the same batch"),
        {"prompt": chat(f"{VIDEO}what happens"), "multi_modal_data": {"video": VideoFrames(video, fps=fps)}},
        {"prompt": chat(f"{IMAGE} and {IMAGE} from embeddings"),
         "multi_modal_data": {"image": {"image_embeds": embeds, "image_grid_thw": pix["image_grid_thw"]}}},
        {"prompt": chat(f"{IMAGE} and {IMAGE} from embeddings"), "multi_modal_data": {"image": emb_images}},
    ]
    encoded_before = llm.llm_engine.runner.encoder_cache.num_encoded_items
    outs = llm.generate(prompts, GREEDY, use_tqdm=False)
    # every new item went through its encoder once (embeddings count as items too)
    assert llm.llm_engine.runner.encoder_cache.num_encoded_items - encoded_before == 8
    hf_check(parts, outs[0], [one])
    hf_check(parts, outs[1], [wide, tall])
    hf_check(parts, outs[2])
    hf_check(parts, outs[3], videos=[video], fps=fps)
    hf_check(parts, outs[4], emb_images)
    # embeddings computed elsewhere give what the pixels give
    assert outs[4].outputs[0].token_ids == outs[5].outputs[0].token_ids
    for a, b in zip(outs[4].outputs[0].logprobs, outs[5].outputs[0].logprobs):
        assert all(abs(a[t].logprob - b[t].logprob) < 1e-4 for t in a)
    # each image's placeholder expanded to its merged patches; the images matter, and so does their order
    n_image = outs[1].prompt_token_ids.count(model.config.image_token_id)
    assert n_image == sum(int(g.prod()) // 4 for g in image_proc(images=[wide, tall], return_tensors="pt")["image_grid_thw"])
    swapped = llm.generate({"prompt": chat(f"first {IMAGE} then {IMAGE} compare"),
                            "multi_modal_data": {"image": [tall, wide]}}, GREEDY, use_tqdm=False)[0]
    assert swapped.outputs[0].logprobs[0] != outs[1].outputs[0].logprobs[0]


def test_mrope_positions_match_hf_get_rope_index(llms, hf):
    """The processor's positions and delta for a prompt with images and a time-scaled video equal
    HF's get_rope_index; decoding then continues at p + delta."""
    llm, (model, _, _) = llms("qwen2_5_vl"), hf("qwen2_5_vl")
    engine = llm.llm_engine
    tok = llm.get_tokenizer()
    ids = tok(chat(f"a {IMAGE} b {VIDEO} c {IMAGE} d")).input_ids
    video = VideoFrames(rand_video(6, 140, 112, 7), fps=2.0)  # 1 s per temporal patch: 2 positions
    ids, items = engine.process_multimodal(ids, {"image": [rand_image(90, 60, 8), rand_image(60, 90, 9)],
                                                 "video": video})
    positions, delta = engine.mm_processor.prompt_positions(ids, items)
    ids_t = torch.tensor([ids])
    types = (ids_t == model.config.image_token_id).long() + 2 * (ids_t == model.config.video_token_id).long()
    grid = lambda m: torch.stack([it.data[f"{m}_grid_thw"] for it in items if it.modality == m])  # noqa: E731
    ref, ref_delta = model.model.get_rope_index(ids_t, mm_token_type_ids=types, image_grid_thw=grid("image"),
                                                video_grid_thw=grid("video"), second_per_grid_ts=torch.tensor([1.0]))
    assert torch.equal(positions, ref[:, 0]) and delta == int(ref_delta)
    video_item = next(it for it in items if it.modality == "video")
    temporal = positions[0, video_item.offset:video_item.end].unique()
    assert (temporal - temporal[0]).tolist() == [0, 2, 4]  # 3 temporal patches, 2 positions apart


# ---- preprocessing -----------------------------------------------------------------------------
def test_preprocessing_equals_hf_processors(llms, hf):
    proc = llms("qwen2_vl").llm_engine.mm_processor
    _, image_proc, video_proc = hf("qwen2_vl")
    images = [rand_image(33, 47, 1), rand_image(640, 480, 2), np.array(rand_image(300, 70, 3)), rand_image(28, 28, 4)]
    for kwargs in ({}, {"max_pixels": 28 * 28 * 6}, {"min_pixels": 28 * 28 * 12, "max_pixels": 28 * 28 * 18}):
        ours = proc.process_raw("image", images, kwargs)
        size = {"shortest_edge": kwargs.get("min_pixels", 28 * 28 * 4), "longest_edge": kwargs.get("max_pixels", 28 * 28 * 20)}
        ref = image_proc(images=images, size=size, return_tensors="pt")
        assert torch.equal(torch.stack([it.data["image_grid_thw"] for it in ours]), ref["image_grid_thw"])
        pixels = torch.cat([it.data["pixel_values"] for it in ours])
        assert pixels.shape == ref["pixel_values"].shape
        assert (pixels - ref["pixel_values"]).abs().max() < 1e-5
        assert [it.num_tokens for it in ours] == (ref["image_grid_thw"].prod(-1) // 4).tolist()
    # videos: an odd frame count is padded to the temporal patch (2) with the last frame, as HF does
    videos = [rand_video(3, 140, 112, 5), rand_video(4, 90, 200, 6)]
    frames_as_pil = [Image.fromarray(f) for f in videos[0]]
    ours = proc.process_raw("video", [frames_as_pil, VideoFrames(videos[1], fps=3.0)], {})
    ref = video_proc(videos=videos, return_tensors="pt", do_sample_frames=False, cap_pixels_per_frame=False)
    assert torch.equal(torch.stack([it.data["video_grid_thw"] for it in ours]), ref["video_grid_thw"])
    assert ref["video_grid_thw"][0, 0] == 2
    pixels = torch.cat([it.data["pixel_values_videos"] for it in ours])
    assert (pixels - ref["pixel_values_videos"]).abs().max() < 1e-5
    assert [float(it.data["second_per_grid_t"]) for it in ours] == [1.0, pytest.approx(2 / 3)]


def test_mm_processor_kwargs_per_request_and_per_engine(ckpt, llms, hf):
    llm = llms("qwen2_vl")
    img = rand_image(400, 300, 11)
    image_id = llm.llm_engine.mm_processor.placeholder_token_id("image")
    image_proc = hf("qwen2_vl")[1]

    def n_tokens(out):
        return out.prompt_token_ids.count(image_id)

    def hf_tokens(max_pixels):
        size = {"shortest_edge": 28 * 28 * 4, "longest_edge": max_pixels}
        return int(image_proc(images=[img], size=size, return_tensors="pt")["image_grid_thw"].prod()) // 4

    prompt = {"prompt": chat(f"{IMAGE}look"), "multi_modal_data": {"image": img}}
    default = llm.generate(prompt, GREEDY, use_tqdm=False)[0]
    small = llm.generate({**prompt, "mm_processor_kwargs": {"max_pixels": 28 * 28 * 6}}, GREEDY, use_tqdm=False)[0]
    assert n_tokens(default) == hf_tokens(28 * 28 * 20) > n_tokens(small) == hf_tokens(28 * 28 * 6)
    assert default.outputs[0].logprobs[0] != small.outputs[0].logprobs[0]  # another resolution, another item
    engine_wide = LLM(ckpt("qwen2_vl"), dtype="float32", max_model_len=512, num_kv_blocks=64,
                      mm_processor_kwargs={"max_pixels": 28 * 28 * 6})
    out = engine_wide.generate(prompt, GREEDY, use_tqdm=False)[0]
    assert n_tokens(out) == n_tokens(small) and out.outputs[0].token_ids == small.outputs[0].token_ids
    with pytest.raises(ValueError, match=r"max_pixels 31360 is above this engine's 15680, for which memory was profiled"):
        llm.generate({**prompt, "mm_processor_kwargs": {"max_pixels": 28 * 28 * 40}}, use_tqdm=False)
    proc = llm.llm_engine.mm_processor
    wider = type(proc)(proc.model_config, proc.tokenizer, {"max_pixels": 28 * 28 * 40})
    assert wider.max_tokens_per_item("image") == 40 > proc.max_tokens_per_item("image")  # profiled as set
    with pytest.raises(ValueError, match=r"unknown mm_processor_kwargs \['max_pixel'\]"):
        llm.generate({**prompt, "mm_processor_kwargs": {"max_pixel": 100}}, use_tqdm=False)


def test_video_sampling_kwargs_are_the_loaders_and_the_processor_ignores_them(ckpt, llms, tmp_path):
    """num_frames / max_frames steer the video loader; set per engine or per prompt they also reach
    the processor, which must take them without complaint (it used to refuse them)."""
    from clips import mp4_bytes

    frames = VideoFrames(rand_video(4, 84, 56, 81), fps=2.0)
    prompt = {"prompt": chat(f"{VIDEO}what"), "multi_modal_data": {"video": frames}}
    want = llms("qwen2_vl").generate(prompt, GREEDY, use_tqdm=False)[0]
    per_prompt = llms("qwen2_vl").generate({**prompt, "mm_processor_kwargs": {"num_frames": 2, "max_frames": 3}},
                                           GREEDY, use_tqdm=False)[0]
    assert per_prompt.outputs[0].token_ids == want.outputs[0].token_ids  # already-sampled frames: no effect
    llm = LLM(ckpt("qwen2_vl"), dtype="float32", max_model_len=512, num_kv_blocks=64,
              mm_processor_kwargs={"num_frames": 4, "max_frames": 8}, allowed_local_media_path=str(tmp_path))
    got = llm.generate(prompt, GREEDY, use_tqdm=False)[0]
    assert got.prompt_token_ids == want.prompt_token_ids and got.outputs[0].token_ids == want.outputs[0].token_ids
    # ... and the engine's num_frames samples a video URL: 3 s at 10 fps -> 4 frames, 2 temporal patches
    (tmp_path / "clip.mp4").write_bytes(mp4_bytes(num_frames=30, rate=10, width=56, height=56))
    out = llm.chat([{"role": "user", "content": [{"type": "video_url", "video_url": {"url": (tmp_path / "clip.mp4").as_uri()}},
                                                 {"type": "text", "text": "what"}]}], GREEDY, use_tqdm=False)[0]
    video_id = llm.llm_engine.mm_processor.placeholder_token_id("video")
    assert out.prompt_token_ids.count(video_id) == 2 * 2 * 2  # 2 frame pairs x (56/28)^2 merged tokens


# ---- the engine around it ----------------------------------------------------------------------
@pytest.mark.parametrize("arch", ARCHS)
def test_chunked_prefill_through_an_image_equals_unchunked(arch, ckpt, llms):
    llm = LLM(ckpt(arch), dtype="float32", max_model_len=512, max_num_batched_tokens=7, num_kv_blocks=64,
              limit_mm_per_prompt={"image": 2, "video": 1})
    prompts = [{"prompt": chat(f"look {IMAGE} here and {VIDEO}"),
                "multi_modal_data": {"image": rand_image(200, 150, 31), "video": rand_video(2, 84, 84, 32)}},
               chat("text alongside")]
    chunked = llm.generate(prompts, GREEDY, use_tqdm=False)
    whole = llms(arch).generate(prompts, GREEDY, use_tqdm=False)
    assert llm.llm_engine.runner.encoder_cache.num_encoded_items == 2  # once each, though split over steps
    for a, b in zip(chunked, whole):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids
        for x, y in zip(a.outputs[0].logprobs, b.outputs[0].logprobs):
            assert all(abs(x[t].logprob - y[t].logprob) < 1e-4 for t in x)


def test_prefix_cache_reuses_image_blocks_with_their_positions(ckpt):
    llm = LLM(ckpt("qwen2_vl"), dtype="float32", max_model_len=512, num_kv_blocks=64, block_size=8)
    stats = llm.llm_engine.stats
    img, other = rand_image(200, 150, 41), rand_image(200, 150, 42)
    prompt = chat(f"{IMAGE} the cat runs to the river and the dog")

    def run(image):
        before = stats.num_prompt_tokens_computed
        out = llm.generate({"prompt": prompt, "multi_modal_data": {"image": image}}, GREEDY, use_tqdm=False)[0]
        return out, stats.num_prompt_tokens_computed - before

    first, n_first = run(img)
    again, n_again = run(img.copy())
    miss, n_miss = run(other)
    assert again.num_cached_tokens >= 24 and n_again < n_first
    assert again.outputs[0].token_ids == first.outputs[0].token_ids
    for a, b in zip(again.outputs[0].logprobs, first.outputs[0].logprobs):
        assert all(abs(a[t].logprob - b[t].logprob) < 1e-4 for t in a)
    assert n_miss == n_first


def test_v5_key_layout_loads_the_same_model(ckpt, llms):
    prompt = {"prompt": chat(f"{IMAGE}what"), "multi_modal_data": {"image": rand_image(90, 120, 51)}}
    v5 = LLM(ckpt("qwen2_vl", "v5"), dtype="float32", max_model_len=512, num_kv_blocks=64)
    a = v5.generate(prompt, GREEDY, use_tqdm=False)[0]
    b = llms("qwen2_vl").generate(prompt, GREEDY, use_tqdm=False)[0]
    assert a.outputs[0].token_ids == b.outputs[0].token_ids


def test_tied_embeddings_v5_layout_against_hf(tmp_path):
    """Qwen2-VL-2B ties lm_head to the embeddings; transformers 5 keeps that flag on the outer config."""
    d = make_qwen2_vl_checkpoint(str(tmp_path), arch="qwen2_5_vl", layout="v5", tie_word_embeddings=True, seed=3)
    parts = (transformers.Qwen2_5_VLForConditionalGeneration.from_pretrained(d, dtype=torch.float32).eval(),
             AutoImageProcessor.from_pretrained(d), None)
    img = rand_image(150, 100, 52)
    out = LLM(d, dtype="float32", max_model_len=256, num_kv_blocks=32).generate(
        {"prompt": chat(f"{IMAGE}what"), "multi_modal_data": {"image": img}}, GREEDY, use_tqdm=False)[0]
    hf_check(parts, out, [img])


def test_preemption_recomputes_with_the_same_positions(ckpt, llms):
    """A KV cache too small for the batch: sequences are preempted and recomputed (prompt and
    output tokens alike), and still decode what an unconstrained engine decodes."""
    small = LLM(ckpt("qwen2_vl"), dtype="float32", max_model_len=96, num_kv_blocks=6, block_size=16)
    params = SamplingParams(temperature=0.0, max_tokens=24, logprobs=5, ignore_eos=True)
    prompts = [{"prompt": chat(f"{IMAGE} number {i} the cat runs"),
                "multi_modal_data": {"image": rand_image(200 + 20 * i, 150, 70 + i)}} for i in range(3)]
    got = small.generate(prompts, params, use_tqdm=False)
    assert small.llm_engine.stats.num_preemptions > 0
    want = llms("qwen2_vl").generate(prompts, params, use_tqdm=False)
    for a, b in zip(got, want):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids
        for x, y in zip(a.outputs[0].logprobs, b.outputs[0].logprobs):
            assert all(abs(x[t].logprob - y[t].logprob) < 1e-4 for t in x)


def test_profiling_items_are_the_largest_allowed(llms):
    engine = llms("qwen2_5_vl").llm_engine
    proc = engine.mm_processor
    limits = {"image": 2, "video": 1}
    _, items = proc.apply(*proc.dummy_request(limits), limits)
    assert [it.modality for it in items] == ["image", "image", "video"]
    assert all(it.length == proc.max_tokens_per_item(it.modality) for it in items)
    assert proc.max_tokens_per_item("image") == 20  # max_pixels = 20 merged patches
    embeds = engine.runner.encode_dummy_items(items)
    assert [e.shape[0] for e in embeds] == [it.length for it in items]


def test_chat_puts_the_vision_tokens(llms):
    from shapes import data_url

    llm = llms("qwen2_vl")
    img = rand_image(90, 90, 61)
    messages = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url(img)}},
                                             {"type": "text", "text": "what is it"}]}]
    out = llm.chat(messages, GREEDY, use_tqdm=False)[0]
    ids = llm.get_tokenizer()("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n" + chat(f"{IMAGE}what is it"),
                              add_special_tokens=False).input_ids
    gen = llm.generate({"prompt_token_ids": ids, "multi_modal_data": {"image": img}}, GREEDY, use_tqdm=False)[0]
    assert out.prompt_token_ids == gen.prompt_token_ids
    assert out.outputs[0].token_ids == gen.outputs[0].token_ids


# ---- bad input ---------------------------------------------------------------------------------
def test_errors_name_the_problem(llms):
    llm = llms("qwen2_vl")
    img = rand_image(64, 64, 1)
    grid = torch.tensor([[1, 4, 4]])  # 4 merged tokens
    with pytest.raises(ValueError, match=r"image_embeds has 5 rows but image_grid_thw \[\[1, 4, 4\]\] makes 4 tokens"):
        llm.generate({"prompt": chat(IMAGE), "multi_modal_data": {"image": {"image_embeds": torch.zeros(5, 64),
                                                                            "image_grid_thw": grid}}}, use_tqdm=False)
    with pytest.raises(ValueError, match=r"image_embeds must be a tensor \[tokens, 64\], got \(4, 32\)"):
        llm.generate({"prompt": chat(IMAGE), "multi_modal_data": {"image": {"image_embeds": torch.zeros(4, 32),
                                                                            "image_grid_thw": grid}}}, use_tqdm=False)
    with pytest.raises(ValueError, match="image_grid_thw must hold positive integers"):
        llm.generate({"prompt": chat(IMAGE), "multi_modal_data": {"image": {"image_embeds": torch.zeros(4, 64),
                                                                            "image_grid_thw": torch.tensor([4, 4])}}},
                     use_tqdm=False)
    with pytest.raises(ValueError, match="embeddings need their grids"):
        llm.generate({"prompt": chat(IMAGE), "multi_modal_data": {"image": torch.zeros(4, 64)}}, use_tqdm=False)
    with pytest.raises(ValueError, match=r"got keys \['image_embeds'\]"):
        llm.generate({"prompt": chat(IMAGE), "multi_modal_data": {"image": {"image_embeds": torch.zeros(4, 64)}}},
                     use_tqdm=False)
    with pytest.raises(ValueError, match=r"2 image placeholder.*1 image.*<\|vision_start\|><\|image_pad\|>"):
        llm.generate({"prompt": chat(IMAGE + IMAGE), "multi_modal_data": {"image": img}}, use_tqdm=False)
    with pytest.raises(ValueError, match="1 video placeholder.*0 video"):
        llm.generate(chat(VIDEO), use_tqdm=False)
    with pytest.raises(ValueError, match="2 videos in one prompt, more than the limit of 1"):
        llm.generate({"prompt": chat(VIDEO), "multi_modal_data": {"video": [rand_video(2, 56, 56, 1)] * 2}},
                     use_tqdm=False)
    with pytest.raises(ValueError, match="video 0: unsupported type str"):
        llm.generate({"prompt": chat(VIDEO), "multi_modal_data": {"video": ["clip.mp4"]}}, use_tqdm=False)
    assert llm.generate(chat("still fine"), SamplingParams(max_tokens=2), use_tqdm=False)[0].outputs[0].token_ids


def test_vision_rotary_tables_cached_per_frame_size():
    """The ViT's rotary tables come from a small cache per frame size: the same values as building
    them from the patches' positions, for images and videos of mixed sizes, with at most 8 sizes kept."""
    from types import SimpleNamespace

    from vlmserve.models.qwen2_vl import Qwen2VisionTransformer, vision_positions

    vcfg = SimpleNamespace(embed_dim=64, num_heads=4, spatial_merge_size=2, patch_size=14, temporal_patch_size=2,
                           mlp_ratio=2, hidden_act="quick_gelu", depth=1, hidden_size=32)
    tower = Qwen2VisionTransformer(vcfg)
    cpu = torch.device("cpu")
    for grids in ([(1, 74, 74)], [(1, 4, 6), (2, 4, 6), (1, 8, 2)], [(3, 2, 2)], [(1, 74, 74), (1, 4, 6)]):
        want = tower.rotary(vision_positions(grids, 2))
        got = tower.rotary_tables(grids, cpu)
        assert all(torch.equal(a, b) for a, b in zip(got, want))
    assert len(tower._frame_rotary) == 4
    for h in range(2, 24, 2):
        tower.rotary_tables([(1, h, 2)], cpu)
    assert len(tower._frame_rotary) == 8 and (22, 2, "cpu") in tower._frame_rotary
