"""The Triton packed-attention kernel (head sizes split into two powers of two, e.g. 80 = 64 + 16)
against its torch reference and against torch's SDPA path, on the CPU through Triton's interpreter,
at float32 tolerance: segments of many lengths (1, shorter than a tile, not a multiple of one),
q, k, v as strided views of a fused qkv projection, causal segments with grouped key heads (the
language models' fresh prompts), when varlen_attention chooses the kernel, and Qwen2-VL's and
Qwen2.5-VL's towers run through it."""
import importlib
import os
import sys
import types

import pytest
import torch

pytest.importorskip("triton")
if os.environ.get("TRITON_INTERPRET") != "1":  # conftest runs the session in the interpreter without a GPU
    pytest.skip("Triton's interpreter is off (a GPU machine): scripts/gpu_alternatives.py --parts vision "
                "checks the kernel there", allow_module_level=True)
if "vlmserve.kernels.triton_packed_attention" in sys.modules:  # decorated without the interpreter
    importlib.reload(sys.modules["vlmserve.kernels.triton_packed_attention"])
from vlmserve.kernels import triton_packed_attention as tpk  # noqa: E402
from vlmserve.layers import vision_attention  # noqa: E402

TOL = dict(atol=2e-5, rtol=2e-5)


def _qkv(n: int, heads: int, d: int, seed: int = 0):
    """q, k, v as the vision blocks make them: views into one [n, 3, heads, d] projection."""
    g = torch.Generator().manual_seed(seed)
    qkv = torch.randn(n, 3, heads, d, generator=g)
    return qkv.unbind(1)


def test_split_head_dim():
    assert tpk.split_head_dim(80) == (64, 16)
    assert tpk.split_head_dim(64) == (64, 0)
    assert tpk.split_head_dim(96) == (64, 32)
    assert tpk.split_head_dim(48) == (32, 16)
    assert tpk.split_head_dim(128) == (128, 0)
    for d in (8, 72, 100, 112):  # a remainder under 16 or not a power of two
        assert tpk.split_head_dim(d) is None


@pytest.mark.parametrize("tiles", ["split", "masked", "paired"])
@pytest.mark.parametrize("d", [80, 64, 48])
@pytest.mark.parametrize("lengths", [[37], [1, 16, 70, 5, 33], [64, 64, 64]])
def test_kernel_matches_reference(d, lengths, tiles):
    """split: full key tiles unmasked, the partial one after; masked: every tile masked; paired: the
    rows as two blocks of 16 whose full tiles share a loop (what images take on a GPU, at 2 x 64)."""
    cu = [0]
    for n in lengths:
        cu.append(cu[-1] + n)
    q, k, v = _qkv(cu[-1], 3, d, seed=d + len(lengths))
    scale = d ** -0.5
    kw = dict(block_m=32 if tiles == "paired" else 16, block_n=16, num_warps=4, split_tail=tiles != "masked",
              pair=tiles == "paired")
    got = tpk.packed_attention(q, k, v, torch.tensor(cu, dtype=torch.int32), max(lengths), scale, **kw)
    ref = tpk.reference_packed_attention(q, k, v, cu, scale)
    torch.testing.assert_close(got, ref, **TOL)
    # each segment attends to itself only: changing one segment's keys leaves the others' rows alone
    k2 = k.clone()
    k2[cu[0]:cu[1]] += 1.0
    got2 = tpk.packed_attention(q, k2, v, torch.tensor(cu, dtype=torch.int32), max(lengths), scale, **kw)
    torch.testing.assert_close(got2[cu[1]:], got[cu[1]:], atol=0, rtol=0)


