"""On a GPU the engine compiles its attention kernels' variants, and its decode GEMV's, at startup: a
serving run (mixed steps of many batch sizes, chunked prefill after cached context) compiles none of them."""
import pytest
import torch

from vlmserve import LLM, SamplingParams
from vlmserve.kernels import triton_gemv as tg
from vlmserve.kernels import triton_packed_attention as tpk
from vlmserve.kernels import triton_paged_attention as tpa

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")

KERNELS = ((tpa, "_decode_kernel"), (tpa, "_merge_splits_kernel"), (tpa, "_prefill_kernel"),
           (tpk, "_packed_attention_kernel"),  # several fresh prompts in a step
           (tg, "_gemv_kernel"))  # single-stream decode steps (sm_90+; compiled by the graphs' capture)


def compiled_variants() -> dict[str, int]:
    out = {}
    for module, name in KERNELS:
        caches = getattr(getattr(module, name), "device_caches", None)
        assert caches is not None, "this Triton keeps its compiled kernels elsewhere: update the test"
        out[name] = sum(len(c[0]) for c in caches.values())
    return out


def test_no_attention_kernel_compiles_after_startup(text_model_dir):
    d = text_model_dir("llama")
    # a small step budget: long prompts go in chunks (prefill over cached context) beside decodes
    llm = LLM(d, dtype="bfloat16", max_model_len=1024, max_num_batched_tokens=256, max_num_seqs=64)
    at_start = compiled_variants()
    assert at_start["_decode_kernel"] >= 5 and at_start["_prefill_kernel"] >= 1
    assert at_start["_packed_attention_kernel"] >= 1 or not llm.llm_engine.runner.attn_backend.fresh_path
    prompts = [{"prompt_token_ids": [(7 * i + j) % 200 + 3 for j in range(40 + 37 * (i % 13))]} for i in range(48)]
    params = [SamplingParams(temperature=0, max_tokens=8 + 11 * (i % 7), ignore_eos=True) for i in range(48)]
    outs = llm.generate(prompts, params, use_tqdm=False)
    assert [len(o.outputs[0].token_ids) for o in outs] == [8 + 11 * (i % 7) for i in range(48)]
    assert compiled_variants() == at_start
