"""The split-K GEMV kernel against its torch reference, on the CPU through Triton's interpreter
(conftest chooses it for the session on machines without a GPU)."""
import os

import pytest
import torch

pytest.importorskip("triton")
if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("no GPU and not in Triton's interpreter", allow_module_level=True)

from vlmserve.kernels import triton_gemv as tg  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("M, N, K, split_k", [(1, 200, 300, None), (3, 64, 1000, 4), (8, 130, 257, 3),
                                              (2, 96, 128, 1)])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("fma", [False, True])
def test_matches_reference(M, N, K, split_k, bias, fma):
    g = torch.Generator().manual_seed(M * 1000 + N + K)
    x = torch.randn(M, K, generator=g).to(DEV)
    w = torch.randn(N, K, generator=g).to(DEV)
    b = torch.randn(N, generator=g).to(DEV) if bias else None
    got = tg.gemv(x, w, b, split_k=split_k, block_n=32, block_k=64, fma=fma)
    torch.testing.assert_close(got, tg.reference_gemv(x, w, b), atol=1e-4, rtol=1e-4)


def test_strided_rows_and_only_small_batches_are_taken():
    x = torch.randn(4, 2 * 96)[:, :96]  # a column slice: rows not contiguous in memory order
    w = torch.randn(40, 96)
    torch.testing.assert_close(tg.gemv(x.to(DEV), w.to(DEV), block_n=32, block_k=32),
                               tg.reference_gemv(x, w).to(DEV), atol=1e-4, rtol=1e-4)
    assert tg.usable(x.to(DEV), w.to(DEV))
    assert not tg.usable(torch.randn(9, 96).to(DEV), w.to(DEV))


def test_linear_layers_route_small_batches_only_when_asked(monkeypatch):
    from vlmserve.layers.linear import route_small_batches_through_triton_gemv

    lin = torch.nn.Linear(64, 48).to(torch.bfloat16)
    assert route_small_batches_through_triton_gemv(lin) == 0  # not asked: nothing changes
    monkeypatch.setenv("VLMSERVE_TRITON_GEMV", "1")
    if not torch.cuda.is_available():
        assert route_small_batches_through_triton_gemv(lin) == 0  # CPU weights stay with oneDNN
        return
    lin = lin.cuda()
    assert route_small_batches_through_triton_gemv(lin) == 1
    x = torch.randn(3, 64, device="cuda", dtype=torch.bfloat16)
    torch.testing.assert_close(lin(x), tg.reference_gemv(x, lin.weight, lin.bias), atol=2e-2, rtol=2e-2)
