"""The CPU fused kernels (kernels/csrc/fused_ops_cpu.cpp) against their torch references."""
import pytest
import torch

from vlmserve.kernels import fused_cpu as fc

pytestmark = pytest.mark.skipif(not fc.available(), reason="the CPU kernels could not be built")
TOL = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.bfloat16: dict(atol=0.07, rtol=0.02)}


@pytest.fixture(params=[torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def dtype(request):
    return request.param


@torch.inference_mode()
def test_rms_norm(dtype):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(37, 200, generator=g).to(dtype)
    w = torch.randn(200, generator=g).to(dtype)
    torch.testing.assert_close(fc.rms_norm(x, w, 1e-6), fc.reference_rms_norm(x, w, 1e-6), **TOL[dtype])


def test_add_rms_norm_leaves_its_inputs(dtype):
    g = torch.Generator().manual_seed(1)
    x, r = (torch.randn(37, 200, generator=g).to(dtype) for _ in range(2))
    w = torch.randn(200, generator=g).to(dtype)
    x0, r0 = x.clone(), r.clone()
    out, s = fc.add_rms_norm(x, r, w, 1e-5)
    torch.testing.assert_close(s, x0 + r0, atol=0, rtol=0)
    torch.testing.assert_close(out, fc.reference_rms_norm(x0 + r0, w, 1e-5), **TOL[dtype])
    assert torch.equal(x, x0) and torch.equal(r, r0)


@pytest.mark.parametrize("rot", [64, 32], ids=["full", "partial"])
def test_rotary_in_place_on_a_strided_view(dtype, rot):
    """q and k are column slices of the fused qkv output, as the models pass them."""
    g = torch.Generator().manual_seed(2)
    T, Hq, Hk, D = 23, 4, 2, 64
    qkv = torch.randn(T, (Hq + 2 * Hk) * D, generator=g).to(dtype)
    q, k = qkv[:, :Hq * D].view(T, Hq, D), qkv[:, Hq * D:(Hq + Hk) * D].view(T, Hk, D)
    v_before = qkv[:, (Hq + Hk) * D:].clone()
    cos, sin = (torch.randn(T, 1, rot, generator=g).to(dtype) for _ in range(2))
    want_q, want_k = fc.reference_rotary(q, cos, sin), fc.reference_rotary(k, cos, sin)
    fc.rotary_(q, cos, sin)
    fc.rotary_(k, cos, sin)
    torch.testing.assert_close(q, want_q, **TOL[dtype])
    torch.testing.assert_close(k, want_k, **TOL[dtype])
    assert torch.equal(qkv[:, (Hq + Hk) * D:], v_before)


def test_silu_and_mul(dtype):
    g = torch.Generator().manual_seed(3)
    x = (torch.randn(19, 2 * 300, generator=g) * 8).to(dtype)
    x[0, :5] = torch.tensor([-200.0, -90.0, 0.0, 90.0, 200.0])  # beyond exp's range
    torch.testing.assert_close(fc.silu_and_mul(x), fc.reference_silu_and_mul(x), **TOL[dtype])


def test_layers_use_the_kernels_and_agree_with_their_torch_path():
    from vlmserve.layers.activation import ActAndMul
    from vlmserve.layers.layernorm import RMSNorm

    g = torch.Generator().manual_seed(4)
    norm = RMSNorm(96, 1e-6)
    torch.nn.init.normal_(norm.weight, generator=g)
    x, r = torch.randn(11, 96, generator=g), torch.randn(11, 96, generator=g)
    with torch.inference_mode():
        out, s = norm(x, r)
        want_out, want_s = norm.forward_torch(x, r)
        torch.testing.assert_close(out, want_out, **TOL[torch.float32])
        torch.testing.assert_close(s, want_s, **TOL[torch.float32])
        y = torch.randn(11, 2 * 50, generator=g)
        torch.testing.assert_close(ActAndMul("silu")(y), ActAndMul("silu").forward_torch(y), **TOL[torch.float32])
