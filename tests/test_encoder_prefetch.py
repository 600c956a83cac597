"""Encoder prefetch (on unless VLMSERVE_ENCODER_PREFETCH=0): an idle engine encodes the next request's media
before scheduling its step, and `LLM.generate` with one prompt with media starts its encoders before
tokenizing the prompt. The outputs (tokens and logprobs) are the engine's without it, every image
still goes through the encoder once, and the step's prefetch takes only the items that the first
chunk reaches past the prefix cache."""
import numpy as np
import pytest
import torch
from PIL import Image

from vlmserve import LLM, SamplingParams
from vlmserve.multimodal import processing
from vlmserve.multimodal import device_pixels
from vlmserve.multimodal.device_pixels import DevicePixels
from vlmserve.testing.checkpoints import make_qwen2_vl_checkpoint

GREEDY = SamplingParams(temperature=0.0, max_tokens=6, logprobs=3, ignore_eos=True)


def image(seed, w=64, h=48):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def engine(llava_dir, monkeypatch, prefetch: bool, **kw):
    monkeypatch.setenv("VLMSERVE_ENCODER_PREFETCH", "1" if prefetch else "0")
    return LLM(llava_dir, dtype="float32", max_model_len=512, limit_mm_per_prompt={"image": 2}, **kw)


def outputs(outs):
    return [(o.outputs[0].token_ids, [sorted(lp.items()) for lp in o.outputs[0].logprobs]) for o in outs]


def assert_close_outputs(a, b):
    """Same tokens and top logprobs to 1e-4: a batch of images encoded in one call and one by one
    differ in the last float bits."""
    for (ids_a, lps_a), (ids_b, lps_b) in zip(outputs(a), outputs(b), strict=True):
        assert ids_a == ids_b
        for la, lb in zip(lps_a, lps_b, strict=True):
            assert [t for t, _ in la] == [t for t, _ in lb]
            np.testing.assert_allclose([x.logprob for _, x in la], [x.logprob for _, x in lb], atol=1e-4)


def test_same_outputs_each_image_encoded_once(llava_dir, monkeypatch):
    prompts = [
        {"prompt": "<image> what is this", "multi_modal_data": {"image": image(1)}},
        {"prompt": "two <image> and <image> here", "multi_modal_data": {"image": [image(2), image(3, 40, 70)]}},
        {"prompt": "plain text only"},
    ]
    runs = {}
    for prefetch in (False, True):
        llm = engine(llava_dir, monkeypatch, prefetch)
        got = [llm.generate(p, GREEDY, use_tqdm=False)[0] for p in prompts]  # one at a time: idle engine
        got += llm.generate([{**prompts[0], "multi_modal_data": {"image": image(4)}},
                             {**prompts[0], "multi_modal_data": {"image": image(5)}}], GREEDY, use_tqdm=False)
        runner = llm.llm_engine.runner
        runs[prefetch] = (got, runner.encoder_cache.num_encoded_items, runner.num_prefetched_items)
    # one prompt at a time: the same computation, to the bit
    assert outputs(runs[True][0][:3]) == outputs(runs[False][0][:3])
    # the batch of two: with prefetch its images go through the encoder one by one, not together
    assert_close_outputs(runs[True][0][3:], runs[False][0][3:])
    assert runs[False][1] == runs[True][1] == 5  # five distinct images, each encoded once
    assert runs[False][2] == 0
    # the three lone image prompts' items (1 + 2), and the first of the batch of two: the second
    # waits behind a running sequence, and is encoded in its step as before
    assert runs[True][2] == 4


def run_engine(llm, request_id, prompt):
    """A request through the engine's own API (as the server queues them): no encoding before it."""
    eng = llm.llm_engine
    ids, items = eng.process_multimodal(llm.get_tokenizer()(prompt["prompt"]).input_ids, prompt["multi_modal_data"])
    eng.add_request(request_id, ids, GREEDY, mm_items=items)
    outs = []
    while eng.has_unfinished_requests():
        outs += eng.step()
    return outs[0]


