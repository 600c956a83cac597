"""Prefill CUDA graphs (vlmserve/worker/prefill_graphs.py): a lone prompt's prefill replays a graph
of its token-count bucket. On a GPU, the tokens and logprobs (prompt logprobs too) equal an
engine's whose prefill graphs are off (VLMSERVE_PREFILL_GRAPH_TOKENS=0), for text, LLaVA and
Qwen2-VL (M-RoPE) models, with prefix-cache hits (a chunk with cached context) and prompts past the
largest bucket. On the CPU only the buckets are checked."""
import numpy as np
import pytest
import torch
from PIL import Image

from vlmserve import LLM, SamplingParams
from vlmserve.testing.checkpoints import make_qwen2_vl_checkpoint, make_text_checkpoint
from vlmserve.worker.prefill_graphs import token_buckets

gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
PARAMS = SamplingParams(temperature=0.0, max_tokens=6, logprobs=5, prompt_logprobs=3, ignore_eos=True)
NO_PROMPT_LOGPROBS = SamplingParams(temperature=0.0, max_tokens=6, logprobs=5, ignore_eos=True)  # prefix hits


def test_buckets_cover_every_length_up_to_the_largest():
    b = token_buckets(2048)
    assert b == sorted(set(b)) and b[0] == 64 and b[-1] == 2048
    assert all(x % 64 == 0 for x in b) and all(y - x <= 128 for x, y in zip(b, b[1:]))
    assert token_buckets(300) == [64, 128, 192, 256] and token_buckets(32) == []


def _run_alone(llm, prompts, params=PARAMS):
    """Each prompt in its own generate call: every prefill step holds one sequence."""
    return [llm.generate(p, params, use_tqdm=False)[0] for p in prompts]


def _same(a, b):
    assert a.outputs[0].token_ids == b.outputs[0].token_ids
    for x, y in zip(a.outputs[0].logprobs, b.outputs[0].logprobs):
        for tok in set(x) & set(y):
            assert abs(x[tok].logprob - y[tok].logprob) < 2e-4
    for x, y in zip((a.prompt_logprobs or [None])[1:], (b.prompt_logprobs or [None])[1:]):
        for tok in set(x) & set(y):
            assert abs(x[tok].logprob - y[tok].logprob) < 2e-4


def _pair(monkeypatch, model_dir, **kw):
    graphs = LLM(model_dir, dtype="float32", **kw)
    monkeypatch.setenv("VLMSERVE_PREFILL_GRAPH_TOKENS", "0")
    eager = LLM(model_dir, dtype="float32", **kw)
    monkeypatch.delenv("VLMSERVE_PREFILL_GRAPH_TOKENS")
    return graphs, eager


@gpu
def test_text_prefill_graphs_equal_eager(tmp_path, monkeypatch):
    d = make_text_checkpoint(str(tmp_path / "llama"), "llama")
    graphs, eager = _pair(monkeypatch, d, max_model_len=1024, max_num_batched_tokens=512)
    # the fresh prompts' graphs are captured at startup, every bucket
    captured = set(graphs.llm_engine.runner.prefill_graphs.graphs)
    assert captured == {(bs, True) for bs in token_buckets(512)}
    rng = np.random.default_rng(0)
    base = rng.integers(5, 400, 150).tolist()
    prompts = [{"prompt_token_ids": rng.integers(5, 400, n).tolist()} for n in (3, 64, 65, 200)]
    prompts += [{"prompt_token_ids": rng.integers(5, 400, 700).tolist()}]  # chunks of 512 and 188
    for a, b in zip(_run_alone(graphs, prompts), _run_alone(eager, prompts)):
        _same(a, b)
    # the second prompt's prefill starts after 144 cached tokens (prompt logprobs would turn that off)
    pair = [{"prompt_token_ids": base}, {"prompt_token_ids": base + [7, 8, 9]}]
    for a, b in zip(_run_alone(graphs, pair, NO_PROMPT_LOGPROBS), _run_alone(eager, pair, NO_PROMPT_LOGPROBS)):
        _same(a, b)
    runner = graphs.llm_engine.runner
    assert runner.prefill_graphs is not None and len(runner.prefill_graphs.graphs) >= 4
    assert eager.llm_engine.runner.prefill_graphs is None
    assert graphs.llm_engine.scheduler.num_cached_tokens > 0
    # captured on first use: the 700-token prompt's second chunk (188 tokens), base + 3 after 144 cached
    assert set(runner.prefill_graphs.graphs) - captured == {(192, False), (64, False)}


@gpu
def test_llava_prefill_graphs_equal_eager(llava_dir, monkeypatch):
    graphs, eager = _pair(monkeypatch, llava_dir, max_model_len=512)
    rng = np.random.default_rng(1)
    prompts = [{"prompt": f"look <image> at this {i}",
                "multi_modal_data": {"image": Image.fromarray(rng.integers(0, 256, (60 + 9 * i, 80, 3), np.uint8))}}
               for i in range(3)] + ["text alone, in the same engine"]
    for a, b in zip(_run_alone(graphs, prompts), _run_alone(eager, prompts)):
        _same(a, b)
    assert graphs.llm_engine.runner.prefill_graphs.graphs


@gpu
def test_qwen2_vl_prefill_graphs_equal_eager(tmp_path, monkeypatch):
    d = make_qwen2_vl_checkpoint(str(tmp_path / "qwen2_vl"))
    graphs, eager = _pair(monkeypatch, d, max_model_len=1024)
    rng = np.random.default_rng(2)
    prompts = [{"prompt": "<|vision_start|><|image_pad|><|vision_end|>what is it?",
                "multi_modal_data": {"image": Image.fromarray(rng.integers(0, 256, (h, w, 3), np.uint8))}}
               for w, h in ((120, 90), (56, 200))]
    for a, b in zip(_run_alone(graphs, prompts), _run_alone(eager, prompts)):
        _same(a, b)
    assert graphs.llm_engine.runner.prefill_graphs.graphs