@pytest.mark.parametrize("paired", [True, False])
@pytest.mark.parametrize("d, lengths, last_split", [
    (80, [100], (3, 3)),  # the last wave's programs of one segment, keys shared in three
    (64, [100], (None, 2)),  # every program cut
    (80, [37, 100, 5], (12, 4)),  # programs past a short segment's end among those cut (nothing to do)
    (64, [40], (6, 7)),  # more pieces than key tiles: pieces with no keys at all
])
def test_last_programs_cut_over_the_keys_match_reference(d, lengths, last_split, paired):
    """A lone image's last wave: its last programs each run as pieces over a share of the keys, whose
    partial states a second kernel merges; every row's output is the whole softmax's, and the rows
    of the programs not cut are those of a launch that cuts none, bit for bit."""
    cu = [0]
    for n in lengths:
        cu.append(cu[-1] + n)
    heads, block_m = 3, 32 if paired else 16
    q, k, v = _qkv(cu[-1], heads, d, seed=d + len(lengths))
    n_tiles = -(-max(lengths) // block_m)
    programs = n_tiles * heads * len(lengths)
    last_split = (programs if last_split[0] is None else last_split[0], last_split[1])
    kw = dict(block_m=block_m, block_n=16, num_warps=4, pair=paired)
    cu_t = torch.tensor(cu, dtype=torch.int32)
    got = tpk.packed_attention(q, k, v, cu_t, max(lengths), d ** -0.5, last_split=last_split, **kw)
    torch.testing.assert_close(got, tpk.reference_packed_attention(q, k, v, cu, d ** -0.5), **TOL)
    whole = tpk.packed_attention(q, k, v, cu_t, max(lengths), d ** -0.5, last_split=(0, 1), **kw)
    cut = torch.zeros(cu[-1], heads, dtype=torch.bool)  # programs run tiles fastest, then heads, segments
    for p in range(programs - last_split[0], programs):
        tile, h, seg = p % n_tiles, p // n_tiles % heads, p // (n_tiles * heads)
        cut[cu[seg] + tile * block_m:min(cu[seg] + (tile + 1) * block_m, cu[seg + 1]), h] = True
    assert torch.equal(got[~cut], whole[~cut])
    with pytest.raises(ValueError, match="last_split"):
        tpk.packed_attention(q, k, v, cu_t, max(lengths), d ** -0.5, last_split=(programs + 1, 2), **kw)
    with pytest.raises(ValueError, match="bidirectional"):
        tpk.packed_attention(q, k, v, cu_t, max(lengths), d ** -0.5, causal=True, block_m=16, last_split=(1, 2))


def test_last_wave_split_by_slots():
    """What the GPU launch plans from its slots (SMs x programs an SM holds)."""
    tiles = 86  # a 1024x1024 image's 5476 keys in tiles of 64
    assert tpk.split_last_wave(688, 264, tiles) == (160, 3)  # one 1024x1024 image on an H200: 2.67 waves, not 3
    assert tpk.split_last_wave(1376, 264, tiles) == (56, 4)  # two: 5.25, not 6
    assert tpk.split_last_wave(1376, 264, 2) == (56, 2)  # pieces no more than the key tiles
    assert tpk.split_last_wave(1376, 528, 1) == (0, 1)  # Qwen2.5-VL's windows: one key tile, nothing to share
    assert tpk.split_last_wave(4128, 264, tiles) == (0, 1)  # six: 15.67 against 16 saves under 3%
    assert tpk.split_last_wave(528, 264, tiles) == (0, 1)  # whole waves
    assert tpk.split_last_wave(200, 264, tiles) == (0, 1)  # under one wave
    assert tpk.split_last_wave(688, 0, tiles) == (0, 1)  # slots unknown
    h200 = types.SimpleNamespace(regs_per_multiprocessor=65536, shared_memory_per_multiprocessor=233472,
                                 max_threads_per_multi_processor=2048)
    assert tpk.resident_programs(245, 80 * 1024, 4, h200) == 2  # the image kernel, as compiled by Triton 3.6
    assert tpk.resident_programs(128, 40 * 1024, 4, h200) == 4
    assert tpk.resident_programs(32, 0, 4, h200) == 16  # by threads


def test_pairs_only_bidirectional_split_tiles():
    q, k, v = _qkv(40, 2, 80)
    cu = torch.tensor([0, 40], dtype=torch.int32)
    for bad in (dict(causal=True), dict(split_tail=False), dict(block_m=16)):
        with pytest.raises(ValueError, match="paired blocks"):
            tpk.packed_attention(q, k, v, cu, 40, 0.1, pair=True, **{"block_m": 32, **bad})
    # by default images (blocks of 128 rows) pair; windows (64) and causal prompts do not
    assert tpk.default_tiles(5476, causal=False)[:2] == (128, True)
    assert tpk.default_tiles(64, causal=False)[:2] == (64, False)
    assert tpk.default_tiles(5476, causal=True)[:2] == (64, False)


@pytest.mark.parametrize("block_m, block_n", [(16, 16), (32, 16), (16, 32)])
@pytest.mark.parametrize("heads, kv_heads, d", [(4, 2, 32), (3, 3, 48), (4, 1, 64)])
@pytest.mark.parametrize("lengths", [[37], [1, 16, 70, 5, 33]])
def test_causal_with_grouped_key_heads_matches_reference(lengths, heads, kv_heads, d, block_m, block_n):
    """Prompts as the language models pack them: every row sees its own position and those before it
    in its segment, query head h reads key head h // (heads / kv_heads); with blocks of rows wider and
    narrower than the key tiles, unmasked tiles (before a block's first row) and masked ones."""
    cu = [0]
    for n in lengths:
        cu.append(cu[-1] + n)
    g = torch.Generator().manual_seed(d + heads)
    q = torch.randn(cu[-1], heads, d, generator=g)
    k, v = torch.randn(cu[-1], 2, kv_heads, d, generator=g).unbind(1)  # strided views, as from a fused projection
    scale = d ** -0.5
    got = tpk.packed_attention(q, k, v, torch.tensor(cu, dtype=torch.int32), max(lengths), scale, block_m=block_m,
                               block_n=block_n, num_warps=4, causal=True)
    torch.testing.assert_close(got, tpk.reference_packed_attention(q, k, v, cu, scale, causal=True), **TOL)
    # a row's output does not depend on later rows: change the last token's key and value
    k2, v2 = k.clone(), v.clone()
    k2[cu[1] - 1] += 1.0
    v2[cu[1] - 1] -= 1.0
    got2 = tpk.packed_attention(q, k2, v2, torch.tensor(cu, dtype=torch.int32), max(lengths), scale,
                                block_m=block_m, block_n=block_n, num_warps=4, causal=True)
    torch.testing.assert_close(got2[:cu[1] - 1], got[:cu[1] - 1], atol=0, rtol=0)
    assert not torch.equal(got2[cu[1] - 1], got[cu[1] - 1])


def test_writes_into_rows_of_a_larger_buffer():
    """out=: the engine's fresh prompts write straight after a step's decode rows, with no copy."""
    q = torch.randn(40, 4, 32)
    k, v = torch.randn(40, 2, 2, 32).unbind(1)
    cu = torch.tensor([0, 15, 40], dtype=torch.int32)
    want = tpk.packed_attention(q, k, v, cu, 25, 32 ** -0.5, block_m=16, block_n=16, num_warps=4, causal=True)
    buf = torch.full((43, 4, 32), float("nan"))
    got = tpk.packed_attention(q, k, v, cu, 25, 32 ** -0.5, block_m=16, block_n=16, num_warps=4, causal=True,
                               out=buf[3:])
    assert got.data_ptr() == buf[3:].data_ptr() and buf[:3].isnan().all()
    torch.testing.assert_close(buf[3:], want, atol=0, rtol=0)
    with pytest.raises(ValueError, match="does not take"):
        tpk.packed_attention(q, k, v, cu, 25, 1.0, causal=True, out=buf[:40].half())


def test_rejects_heads_that_do_not_group():
    q, k, v = torch.randn(8, 3, 32), torch.randn(8, 2, 32), torch.randn(8, 2, 32)
    with pytest.raises(ValueError, match="3 query heads"):
        tpk.packed_attention(q, k, v, torch.tensor([0, 8], dtype=torch.int32), 8, 1.0, causal=True)


def test_preferred_for_padded_head_sizes_on_cuda(monkeypatch):
    monkeypatch.delenv("VLMSERVE_TRITON_VISION_ATTENTION", raising=False)
    assert tpk.preferred_for_vision(80, torch.bfloat16, on_cuda=True)
    assert tpk.preferred_for_vision(48, torch.float16, on_cuda=True)
    assert not tpk.preferred_for_vision(64, torch.bfloat16, on_cuda=True)  # a power of two: cuDNN does not pad it
    assert not tpk.preferred_for_vision(80, torch.float32, on_cuda=True)  # measured in 16 bits only
    assert not tpk.preferred_for_vision(80, torch.bfloat16, on_cuda=False)  # the CPU: SDPA, not the interpreter
    assert not tpk.preferred_for_vision(72, torch.bfloat16, on_cuda=True)  # does not split
    monkeypatch.setenv("VLMSERVE_TRITON_VISION_ATTENTION", "0")
    assert not tpk.preferred_for_vision(80, torch.bfloat16, on_cuda=True)
    monkeypatch.setenv("VLMSERVE_TRITON_VISION_ATTENTION", "1")
    assert tpk.preferred_for_vision(64, torch.float32, on_cuda=False)


def test_switch_in_varlen_attention(monkeypatch):
    cu = [0, 20, 45, 45, 90]  # an empty segment too
    q, k, v = _qkv(cu[-1], 2, 80, seed=7)
    monkeypatch.delenv("VLMSERVE_TRITON_VISION_ATTENTION", raising=False)
    sdpa = vision_attention.varlen_attention(q, k, v, cu, 80 ** -0.5)  # float32 on the CPU: SDPA
    monkeypatch.setenv("VLMSERVE_TRITON_VISION_ATTENTION", "1")
    assert tpk.usable(q)
    calls = []
    real = tpk.packed_attention
    monkeypatch.setattr(tpk, "packed_attention", lambda *a, **kw: calls.append(a[3:5]) or real(*a, **kw))
    got = vision_attention.varlen_attention(q, k, v, cu, 80 ** -0.5)
    torch.testing.assert_close(got, sdpa, **TOL)
    assert calls[0][1] == 45  # the longest segment sizes the grid
    # Segments made once per call hold the bounds on the device: passed as they are, no copy per block
    segments = vision_attention.Segments(cu, q.device, q.dtype, 80)
    assert segments.on_device is not None and segments.max_len == 45
    assert not vision_attention.copies_host_data(segments)
    torch.testing.assert_close(vision_attention.varlen_attention(q, k, v, segments, 80 ** -0.5), sdpa, **TOL)
    assert calls[1][0] is segments.on_device
    monkeypatch.setenv("VLMSERVE_TRITON_VISION_ATTENTION", "0")
    assert vision_attention.Segments(cu, q.device, q.dtype, 80).on_device is None


def test_qwen2_vl_tower_with_the_kernel_equals_sdpa(monkeypatch):
    """Qwen2-VL's ViT at head_dim 80, the kernel forced on (in the interpreter) against SDPA: the
    frames' bounds go through the call's Segments into every block."""
    from transformers import Qwen2VLConfig

    from vlmserve.models.qwen2_vl import Qwen2VisionTransformer

    torch.manual_seed(0)
    vcfg = Qwen2VLConfig(vision_config={"depth": 2, "embed_dim": 160, "num_heads": 2, "mlp_ratio": 2,
                                        "hidden_size": 32, "patch_size": 14, "spatial_merge_size": 2,
                                        "temporal_patch_size": 2}).vision_config
    tower = Qwen2VisionTransformer(vcfg).eval()
    for p in tower.parameters():
        p.data.normal_(0, 0.05)
    grids = [(1, 4, 6), (2, 2, 4), (1, 4, 6)]  # equal frames apart: SDPA gathers rows, the kernel does not
    x = torch.randn(sum(t * h * w for t, h, w in grids), 3 * 2 * 14 * 14, generator=torch.Generator().manual_seed(1))
    monkeypatch.setenv("VLMSERVE_TRITON_VISION_ATTENTION", "0")
    with torch.inference_mode():
        ref = tower(x, grids)
        assert not tower.graph_safe(grids)
        monkeypatch.setenv("VLMSERVE_TRITON_VISION_ATTENTION", "1")
        got = tower(x, grids)
    assert tower.graph_safe(grids)  # the bounds on the device, held with the graph
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)


