"""The Triton vision-attention kernel (head sizes split into two powers of two, e.g. 80 = 64 + 16)
against its torch reference and against torch's SDPA path, on the CPU through Triton's interpreter,
at float32 tolerance: segments of many lengths (1, shorter than a tile, not a multiple of one),
q, k, v as strided views of a fused qkv projection, and the opt-in switch in varlen_attention."""
import importlib
import os
import sys

import pytest
import torch

pytest.importorskip("triton")
if os.environ.get("TRITON_INTERPRET") != "1":  # conftest runs the session in the interpreter without a GPU
    pytest.skip("Triton's interpreter is off (a GPU machine): scripts/gpu_alternatives.py --parts vision "
                "checks the kernel there", allow_module_level=True)
if "vlmserve.kernels.triton_vision_attention" in sys.modules:  # decorated without the interpreter
    importlib.reload(sys.modules["vlmserve.kernels.triton_vision_attention"])
from vlmserve.kernels import triton_vision_attention as tva  # noqa: E402
from vlmserve.layers import vision_attention  # noqa: E402

TOL = dict(atol=2e-5, rtol=2e-5)


def _qkv(n: int, heads: int, d: int, seed: int = 0):
    """q, k, v as the vision blocks make them: views into one [n, 3, heads, d] projection."""
    g = torch.Generator().manual_seed(seed)
    qkv = torch.randn(n, 3, heads, d, generator=g)
    return qkv.unbind(1)


def test_split_head_dim():
    assert tva.split_head_dim(80) == (64, 16)
    assert tva.split_head_dim(64) == (64, 0)
    assert tva.split_head_dim(96) == (64, 32)
    assert tva.split_head_dim(48) == (32, 16)
    assert tva.split_head_dim(128) == (128, 0)
    for d in (8, 72, 100, 112):  # a remainder under 16 or not a power of two
        assert tva.split_head_dim(d) is None


@pytest.mark.parametrize("split_tail", [True, False])
@pytest.mark.parametrize("d", [80, 64, 48])
@pytest.mark.parametrize("lengths", [[37], [1, 16, 70, 5, 33], [64, 64, 64]])
def test_kernel_matches_reference(d, lengths, split_tail):
    cu = [0]
    for n in lengths:
        cu.append(cu[-1] + n)
    q, k, v = _qkv(cu[-1], 3, d, seed=d + len(lengths))
    scale = d ** -0.5
    got = tva.vision_attention(q, k, v, torch.tensor(cu, dtype=torch.int32), max(lengths), scale,
                               block_m=16, block_n=16, num_warps=4, split_tail=split_tail)
    ref = tva.reference_vision_attention(q, k, v, cu, scale)
    torch.testing.assert_close(got, ref, **TOL)
    # each segment attends to itself only: changing one segment's keys leaves the others' rows alone
    k2 = k.clone()
    k2[cu[0]:cu[1]] += 1.0
    got2 = tva.vision_attention(q, k2, v, torch.tensor(cu, dtype=torch.int32), max(lengths), scale,
                                block_m=16, block_n=16, num_warps=4, split_tail=split_tail)
    torch.testing.assert_close(got2[cu[1]:], got[cu[1]:], atol=0, rtol=0)


def test_opt_in_switch_in_varlen_attention(monkeypatch):
    cu = [0, 20, 45, 45, 90]  # an empty segment too
    q, k, v = _qkv(cu[-1], 2, 80, seed=7)
    assert not tva.enabled()
    sdpa = vision_attention.varlen_attention(q, k, v, cu, 80 ** -0.5)
    monkeypatch.setenv("VLMSERVE_TRITON_VISION_ATTENTION", "1")
    assert tva.enabled() and tva.usable(q)
    calls = []
    real = tva.vision_attention
    monkeypatch.setattr(tva, "vision_attention", lambda *a, **kw: calls.append(a[4]) or real(*a, **kw))
    got = vision_attention.varlen_attention(q, k, v, cu, 80 ** -0.5)
    assert calls == [45]  # the longest segment sizes the grid
    torch.testing.assert_close(got, sdpa, **TOL)


def test_rejects_head_dims_it_cannot_split():
    q, k, v = _qkv(8, 1, 72)
    assert not tva.usable(q)
    with pytest.raises(ValueError, match="head_dim 72"):
        tva.vision_attention(q, k, v, torch.tensor([0, 8], dtype=torch.int32), 8, 1.0)
