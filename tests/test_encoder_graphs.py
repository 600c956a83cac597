"""EncoderGraphs: CPU inputs run eagerly; counts split into bucket-sized pieces; on a GPU, replays
equal the eager encoder for counts in and past the buckets, and later calls do not change outputs
already returned."""
import pytest
import torch
from torch import nn

from vlmserve.worker.encoder_graphs import COUNT_BUCKETS, EncoderGraphs, split_count


def _encoder(device):
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(1), nn.Linear(48, 32), nn.GELU(), nn.Linear(32, 8)).to(device)


def test_cpu_inputs_run_eagerly():
    enc = _encoder("cpu")
    graphs = EncoderGraphs(enc, torch.device("cpu"))
    x = torch.randn(3, 3, 4, 4)
    assert torch.equal(graphs(x), enc(x)) and not graphs.graphs


def test_split_count_covers_every_count_with_buckets():
    for n in range(1, 70):
        pieces = split_count(n)
        assert sum(pieces) == n and all(0 < k <= COUNT_BUCKETS[-1] for k in pieces), (n, pieces)
        padded = sum(next(b for b in COUNT_BUCKETS if b >= k) for k in pieces)
        assert padded - n <= max(7, n // 4), (n, pieces)
    assert split_count(1) == [1] and split_count(7) == [7] and split_count(16) == [16]
    assert split_count(26) == [16, 8, 2] and split_count(15) == [15] and split_count(9) == [8, 1]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
@torch.inference_mode()
def test_counts_past_the_buckets_replay_in_pieces():
    enc = _encoder("cuda")
    graphs = EncoderGraphs(enc, torch.device("cuda"))
    for n in (26, 3, 40):
        x = torch.randn(n, 3, 4, 4, device="cuda")
        torch.testing.assert_close(graphs(x), enc(x))
    assert graphs.num_replays == 3 + 1 + 3  # 16+8+2, 3 (in 4), 16+16+8
    graphs.warm_up()  # every bucket of the one shape met
    assert sorted(k[0] for k in graphs.graphs) == list(COUNT_BUCKETS)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
@torch.inference_mode()
def test_graphs_equal_eager_on_gpu():
    enc = _encoder("cuda")
    graphs = EncoderGraphs(enc, torch.device("cuda"), max_graphs=2)
    kept = []
    for n in (1, 3, 4, 9, 2, 1):  # 9: past the buckets; 2: a third graph, past max_graphs
        x = torch.randn(n, 3, 4, 4, device="cuda")
        out = graphs(x)
        torch.testing.assert_close(out, enc(x))
        kept.append((out, enc(x)))
    for out, ref in kept:
        torch.testing.assert_close(out, ref)
    assert len(graphs.graphs) == 2


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
@torch.inference_mode()
def test_capture_while_a_media_thread_pins_memory():
    """The prompt pipeline's media threads stage images in pinned memory while the engine thread
    may be capturing a graph: neither may fail (the default, global capture mode failed both)."""
    import threading

    from vlmserve.multimodal.device_pixels import DevicePixels

    enc = _encoder("cuda")
    errors = []

    def stage():
        try:  # a fresh size: the host allocator must allocate, not reuse
            DevicePixels.staged(torch.zeros(1 << 22, dtype=torch.uint8) + 1, lambda t: t, "cuda")
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    def encode(x):
        if torch.cuda.is_current_stream_capturing():
            t = threading.Thread(target=stage)
            t.start()
            t.join()
        return enc(x)

    graphs = EncoderGraphs(encode, torch.device("cuda"))
    x = torch.randn(3, 3, 4, 4, device="cuda")
    torch.testing.assert_close(graphs(x), enc(x))
    assert not errors and graphs.enabled and len(graphs.graphs) == 1
    torch.testing.assert_close(graphs(x * 2), enc(x * 2))  # the graph replays


# ---- GridEncoderGraphs: Qwen2-VL's ViT per call layout ----------------------------------------

def _qwen_tower(device, dtype=torch.float32, embed_dim=64, num_heads=4):
    from transformers import Qwen2VLConfig

    from vlmserve.models.qwen2_vl import Qwen2VisionTransformer

    torch.manual_seed(0)
    vcfg = Qwen2VLConfig(vision_config={"depth": 2, "embed_dim": embed_dim, "num_heads": num_heads, "mlp_ratio": 2,
                                        "hidden_size": 32, "patch_size": 14, "spatial_merge_size": 2,
                                        "temporal_patch_size": 2}).vision_config
    tower = Qwen2VisionTransformer(vcfg).to(device=device, dtype=dtype).eval()
    for p in tower.parameters():  # random, not the zeros or ones of fresh norms and biases
        p.data.normal_(0, 0.05)
    return tower


def _pixels(grids, device, seed=0):
    n = sum(t * h * w for t, h, w in grids)
    return torch.randn(n, 3 * 2 * 14 * 14, generator=torch.Generator().manual_seed(seed)).to(device)


def test_copies_host_data_only_for_scattered_equal_lengths():
    from vlmserve.layers.vision_attention import copies_host_data

    assert not copies_host_data([0, 16])
    assert not copies_host_data([0, 16, 32, 48, 60])  # 16, 16, 16 back to back, then 12
    assert not copies_host_data([0, 16, 28, 40])  # 16, then 12, 12
    assert copies_host_data([0, 16, 28, 44])  # 16, 12, 16: the 16s are apart
    assert not copies_host_data([0, 16, 16, 32])  # an empty segment between is no gap


def test_grid_graphs_run_cpu_inputs_eagerly():
    from vlmserve.worker.encoder_graphs import GridEncoderGraphs

    tower = _qwen_tower("cpu")
    graphs = GridEncoderGraphs(tower, torch.device("cpu"))
    grids = [(1, 8, 12)]
    x = _pixels(grids, "cpu")
    with torch.inference_mode():
        for _ in range(3):
            assert torch.equal(graphs(x, grids), tower(x, grids))
    assert not graphs.graphs and graphs.num_replays == 0
    assert tower.graph_safe(grids) and tower.graph_safe([(1, 8, 12), (2, 4, 4)])
    assert not tower.graph_safe([(1, 8, 12), (1, 4, 4), (1, 8, 12)])  # equal frames apart


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
@torch.inference_mode()
def test_grid_graphs_equal_eager_on_gpu():
    from vlmserve.worker.encoder_graphs import GridEncoderGraphs

    tower = _qwen_tower("cuda", torch.bfloat16)
    graphs = GridEncoderGraphs(tower, torch.device("cuda"), max_patches=2048, max_graphs=2)
    one, two = [(1, 16, 20)], [(1, 8, 8), (1, 8, 8), (2, 4, 12)]
    apart = [(1, 8, 8), (1, 4, 4), (1, 8, 8)]  # not graph safe: stays eager
    big = [(1, 48, 48)]  # past max_patches
    kept = []
    for i, grids in enumerate([one, two, one, one, apart, two, apart, big, big, two, one]):
        x = _pixels(grids, "cuda", seed=i).to(torch.bfloat16)
        out = graphs(x, grids)
        ref = tower(x, grids)
        torch.testing.assert_close(out, ref, rtol=2e-2, atol=2e-2)
        kept.append((out, ref))
    for out, ref in kept:  # later replays wrote over the pool, not over outputs already returned
        torch.testing.assert_close(out, ref, rtol=2e-2, atol=2e-2)
    assert sorted(len(k[0]) for k in graphs.graphs) == [1, 3]  # one and two, each from its second call
    assert graphs.num_replays == 3 + 2  # one: its 2nd, 3rd and 4th calls; two: its 2nd and 3rd


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
@torch.inference_mode()
def test_grid_graphs_with_triton_attention_equal_eager_on_gpu(monkeypatch):
    """head_dim 80 (Qwen2-VL's): the Triton kernel reads the frames' bounds from the call's tables,
    so layouts that SDPA would gather (equal frames apart) are graphed too, and equal eager and SDPA."""
    from vlmserve.worker.encoder_graphs import GridEncoderGraphs

    monkeypatch.delenv("VLMSERVE_TRITON_VISION_ATTENTION", raising=False)
    tower = _qwen_tower("cuda", torch.bfloat16, embed_dim=160, num_heads=2)
    graphs = GridEncoderGraphs(tower, torch.device("cuda"), max_patches=2048, max_graphs=4)

    class Counted:  # the tower's passes that the graphs run: eager, warm-up, capture
        calls = 0

        def __call__(self, *args):
            Counted.calls += 1
            return tower(*args)

        def __getattr__(self, name):
            return getattr(tower, name)

    graphs.tower = Counted()
    apart, one = [(1, 8, 8), (1, 4, 4), (1, 8, 8)], [(1, 16, 20)]
    assert tower.graph_safe(apart)
    for i, grids in enumerate([apart, one, apart, one, apart]):
        x = _pixels(grids, "cuda", seed=i).to(torch.bfloat16)
        out = graphs(x, grids)
        torch.testing.assert_close(out, tower(x, grids), rtol=1e-2, atol=1e-2)
        monkeypatch.setenv("VLMSERVE_TRITON_VISION_ATTENTION", "0")
        torch.testing.assert_close(out, tower(x, grids), rtol=2e-2, atol=2e-2)  # SDPA's result
        monkeypatch.delenv("VLMSERVE_TRITON_VISION_ATTENTION")
    assert sorted(len(k[0]) for k in graphs.graphs) == [1, 3] and graphs.num_replays == 3
    # apart and one eagerly, apart warmed up and captured, one captured without a warm-up (its eager
    # pass had compiled its kernels), then replays only
    assert Counted.calls == 1 + 1 + 2 + 1


def _qwen2_5_tower(device, dtype=torch.float32):
    from transformers import Qwen2_5_VLConfig

    from vlmserve.models.qwen2_5_vl import Qwen2_5_VisionTransformer

    torch.manual_seed(0)
    vcfg = Qwen2_5_VLConfig(vision_config={"depth": 3, "hidden_size": 160, "num_heads": 2, "intermediate_size": 96,
                                           "out_hidden_size": 32, "patch_size": 14, "spatial_merge_size": 2,
                                           "temporal_patch_size": 2, "window_size": 56,
                                           "fullatt_block_indexes": [1]}).vision_config
    tower = Qwen2_5_VisionTransformer(vcfg).to(device=device, dtype=dtype).eval()
    for p in tower.parameters():
        p.data.normal_(0, 0.05)
    return tower


def test_qwen2_5_vl_tower_with_its_tables_equals_without():
    """Qwen2.5-VL's tower takes its window order, rotary tables and bounds from call_tables (what a
    graph holds): the same result as building them in forward. Windows at the edges are smaller,
    so equal-length windows lie apart and SDPA gathers them: not graph safe there."""
    tower = _qwen2_5_tower("cpu")
    grids = [(1, 12, 8), (2, 4, 4)]
    x = _pixels(grids, "cpu")
    with torch.inference_mode():
        ref = tower(x, grids)
        got = tower(x, grids, tower.call_tables(grids, torch.device("cpu")))
    assert torch.equal(got, ref)
    assert tower.graph_safe([(1, 8, 8)]) and not tower.graph_safe([(1, 10, 10)])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
@torch.inference_mode()
def test_qwen2_5_vl_grid_graphs_equal_eager_on_gpu(monkeypatch):
    """Qwen2.5-VL's windowed tower (head_dim 80: the Triton attention) replayed per layout equals eager."""
    from vlmserve.worker.encoder_graphs import GridEncoderGraphs

    monkeypatch.delenv("VLMSERVE_TRITON_VISION_ATTENTION", raising=False)
    tower = _qwen2_5_tower("cuda", torch.bfloat16)
    graphs = GridEncoderGraphs(tower, torch.device("cuda"), max_patches=2048, max_graphs=4)
    a, b = [(1, 12, 8), (2, 4, 4)], [(1, 20, 16)]
    assert tower.graph_safe(a) and tower.graph_safe(b)
    kept = []
    for i, grids in enumerate([a, b, a, b, a]):
        x = _pixels(grids, "cuda", seed=i).to(torch.bfloat16)
        out = graphs(x, grids)
        ref = tower(x, grids)
        torch.testing.assert_close(out, ref, rtol=1e-2, atol=1e-2)
        kept.append((out, ref))
    for out, ref in kept:
        torch.testing.assert_close(out, ref, rtol=1e-2, atol=1e-2)
    assert len(graphs.graphs) == 2 and graphs.num_replays == 3
