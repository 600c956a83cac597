"""The built-in demo model, run through vlmserve on the held-out evaluation set that training never
saw (scripts/demo_model/data.py's eval stream): at least 95% right on each question kind, and the
same answers as HF transformers gives with the same weights."""
import os
import sys
from collections import Counter

import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "scripts", "demo_model"))
import data  # noqa: E402

from vlmserve import LLM, SamplingParams  # noqa: E402
from vlmserve.entrypoints.llm import DEMO_MODEL_DIR  # noqa: E402

PER_KIND = 200  # 1000 held-out samples
GREEDY = SamplingParams(temperature=0, max_tokens=8)


@pytest.fixture(scope="module")
def eval_set():
    return data.make_eval_set(data.eval_stream(0), PER_KIND, data.EVAL_DIST)


@pytest.fixture(scope="module")
def demo():
    return LLM(dtype="float32", limit_mm_per_prompt={"image": 2})


def _prompt(llm, sample):
    tok = llm.get_tokenizer()
    return tok.apply_chat_template(sample["messages"], add_generation_prompt=True, tokenize=False)


@pytest.fixture(scope="module")
def vlmserve_answers(demo, eval_set):
    prompts = [{"prompt": _prompt(demo, s), "multi_modal_data": {"image": s["images"]}} for s in eval_set]
    outs = demo.generate(prompts, GREEDY, use_tqdm=False)
    return [o.outputs[0] for o in outs]


def test_accuracy_on_each_question_kind(eval_set, vlmserve_answers):
    right, total = Counter(), Counter()
    for s, out in zip(eval_set, vlmserve_answers):
        total[s["kind"]] += 1
        right[s["kind"]] += out.text.strip() == s["answer"] and out.finish_reason == "stop"
    acc = {k: right[k] / total[k] for k in total}
    assert set(acc) == set(data.KINDS)
    assert all(a >= 0.95 for a in acc.values()), acc


def test_hf_transformers_agrees(eval_set, vlmserve_answers):
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    processor = AutoProcessor.from_pretrained(DEMO_MODEL_DIR)
    model = LlavaForConditionalGeneration.from_pretrained(DEMO_MODEL_DIR, dtype=torch.float32).eval()
    tok = processor.tokenizer
    for s, ours in list(zip(eval_set, vlmserve_answers))[::20]:
        prompt = processor.apply_chat_template(s["messages"], add_generation_prompt=True, tokenize=False)
        inputs = processor(text=prompt, images=s["images"], return_tensors="pt")
        with torch.no_grad():
            out = model.generate(**inputs, do_sample=False, max_new_tokens=8)
        gen = out[0, inputs["input_ids"].shape[1]:].tolist()
        if tok.eos_token_id in gen:
            gen = gen[:gen.index(tok.eos_token_id)]
        assert gen == ours.token_ids[:len(gen)] and len(gen) in (len(ours.token_ids), len(ours.token_ids) - 1)


def test_default_llm_is_the_demo_model(demo):
    assert os.path.samefile(demo.llm_engine.model_config.model, DEMO_MODEL_DIR)
    assert demo.llm_engine.model_config.architecture == "LlavaForConditionalGeneration"
