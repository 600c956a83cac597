"""The streaming GEMV kernel against its torch reference, on the CPU through Triton's interpreter
(conftest chooses it for the session on machines without a GPU), and which linear layers take it."""
import os

import pytest
import torch

pytest.importorskip("triton")
if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("no GPU and not in Triton's interpreter", allow_module_level=True)

from vlmserve.kernels import triton_gemv as tg  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("M, N, K", [(1, 200, 300), (3, 64, 1000), (4, 130, 257), (2, 96, 128), (1, 7, 1030)])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("block_n, block_k", [(8, 128), (16, 64)])
def test_matches_reference(M, N, K, bias, block_n, block_k):
    # N and K not multiples of the tiles: the last row tile and the last K tile are partial
    g = torch.Generator().manual_seed(M * 1000 + N + K)
    x = torch.randn(M, K, generator=g).to(DEV)
    w = torch.randn(N, K, generator=g).to(DEV)
    b = torch.randn(N, generator=g).to(DEV) if bias else None
    got = tg.gemv(x, w, b, block_n=block_n, block_k=block_k)
    torch.testing.assert_close(got, tg.reference_gemv(x, w, b), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("M, N, K, bias", [(1, 40, 300, False), (2, 17, 1030, True)])
def test_silu_and_mul_on_the_way_in(M, N, K, bias):
    # the gated MLP's down projection reading [gate | up]: as the SiLU-and-mul kernel, then the GEMV
    from vlmserve.kernels import triton_fused

    g = torch.Generator().manual_seed(N + K)
    gate_up = torch.randn(M, 2 * K, generator=g).to(DEV)
    w = torch.randn(N, K, generator=g).to(DEV)
    b = torch.randn(N, generator=g).to(DEV) if bias else None
    got = tg.gemv(gate_up, w, b, block_n=8, block_k=128, silu_and_mul=True)
    torch.testing.assert_close(got, tg.reference_gemv(gate_up, w, b, silu_and_mul=True), atol=1e-4, rtol=1e-4)
    two_kernels = tg.gemv(triton_fused.silu_and_mul(gate_up), w, b, block_n=8, block_k=128)
    torch.testing.assert_close(got, two_kernels, atol=0, rtol=0)
    assert tg.usable(gate_up[:1], w, silu_and_mul=True) and not tg.usable(gate_up[:1], w)


@pytest.mark.parametrize("M, N, K, bias", [(1, 40, 300, False), (2, 17, 1030, True)])
def test_rms_norm_on_the_way_in(M, N, K, bias):
    # the projection after an RMSNorm: W (g * x) / rms(x), the squares summed in the same pass
    from vlmserve.kernels import triton_fused

    g = torch.Generator().manual_seed(N + K + 1)
    x = (torch.randn(M, K, generator=g) * 3).to(DEV)
    w = torch.randn(N, K, generator=g).to(DEV)
    gain = torch.rand(K, generator=g).to(DEV) + 0.5
    b = torch.randn(N, generator=g).to(DEV) if bias else None
    got = tg.gemv(x, w, b, block_n=8, block_k=128, norm_weight=gain, eps=1e-5)
    torch.testing.assert_close(got, tg.reference_gemv(x, w, b, norm_weight=gain, eps=1e-5), atol=1e-4, rtol=1e-4)
    # in float32 the norm kernel's roundings are none: the two kernels agree to float32's noise
    two_kernels = tg.gemv(triton_fused.rms_norm(x, gain, 1e-5), w, b, block_n=8, block_k=128)
    torch.testing.assert_close(got, two_kernels, atol=1e-4, rtol=1e-4)
    # and the norm matters: without it the product is far off
    assert (tg.gemv(x, w, b, block_n=8, block_k=128) - got).abs().max() > 1


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_residual_added_on_the_way_out(dtype):
    g = torch.Generator().manual_seed(5)
    x = torch.randn(1, 300, generator=g).to(DEV, dtype)
    w = (torch.randn(70, 300, generator=g) * 300 ** -0.5).to(DEV, dtype)
    r = torch.randn(1, 2 * 70, generator=g).to(DEV, dtype)[:, ::2]  # strided: copied first
    got = tg.gemv(x, w, block_n=8, block_k=128, residual=r)
    # bit for bit the GEMV, then torch's add (Triton's interpreter rounds float32 to bfloat16 its own way,
    # not torch's: there, one bfloat16 step apart at most)
    exact = dtype == torch.float32 or torch.cuda.is_available()
    torch.testing.assert_close(got, tg.gemv(x, w, block_n=8, block_k=128) + r, atol=0 if exact else 1.6e-2,
                               rtol=0 if exact else 8e-3)
    tol = 1e-4 if dtype == torch.float32 else 3.2e-2  # bf16: two roundings may land an ulp (at 4: 1/64) apart
    torch.testing.assert_close(got, tg.reference_gemv(x, w, residual=r), atol=tol, rtol=tol)


def test_rows_of_x_apart_in_memory():
    x = torch.randn(4, 2 * 96)[:, :96]  # a column slice: rows 192 elements apart
    w = torch.randn(40, 96)
    torch.testing.assert_close(tg.gemv(x.to(DEV), w.to(DEV), block_n=8, block_k=32),
                               tg.reference_gemv(x, w).to(DEV), atol=1e-4, rtol=1e-4)


def test_only_single_rows_are_taken():
    w = torch.randn(40, 96).to(DEV)
    assert tg.usable(torch.randn(tg.MAX_ROWS, 96).to(DEV), w)
    assert not tg.usable(torch.randn(tg.MAX_ROWS + 1, 96).to(DEV), w)
    assert not tg.usable(torch.randn(2, 96).to(DEV).to(torch.float64), w)  # dtypes differ
    assert not tg.usable(torch.randn(2, 95).to(DEV), w)  # K differs
    assert not tg.usable(torch.randn(2, 3, 96).to(DEV), w)


def test_linear_layers_route_single_rows(monkeypatch):
    from vlmserve.layers.linear import route_single_rows_through_triton_gemv

    lin = torch.nn.Linear(64, 48).to(torch.bfloat16)
    assert route_single_rows_through_triton_gemv(lin) == 0  # CPU weights stay with oneDNN
    if not torch.cuda.is_available():
        return
    lin = lin.cuda()
    monkeypatch.setenv("VLMSERVE_TRITON_GEMV", "0")
    assert route_single_rows_through_triton_gemv(lin) == 0
    monkeypatch.setenv("VLMSERVE_TRITON_GEMV", "1")
    assert route_single_rows_through_triton_gemv(lin) == 1
    for rows in (1, 3):  # 3 rows: cuBLAS, through the same forward
        x = torch.randn(rows, 64, device="cuda", dtype=torch.bfloat16)
        torch.testing.assert_close(lin(x), tg.reference_gemv(x, lin.weight, lin.bias), atol=2e-2, rtol=2e-2)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="routing happens for CUDA weights")
