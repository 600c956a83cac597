"""EncoderGraphs: CPU inputs run eagerly; on a GPU, replays equal the eager encoder for counts in
and past the buckets, and later calls do not change outputs already returned."""
import pytest
import torch
from torch import nn

from vlmserve.worker.encoder_graphs import EncoderGraphs


def _encoder(device):
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(1), nn.Linear(48, 32), nn.GELU(), nn.Linear(32, 8)).to(device)


def test_cpu_inputs_run_eagerly():
    enc = _encoder("cpu")
    graphs = EncoderGraphs(enc, torch.device("cpu"))
    x = torch.randn(3, 3, 4, 4)
    assert torch.equal(graphs(x), enc(x)) and not graphs.graphs


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
