"""device_utils: host data onto the device through pinned memory, copied by one thread (or split over
several, for a copy that holds up a latency-bound request)."""
import numpy as np
import pytest
import torch

from vlmserve.device_utils import copy_in_parallel, pinned, to_device


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


@pytest.mark.parametrize("shape", [(1024, 1024, 4), (7, 5, 3), (1, 4096), (13,)])
def test_copy_in_parallel_copies_every_row(shape):
    src = torch.from_numpy(np.random.default_rng(len(shape)).integers(0, 256, shape, dtype=np.uint8))
    dst = torch.zeros_like(src)
    assert copy_in_parallel(dst, src, threads=4, min_bytes_per_thread=1) is dst  # as many parts as rows allow
    assert torch.equal(dst, src)