def test_gated_down_projection_fuses_silu_for_one_row(monkeypatch):
    from vlmserve.layers.activation import ActAndMul
    from vlmserve.layers.linear import gated_down_proj, route_single_rows_through_triton_gemv

    monkeypatch.setenv("VLMSERVE_TRITON_GEMV", "1")
    down = torch.nn.Linear(96, 48, device="cuda", dtype=torch.bfloat16)
    act = ActAndMul("silu")
    assert route_single_rows_through_triton_gemv(down) == 1
    for rows in (1, 2):  # one row: one kernel; two: SiLU-and-mul, then cuBLAS
        gate_up = torch.randn(rows, 192, device="cuda", dtype=torch.bfloat16)
        want = tg.reference_gemv(gate_up, down.weight, down.bias, silu_and_mul=True)
        torch.testing.assert_close(gated_down_proj(down, act, gate_up), want, atol=2e-2, rtol=2e-2)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="programmatic dependent launch needs a GPU")
def test_dependent_launch_in_a_cuda_graph_reads_what_the_kernel_before_wrote():
    # a chain where every GEMV reads the last one's output: launched early, each must still wait for it
    from vlmserve.kernels import pdl

    if not pdl.enabled(torch.empty(1, device="cuda")):
        pytest.skip("no programmatic dependent launch on this GPU or Triton")
    ws = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * k ** -0.5
          for n, k in ((4096, 1024), (1024, 4096)) * 4]
    x = torch.randn(1, 1024, device="cuda", dtype=torch.bfloat16)

    def chain(pdl):
        y = x * 2  # an ordinary kernel first
        for w in ws:
            y = tg.gemv(y, w, pdl=pdl)
        return y
    want = chain(False)
    chain(True)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        got = chain(True)
    for _ in range(3):
        x.normal_()
        want = chain(False)
        graph.replay()
        torch.testing.assert_close(got, want, atol=0, rtol=0)


