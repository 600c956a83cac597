"""The Triton paged-attention kernels against their torch references, on the CPU through Triton's
interpreter (TRITON_INTERPRET=1), at float32 tolerance. Caches hold NaN outside the sequences' tokens
and block tables hold huge ids past their used entries, so a read outside a sequence would show."""
import importlib
import os
import sys

import pytest
import torch

pytest.importorskip("triton")
if os.environ.get("TRITON_INTERPRET") != "1":  # conftest runs the session in the interpreter without a GPU
    pytest.skip("Triton's interpreter is off (a GPU machine): scripts/gpu_check.py checks the kernels there",
                allow_module_level=True)
if "vlmserve.kernels.triton_paged_attention" in sys.modules:  # decorated without the interpreter
    importlib.reload(sys.modules["vlmserve.kernels.triton_paged_attention"])
from vlmserve.kernels import triton_paged_attention as tpa  # noqa: E402

TOL = dict(atol=1e-4, rtol=1e-4)


def _paged_cache(lens, block_size, kv_heads, head_dim, g, num_blocks=64):
    """Random caches filled for sequences of `lens` tokens; NaN elsewhere."""
    k = torch.full((num_blocks, block_size, kv_heads, head_dim), float("nan"))
    v = torch.full_like(k, float("nan"))
    max_blocks = max(-(-L // block_size) for L in lens) + 1
    tables = torch.full((len(lens), max_blocks), 10**9, dtype=torch.long)
    ids = torch.randperm(num_blocks, generator=g)
    used = 0
    for b, L in enumerate(lens):
        nb = -(-L // block_size)
        tables[b, :nb] = ids[used:used + nb]
        used += nb
        for name, cache in (("k", k), ("v", v)):
            flat = cache[tables[b, :nb]].reshape(-1, kv_heads, head_dim)
            flat[:L] = torch.randn(L, kv_heads, head_dim, generator=g)
            cache[tables[b, :nb]] = flat.view(nb, block_size, kv_heads, head_dim)
    return k, v, tables


@pytest.mark.parametrize("heads, kv_heads, head_dim", [(4, 4, 32), (8, 2, 24)])
@pytest.mark.parametrize("window", [None, 7])
@pytest.mark.parametrize("num_splits", [1, 4])
def test_decode_matches_reference(heads, kv_heads, head_dim, window, num_splits):
    g = torch.Generator().manual_seed(heads * 100 + head_dim)
    lens = [1, 9, 16, 17, 70]
    k, v, tables = _paged_cache(lens, 8, kv_heads, head_dim, g)
    q = torch.randn(len(lens), heads, head_dim, generator=g)
    seq_lens = torch.tensor(lens)
    scale = head_dim ** -0.5
    out = tpa.paged_decode_attention(q, k, v, tables, seq_lens, scale, window, num_splits=num_splits, block_n=16)
    ref = tpa.reference_paged_decode_attention(q, k, v, tables, seq_lens, scale, window)
    assert not out.isnan().any()
    torch.testing.assert_close(out, ref, **TOL)


def test_decode_padded_rows_give_zeros():
    g = torch.Generator().manual_seed(1)
    k, v, tables = _paged_cache([5, 12], 4, 2, 16, g)
    tables = torch.cat([tables, torch.zeros_like(tables[:1])])
    seq_lens = torch.tensor([5, 12, 0])
    q = torch.randn(3, 4, 16, generator=g)
    out = tpa.paged_decode_attention(q, k, v, tables, seq_lens, 0.25, num_splits=2, block_n=16)
    ref = tpa.reference_paged_decode_attention(q[:2], k, v, tables[:2], seq_lens[:2], 0.25)
    torch.testing.assert_close(out[:2], ref, **TOL)
    assert (out[2] == 0).all()


@pytest.mark.parametrize("block_m", [16, 32])
@pytest.mark.parametrize("heads, kv_heads, head_dim", [(4, 4, 32), (8, 2, 16), (4, 2, 80)])
@pytest.mark.parametrize("window", [None, 11])
def test_prefill_with_cached_context_matches_reference(heads, kv_heads, head_dim, window, block_m):
    """Blocks of rows as wide as the key tiles and wider; head_dim 80 pads to 128 under a mask."""
    g = torch.Generator().manual_seed(heads + head_dim)
    # two decodes first (skipped: first_seq=2), then a fresh prompt, a chunk after 20 cached tokens
    # (a prefix-cache hit or an earlier chunk), and a one-token tail of a chunked prefill
    lens = [9, 30, 37, 45, 21]
    q_lens = [1, 1, 37, 25, 1]
    k, v, tables = _paged_cache(lens, 8, kv_heads, head_dim, g)
    qsl = torch.tensor([0] + q_lens).cumsum(0)
    q = torch.randn(int(qsl[-1]), heads, head_dim, generator=g)
    seq_lens = torch.tensor(lens)
    scale = head_dim ** -0.5
    out = torch.full_like(q, float("nan"))
    tpa.paged_prefill_attention(q, k, v, tables, qsl, seq_lens, scale, window, first_seq=2, out=out,
                                block_m=block_m, block_n=16)
    ref = tpa.reference_paged_prefill_attention(q, k, v, tables, qsl, seq_lens, scale, window, first_seq=2)
    assert not out[2:].isnan().any()
    torch.testing.assert_close(out[2:], ref[2:], **TOL)


def test_store_kv_skips_negative_slots():
    g = torch.Generator().manual_seed(3)
    k_cache = torch.randn(6, 4, 2, 8, generator=g)
    v_cache = torch.randn(6, 4, 2, 8, generator=g)
    k, v = torch.randn(5, 2, 8, generator=g), torch.randn(5, 2, 8, generator=g)
    slots = torch.tensor([3, 17, -1, 0, 23])
    kr, vr = k_cache.clone(), v_cache.clone()
    tpa.reference_store_kv(k, v, kr, vr, slots)
    tpa.store_kv(k, v, k_cache, v_cache, slots)
    assert torch.equal(k_cache, kr) and torch.equal(v_cache, vr)


@pytest.mark.parametrize("hq, hkv, d", [(4, 2, 8), (3, 3, 16), (28, 4, 32)])
def test_store_kv_rotates_q_and_k_first(hq, hkv, d):
    # one kernel for rotary and the KV store: as the rotary embedding, then the store
    from vlmserve.layers.rotary import _rotate

    g = torch.Generator().manual_seed(hq * 100 + d)
    k_cache, v_cache = torch.randn(6, 4, hkv, d, generator=g), torch.randn(6, 4, hkv, d, generator=g)
    qkv = torch.randn(5, (hq + 2 * hkv) * d, generator=g)  # the projection's rows, split as the models do
    q, k, v = (t.view(5, -1, d) for t in qkv.split([hq * d, hkv * d, hkv * d], dim=-1))
    angles = torch.rand(5, 1, d // 2, generator=g) * 6
    cos, sin = torch.cat([angles.cos()] * 2, -1), torch.cat([angles.sin()] * 2, -1)
    slots = torch.tensor([3, 17, -1, 0, 23])
    want_q, want_k = _rotate(q, cos, sin, d), _rotate(k, cos, sin, d)
    kr, vr = k_cache.clone(), v_cache.clone()
    tpa.reference_store_kv(want_k, v, kr, vr, slots)
    v_before = v.clone()
    tpa.store_kv(k, v, k_cache, v_cache, slots, rotary=(q, cos, sin))
    torch.testing.assert_close(q, want_q, **TOL)  # in place, the padded row's too
    torch.testing.assert_close(k, want_k, **TOL)
    assert torch.equal(v, v_before)
    torch.testing.assert_close(k_cache, kr, **TOL)
    assert torch.equal(v_cache, vr)


def test_store_kv_odd_head_size():
    g = torch.Generator().manual_seed(4)
    k_cache, v_cache = torch.randn(3, 4, 2, 7, generator=g), torch.randn(3, 4, 2, 7, generator=g)
    k, v = torch.randn(2, 2, 7, generator=g), torch.randn(2, 2, 7, generator=g)
    slots = torch.tensor([5, 0])
    kr, vr = k_cache.clone(), v_cache.clone()
    tpa.reference_store_kv(k, v, kr, vr, slots)
    tpa.store_kv(k, v, k_cache, v_cache, slots)
    assert torch.equal(k_cache, kr) and torch.equal(v_cache, vr)


def test_backend_warm_up_runs_every_split_count_and_leaves_the_cache(monkeypatch):
    """The CUDA backend's startup compile (TritonPagedAttentionBackend.warm_up): every decode split
    count and the prefill kernel run, once per kind of layer, reading the cache without writing it."""
    import types

    from vlmserve.layers.attention.triton_backend import TritonPagedAttentionBackend

    calls = []
    decode, prefill = tpa.paged_decode_attention, tpa.paged_prefill_attention
    monkeypatch.setattr(tpa, "paged_decode_attention",
                        lambda *a, **k: calls.append(("decode", k["num_splits"])) or decode(*a, **k))
    monkeypatch.setattr(tpa, "paged_prefill_attention",
                        lambda *a, **k: calls.append(("prefill", None)) or prefill(*a, **k))
    g = torch.Generator().manual_seed(0)
    kv = torch.randn(2, 4, 16, 2, 64, generator=g)
    kv[:, 0, 0] = float("nan")  # the slot the warm-up reads: never written
    before = kv.clone()
    layer = types.SimpleNamespace(kv_cache=kv, num_heads=4, head_dim=64, scale=0.125, sliding_window=None)
    other = types.SimpleNamespace(kv_cache=None, num_heads=4, head_dim=64, scale=0.125, sliding_window=None)
    TritonPagedAttentionBackend(torch.device("cpu")).warm_up([layer, layer, other])
    assert calls == [("decode", s) for s in (1, 2, 4, 8, 16)] + [("prefill", None)]
    torch.testing.assert_close(kv, before, equal_nan=True, atol=0, rtol=0)


@pytest.mark.parametrize("dtype, packed", [(torch.float16, True), (torch.float32, False)])
def test_backend_warm_up_compiles_the_packed_kernel_where_fresh_prompts_take_it(monkeypatch, dtype, packed):
    """Where the backend sends fresh prompts to the packed causal kernel (16-bit layers), its startup
    compiles that kernel too, once per kind of layer, with the layer's grouped key heads."""
    import types

    from vlmserve.kernels import triton_packed_attention as tpk
    from vlmserve.layers.attention.triton_backend import TritonPagedAttentionBackend

    calls = []
    real = tpk.packed_attention
    monkeypatch.setattr(tpk, "packed_attention",
                        lambda q, k, *a, **kw: calls.append((q.shape[1], k.shape[1], kw)) or real(q, k, *a, **kw))
    kv = torch.zeros(2, 4, 16, 2, 32, dtype=dtype)
    layer = types.SimpleNamespace(kv_cache=kv, num_heads=4, num_kv_heads=2, head_dim=32, scale=0.125,
                                  sliding_window=None)
    backend = TritonPagedAttentionBackend(torch.device("cpu"))
    backend.fresh_path = True
    backend.warm_up([layer, layer])
    assert calls == ([(4, 2, {"causal": True})] if packed else [])


def test_single_stream_decode_splits_and_tiles():
    # one sequence: up to 16 splits of >= 64 tokens; 64-token tiles where there are many KV heads (gpu_check --single)
    assert tpa.decode_num_splits(1, 32, 700, 132) == 16 and tpa.decode_num_splits(1, 4, 32768, 132) == 16
    assert tpa.decode_num_splits(1, 32, 100, 132) == 2
    assert tpa.decode_num_splits(2, 32, 700, 132) == 4  # batches keep the rule that fills the GPU once
    bf16 = torch.empty(1, 16, 32, 128, dtype=torch.bfloat16)
    assert tpa.decode_tiles(bf16, 1) == (64, 2) and tpa.decode_tiles(bf16, 2) == (128, 4)
    assert tpa.decode_tiles(bf16[:, :, :4], 1) == (128, 4)
    assert tpa.decode_tiles(bf16.float(), 1) == (64, 4)
