"""Prefill chunks without cached context (layers/attention/triton_backend.py), through the packed
causal Triton kernel or FlashAttention: on the CPU, which sequences of a step take them, and the
packed kernel's results in a mixed step (Triton's interpreter); on a GPU in bf16, prompt logprobs and
tokens as the paged Triton prefill kernel gives them, in steps that mix decode rows, chunks with cached context and
fresh prompts, with prefix-cache hits (which take the Triton kernel), and through the prefill CUDA
graphs (a graph per kind of chunk)."""
import os

import numpy as np
import pytest
import torch

from vlmserve import LLM, SamplingParams
from vlmserve.layers.attention import AttentionMetadata
from vlmserve.layers.attention.triton_backend import TritonPagedAttentionBackend
from vlmserve.testing.checkpoints import make_text_checkpoint

gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="the fresh path runs on a GPU")
PARAMS = SamplingParams(temperature=0.0, max_tokens=4, logprobs=3, prompt_logprobs=3, ignore_eos=True)
TOL = 0.05  # bf16: the two kernels round differently


def _close(a, b):
    for x, y in zip(a.prompt_logprobs[1:], b.prompt_logprobs[1:]):
        for tok in set(x) & set(y):
            assert abs(x[tok].logprob - y[tok].logprob) < TOL
    first_a, first_b = a.outputs[0].logprobs[0], b.outputs[0].logprobs[0]
    for tok in set(first_a) & set(first_b):
        assert abs(first_a[tok].logprob - first_b[tok].logprob) < TOL


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    # GQA (4 query heads per KV head), head_dim 64
    return make_text_checkpoint(str(tmp_path_factory.mktemp("llama_gqa")), "llama", num_key_value_heads=1)


def _prompts(seed, lengths):
    rng = np.random.default_rng(seed)
    return [{"prompt_token_ids": rng.integers(5, 400, n).tolist()} for n in lengths]


