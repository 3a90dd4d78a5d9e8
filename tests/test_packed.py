"""Packed sequences: pack/unpack round trips, length groups, and attention within segments
equal to each sample's own attention, as hypothesis properties over ragged batches."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from trimkit.packed import Segments, length_groups, pack, segment_attention, unpack

SETTINGS = settings(max_examples=60, deadline=None, derandomize=True)
lengths = st.lists(st.integers(0, 20), min_size=1, max_size=8).filter(lambda ls: max(ls) > 0)


@SETTINGS
@given(lengths, st.integers(0, 3))
def test_pack_then_unpack_gives_the_live_tokens_back(ls, extra):
    g = torch.Generator().manual_seed(len(ls))
    n = max(ls) + extra
    x = torch.randn(len(ls), n, 3, generator=g)
    live = torch.rand(len(ls), n, generator=g) < 0.6
    packed, seg = pack(x, live)
    assert seg.lengths == tuple(live.sum(1).tolist())
    assert packed.shape == (1, int(live.sum()), 3)
    out, real = unpack(packed, seg)
    for i in range(len(ls)):
        k = seg.lengths[i]
        assert torch.equal(out[i, :k], x[i][live[i]])
        assert not real[i, k:].any() and (out[i, k:] == 0).all()
    assert torch.equal(seg.ids(), torch.repeat_interleave(torch.arange(len(ls)),
                                                          live.sum(1)))


@SETTINGS
@given(lengths, st.floats(0, 5000))
def test_length_groups_partition_the_batch_by_length(ls, call_cost):
    groups = length_groups(ls, call_cost)
    assert sorted(i for grp in groups for i in grp) == list(range(len(ls)))
    # contiguous in length: a group's shortest is at least the previous group's longest
    for a, b in zip(groups, groups[1:], strict=False):
        assert max(ls[i] for i in a) <= min(ls[i] for i in b)


def test_length_groups_trade_padding_against_calls():
    ls = [2, 3, 3, 200, 210]
    assert length_groups(ls, call_cost=0) == [[0], [1, 2], [3], [4]]
    assert len(length_groups(ls, call_cost=1e9)) == 1
    assert length_groups(ls, call_cost=100) == [[0, 1, 2], [3], [4]]
    assert length_groups(ls, call_cost=5000) == [[0, 1, 2], [3, 4]]


def _reference(q, k, v, qs: Segments, ks: Segments, key_bias, scale):
    out = torch.zeros_like(q)
    for i in range(qs.batch):
        a, b = qs.offsets[i], qs.offsets[i + 1]
        c, d = ks.offsets[i], ks.offsets[i + 1]
        if a == b:
            continue
        mask = None if key_bias is None else key_bias[None, c:d]
        out[:, :, a:b] = F.scaled_dot_product_attention(q[:, :, a:b], k[:, :, c:d],
                                                        v[:, :, c:d], attn_mask=mask,
                                                        scale=scale)
    return out


@SETTINGS
@given(lengths, st.booleans(), st.booleans(), st.sampled_from([None, 0.0, 1e9]))
def test_segment_attention_equals_each_samples_own(ls, cross, biased, call_cost):
    g = torch.Generator().manual_seed(sum(ls) + 7 * len(ls))
    qs = Segments.from_lengths(ls)
    ks = qs
    if cross:  # every query segment reads a key segment of its own (non-empty) length
        ks = Segments.from_lengths(
            torch.randint(1, 12, (len(ls),), generator=g).tolist())
    h, d = 2, 4
    q = torch.randn(1, h, qs.total, d, generator=g)
    k = torch.randn(1, h, ks.total, d, generator=g)
    v = torch.randn(1, h, ks.total, d, generator=g)
    bias = torch.randn(ks.total, generator=g) if biased else None
    groups = None if call_cost is None else length_groups(
        [max(a, b) for a, b in zip(qs.lengths, ks.lengths, strict=True)], call_cost)
    got = segment_attention(q, k, v, qs, None if not cross else ks, bias,
                            scale=1 / math.sqrt(d), groups=groups)
    want = _reference(q, k, v, qs, ks, bias, 1 / math.sqrt(d))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_segment_attention_refuses_mismatched_segments():
    q = torch.randn(1, 1, 3, 2)
    try:
        segment_attention(q, q, q, Segments.from_lengths([1, 2]), Segments.from_lengths([3]))
    except ValueError as e:
        assert "2 query segments but 1 key ones" in str(e)
    else:
        raise AssertionError("mismatched segments were accepted")
