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
