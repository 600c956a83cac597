"""Programmatic dependent launch (kernels/pdl.py): where it is on, and, on a GPU that has it, that a decode
layer's Triton kernels launched with it in a CUDA graph give what they give launched the ordinary way."""
import pytest
import torch

from vlmserve.kernels import pdl


def test_off_for_cpu_tensors_and_when_asked(monkeypatch):
    assert not pdl.enabled(torch.empty(1))
    assert pdl.launch_options(False) == {} and pdl.launch_options(True) == {"launch_pdl": True}
    if torch.cuda.is_available():
        monkeypatch.setenv("VLMSERVE_PDL", "0")
        assert not pdl.enabled(torch.empty(1, device="cuda"))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_a_decode_layers_kernels_in_a_graph_match_ordinary_launches(monkeypatch):
    if not pdl.enabled(torch.empty(1, device="cuda")):
        pytest.skip("no programmatic dependent launch on this GPU or Triton")
    from vlmserve.kernels import triton_fused as tf
    from vlmserve.kernels import triton_gemv as tg
    from vlmserve.kernels import triton_paged_attention as tpa

    torch.manual_seed(0)
    dev, dt, H, D, hidden, bs, ctx = "cuda", torch.bfloat16, 8, 128, 1024, 16, 300
    w_qkv = torch.randn(3 * H * D, hidden, device=dev, dtype=dt) * hidden ** -0.5
    w_o = torch.randn(hidden, H * D, device=dev, dtype=dt) * hidden ** -0.5
    norm_w = torch.rand(hidden, device=dev, dtype=dt) + 0.5
    k_cache, v_cache = (torch.randn(ctx // bs + 2, bs, H, D, device=dev, dtype=dt) for _ in range(2))
    table = torch.arange(ctx // bs + 2, device=dev, dtype=torch.int32)[None]
    seq_lens = torch.tensor([ctx], device=dev, dtype=torch.int32)
    slot = torch.tensor([ctx - 1], device=dev, dtype=torch.int64)
    cos = torch.rand(1, 1, D, device=dev, dtype=dt)
    sin = torch.rand(1, 1, D, device=dev, dtype=dt)
    x = torch.randn(1, hidden, device=dev, dtype=dt)
    res = torch.randn(1, hidden, device=dev, dtype=dt)

    def layer():  # as a decode step runs them: norm, qkv, rotary, KV store, attention (split), o
        h, r = tf.rms_norm(x, norm_w, 1e-6, res)
        q, k, v = tg.gemv(h, w_qkv).view(1, 3, H, D).unbind(1)
        q, k = q.contiguous(), k.contiguous()
        tf.rotary_inplace(q, k, cos, sin)
        tpa.store_kv(k, v, k_cache, v_cache, slot)
        o = tpa.paged_decode_attention(q, k_cache, v_cache, table, seq_lens, D ** -0.5, num_splits=4)
        return tg.gemv(o.view(1, -1), w_o) + r

    monkeypatch.setenv("VLMSERVE_PDL", "0")
    want = layer()
    monkeypatch.setenv("VLMSERVE_PDL", "1")
    layer()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        got = layer()
    for _ in range(3):
        x.normal_()
        monkeypatch.setenv("VLMSERVE_PDL", "0")
        want = layer()
        graph.replay()
        torch.testing.assert_close(got, want, atol=0, rtol=0)