@pytest.mark.parametrize("qkv_bias", [False, True])  # Llama; Qwen2 (a bias on q, k, v)
def test_a_decode_layer_with_its_norms_and_residual_adds_inside_the_gemvs(monkeypatch, qkv_bias):
    # LlamaDecoderLayer.forward_one_row (single-stream decode on the GPU) against the layer's ordinary forward,
    # in float32: after a prefill, one decode token through two layers
    from transformers import LlamaConfig

    from vlmserve.layers.attention import AttentionMetadata
    from vlmserve.layers.attention.backends import TorchSDPABackend
    from vlmserve.models import llama

    cfg = LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-5, attention_bias=qkv_bias)
    torch.manual_seed(0)
    model = llama.LlamaModel(cfg, max_model_len=64).to(DEV)
    for layer in model.layers:
        for norm in (layer.input_layernorm, layer.post_attention_layernorm):
            norm.weight.data.uniform_(0.5, 1.5)
        layer.self_attn.attn.backend = TorchSDPABackend()
        layer.self_attn.attn.kv_cache = torch.zeros(TorchSDPABackend.kv_cache_shape(4, 4, 2, 16), device=DEV)
    tables = torch.arange(4, device=DEV)[None]

    def meta(start, n):
        return AttentionMetadata(num_decodes=int(start > 0), query_start_loc=[0, n], seq_lens=[start + n],
                                 slot_mapping=torch.arange(start, start + n, device=DEV), block_tables=tables,
                                 seq_lens_tensor=torch.tensor([start + n], device=DEV), block_size=4)

    with torch.no_grad():
        model(torch.randint(0, 64, (6,)).to(DEV), torch.arange(6, device=DEV), meta(0, 6))  # the prompt, cached
        token, pos = torch.tensor([7], device=DEV), torch.tensor([6], device=DEV)
        want = model(token, pos, meta(6, 1))
        monkeypatch.setattr(llama, "gemv_fusion_enabled", lambda *a: True)
        got = model(token, pos, meta(6, 1))
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    assert (got - model.norm(model.embed_tokens(token))).abs().max() > 0.1  # the layers did something


@pytest.mark.skipif(not torch.cuda.is_available(), reason="single-stream decode's fused path runs on a GPU")
def test_single_stream_decode_with_fusions_keeps_tokens_and_logprobs(tmp_path, monkeypatch):
    # the engine's decode graphs with the norms and residual adds in the GEMVs and rotary in the KV store (the
    # default on sm_90+) against both kept apart: the same greedy tokens (but at a near tie), logprobs within
    # bf16's rounding
    from vlmserve import LLM, SamplingParams
    from vlmserve.testing.checkpoints import make_text_checkpoint

    monkeypatch.setenv("VLMSERVE_TRITON_GEMV", "1")
    model_dir = make_text_checkpoint(str(tmp_path / "llama"), "llama", num_key_value_heads=2)
    params = SamplingParams(temperature=0.0, max_tokens=12, logprobs=3, ignore_eos=True)
    prompt = {"prompt_token_ids": list(range(5, 45))}
    outs = []
    for on in ("1", "0"):
        monkeypatch.setenv("VLMSERVE_GEMV_FUSION", on)
        monkeypatch.setenv("VLMSERVE_ROTARY_IN_KV_STORE", on)
        llm = LLM(model_dir, dtype="bfloat16", max_model_len=256, gpu_memory_utilization=0.2)
        outs.append(llm.generate(prompt, params, use_tqdm=False)[0].outputs[0])
        del llm
    fused, apart = outs
    for i, (a, b) in enumerate(zip(fused.logprobs, apart.logprobs)):
        for tok in set(a) & set(b):
            assert abs(a[tok].logprob - b[tok].logprob) < 0.05
        if fused.token_ids[i] != apart.token_ids[i]:  # a near tie, broken apart by the rounding: past it, the
            # sequences differ
            top = sorted((lp.logprob for lp in a.values()), reverse=True)
            assert top[0] - top[1] < 0.05
            break