def test_only_what_the_first_chunk_reaches(llava_dir, monkeypatch):
    llm = engine(llava_dir, monkeypatch, True, max_num_batched_tokens=24)
    runner = llm.llm_engine.runner
    late = {"prompt": "word " * 30 + "<image>", "multi_modal_data": {"image": image(6)}}
    out_late = run_engine(llm, "late", late)
    assert runner.num_prefetched_items == 0 and runner.encoder_cache.num_encoded_items == 1
    early = {"prompt": "look <image> here", "multi_modal_data": {"image": image(7)}}
    out_early = run_engine(llm, "early", early)
    assert runner.num_prefetched_items == 1 and runner.encoder_cache.num_encoded_items == 2

    ref = engine(llava_dir, monkeypatch, False, max_num_batched_tokens=24)
    assert outputs([out_late, out_early]) == outputs([ref.generate(p, GREEDY, use_tqdm=False)[0] for p in (late, early)])


def test_lone_prompt_encoded_before_it_is_tokenized(llava_dir, monkeypatch):
    """generate with one prompt with media: its image is encoded before the prompt is tokenized, past
    the first chunk too (all of a lone prompt's items come before its first token)."""
    llm = engine(llava_dir, monkeypatch, True, max_num_batched_tokens=24)
    runner = llm.llm_engine.runner
    seen = []
    tokenize = llm._prompt_token_ids

    def recording(prompt):
        seen.append(runner.encoder_cache.num_encoded_items)
        return tokenize(prompt)

    monkeypatch.setattr(llm, "_prompt_token_ids", recording)
    late = {"prompt": "word " * 30 + "<image>", "multi_modal_data": {"image": image(6)}}
    got = llm.generate([late, {"prompt": "plain text"}], GREEDY, use_tqdm=False)
    assert seen == [0, 1]  # the text prompt first (before any processing), then the image prompt
    assert runner.num_prefetched_items == 1 and runner.encoder_cache.num_encoded_items == 1
    ref = engine(llava_dir, monkeypatch, False, max_num_batched_tokens=24)
    assert outputs(got) == outputs(ref.generate([late, {"prompt": "plain text"}], GREEDY, use_tqdm=False))
    assert ref.llm_engine.runner.num_prefetched_items == 0
    # a bad prompt still fails alone, named, after its image was encoded
    with pytest.raises(ValueError, match="prompt 0: .*placeholder"):
        llm.generate({"prompt": "no placeholder", "multi_modal_data": {"image": image(9)}}, GREEDY, use_tqdm=False)
    assert not llm.llm_engine.has_unfinished_requests()
    assert_close_outputs(llm.generate(late, GREEDY, use_tqdm=False), got[:1])  # now a prefix-cache hit


def test_lone_prompt_pixels_staged_by_several_threads(llava_dir, monkeypatch):
    """Device pixels (on the CPU here, as a GPU engine hands them over): a lone prompt's image, which
    holds up its encoder, is copied out of the caller's memory by several threads; the pipeline's
    images by their worker thread each. Every image is staged before its request is queued."""
    llm = engine(llava_dir, monkeypatch, True)
    eng = llm.llm_engine
    eng.mm_processor.media_device = torch.device("cpu")
    placed, parallel = [], []
    place, copy = eng.place_media, device_pixels.copy_in_parallel
    monkeypatch.setattr(eng, "place_media", lambda ids, media: placed.append(media) or place(ids, media))
    monkeypatch.setattr(device_pixels, "copy_in_parallel", lambda *a: parallel.append(a[2]) or copy(*a))

    def pixels(i):
        return placed[i].items["image"][0].data["pixel_values"]

    prompt = "<image> " + "the cat runs to the river " * 4
    img = image(11)
    got = llm.generate({"prompt": prompt, "multi_modal_data": {"image": img}}, GREEDY, use_tqdm=False)
    assert isinstance(pixels(0), DevicePixels) and pixels(0).is_staged and parallel == [4]
    got += llm.generate([{"prompt": prompt, "multi_modal_data": {"image": image(12 + i)}} for i in range(2)],
                        GREEDY, use_tqdm=False)
    assert pixels(1).is_staged and pixels(2).is_staged and parallel == [4]
    ref = engine(llava_dir, monkeypatch, False)  # preprocessed on the host: the same numbers on the CPU
    want = [ref.generate({"prompt": prompt, "multi_modal_data": {"image": im}}, GREEDY, use_tqdm=False)[0]
            for im in (img, image(12), image(13))]
    assert outputs(got[:1]) == outputs(want[:1])
    assert_close_outputs(got[1:], want[1:])  # a batch of two: the last float bits differ


