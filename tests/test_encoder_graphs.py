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
