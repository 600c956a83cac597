"""Async scheduling (step n+1 is scheduled and launched before step n's results are read) gives what
the synchronous engine gives: the same tokens, text, finish reasons and logprobs, through stops that
leave a wasted step behind, stop strings, min_tokens, seeded sampling, penalties (which wait for
the results), prompt logprobs, preemption, chunked prefill through an image, M-RoPE positions and
aborts. On the CPU a launched step has already run, so these tests check the bookkeeping (pending
tokens read on the device, moot results dropped); the GPU run checks that launching does not wait."""
import random

import numpy as np
import pytest
import torch
from PIL import Image

from vlmserve import LLM, SamplingParams
from vlmserve.testing.checkpoints import make_qwen2_vl_checkpoint
from vlmserve.testing.sync_watch import sync_sites

LOGPROB_TOL = 1e-4  # batches differ by the wasted rows, so matmuls may round differently


def make_llm(model_dir, async_on, **kw):
    llm = LLM(model_dir, dtype="float32", async_scheduling=async_on, **kw)
    assert llm.llm_engine.async_scheduling is async_on
    return llm


def count_pending_reads(llm):
    """Wrap the runner's launch: count launches that read a pending token on the device."""
    runner = llm.llm_engine.runner
    launch = runner.launch
    counts = {"pending": 0}

    def counted(sched, stop_ids, prev=None):
        if any(s.seq.num_pending_tokens for s in sched.scheduled):
            counts["pending"] += 1
        return launch(sched, stop_ids, prev)

    runner.launch = counted
    return counts


def assert_same(sync_outs, async_outs):
    assert len(sync_outs) == len(async_outs)
    for a, b in zip(sync_outs, async_outs):
        assert_close_logprobs(a.prompt_logprobs, b.prompt_logprobs)
        for ca, cb in zip(a.outputs, b.outputs, strict=True):
            assert ca.token_ids == cb.token_ids
            assert ca.text == cb.text
            assert (ca.finish_reason, ca.stop_reason) == (cb.finish_reason, cb.stop_reason)
            assert_close_logprobs(ca.logprobs, cb.logprobs)
            if ca.cumulative_logprob is not None:
                assert abs(ca.cumulative_logprob - cb.cumulative_logprob) < LOGPROB_TOL * 20


def assert_close_logprobs(a, b):
    assert (a is None) == (b is None)
    if a is None:
        return
    assert len(a) == len(b)
    for pa, pb in zip(a, b):
        assert (pa is None) == (pb is None)
        if pa is None:
            continue
        assert pa.keys() == pb.keys()
        for t in pa:
            assert abs(pa[t].logprob - pb[t].logprob) < LOGPROB_TOL
            assert pa[t].rank == pb[t].rank


