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


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("N, K", [(9, 300), (5, 9000)])  # tiles_for: 2 x 2048 with 4 warps; over 8192: 2 x 1024
def test_default_tiles(N, K, dtype):
    g = torch.Generator().manual_seed(N + K)
    x = torch.randn(1, K, generator=g).to(DEV, dtype)
    w = (torch.randn(N, K, generator=g) * K ** -0.5).to(DEV, dtype)
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(tg.gemv(x, w), tg.reference_gemv(x, w), atol=tol, rtol=tol)


@pytest.mark.parametrize("M, N, K, bias, block_n", [(1, 40, 300, False, 2), (2, 34, 1030, True, 4)])
def test_silu_and_mul_on_the_way_out(M, N, K, bias, block_n):
    # a gated MLP's [gate; up] projection writing silu(gate) * up: as the GEMV, then the SiLU-and-mul kernel
    from vlmserve.kernels import triton_fused

    g = torch.Generator().manual_seed(N + K)
    x = torch.randn(M, K, generator=g).to(DEV)
    w = (torch.randn(N, K, generator=g) * K ** -0.5).to(DEV)
    b = torch.randn(N, generator=g).to(DEV) if bias else None
    got = tg.gemv(x, w, b, block_n=block_n, block_k=128, silu_and_mul=True)
    assert got.shape == (M, N // 2)
    torch.testing.assert_close(got, tg.reference_gemv(x, w, b, silu_and_mul=True), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got, triton_fused.silu_and_mul(tg.gemv(x, w, b, block_n=block_n, block_k=128)),
                               atol=1e-6, rtol=1e-6)
    with pytest.raises(ValueError, match="even"):
        tg.gemv(x, w[:-1], silu_and_mul=True)
    if torch.cuda.is_available():  # bfloat16 on the GPU: bit for bit the two kernels
        xb, wb = x.bfloat16(), w.bfloat16()
        torch.testing.assert_close(tg.gemv(xb, wb, block_n=block_n, block_k=128, silu_and_mul=True),
                                   triton_fused.silu_and_mul(tg.gemv(xb, wb, block_n=block_n, block_k=128)),
                                   atol=0, rtol=0)


@pytest.mark.parametrize("K", [100, 256, 700])  # inside the first tile, whole tiles, a partial last one
def test_first_tile_read_before_the_wait_gives_the_same_sums(K):
    # early (pdl.early("GEMV")): the first tile of W is read before the wait, out of the loop
    g = torch.Generator().manual_seed(K)
    x = torch.randn(1, K, generator=g).to(DEV)
    w = torch.randn(37, K, generator=g).to(DEV)
    for silu in (False, True):
        w_ = w[:36] if silu else w
        torch.testing.assert_close(tg.gemv(x, w_, block_n=4, block_k=128, early=True, silu_and_mul=silu),
                                   tg.gemv(x, w_, block_n=4, block_k=128, early=False, silu_and_mul=silu),
                                   atol=0, rtol=0)


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
def test_gated_mlp_activation_in_the_gate_up_gemv_for_one_row(monkeypatch):
    from vlmserve.layers.activation import ActAndMul
    from vlmserve.layers.linear import MergedLinear, gated_act, route_single_rows_through_triton_gemv

    monkeypatch.setenv("VLMSERVE_TRITON_GEMV", "1")
    gate_up = MergedLinear(96, {"gate": 48, "up": 48}, bias=True).cuda().bfloat16()
    act = ActAndMul("silu")
    assert route_single_rows_through_triton_gemv(gate_up) == 1
    for rows in (1, 2):  # one row: one kernel; two: cuBLAS, then SiLU-and-mul
        x = torch.randn(rows, 96, device="cuda", dtype=torch.bfloat16)
        want = tg.reference_gemv(x, gate_up.weight, gate_up.bias, silu_and_mul=True)
        torch.testing.assert_close(gated_act(gate_up, act, x), want, atol=2e-2, rtol=2e-2)


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


@pytest.mark.skipif(not torch.cuda.is_available(), reason="single-stream decode's kernels run on a GPU")
def test_single_stream_decode_kernels_keep_tokens_and_logprobs(tmp_path, monkeypatch):
    # the engine's decode graphs with this GEMV (SiLU-and-mul in the gate_up projection's) and rotary inside the
    # KV store (the defaults on sm_90+) against cuBLAS, the SiLU-and-mul kernel and the rotary kernel: the same
    # greedy tokens (but at a near tie), logprobs within bf16's rounding
    from vlmserve import LLM, SamplingParams
    from vlmserve.testing.checkpoints import make_text_checkpoint

    model_dir = make_text_checkpoint(str(tmp_path / "llama"), "llama", num_key_value_heads=2)
    params = SamplingParams(temperature=0.0, max_tokens=12, logprobs=3, ignore_eos=True)
    prompt = {"prompt_token_ids": list(range(5, 45))}
    outs = []
    for on in ("1", "0"):
        monkeypatch.setenv("VLMSERVE_TRITON_GEMV", on)
        monkeypatch.setenv("VLMSERVE_ROTARY_IN_KV_STORE", on)
        llm = LLM(model_dir, dtype="bfloat16", max_model_len=256, gpu_memory_utilization=0.2)
        outs.append(llm.generate(prompt, params, use_tqdm=False)[0].outputs[0])
        del llm
    ours, apart = outs
    for i, (a, b) in enumerate(zip(ours.logprobs, apart.logprobs)):
        for tok in set(a) & set(b):
            assert abs(a[tok].logprob - b[tok].logprob) < 0.05
        if ours.token_ids[i] != apart.token_ids[i]:  # a near tie, broken apart by the rounding: past it, the
            # sequences differ
            top = sorted((lp.logprob for lp in a.values()), reverse=True)
            assert top[0] - top[1] < 0.05
            break