def test_rejects_head_dims_it_cannot_split():
    q, k, v = _qkv(8, 1, 72)
    assert not tpk.usable(q)
    with pytest.raises(ValueError, match="head_dim 72"):
        tpk.packed_attention(q, k, v, torch.tensor([0, 8], dtype=torch.int32), 8, 1.0)


def test_qwen2_5_vl_windowed_tower_with_the_kernel_equals_sdpa(monkeypatch):
    """Qwen2.5-VL's tower, the kernel forced on (in the interpreter) with its default tiles: windows of
    at most 64 tokens (64-row tiles) in most blocks, whole frames (128-row tiles) in one."""
    from transformers import Qwen2_5_VLConfig

    from vlmserve.models.qwen2_5_vl import Qwen2_5_VisionTransformer

    torch.manual_seed(0)
    vcfg = Qwen2_5_VLConfig(vision_config={"depth": 2, "hidden_size": 160, "num_heads": 2, "intermediate_size": 96,
                                           "out_hidden_size": 32, "patch_size": 14, "spatial_merge_size": 2,
                                           "temporal_patch_size": 2, "window_size": 112,
                                           "fullatt_block_indexes": [1]}).vision_config
    tower = Qwen2_5_VisionTransformer(vcfg).eval()
    for p in tower.parameters():
        p.data.normal_(0, 0.05)
    grids = [(1, 12, 8), (1, 4, 8)]  # windows of 64 patches and a clipped one at the edge
    x = torch.randn(sum(t * h * w for t, h, w in grids), 3 * 2 * 14 * 14, generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        monkeypatch.setenv("VLMSERVE_TRITON_VISION_ATTENTION", "0")
        ref = tower(x, grids)
        monkeypatch.setenv("VLMSERVE_TRITON_VISION_ATTENTION", "1")
        got = tower(x, grids)
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)
