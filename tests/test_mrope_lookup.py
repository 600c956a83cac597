"""M-RoPE lookups read no positions on the host when they are on a device (so Qwen2-VL decode steps
can be CUDA graphs): the runner reserves the table from the step's CPU positions first; growing
the table drops captured decode graphs."""
import pytest
import torch

from vlmserve.layers import rotary
from vlmserve.layers.rotary import MRotaryEmbedding

PARAMS = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]}


class NoHostReads(torch.Tensor):
    """Positions that fail any read of their values on the host."""

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name in ("item", "tolist", "__int__", "__index__", "__bool__", "__float__", "max", "numpy"):
            raise AssertionError(f"positions read on the host ({name})")
        return super().__torch_function__(func, types, args, kwargs or {})


def reference(rope, positions):
    """cos, sin of [T, 1, D] from the definition: dim d turns with row row_of_dim[d]."""
    inv = rope.inv_freq
    freqs = positions[:, :, None].double() * torch.cat((inv, inv)).double()  # [3, T, D]
    pick = rope.row_of_dim.view(1, 1, -1).expand(1, positions.shape[1], -1)
    ang = freqs.gather(0, pick).squeeze(0)
    return ang.cos()[:, None, :], ang.sin()[:, None, :]


def test_device_positions_are_not_read_on_the_host(monkeypatch):
    rope = MRotaryEmbedding(16, 64, PARAMS, 64)
    positions = torch.stack([torch.arange(200, 210), torch.arange(5, 15), torch.arange(90, 100)])
    assert rope.reserve(int(positions.max()))  # grows past 64, as the runner would before the forward
    assert not rope.reserve(int(positions.max()))
    monkeypatch.setattr(rotary, "_on_host", lambda t: False)  # take the device path on the CPU
    cos, sin = rope.lookup(positions.as_subclass(NoHostReads), torch.float32)
    ref_cos, ref_sin = reference(rope, positions)
    torch.testing.assert_close(cos.as_subclass(torch.Tensor).double(), ref_cos, atol=1e-5, rtol=0)
    torch.testing.assert_close(sin.as_subclass(torch.Tensor).double(), ref_sin, atol=1e-5, rtol=0)


def test_host_positions_grow_the_table():
    rope = MRotaryEmbedding(16, 32, PARAMS, 32)
    positions = torch.tensor([[3, 100], [4, 120], [5, 7]])
    cos, _ = rope.lookup(positions, torch.float32)
    assert rope.cos.shape[0] > 120
    torch.testing.assert_close(cos.double(), reference(rope, positions)[0], atol=1e-5, rtol=0)


def test_runner_drops_decode_graphs_when_the_table_grows():
    from vlmserve.worker.model_runner import ModelRunner

    runner = ModelRunner.__new__(ModelRunner)
    runner.position_tables = [MRotaryEmbedding(16, 32, PARAMS, 32)]
    runner.decode_graphs = object()
    runner._reserve_positions(31)
    assert runner.decode_graphs is not None  # fits: graphs kept
    runner._reserve_positions(40)
    assert runner.decode_graphs is None
    assert runner.position_tables[0].cos.shape[0] > 40


@pytest.mark.parametrize("rows", [1, 3])
def test_text_positions_are_plain_rope(rows):
    rope = MRotaryEmbedding(16, 64, PARAMS, 64)
    pos = torch.arange(10)
    cos1, sin1 = rope.lookup(pos, torch.float32)
    cos3, sin3 = rope.lookup(pos.expand(3, -1).clone(), torch.float32)
    torch.testing.assert_close(cos1, cos3)
    torch.testing.assert_close(sin1, sin3)