def test_new_image_hashed_while_its_encoder_runs(llava_dir, monkeypatch):
    """A lone prompt's image of content not seen lately is hashed after its encoder was launched; one
    seen before is hashed first (a cache may hold it: here the prefix cache does); an image given twice
    is encoded once. The outputs are the engine's without encoding ahead."""
    llm = engine(llava_dir, monkeypatch, True)
    runner = llm.llm_engine.runner
    encoder_calls, encoded_at_hash = [], []  # images through the encoder when each image is hashed
    hash_item, embed = processing.hash_item, runner.model.embed_multimodal

    def recording(value, **extra):
        if isinstance(value, Image.Image):
            encoded_at_hash.append(sum(encoder_calls))
        return hash_item(value, **extra)

    def counted(modality, data):
        encoder_calls.append(len(data))
        return embed(modality, data)

    monkeypatch.setattr(processing, "hash_item", recording)
    monkeypatch.setattr(runner.model, "embed_multimodal", counted)
    img, other = image(21), image(22)
    one = {"prompt": "<image> " + "the cat runs to the river " * 4, "multi_modal_data": {"image": img}}
    twice = {"prompt": "two <image> and <image> here", "multi_modal_data": {"image": [other, other.copy()]}}
    got = llm.generate(one, GREEDY, use_tqdm=False)
    assert encoded_at_hash == [1]  # after its encoder
    runner.encoder_cache.entries.clear()
    got += llm.generate({**one, "multi_modal_data": {"image": img.copy()}}, GREEDY, use_tqdm=False)
    assert encoded_at_hash == [1, 1] and sum(encoder_calls) == 1  # a prefix-cache hit
    got += llm.generate(twice, GREEDY, use_tqdm=False)
    assert encoded_at_hash == [1, 1, 1, 2]  # the second copy at once, then the first after the encoder
    assert sum(encoder_calls) == runner.encoder_cache.num_encoded_items == runner.num_prefetched_items == 2
    ref = engine(llava_dir, monkeypatch, False)
    assert outputs(got) == outputs([ref.generate(p, GREEDY, use_tqdm=False)[0] for p in (one, one, twice)])


def test_no_prefetch_behind_a_prefix_cache_hit(llava_dir, monkeypatch):
    llm = engine(llava_dir, monkeypatch, True)
    runner = llm.llm_engine.runner
    prompt = "<image> " + "the cat runs to the river " * 4
    img = image(8)
    first = llm.generate({"prompt": prompt, "multi_modal_data": {"image": img}}, GREEDY, use_tqdm=False)[0]
    assert runner.num_prefetched_items == 1
    runner.encoder_cache.entries.clear()  # the embeddings are gone; the KV cache still holds the prompt
    again = llm.generate({"prompt": prompt, "multi_modal_data": {"image": img.copy()}}, GREEDY, use_tqdm=False)[0]
    assert again.num_cached_tokens > 64  # the image's blocks came from the prefix cache
    assert runner.num_prefetched_items == 1 and runner.encoder_cache.num_encoded_items == 1
    assert outputs([again]) == outputs([first])
    # looking ahead at the prefix cache does not count as a query in its hit rate
    ref = engine(llava_dir, monkeypatch, False)
    for im in (img, img.copy()):
        ref.generate({"prompt": prompt, "multi_modal_data": {"image": im}}, GREEDY, use_tqdm=False)
    bm, ref_bm = llm.llm_engine.block_manager, ref.llm_engine.block_manager
    assert (bm.num_queried_tokens, bm.num_hit_tokens) == (ref_bm.num_queried_tokens, ref_bm.num_hit_tokens)


def test_qwen2_vl_with_async_scheduling(tmp_path_factory, monkeypatch):
    """M-RoPE and Qwen2-VL's own encoder, with the step launched before the last one's results."""
    d = make_qwen2_vl_checkpoint(str(tmp_path_factory.mktemp("qwen2_vl_prefetch")))
    prompts = [{"prompt": f"<|vision_start|><|image_pad|><|vision_end|>describe {i}",
                "multi_modal_data": {"image": image(10 + i, 56 + 28 * i, 84)}} for i in range(3)]
    runs = {}
    for prefetch in (False, True):
        monkeypatch.setenv("VLMSERVE_ENCODER_PREFETCH", "1" if prefetch else "0")
        llm = LLM(d, dtype="float32", max_model_len=512, async_scheduling=True)
        runs[prefetch] = [llm.generate(p, GREEDY, use_tqdm=False)[0] for p in prompts]
        assert llm.llm_engine.runner.num_prefetched_items == (3 if prefetch else 0)
        assert llm.llm_engine.runner.encoder_cache.num_encoded_items == 3
    assert outputs(runs[True]) == outputs(runs[False])