@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("num_decodes, chunks, fresh_from", [
    (2, [(0, 5), (0, 9)], 2),            # decodes, then two fresh prompts: all prefill to the fresh path
    (1, [(40, 8), (0, 9), (0, 3)], 2),   # a chunk after cached context first: it to the paged kernel, the rest fresh
    (0, [(0, 5), (12, 4)], 2),           # the last chunk has context: all to the paged kernel
    (0, [(0, 7)], 0),                    # a lone fresh prompt: dense SDPA in a graph's bucket only
    (2, [(30, 4), (0, 6)], 3),           # one fresh chunk after others: likewise
    (3, [], 3),                          # decode only
])
def test_which_sequences_take_the_fresh_path(num_decodes, chunks, fresh_from, padded):
    backend = TritonPagedAttentionBackend(torch.device("cpu"))
    backend.fresh_path = True
    qsl, seq_lens = list(range(num_decodes + 1)), [30] * num_decodes
    for ctx, n in chunks:
        qsl.append(qsl[-1] + n)
        seq_lens.append(ctx + n)
    T = qsl[-1]
    meta = AttentionMetadata(num_decodes=num_decodes, query_start_loc=qsl, seq_lens=seq_lens,
                             slot_mapping=torch.zeros(T, dtype=torch.long), block_tables=torch.zeros(len(seq_lens), 4),
                             seq_lens_tensor=torch.tensor(seq_lens), block_size=16, padded_to_bucket=padded)
    backend._step_info(meta)
    if not chunks:
        return
    assert backend._fresh_from == fresh_from
    if fresh_from < len(seq_lens):
        assert backend._fresh_cu.tolist() == [q - qsl[fresh_from] for q in qsl[fresh_from:]]
        assert backend._fresh_max_len == max(n for ctx, n in chunks[fresh_from - num_decodes:])
        # one, in a graph's bucket: the dense kernel (eagerly, cuDNN's plan per length costs more)
        assert backend._one_fresh == (padded and fresh_from == len(seq_lens) - 1)


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="runs the Triton kernel in its interpreter")
@pytest.mark.parametrize("chunks", [[(0, 9), (0, 5)], [(20, 6), (0, 9)], [(7, 3), (10, 4)]])
def test_layers_the_fresh_path_cannot_serve_take_the_paged_kernel_for_the_whole_step(chunks):
    """float32 (or a sliding window): whatever the step's bookkeeping chose for the fresh path,
    such a layer attends over every prefill sequence with the Triton kernel, as the reference does."""
    from types import SimpleNamespace

    from vlmserve.kernels import triton_paged_attention as tpa

    g = torch.Generator().manual_seed(len(chunks))
    hq, hkv, d, bs = 4, 2, 16, 4
    backend = TritonPagedAttentionBackend(torch.device("cpu"))
    backend.fresh_path = True
    layer = SimpleNamespace(num_heads=hq, num_kv_heads=hkv, head_dim=d, scale=d ** -0.5, sliding_window=None)
    nd, lens = 1, [6]  # one decode row, then the chunks
    qsl = [0, 1]
    for ctx, n in chunks:
        qsl.append(qsl[-1] + n)
        lens.append(ctx + n)
    T, B = qsl[-1], len(lens)
    per_seq = max(-(-L // bs) for L in lens)
    tables = torch.arange(B * per_seq).view(B, per_seq)
    cache = torch.randn(2, B * per_seq, bs, hkv, d, generator=g)
    slots = []
    for i in range(B):
        first = lens[i] - (qsl[i + 1] - qsl[i])
        slots += [int(tables[i, p // bs]) * bs + p % bs for p in range(first, lens[i])]
    q, k, v = (torch.randn(T, h, d, generator=g) for h in (hq, hkv, hkv))
    meta = AttentionMetadata(num_decodes=nd, query_start_loc=qsl, seq_lens=lens, slot_mapping=torch.tensor(slots),
                             block_tables=tables, seq_lens_tensor=torch.tensor(lens), block_size=bs)
    out = backend.forward(layer, q, k, v, cache, meta)
    ref = tpa.reference_paged_prefill_attention(q, cache[0], cache[1], tables, torch.tensor(qsl), torch.tensor(lens),
                                                layer.scale)
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="runs the Triton kernels in their interpreter")
def test_fresh_prompts_take_the_packed_kernel_beside_decodes_and_cached_chunks(monkeypatch):
    """fp16, as on a GPU: a decode row and a chunk after cached context through the paged kernels, then
    two fresh prompts through the packed causal kernel (grouped key heads, offsets from the first
    fresh row): all as the reference computes them from the cache."""
    from types import SimpleNamespace

    from vlmserve.kernels import triton_packed_attention as tpk
    from vlmserve.kernels import triton_paged_attention as tpa

    g = torch.Generator().manual_seed(3)
    hq, hkv, d, bs = 4, 2, 32, 4
    backend = TritonPagedAttentionBackend(torch.device("cpu"))
    backend.fresh_path = True
    layer = SimpleNamespace(num_heads=hq, num_kv_heads=hkv, head_dim=d, scale=d ** -0.5, sliding_window=None)
    qsl, lens = [0, 1], [6]  # one decode row
    for ctx, n in [(5, 3), (0, 9), (0, 17)]:
        qsl.append(qsl[-1] + n)
        lens.append(ctx + n)
    T, B = qsl[-1], len(lens)
    per_seq = max(-(-L // bs) for L in lens)
    tables = torch.arange(B * per_seq).view(B, per_seq)
    cache = torch.randn(2, B * per_seq, bs, hkv, d, generator=g).half()
    slots = []
    for i in range(B):
        first = lens[i] - (qsl[i + 1] - qsl[i])
        slots += [int(tables[i, p // bs]) * bs + p % bs for p in range(first, lens[i])]
    q, k, v = (torch.randn(T, h, d, generator=g).half() for h in (hq, hkv, hkv))
    meta = AttentionMetadata(num_decodes=1, query_start_loc=qsl, seq_lens=lens, slot_mapping=torch.tensor(slots),
                             block_tables=tables, seq_lens_tensor=torch.tensor(lens), block_size=bs)
    calls = []
    real = tpk.packed_attention
    monkeypatch.setattr(tpk, "packed_attention", lambda *a, **kw: calls.append(a[3].tolist()) or real(*a, **kw))
    out = backend.forward(layer, q, k, v, cache, meta)
    assert calls == [[0, 9, 26]]  # the two fresh prompts, offsets from the first of their rows
    ref = tpa.reference_paged_prefill_attention(q.float(), cache[0].float(), cache[1].float(), tables,
                                                torch.tensor(qsl), torch.tensor(lens), layer.scale)
    torch.testing.assert_close(out.float(), ref, atol=2e-3, rtol=2e-3)


@gpu
@pytest.mark.parametrize("packed", ["1", "0"])
def test_fresh_prefill_equals_paged_kernel_in_mixed_steps(model_dir, monkeypatch, packed):
    """Fresh prompts through the packed causal kernel (the default) and through FlashAttention's varlen
    op (VLMSERVE_PACKED_PREFILL=0), against the paged kernel for all."""
    monkeypatch.setenv("VLMSERVE_PACKED_PREFILL", packed)
    # chunks of 96 tokens: steps hold decodes, a long prompt's later chunk and a new prompt's first
    llm = LLM(model_dir, dtype="bfloat16", max_model_len=1024, max_num_seqs=3, max_num_batched_tokens=96,
              enforce_eager=True)
    backend = llm.llm_engine.runner.attn_backend
    if not backend.fresh_path:
        pytest.skip("this torch has no FlashAttention for this GPU")
    prompts = _prompts(0, (5, 130, 64, 300, 17, 257, 90))  # 3 at a time: later ones join decoding ones
    before = backend.num_fresh_prefill_steps
    fresh = llm.generate(prompts, PARAMS, use_tqdm=False)
    assert backend.num_fresh_prefill_steps > before
    backend.fresh_path = False
    try:
        llm.llm_engine.block_manager.reset_prefix_cache()
        triton = llm.generate(prompts, PARAMS, use_tqdm=False)
    finally:
        backend.fresh_path = True
    for a, b in zip(fresh, triton):
        _close(a, b)


@gpu
def test_lone_prompt_dense_attention_equals_triton_kernel(model_dir, monkeypatch):
    """A lone fresh prompt takes dense SDPA in a prefill graph (its bucket's padding rows after the
    prompt), the packed causal kernel eagerly: the same tokens and logprobs as the paged kernel."""
    graphs = LLM(model_dir, dtype="bfloat16", max_model_len=1024)
    monkeypatch.setenv("VLMSERVE_PREFILL_GRAPH_TOKENS", "0")
    eager = LLM(model_dir, dtype="bfloat16", max_model_len=1024)
    monkeypatch.setenv("VLMSERVE_FLASH_PREFILL", "0")
    triton = LLM(model_dir, dtype="bfloat16", max_model_len=1024)
    if not graphs.llm_engine.runner.attn_backend.fresh_path:
        pytest.skip("this torch has no FlashAttention for this GPU")
    for p in _prompts(3, (70, 333, 600)):
        want = triton.generate(p, PARAMS, use_tqdm=False)[0]
        for llm in (graphs, eager):
            llm.llm_engine.block_manager.reset_prefix_cache()
            _close(llm.generate(p, PARAMS, use_tqdm=False)[0], want)
    assert graphs.llm_engine.runner.prefill_graphs.graphs


@gpu
def test_prefix_hits_and_graphs_with_fresh_prefill(model_dir, monkeypatch):
    graphs = LLM(model_dir, dtype="bfloat16", max_model_len=1024)
    monkeypatch.setenv("VLMSERVE_PREFILL_GRAPH_TOKENS", "0")
    eager = LLM(model_dir, dtype="bfloat16", max_model_len=1024)
    monkeypatch.delenv("VLMSERVE_PREFILL_GRAPH_TOKENS")
    if not graphs.llm_engine.runner.attn_backend.fresh_path:
        pytest.skip("this torch has no FlashAttention for this GPU")
    base = _prompts(1, (200,))[0]["prompt_token_ids"]
    no_prompt_lp = SamplingParams(temperature=0.0, max_tokens=4, logprobs=3, ignore_eos=True)
    for llm in (graphs, eager):
        llm.generate({"prompt_token_ids": base}, no_prompt_lp, use_tqdm=False)
    # alone: a fresh prompt (the fresh path), then one whose first 192 tokens are cached (the Triton kernel)
    outs = {}
    for name, llm in (("graphs", graphs), ("eager", eager)):
        outs[name] = [llm.generate(p, PARAMS, use_tqdm=False)[0] for p in _prompts(2, (70, 333))]
        outs[name] += [llm.generate({"prompt_token_ids": base + [7, 8, 9]}, no_prompt_lp, use_tqdm=False)[0]]
    for a, b in zip(outs["graphs"][:2], outs["eager"][:2]):
        _close(a, b)
    a, b = outs["graphs"][2], outs["eager"][2]
    for x, y in zip(a.outputs[0].logprobs, b.outputs[0].logprobs):
        for tok in set(x) & set(y):
            assert abs(x[tok].logprob - y[tok].logprob) < TOL
    kinds = {fresh for _, fresh in graphs.llm_engine.runner.prefill_graphs.graphs}
    assert kinds == {True, False}  # one graph per kind of chunk
    assert graphs.llm_engine.scheduler.num_cached_tokens > 0
