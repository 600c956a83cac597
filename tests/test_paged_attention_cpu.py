"""The CPU paged decode-attention kernel against its torch reference, on random caches whose unused
slots hold NaN (so reading outside a sequence's tokens would show)."""
import pytest
import torch

from vlmserve.kernels import paged_attention_cpu as pa

pytestmark = pytest.mark.skipif(not pa.available(), reason="the C++ kernel could not be built here")


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 2e-6), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("heads, kv_heads, head_dim", [(8, 8, 64), (8, 2, 32), (4, 1, 128)])
@pytest.mark.parametrize("block_size", [8, 16])
@pytest.mark.parametrize("window", [None, 20])
def test_matches_reference(dtype, tol, heads, kv_heads, head_dim, block_size, window):
    g = torch.Generator().manual_seed(heads * 1000 + head_dim + block_size)
    lens = torch.tensor([1, 15, 16, 17, 200, 33])
    num_blocks = 200
    k = torch.full((num_blocks, block_size, kv_heads, head_dim), float("nan"))
    v = torch.full_like(k, float("nan"))
    max_blocks = int((lens.max() + block_size - 1) // block_size) + 2
    tables = torch.full((len(lens), max_blocks), 10**9, dtype=torch.long)  # unused entries: never read
    ids = torch.randperm(num_blocks, generator=g)
    used = 0
    for b, L in enumerate(lens.tolist()):
        nb = -(-L // block_size)
        tables[b, :nb] = ids[used:used + nb]
        used += nb
        flat_k = k[tables[b, :nb]].reshape(-1, kv_heads, head_dim)
        flat_k[:L] = torch.randn(L, kv_heads, head_dim, generator=g)
        k[tables[b, :nb]] = flat_k.view(nb, block_size, kv_heads, head_dim)
        flat_v = v[tables[b, :nb]].reshape(-1, kv_heads, head_dim)
        flat_v[:L] = torch.randn(L, kv_heads, head_dim, generator=g)
        v[tables[b, :nb]] = flat_v.view(nb, block_size, kv_heads, head_dim)
    q = torch.randn(len(lens), heads, head_dim, generator=g)
    k, v, q = k.to(dtype), v.to(dtype), q.to(dtype)
    scale = head_dim ** -0.5
    out = pa.paged_decode_attention(q, k, v, tables, lens, scale, window)
    ref = pa.reference_paged_decode_attention(q, k, v, tables, lens, scale, window)
    assert not out.isnan().any()
    torch.testing.assert_close(out.float(), ref.float(), atol=tol, rtol=tol)


@pytest.mark.parametrize("bad", [-1, 50], ids=["negative", "past the cache"])
def test_block_ids_outside_the_cache_are_refused(bad):
    k = torch.zeros(50, 16, 2, 32)
    q = torch.zeros(2, 2, 32)
    tables = torch.tensor([[0, 1], [2, bad]])
    with pytest.raises(RuntimeError, match="outside the cache"):
        pa.paged_decode_attention(q, k, k.clone(), tables, torch.tensor([20, 20]), 1.0)
    with pytest.raises(RuntimeError, match="does not fit"):
        pa.paged_decode_attention(q, k, k.clone(), tables, torch.tensor([20, 40]), 1.0)
