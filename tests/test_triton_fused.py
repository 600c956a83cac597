"""The fused Triton kernels (RMSNorm, LayerNorm, rotary, SiLU-and-mul, QuickGELU) against the torch layers they replace,
on the CPU through Triton's interpreter, at float32 tolerance."""
import importlib
import os
import sys

import pytest
import torch

pytest.importorskip("triton")
if os.environ.get("TRITON_INTERPRET") != "1":  # conftest runs the session in the interpreter without a GPU
    pytest.skip("Triton's interpreter is off (a GPU machine): scripts/gpu_check.py checks the kernels there",
                allow_module_level=True)
if "vlmserve.kernels.triton_fused" in sys.modules:
    importlib.reload(sys.modules["vlmserve.kernels.triton_fused"])
from vlmserve.kernels import triton_fused as tf  # noqa: E402
from vlmserve.layers.activation import ActAndMul  # noqa: E402
from vlmserve.layers.layernorm import LayerNorm, RMSNorm  # noqa: E402
from vlmserve.layers.rotary import RotaryEmbedding  # noqa: E402

TOL = dict(atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("with_residual", [False, True])
def test_rms_norm(with_residual):
    g = torch.Generator().manual_seed(0)
    norm = RMSNorm(96, 1e-5)
    norm.weight.data = torch.randn(96, generator=g)
    x = torch.randn(5, 96, generator=g)
    res = torch.randn(5, 96, generator=g) if with_residual else None
    got, ref = tf.rms_norm(x, norm.weight, norm.eps, res), norm.forward_torch(x, res)
    if with_residual:
        torch.testing.assert_close(got[0], ref[0], **TOL)
        torch.testing.assert_close(got[1], ref[1], **TOL)
    else:
        torch.testing.assert_close(got, ref, **TOL)


@pytest.mark.parametrize("with_residual", [False, True])
@pytest.mark.parametrize("n", [80, 96])  # 80: masked columns must not enter the mean or the variance
def test_layer_norm(with_residual, n):
    g = torch.Generator().manual_seed(n)
    norm = LayerNorm(n, eps=1e-6)
    norm.weight.data, norm.bias.data = torch.randn(n, generator=g), torch.randn(n, generator=g)
    x = 3 + 2 * torch.randn(2, 3, n, generator=g)  # rows far from zero mean, 3-D as the CLIP tower gives them
    res = torch.randn(2, 3, n, generator=g) if with_residual else None
    got, ref = tf.layer_norm(x, norm.weight, norm.bias, norm.eps, res), norm.forward_torch(x, res)
    if with_residual:
        torch.testing.assert_close(got[0], ref[0], **TOL)
        torch.testing.assert_close(got[1], ref[1], **TOL)
    else:
        torch.testing.assert_close(got, ref, **TOL)


@pytest.mark.parametrize("kind", ["layer", "rms"])
def test_norms_of_views_without_unit_column_stride(kind):
    g = torch.Generator().manual_seed(3)
    x, res = torch.randn(24, 7, generator=g).t(), torch.randn(24, 7, generator=g).t()  # [7, 24], column stride 7
    if kind == "layer":
        norm = LayerNorm(24, eps=1e-5)
        norm.bias.data = torch.randn(24, generator=g)
        got = tf.layer_norm(x, norm.weight, norm.bias, norm.eps, res)
    else:
        norm = RMSNorm(24, 1e-5)
        got = tf.rms_norm(x, norm.weight, norm.eps, res)
    ref = norm.forward_torch(x, res)
    torch.testing.assert_close(got[0], ref[0], **TOL)
    torch.testing.assert_close(got[1], ref[1], **TOL)


def test_rotary_in_place_on_strided_views():
    g = torch.Generator().manual_seed(1)
    rope = RotaryEmbedding(32, 64, {"rope_theta": 10000.0, "rope_type": "default"}, 64)
    T, hq, hk = 6, 4, 2
    qkv = torch.randn(T, (hq + 2 * hk) * 32, generator=g)  # q, k as views of one projection, as llama makes them
    q, k, _ = qkv.split([hq * 32, hk * 32, hk * 32], dim=-1)
    q, k = q.view(T, hq, 32), k.view(T, hk, 32)
    cos_sin = rope.lookup(torch.tensor([0, 3, 7, 8, 30, 63]), torch.float32)
    ref_q, ref_k = rope.forward(cos_sin, q.clone(), k.clone())  # CPU tensors: the torch path
    tf.rotary_inplace(q, k, *cos_sin)
    torch.testing.assert_close(q, ref_q, **TOL)
    torch.testing.assert_close(k, ref_k, **TOL)


def test_silu_and_mul():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(3, 2 * 40, generator=g)
    torch.testing.assert_close(tf.silu_and_mul(x), ActAndMul("silu").forward_torch(x), **TOL)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_quick_gelu(dtype):
    """Rounded as HF's three torch ops round (to the tensor's dtype after each)."""
    from vlmserve.layers.activation import quick_gelu_torch
    x = (4 * torch.randn(7, 333, generator=torch.Generator().manual_seed(3))).to(dtype)
    got, ref = tf.quick_gelu(x), quick_gelu_torch(x)
    assert got.dtype == dtype and got.shape == x.shape
    torch.testing.assert_close(got, ref, atol=1e-6 if dtype == torch.float32 else 1e-3, rtol=1e-5)


def test_rotary_in_place_matches_qwen2_vl_vision_rotary():
    """The ViT of Qwen2-VL rotates q and k (views of one fused qkv projection, head_dim 80) with
    float32 cos/sin of its 2D patch positions; on the GPU it takes this kernel instead of torch."""
    from vlmserve.models.qwen2_vl import VisionRotary, apply_vision_rotary, vision_positions

    g = torch.Generator().manual_seed(3)
    heads, d = 3, 80
    grids = [(1, 4, 6), (2, 2, 2)]
    rot = VisionRotary(d, 10000.0)
    cos, sin = rot(vision_positions(grids, 2))
    n = cos.shape[0]
    q, k, _ = torch.randn(n, 3, heads, d, generator=g).unbind(1)
    ref_q, ref_k = apply_vision_rotary(q, cos, sin), apply_vision_rotary(k, cos, sin)
    tf.rotary_inplace(q, k, cos, sin)
    torch.testing.assert_close(q, ref_q, **TOL)
    torch.testing.assert_close(k, ref_k, **TOL)
