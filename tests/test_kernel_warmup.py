"""On a GPU the engine compiles its attention kernels' variants, and its decode GEMV's (capturing the decode
graphs), at startup: a serving run (mixed steps of many batch sizes, chunked prefill after cached context)
compiles none of them."""
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
    assert llm.llm_engine.runner.decode_graphs is not None  # captured at startup, not by the first decode step
    assert at_start["_decode_kernel"] >= 5 and at_start["_prefill_kernel"] >= 1
    assert at_start["_packed_attention_kernel"] >= 1 or not llm.llm_engine.runner.attn_backend.fresh_path
    prompts = [{"prompt_token_ids": [(7 * i + j) % 200 + 3 for j in range(40 + 37 * (i % 13))]} for i in range(48)]
    params = [SamplingParams(temperature=0, max_tokens=8 + 11 * (i % 7), ignore_eos=True) for i in range(48)]
    outs = llm.generate(prompts, params, use_tqdm=False)
    assert [len(o.outputs[0].token_ids) for o in outs] == [8 + 11 * (i % 7) for i in range(48)]
    assert compiled_variants() == at_start


def test_vision_attention_cut_variants_compiled_with_the_first_launch():
    """The first launch of a tile configuration compiles the cut's variants (2-4 pieces, both kernels): later
    launches cut any way, at program counts of any divisibility, compile nothing (a run met them mid-run)."""
    if tpk.default_tiles(300, False)[0] != 128:
        pytest.skip("the image tiles changed")
    torch.manual_seed(0)
    qkv = torch.randn(300, 3, 16, 80, device="cuda", dtype=torch.bfloat16)
    q, k, v = qkv.unbind(1)  # rows strided, as the towers' fused projections give them
    cu = torch.tensor([0, 300], device="cuda", dtype=torch.int32)
    tpk.packed_attention(q, k, v, cu, 300, 80 ** -0.5)  # plans its launch: meets the configuration
    if not any(tpk._SLOTS.values()):
        pytest.skip("this Triton's compiled kernels do not tell their registers: no cuts")
    kernels = (tpk._packed_attention_kernel, tpk._merge_pieces_kernel)
    before = [sum(len(c[0]) for c in kern.device_caches.values()) for kern in kernels]
    ref = tpk.packed_attention(q, k, v, cu, 300, 80 ** -0.5, last_split=(0, 1))
    programs = 3 * 16  # 3 blocks of 128 rows x 16 heads
    for cut in (1, 16, 17, programs):
        for pieces in (2, 3, 4):
            out = tpk.packed_attention(q, k, v, cu, 300, 80 ** -0.5, last_split=(cut, pieces))
            torch.testing.assert_close(out, ref, rtol=2e-2, atol=2e-2)
    torch.cuda.synchronize()
    assert [sum(len(c[0]) for c in kern.device_caches.values()) for kern in kernels] == before
