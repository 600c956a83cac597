"""device_utils: host data onto the device through pinned memory, copied by one thread."""
import pytest
import torch

from vlmserve.device_utils import pinned, to_device


def test_to_device_on_cpu_converts_lists_and_dtypes():
    t = to_device([1, 2, 3], torch.device("cpu"), torch.int32)
    assert t.dtype == torch.int32 and t.tolist() == [1, 2, 3]
    assert to_device(torch.tensor([1.5]), torch.device("cpu"), torch.float64).dtype == torch.float64


@pytest.mark.skipif(not torch.cuda.is_available(), reason="pinned memory needs CUDA")
def test_pinned_copies_match_and_are_pinned():
    big = torch.arange(100_000, dtype=torch.int64)  # past the size at which pin_memory() uses its thread pool
    half = torch.randn(64, 48, dtype=torch.bfloat16).t()  # no numpy view: bfloat16, not contiguous
    mask = torch.rand(1000) > 0.5
    for t in (big, half, mask):
        p = pinned(t)
        assert p.is_pinned() and p.dtype == t.dtype and torch.equal(p, t)
        assert p.data_ptr() != t.data_ptr()
    dev = to_device(big, torch.device("cuda"))
    assert torch.equal(dev.cpu(), big)