def test_text_requests_match_the_synchronous_engine(text_model_dir):
    d = text_model_dir("llama")
    rng = random.Random(0)
    prompts = [{"prompt_token_ids": [rng.randrange(4, 500) for _ in range(rng.randint(5, 60))]}
               for _ in range(10)]
    prompts.append({"prompt_token_ids": prompts[3]["prompt_token_ids"][:40] + [7, 8, 9]})  # a shared prefix
    prompts.append({"prompt_token_ids": [rng.randrange(4, 500) for _ in range(250)]})  # near max_model_len
    kw = dict(max_model_len=256, block_size=16, num_kv_blocks=24, max_num_batched_tokens=256)

    # Stops placed where the synchronous engine's greedy run goes: a stop token at output 4, a stop
    # string over outputs 3-5, a barred stop token at output 1 with min_tokens 5.
    sync = make_llm(d, False, **kw)
    probe = sync.generate(prompts[:3], SamplingParams(temperature=0, max_tokens=8, ignore_eos=True),
                          use_tqdm=False)
    stop_tok = probe[0].outputs[0].token_ids[4]
    stop_str = sync.get_tokenizer().decode(probe[1].outputs[0].token_ids[3:6])
    barred = probe[2].outputs[0].token_ids[1]

    params = [
        SamplingParams(temperature=0, max_tokens=8, stop_token_ids=[stop_tok], logprobs=2),
        SamplingParams(temperature=0, max_tokens=8, stop=[stop_str], include_stop_str_in_output=True),
        SamplingParams(temperature=0, max_tokens=9, min_tokens=5, stop_token_ids=[barred], logprobs=1),
        SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=2),
        SamplingParams(temperature=0.8, top_k=20, top_p=0.9, seed=7, n=2, max_tokens=12, logprobs=3),
        SamplingParams(temperature=1.0, min_p=0.05, seed=3, max_tokens=10),
        SamplingParams(temperature=0, max_tokens=10, stop_token_ids=[stop_tok]),
        SamplingParams(temperature=0, max_tokens=15, logprobs=0, prompt_logprobs=0),
        SamplingParams(temperature=0, max_tokens=2),
        SamplingParams(temperature=0.7, seed=11, max_tokens=20),
        SamplingParams(temperature=0, max_tokens=6),
        SamplingParams(temperature=0, max_tokens=50, ignore_eos=True),  # stops at max_model_len
    ]
    want = sync.generate(prompts, params, use_tqdm=False)

    llm = make_llm(d, True, **kw)
    pending = count_pending_reads(llm)
    got = llm.generate(prompts, params, use_tqdm=False)
    assert_same(want, got)
    assert got[0].outputs[0].finish_reason == "stop" and got[0].outputs[0].token_ids[-1] == stop_tok
    assert got[1].outputs[0].stop_reason == stop_str
    assert len(got[2].outputs[0].token_ids) >= 5
    assert got[-1].outputs[0].finish_reason == "length" and len(got[-1].outputs[0].token_ids) == 6
    assert pending["pending"] > 0  # decodes did read their input token on the device
    eng = llm.llm_engine
    # the wasted step after a stop made no token
    assert eng.stats.num_generation_tokens == sum(len(c.token_ids) for o in got for c in o.outputs)
    assert eng.stats.num_preemptions > 0  # the small cache preempted sequences with pending tokens
    assert eng.block_manager.num_free_blocks == eng.num_kv_blocks


def test_penalties_wait_for_the_results(text_model_dir):
    """Penalties read a sequence's earlier tokens on the host: a step with them waits for the step
    in flight; requests without them in the same batch go on as before."""
    d = text_model_dir("llama")
    rng = random.Random(1)
    prompts = [{"prompt_token_ids": [rng.randrange(4, 500) for _ in range(rng.randint(5, 30))]} for _ in range(4)]
    params = [SamplingParams(temperature=0, repetition_penalty=1.3, presence_penalty=0.5, max_tokens=10),
              SamplingParams(temperature=0.7, seed=11, max_tokens=14, frequency_penalty=0.4, logprobs=1),
              SamplingParams(temperature=0, max_tokens=20, logprobs=2),
              SamplingParams(temperature=0.9, seed=5, max_tokens=20)]
    want = make_llm(d, False, max_model_len=128).generate(prompts, params, use_tqdm=False)
    got = make_llm(d, True, max_model_len=128).generate(prompts, params, use_tqdm=False)
    assert_same(want, got)


def test_no_step_for_a_sequence_that_stops_by_length(text_model_dir):
    d = text_model_dir("llama")
    steps = []
    for async_on in (False, True):
        llm = make_llm(d, async_on, max_model_len=128)
        out = llm.generate({"prompt_token_ids": [5, 6, 7, 8]},
                           SamplingParams(temperature=0, max_tokens=5, ignore_eos=True), use_tqdm=False)
        assert len(out[0].outputs[0].token_ids) == 5
        steps.append(llm.llm_engine.stats.num_steps)
        assert llm.llm_engine._in_flight is None
    assert steps == [5, 5]


