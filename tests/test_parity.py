"""Greedy tokens and top-5 logprobs match HF transformers on random-weight checkpoints of each
supported architecture, in float32, for a batch of prompts of different lengths."""
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from hf_reference import check_greedy_against_hf, hf_logprobs
from vlmserve import LLM, SamplingParams

ARCHS = ["llama", "llama_tied", "mistral", "qwen2", "phi3"]

PROMPTS = [
    "the cat runs to the river",
    "Hello world, the model engine reads a token cache and finds seven stars over the city of Tokyo. "
    "The quick bird flies over a dark mountain road while one small boat swims in the bright river.",
    "one",
    "café naïve über 東京 こんにちは 😀 🚀 the large train takes five planes from the moon",
    "red green blue yellow purple orange black white small large quick slow bright dark happy " * 3,
]

GREEDY = SamplingParams(temperature=0.0, max_tokens=24, logprobs=5, ignore_eos=True)


def _check_batch(model_dir, outs):
    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    for out in outs:
        comp = out.outputs[0]
        assert len(comp.token_ids) == GREEDY.max_tokens and comp.finish_reason == "length"
        lp = hf_logprobs(hf, out.prompt_token_ids + comp.token_ids)
        check_greedy_against_hf(lp, len(out.prompt_token_ids), comp)


@pytest.mark.parametrize("arch", ARCHS)
def test_greedy_matches_hf(text_model_dir, arch):
    d = text_model_dir(arch)
    llm = LLM(d, dtype="float32", max_model_len=512)
    tok = AutoTokenizer.from_pretrained(d)
    outs = llm.generate(PROMPTS, GREEDY, use_tqdm=False)
    for p, out in zip(PROMPTS, outs):
        assert out.prompt_token_ids == tok(p).input_ids
    _check_batch(d, outs)


@pytest.mark.parametrize("arch", ARCHS)
def test_small_kv_cache_queues_and_preempts(text_model_dir, arch):
    """A cache of 12 blocks of 8 tokens cannot hold the batch: requests wait and get preempted,
    and the results still match HF."""
    d = text_model_dir(arch)
    llm = LLM(d, dtype="float32", max_model_len=96, block_size=8, num_kv_blocks=12)
    outs = llm.generate(PROMPTS, GREEDY, use_tqdm=False)
    stats = llm.llm_engine.stats
    assert stats.num_preemptions > 0
    assert stats.max_batch_seqs < len(PROMPTS)  # never all at once
    _check_batch(d, outs)


def test_prompt_logprobs_match_hf(text_model_dir):
    d = text_model_dir("qwen2")
    llm = LLM(d, dtype="float32", max_model_len=512, max_num_batched_tokens=16)  # chunked prompts
    params = SamplingParams(temperature=0.0, max_tokens=2, prompt_logprobs=3)
    outs = llm.generate(PROMPTS[:2], params, use_tqdm=False)
    hf = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
    for out in outs:
        ids = out.prompt_token_ids
        assert len(out.prompt_logprobs) == len(ids) and out.prompt_logprobs[0] is None
        lp = hf_logprobs(hf, ids)
        for i in range(1, len(ids)):
            pos = out.prompt_logprobs[i]
            assert ids[i] in pos
            top3 = lp[i - 1].topk(3).indices.tolist()
            assert set(top3) <= set(pos)
            for t, v in pos.items():
                assert abs(v.logprob - lp[i - 1, t].item()) < 1e-3
            assert pos[ids[i]].rank == int((lp[i - 1] > lp[i - 1, ids[i]]).sum()) + 1


def test_long_prompt_chunked_prefill_matches_unlimited_budget(text_model_dir):
    d = text_model_dir("llama")
    long_prompt = {"prompt_token_ids": [1] + [(7 * i) % 500 + 4 for i in range(300)]}
    prompts = [long_prompt, PROMPTS[0], PROMPTS[3]]
    ref = LLM(d, dtype="float32", max_model_len=512, max_num_batched_tokens=4096).generate(
        prompts, GREEDY, use_tqdm=False)
    llm = LLM(d, dtype="float32", max_model_len=512, max_num_batched_tokens=32)
    outs = llm.generate(prompts, GREEDY, use_tqdm=False)
    assert llm.llm_engine.stats.num_steps > 300 // 32
    for a, b in zip(ref, outs):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids
        for pa, pb in zip(a.outputs[0].logprobs, b.outputs[0].logprobs):
            for t in pa:
                assert abs(pa[t].logprob - pb[t].logprob) < 1e-4


def test_prefix_caching_computes_fewer_tokens_with_identical_outputs(text_model_dir):
    d = text_model_dir("llama")
    prefix = [1] + [(11 * i) % 480 + 10 for i in range(96)]
    prompts = [{"prompt_token_ids": prefix + [20 + j, 30 + j, 40 + j]} for j in range(6)]
    llm = LLM(d, dtype="float32", max_model_len=512, block_size=16)
    stats = llm.llm_engine.stats
    first = llm.generate(prompts, GREEDY, use_tqdm=False)
    computed_first = stats.num_prompt_tokens_computed
    second = llm.generate(prompts, GREEDY, use_tqdm=False)
    computed_second = stats.num_prompt_tokens_computed - computed_first
    total = sum(len(p["prompt_token_ids"]) for p in prompts)
    assert computed_first == total
    # 96 + 1 shared tokens = 6 full blocks of 16 per prompt come from the cache the second time.
    assert computed_second == total - 6 * 96
    assert all(o.num_cached_tokens == 96 for o in second)
    for a, b in zip(first, second):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids
        for pa, pb in zip(a.outputs[0].logprobs, b.outputs[0].logprobs):
            for t in pa:
                assert abs(pa[t].logprob - pb[t].logprob) < 1e-5
    # Without prefix caching nothing is reused.
    off = LLM(d, dtype="float32", max_model_len=512, enable_prefix_caching=False)
    off.generate(prompts, GREEDY, use_tqdm=False)
    off.generate(prompts, GREEDY, use_tqdm=False)
    assert off.llm_engine.stats.num_prompt_tokens_computed == 2 * total
