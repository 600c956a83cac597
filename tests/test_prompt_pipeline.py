"""LLM.generate processes the prompts' media in a thread pool and steps the engine while later
prompts are still being processed; outputs stay in prompt order and equal to one-at-a-time runs; a
bad prompt raises an error naming it and leaves the engine clean."""
import threading

import numpy as np
import pytest
from PIL import Image

from vlmserve import LLM, SamplingParams

GREEDY = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)


def rand_image(w, h, seed):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def llm(llava_dir):
    return LLM(llava_dir, dtype="float32", max_model_len=256)


def prompts(n):
    return [{"prompt": f"the cat <image> runs {i}", "multi_modal_data": {"image": rand_image(60 + 7 * i, 50, i)}}
            for i in range(n)]


@pytest.mark.parametrize("workers", ["0", "3"])  # 0: every prompt processed serially, in this thread
def test_same_outputs_as_one_at_a_time(llm, monkeypatch, workers):
    monkeypatch.setenv("VLMSERVE_MEDIA_WORKERS", workers)
    ps = prompts(5)
    ps.insert(2, "a text prompt between them")
    outs = llm.generate(ps, GREEDY, use_tqdm=False)
    for p, o in zip(ps, outs):
        alone = llm.generate(p, GREEDY, use_tqdm=False)[0]
        assert o.prompt_token_ids == alone.prompt_token_ids
        assert o.outputs[0].token_ids == alone.outputs[0].token_ids


def test_media_processed_in_parallel(llm, monkeypatch):
    """Two prompts' media are in the processor at the same time (a barrier of two passes)."""
    monkeypatch.setenv("VLMSERVE_MEDIA_WORKERS", "2")
    engine = llm.llm_engine
    barrier = threading.Barrier(2, timeout=20)
    real = engine.process_multimodal

    def process(ids, mm_data, kwargs=None):
        if mm_data:
            barrier.wait()
        return real(ids, mm_data, kwargs)

    monkeypatch.setattr(engine, "process_multimodal", process)
    outs = llm.generate(prompts(2), GREEDY, use_tqdm=False)
    assert [len(o.outputs[0].token_ids) for o in outs] == [4, 4]


def test_engine_steps_before_the_last_prompt_is_ready(llm, monkeypatch):
    monkeypatch.setenv("VLMSERVE_MEDIA_WORKERS", "2")
    engine = llm.llm_engine
    stepped = threading.Event()
    real_process, real_step = engine.process_multimodal, engine.step
    last = prompts(3)[-1]["multi_modal_data"]["image"]

    def process(ids, mm_data, kwargs=None):
        if mm_data and mm_data["image"] is last:
            assert stepped.wait(20), "the engine did not step while the last prompt was being processed"
        return real_process(ids, mm_data, kwargs)

    def step(*a, **kw):
        stepped.set()
        return real_step(*a, **kw)

    monkeypatch.setattr(engine, "process_multimodal", process)
    monkeypatch.setattr(engine, "step", step)
    ps = prompts(3)
    ps[-1]["multi_modal_data"]["image"] = last
    outs = llm.generate(ps, GREEDY, use_tqdm=False)
    assert [len(o.outputs[0].token_ids) for o in outs] == [4, 4, 4]


@pytest.mark.parametrize("bad, message", [
    ({"prompt": "<image> two images", "multi_modal_data": {"image": [rand_image(8, 8, 0)] * 2}},
     r"prompt 3: 2 images in one prompt, more than the limit of 1"),
    ({"prompt": "<image> bytes", "multi_modal_data": {"image": b"not an image"}},
     r"prompt 3: image 0: unsupported type bytes"),
    ({"prompt_token_ids": []}, r"prompt 3: the prompt is empty"),
    ("", r"prompt 3: the prompt is empty"),
])
def test_bad_prompt_is_named_and_engine_left_clean(llm, bad, message):
    ps = prompts(5)
    ps.insert(3, bad)
    with pytest.raises(ValueError, match=message):
        llm.generate(ps, GREEDY, use_tqdm=False)
    engine = llm.llm_engine
    assert not engine.has_unfinished_requests()
    assert not engine.scheduler.has_unfinished()
    out = llm.generate(prompts(2), GREEDY, use_tqdm=False)
    assert [len(o.outputs[0].token_ids) for o in out] == [4, 4]


def test_error_after_steps_aborts_queued_requests(llm, monkeypatch):
    """The bad prompt's processing fails after the engine has run steps of the earlier ones."""
    monkeypatch.setenv("VLMSERVE_MEDIA_WORKERS", "1")
    engine = llm.llm_engine
    stepped = threading.Event()
    real_process, real_step = engine.process_multimodal, engine.step
    ps = prompts(4)
    bad_image = ps[3]["multi_modal_data"]["image"]

    def process(ids, mm_data, kwargs=None):
        if mm_data and mm_data["image"] is bad_image:
            stepped.wait(20)
            raise ValueError("this image is broken")
        return real_process(ids, mm_data, kwargs)

    def step(*a, **kw):
        stepped.set()
        return real_step(*a, **kw)

    monkeypatch.setattr(engine, "process_multimodal", process)
    monkeypatch.setattr(engine, "step", step)
    with pytest.raises(ValueError, match="prompt 3: this image is broken"):
        llm.generate(ps, SamplingParams(temperature=0.0, max_tokens=64, ignore_eos=True), use_tqdm=False)
    assert stepped.is_set()
    assert not engine.has_unfinished_requests()
    assert not engine.scheduler.has_unfinished()
    assert engine.block_manager.num_free_blocks == engine.num_kv_blocks  # every block given back