def test_abort_while_a_step_is_in_flight(text_model_dir):
    d = text_model_dir("llama")
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, logprobs=1)
    prompts = [[10 + i, 20 + i, 30 + i, 40 + i, 50 + i] for i in range(3)]
    want = make_llm(d, False, max_model_len=128).generate(
        [{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)

    llm = make_llm(d, True, max_model_len=128)
    eng = llm.llm_engine
    for i, p in enumerate(prompts):
        eng.add_request(str(i), p, params)
    outs = {}
    for _ in range(4):
        for o in eng.step(include_unfinished=True):
            outs[o.request_id] = o
    assert eng._in_flight is not None and eng.requests["1"].seqs[0].num_pending_tokens == 1
    eng.abort_request("1")
    while eng.has_unfinished_requests():
        for o in eng.step(include_unfinished=True):
            assert o.request_id != "1"
            outs[o.request_id] = o
    for rid in ("0", "2"):
        assert outs[rid].finished
        assert outs[rid].outputs[0].token_ids == want[int(rid)].outputs[0].token_ids
        assert_close_logprobs(outs[rid].outputs[0].logprobs, want[int(rid)].outputs[0].logprobs)
    assert eng.block_manager.num_free_blocks == eng.num_kv_blocks


def rand_image(w, h, seed):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def test_llava_chunked_prefill_through_an_image(llava_dir):
    prompts = [{"prompt": f"the cat <image> runs to the river {i}",
                "multi_modal_data": {"image": rand_image(64 + 10 * i, 48 + 7 * i, i)}} for i in range(3)]
    prompts.insert(1, "a plain text prompt in the same batch")
    params = SamplingParams(temperature=0, max_tokens=10, logprobs=3, ignore_eos=True)
    kw = dict(max_model_len=512, max_num_batched_tokens=48)  # 64-token images span two steps
    want = make_llm(llava_dir, False, **kw).generate(prompts, params, use_tqdm=False)
    llm = make_llm(llava_dir, True, **kw)
    got = llm.generate(prompts, params, use_tqdm=False)
    assert_same(want, got)
    assert llm.llm_engine.runner.encoder_cache.num_encoded_items == 3


@pytest.fixture(scope="module")
def qwen_dir(tmp_path_factory):
    return make_qwen2_vl_checkpoint(str(tmp_path_factory.mktemp("qwen2_vl_async")))


def test_qwen2_vl_mrope_decode_positions(qwen_dir):
    prompts = [{"prompt": f"<|vision_start|><|image_pad|><|vision_end|>describe {i}",
                "multi_modal_data": {"image": rand_image(56 + 28 * i, 84, i)}} for i in range(2)]
    prompts.append("text only")
    params = SamplingParams(temperature=0, max_tokens=8, logprobs=2, ignore_eos=True)
    want = make_llm(qwen_dir, False, max_model_len=512).generate(prompts, params, use_tqdm=False)
    got = make_llm(qwen_dir, True, max_model_len=512).generate(prompts, params, use_tqdm=False)
    assert_same(want, got)


# ---- on a GPU: launching a step does not wait for the device ----------------------------------------
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("arch", ["llava", "qwen2_vl"])
def test_launch_does_not_wait_for_the_device(arch, request):
    """After a warm-up (graphs captured, kernels compiled), no launch of a step (prefill with new
    images through the encoder, mixed, decode, sampling with logprobs, seeds and top-p) syncs."""
    d = request.getfixturevalue("llava_dir" if arch == "llava" else "qwen_dir")
    image = "the cat <image> runs" if arch == "llava" else "<|vision_start|><|image_pad|><|vision_end|>runs"
    llm = LLM(d, dtype="bfloat16", async_scheduling=True, max_model_len=512)

    def prompts(seed):
        out = [{"prompt": f"{image} {i}", "multi_modal_data": {"image": rand_image(64, 64, seed * 10 + i)}}
               for i in range(3)]
        return out + [f"text only {seed} {i}" for i in range(2)]

    params = [SamplingParams(temperature=0, max_tokens=12, logprobs=2, ignore_eos=True),
              SamplingParams(temperature=0.8, top_p=0.9, seed=1, max_tokens=16, ignore_eos=True),
              SamplingParams(temperature=0.8, top_k=5, max_tokens=9, ignore_eos=True),
              SamplingParams(temperature=0, max_tokens=14, ignore_eos=True),
              SamplingParams(temperature=0, max_tokens=10, prompt_logprobs=1, ignore_eos=True)]
    llm.generate(prompts(0), params, use_tqdm=False)
    sites: list[str] = []
    with sync_sites(sites, skip_file=__file__):  # the watch sees a sync
        torch.ones(1, device="cuda").item()
    assert sites
    sites.clear()
    runner = llm.llm_engine.runner
    launch = runner.launch

    def watched(*args, **kwargs):
        with sync_sites(sites):
            return launch(*args, **kwargs)

    runner.launch = watched
    outs = llm.generate(prompts(1), params, use_tqdm=False)
    assert [len(o.outputs[0].token_ids) for o in outs] == [12, 16, 9, 14, 10]
    # capturing a CUDA graph of a new shape waits, once (which shapes the warm-up met depends on
    # how the prompt pipeline's threads feed the steps)
    sites = [s for s in sites if "capture" not in s]
    assert not sites, "launching a step waited for the device at:\n" + "\n".join(sorted(set(sites)))
