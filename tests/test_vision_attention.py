"""varlen_attention (layers/vision_attention.py) equals attention run segment by segment, for
segments of one length back to back (a view), of one length apart (a gather), of mixed lengths,
and for q, k, v that are strided views of one qkv projection; many segments of one length go in
batches of power-of-two counts."""
import pytest
import torch
import torch.nn.functional as F

from vlmserve.layers.vision_attention import power_of_two_counts, varlen_attention


def per_segment(q, k, v, cu, scale):
    out = torch.empty_like(q)
    for a, b in zip(cu[:-1], cu[1:]):
        o = F.scaled_dot_product_attention(*(x[a:b].transpose(0, 1) for x in (q, k, v)), scale=scale)
        out[a:b] = o.transpose(0, 1)
    return out


@pytest.mark.parametrize("lengths", [[16, 16, 16], [16, 9, 16], [5, 7, 5, 16, 7], [12], [6] * 13,
                                     [6, 3] * 13 + [6] * 21])
def test_equals_per_segment_attention(lengths):
    g = torch.Generator().manual_seed(len(lengths))
    n, h, d = sum(lengths), 3, 8
    q, k, v = torch.randn(n, 3, h, d, generator=g).unbind(1)  # strided views, as the towers give them
    cu = [0]
    for L in lengths:
        cu.append(cu[-1] + L)
    got = varlen_attention(q, k, v, cu, d ** -0.5)
    torch.testing.assert_close(got, per_segment(q, k, v, cu, d ** -0.5), atol=1e-6, rtol=1e-5)


def test_power_of_two_counts():
    assert power_of_two_counts(1) == [1] and power_of_two_counts(8) == [8]
    assert power_of_two_counts(13) == [8, 4, 1] and power_of_two_counts(11) == [8, 2, 1]
    assert power_of_two_counts(40) == [16, 16, 8] and power_of_two_counts(0) == []
    for n in range(1, 70):
        counts = power_of_two_counts(n)
        assert sum(counts) == n and all(c & (c - 1) == 0 and c <= 16 for c in counts)
        assert counts == sorted(counts, reverse=True)
