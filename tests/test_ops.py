"""Unit and property tests of the pure tensor ops (`trimkit.ops`) and `TokenState.start`."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from trimkit.ops import (
    NEG,
    attention_bias,
    bipartite_soft_matching,
    compact,
    drop_tokens,
    fuse_tokens,
    gumbel_sigmoid_st,
    masked_softmax,
    merge_tokens,
    query_attention,
    topk_by_score,
)
from trimkit.state import TokenState

PROPS = settings(max_examples=40, deadline=None, derandomize=True)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def bools(rows) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.bool)


def live_size(state: TokenState) -> torch.Tensor:
    return (state.size * state.live).sum(1)


# -- TokenState.start ---------------------------------------------------------------------


def test_start_defaults():
    x = torch.randn(2, 5, 3, dtype=torch.float64)
    s = TokenState.start(x)
    assert s.x is x
    assert s.keep.dtype == torch.bool and bool(s.keep.all())
    assert s.size.dtype == torch.float64 and torch.equal(s.size, torch.ones(2, 5, dtype=x.dtype))
    assert s.protected.dtype == torch.bool and not bool(s.protected.any())
    assert s.source is None
    assert not s.sized and not s.has_dead
    assert s.live_counts().tolist() == [5, 5]


def test_start_protection_padding_and_source():
    x = torch.randn(2, 5, 3)
    pad = bools([[0, 0, 0, 1, 1], [0, 0, 0, 0, 0]])
    extra = bools([[0, 0, 1, 1, 0], [0, 0, 0, 0, 1]])
    s = TokenState.start(x, num_protected=1, protected=extra, padding_mask=pad, track_source=True)
    assert torch.equal(s.keep, ~pad)
    assert s.has_dead
    # CLS and the extra mask are protected, but padding never is.
    assert s.protected.tolist() == [[True, False, True, False, False],
                                    [True, False, False, False, True]]
    assert s.source.tolist() == [[0, 1, 2, -1, -1], [0, 1, 2, 3, 4]]
    assert s.live_counts().tolist() == [3, 5]


def test_start_padding_without_padding_is_not_dead():
    x = torch.randn(2, 4, 3)
    s = TokenState.start(x, num_protected=2, padding_mask=torch.zeros(2, 4, dtype=torch.bool))
    assert not s.has_dead and bool(s.keep.all())
    assert s.protected[:, :2].all() and not s.protected[:, 2:].any()


def test_live_of_soft_keep():
    s = TokenState.start(torch.randn(1, 4, 2))
    s.keep = torch.tensor([[1.0, 0.2, 0.0, 0.7]])
    assert s.live.tolist() == [[True, True, False, True]]
    assert s.live_counts().tolist() == [3]


# -- masked_softmax -----------------------------------------------------------------------


def test_masked_softmax_all_unmasked_is_softmax():
    s = torch.randn(3, 4, 7)
    out = masked_softmax(s, torch.ones(3, 4, 7, dtype=torch.bool))
    torch.testing.assert_close(out, torch.softmax(s, -1))


def test_masked_softmax_partial_mask_matches_softmax_of_subset():
    s = torch.randn(2, 6)
    mask = bools([[1, 0, 1, 1, 0, 1], [0, 0, 0, 0, 0, 1]])
    out = masked_softmax(s, mask)
    for b in range(2):
        sub = torch.softmax(s[b][mask[b]], -1)
        torch.testing.assert_close(out[b][mask[b]], sub)
        assert torch.all(out[b][~mask[b]] == 0)
    torch.testing.assert_close(out.sum(-1), torch.ones(2))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_masked_softmax_fully_masked_row_is_zero_not_nan(dtype):
    s = (torch.randn(3, 5) * 100).to(dtype)
    mask = bools([[0] * 5, [1, 0, 0, 0, 0], [1] * 5])
    out = masked_softmax(s, mask)
    assert torch.isfinite(out).all()
    assert torch.all(out[0] == 0)
    assert out[1].tolist() == [1.0, 0, 0, 0, 0]
    assert abs(float(out[2].float().sum()) - 1) < 1e-2


def test_masked_softmax_broadcast_mask_and_dim_and_grad():
    s = torch.randn(2, 3, 4, requires_grad=True)
    mask = bools([[1, 1, 0], [0, 0, 0]])[:, :, None]  # masks whole columns along dim=1
    out = masked_softmax(s, mask, dim=1)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out[0, :2], torch.softmax(s[0, :2], 0))
    assert torch.all(out[0, 2] == 0) and torch.all(out[1] == 0)
    out.sum().backward()
    assert torch.isfinite(s.grad).all()


# -- gumbel_sigmoid_st --------------------------------------------------------------------


def _soft_sample(logits, tau, seed):
    u = torch.rand(logits.shape, generator=gen(seed), dtype=logits.dtype)
    u = u.clamp(1e-6, 1 - 1e-6)
    return torch.sigmoid((logits + torch.log(u) - torch.log1p(-u)) / tau)


def test_gumbel_forward_is_exactly_binary():
    logits = torch.randn(64, 33) * 3
    out = gumbel_sigmoid_st(logits, generator=gen(1))
    assert set(out.unique().tolist()) <= {0.0, 1.0}
    assert 0 < float(out.mean()) < 1


@pytest.mark.parametrize("tau", [0.3, 1.0, 4.0])
def test_gumbel_gradient_is_the_soft_samples(tau):
    logits = (torch.randn(8, 17) * 2).requires_grad_()
    coef = torch.randn(8, 17)
    out = gumbel_sigmoid_st(logits, tau=tau, generator=gen(7))
    (out * coef).sum().backward()
    g_st = logits.grad.clone()

    logits.grad = None
    soft = _soft_sample(logits, tau, 7)
    (soft * coef).sum().backward()
    torch.testing.assert_close(g_st, logits.grad)
    assert torch.equal(out.detach(), (soft.detach() > 0.5).float())
    # and the gradient is the analytic sigmoid'(z / tau) / tau
    s = soft.detach()
    torch.testing.assert_close(g_st, coef * s * (1 - s) / tau)
    assert g_st.abs().sum() > 0


def test_gumbel_tau_changes_gradient_not_decision():
    logits = (torch.randn(200) * 2).requires_grad_()
    grads, outs = [], []
    for tau in (0.1, 1.0, 50.0):
        logits.grad = None
        out = gumbel_sigmoid_st(logits, tau=tau, generator=gen(3))
        out.sum().backward()
        grads.append(logits.grad.clone())
        outs.append(out.detach())
    # The hard decision is the sign of logits + noise, whatever tau.
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[1], outs[2])
    # A large tau flattens the soft sample: gradient bounded by 1 / (4 tau), nearly uniform.
    assert grads[2].max() <= 1 / (4 * 50.0) + 1e-7
    assert grads[2].min() > 0.9 / (4 * 50.0)
    # A small tau concentrates it: most entries get almost nothing.
    assert (grads[0] < 1e-3).float().mean() > 0.5
    assert not torch.allclose(grads[0], grads[1])


def test_gumbel_keep_rate_is_sigmoid_of_logit():
    for logit in (-2.0, 0.0, 1.5):
        out = gumbel_sigmoid_st(torch.full((40000,), logit), generator=gen(11))
        assert abs(float(out.mean()) - 1 / (1 + math.exp(-logit))) < 0.015


def test_gumbel_generator_reproducible():
    logits = torch.randn(50, 20)
    a = gumbel_sigmoid_st(logits, generator=gen(5))
    b = gumbel_sigmoid_st(logits, generator=gen(5))
    c = gumbel_sigmoid_st(logits, generator=gen(6))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_gumbel_extreme_logits_are_finite():
    logits = torch.tensor([-60.0, -30.0, 30.0, 60.0], requires_grad=True)
    out = gumbel_sigmoid_st(logits, generator=gen(0))
    assert out.tolist() == [0.0, 0.0, 1.0, 1.0]
    out.sum().backward()
    assert torch.isfinite(logits.grad).all()


# -- attention_bias -----------------------------------------------------------------------


def test_attention_bias_none_when_nothing_dead_and_not_sized():
    s = TokenState.start(torch.randn(2, 4, 3))
    assert attention_bias(s, torch.float32, proportional=False) is None
    assert attention_bias(s, torch.float32, proportional=True) is None
    sized = TokenState.start(torch.randn(2, 4, 3))
    sized.size = torch.full((2, 4), 3.0)
    sized.sized = True
    assert attention_bias(sized, torch.float32, proportional=False) is None
    assert attention_bias(sized, torch.float32, proportional=True) is not None


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_attention_bias_neg_on_dead_keys(dtype):
    pad = bools([[0, 0, 1, 1], [0, 0, 0, 0]])
    s = TokenState.start(torch.randn(2, 4, 3), padding_mask=pad)
    bias = attention_bias(s, dtype, proportional=False)
    assert bias.shape == (2, 1, 1, 4) and bias.dtype == dtype
    assert torch.isfinite(bias).all()
    flat = bias[:, 0, 0]
    assert torch.all(flat[pad] == NEG(dtype))
    assert torch.all(flat[~pad] == 0)


def test_neg_stays_finite_when_four_are_added():
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        t = torch.tensor([NEG(dtype)] * 4, dtype=dtype)
        assert math.isfinite(float(t.sum()))


def test_attention_bias_log_size_when_proportional():
    x = torch.randn(1, 4, 3)
    s = TokenState.start(x, padding_mask=bools([[0, 0, 0, 1]]))
    s.size = torch.tensor([[1.0, 2.0, 5.0, 1.0]])
    s.sized = True
    bias = attention_bias(s, torch.float32, proportional=True)[0, 0, 0]
    torch.testing.assert_close(bias[:3], torch.log(torch.tensor([1.0, 2.0, 5.0])))
    assert bias[3] <= NEG(torch.float32) / 2 and math.isfinite(float(bias[3]))
    no_prop = attention_bias(s, torch.float32, proportional=False)[0, 0, 0]
    assert torch.all(no_prop[:3] == 0)


def test_attention_bias_soft_keep_with_grad():
    s = TokenState.start(torch.randn(1, 4, 3))
    keep = torch.tensor([[1.0, 0.5, 0.25, 1.0]], requires_grad=True)
    s.keep = keep
    bias = attention_bias(s, torch.float32, proportional=False)
    assert bias is not None and bias.shape == (1, 1, 1, 4)
    torch.testing.assert_close(bias[0, 0, 0], torch.log(keep.detach()[0]))
    bias.sum().backward()
    torch.testing.assert_close(keep.grad, 1 / keep.detach())


def test_attention_bias_hard_straight_through_keep_reaches_logits():
    logits = torch.tensor([[3.0, -3.0, 0.5, 2.0]], requires_grad=True)
    keep = gumbel_sigmoid_st(logits, generator=gen(2))
    s = TokenState.start(torch.randn(1, 4, 3))
    s.keep = keep
    bias = attention_bias(s, torch.float32, proportional=False)
    assert torch.isfinite(bias).all()
    hard = keep.detach()[0]
    assert 0 < int(hard.sum()) < 4
    assert torch.all(bias[0, 0, 0][hard == 1] == 0)
    assert torch.all(bias[0, 0, 0][hard == 0] < -40)
    scores = torch.softmax(torch.randn(1, 1, 1, 4) + bias, -1)
    (scores * torch.arange(4.0)).sum().backward()
    assert torch.isfinite(logits.grad).all() and logits.grad.abs().sum() > 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_attention_bias_soft_keep_without_grad(dtype):
    s = TokenState.start(torch.randn(1, 4, 3))
    s.keep = torch.tensor([[1.0, 0.5, 0.0, 0.0]])
    assert attention_bias(s, dtype, proportional=False) is None  # has_dead is False
    s.has_dead = True
    bias = attention_bias(s, dtype, proportional=False)[0, 0, 0]
    assert bias.dtype == dtype
    assert torch.isfinite(bias).all()  # NEG of the target dtype, not float32's (-inf in fp16)
    assert bias[0] == 0
    assert abs(float(bias[1]) - math.log(0.5)) < 1e-2
    assert torch.all(bias[2:] == NEG(dtype))
    # A row whose keys are all dead still gives a finite softmax.
    s.keep = torch.zeros(1, 4)
    b = attention_bias(s, dtype, proportional=False)
    assert torch.isfinite(torch.softmax((torch.randn(1, 1, 2, 4).to(dtype) + b).float(), -1)).all()


# -- query_attention ----------------------------------------------------------------------


def _full_probs(q, k, bias, scale):
    logits = q @ k.transpose(-2, -1) * scale
    if bias is not None:
        logits = logits + bias
    return torch.softmax(logits, -1)  # B×H×N×N


@pytest.mark.parametrize("rows", [1, 3])
def test_query_attention_matches_rows_of_full_map(rows):
    b, h, n, d = 2, 4, 7, 5
    q, k = torch.randn(b, h, n, d), torch.randn(b, h, n, d)
    s = TokenState.start(torch.randn(b, n, 8), padding_mask=bools([[0] * 5 + [1] * 2, [0] * 7]))
    bias = attention_bias(s, torch.float32, proportional=False)
    scale = d ** -0.5
    out = query_attention(q[:, :, :rows], k, bias, scale)
    full = _full_probs(q, k, bias, scale)
    assert out.shape == (b, n) and out.dtype == torch.float32
    torch.testing.assert_close(out, full[:, :, :rows].mean(1).mean(1))
    torch.testing.assert_close(out.sum(1), torch.ones(b))
    assert out[0, 5:].max() < 1e-30  # dead keys get nothing


def test_query_attention_row_weights():
    b, h, n, d = 2, 3, 6, 4
    q, k = torch.randn(b, h, n, d), torch.randn(b, h, n, d)
    full = _full_probs(q, k, None, 0.5).mean(1)  # B×N×N
    w = torch.tensor([[1.0, 0.0, 3.0], [0.0, 0.0, 2.0]])
    out = query_attention(q[:, :, :3], k, None, 0.5, row_weights=w)
    expected = (full[:, :3] * w[..., None]).sum(1) / w.sum(1, keepdim=True)
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(out[1], full[1, 2])  # only the weighted row counts
    zero = query_attention(q[:, :, :3], k, None, 0.5, row_weights=torch.zeros(b, 3))
    assert torch.isfinite(zero).all()


def test_query_attention_half_precision_is_finite():
    q = torch.randn(1, 2, 1, 4, dtype=torch.float16)
    k = torch.randn(1, 2, 5, 4, dtype=torch.float16)
    s = TokenState.start(torch.randn(1, 5, 3), padding_mask=bools([[0, 1, 1, 1, 1]]))
    out = query_attention(q, k, attention_bias(s, torch.float16, False), 0.5)
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    assert abs(float(out[0, 0]) - 1) < 1e-3


# -- bipartite_soft_matching --------------------------------------------------------------


def _brute_force_matching(metric, r, eligible):
    """Per sample: the set of (src, dst) pairs ToMe should merge."""
    out = []
    m = torch.nn.functional.normalize(metric.double(), dim=-1)
    for b in range(metric.shape[0]):
        pos = eligible[b].nonzero().flatten().tolist()
        a_set, b_set = pos[0::2], pos[1::2]
        if not b_set or r <= 0:
            out.append(set())
            continue
        edges = []
        for i in a_set:
            sims = [float(m[b, i] @ m[b, j]) for j in b_set]
            best = max(range(len(b_set)), key=lambda t: sims[t])
            edges.append((sims[best], i, b_set[best]))
        edges.sort(key=lambda e: -e[0])
        out.append({(i, j) for _, i, j in edges[:r]})
    return out


def _pairs(src, dst, valid):
    return [
        {(int(s), int(d)) for s, d, v in zip(src[b], dst[b], valid[b], strict=True) if v}
        for b in range(src.shape[0])
    ]


@pytest.mark.parametrize("seed", range(6))
def test_bipartite_matches_brute_force(seed):
    g = gen(seed)
    b, n, d = 3, 11, 4
    metric = torch.randn(b, n, d, generator=g)
    eligible = torch.rand(b, n, generator=g) > 0.3
    eligible[:, 0] = False  # a protected CLS
    for r in (1, 2, 3, 5, 20):
        src, dst, valid = bipartite_soft_matching(metric, r, eligible)
        assert src.shape == dst.shape == valid.shape
        assert _pairs(src, dst, valid) == _brute_force_matching(metric, r, eligible)


def test_bipartite_src_in_a_dst_in_b_and_never_ineligible():
    g = gen(4)
    metric = torch.randn(4, 12, 6, generator=g)
    eligible = torch.rand(4, 12, generator=g) > 0.4
    eligible[:, 0] = False
    rank = eligible.cumsum(1) - 1
    is_a = eligible & (rank % 2 == 0)
    is_b = eligible & (rank % 2 == 1)
    src, dst, valid = bipartite_soft_matching(metric, 4, eligible)
    assert valid.any()
    for bi in range(4):
        s, t = src[bi][valid[bi]], dst[bi][valid[bi]]
        assert is_a[bi, s].all() and is_b[bi, t].all()
        assert eligible[bi, s].all() and eligible[bi, t].all()
        assert len(set(s.tolist())) == len(s)  # each source merged once
        assert not set(s.tolist()) & set(t.tolist())


def test_bipartite_merges_the_obvious_pair():
    # tokens 1 and 2 are nearly parallel, everything else is orthogonal-ish
    metric = torch.tensor([[[1.0, 0, 0, 0], [0, 1.0, 0, 0], [0, 2.0, 0.01, 0],
                            [0, 0, 1.0, 0], [0, 0, 0, 1.0]]])
    eligible = bools([[0, 1, 1, 1, 1]])  # CLS protected
    src, dst, valid = bipartite_soft_matching(metric, 1, eligible)
    assert (int(src[0, 0]), int(dst[0, 0]), bool(valid[0, 0])) == (1, 2, True)


def test_bipartite_cap_per_sample():
    metric = torch.randn(5, 8, 3)
    eligible = torch.zeros(5, 8, dtype=torch.bool)
    eligible[0] = True            # E = 8 → at most 4
    eligible[1, [1, 4, 6]] = True  # E = 3 → at most 2
    eligible[2, 5] = True          # E = 1 → 0
    # eligible[3]: E = 0 → 0
    eligible[4, [2, 7]] = True     # E = 2 → 1
    src, dst, valid = bipartite_soft_matching(metric, 100, eligible)
    assert valid.sum(1).tolist() == [4, 2, 0, 0, 1]
    assert src.shape[1] == 4
    src, dst, valid = bipartite_soft_matching(metric, 2, eligible)
    assert valid.sum(1).tolist() == [2, 2, 0, 0, 1]
    # valid pairs come first in each row
    assert torch.equal(valid, torch.arange(valid.shape[1])[None] < valid.sum(1, keepdim=True))


def test_bipartite_nothing_to_merge_gives_empty():
    metric = torch.randn(2, 5, 3)
    for r, eligible in ((0, torch.ones(2, 5, dtype=torch.bool)),
                        (3, bools([[0, 0, 1, 0, 0], [0, 0, 0, 0, 0]]))):
        src, dst, valid = bipartite_soft_matching(metric, r, eligible)
        assert src.shape == dst.shape == valid.shape == (2, 0)
        assert src.dtype == torch.long and valid.dtype == torch.bool


# -- merge_tokens -------------------------------------------------------------------------


def test_merge_hand_example():
    x = torch.tensor([[[1.0, 10.0], [2.0, 20.0], [3.0, 30.0], [4.0, 40.0], [5.0, 50.0]]])
    s = TokenState.start(x, track_source=True)
    s.size = torch.tensor([[1.0, 1.0, 2.0, 1.0, 3.0]])
    s.sized = True
    src, dst = torch.tensor([[1, 3, 0]]), torch.tensor([[2, 2, 4]])
    valid = bools([[1, 1, 0]])
    out = merge_tokens(s, src, dst, valid)
    # slot 2: (2·1 + 3·2 + 4·1) / 4 = 3
    torch.testing.assert_close(out.x[0, 2], torch.tensor([3.0, 30.0]))
    assert out.size[0].tolist() == [1.0, 1.0, 4.0, 1.0, 3.0]
    torch.testing.assert_close(out.x[0, [0, 4]], x[0, [0, 4]])  # invalid pair: untouched
    assert out.keep[0].tolist() == [True, False, True, False, True]
    assert out.source[0].tolist() == [0, 2, 2, 2, 4]
    assert out.sized and out.has_dead
    assert float(live_size(out)[0]) == float(live_size(s)[0]) == 8.0


def test_merge_size_weighted_average_two_into_one():
    x = torch.tensor([[[0.0], [6.0], [3.0]]])
    s = TokenState.start(x)
    s.size = torch.tensor([[2.0, 1.0, 3.0]])
    out = merge_tokens(s, torch.tensor([[0]]), torch.tensor([[1]]), bools([[1]]))
    # (0·2 + 6·1) / 3 = 2
    torch.testing.assert_close(out.x[0, :, 0], torch.tensor([0.0, 2.0, 3.0]))
    assert out.size[0].tolist()[1:] == [3.0, 3.0]


def test_merge_source_follows_through_two_rounds():
    x = torch.randn(1, 6, 2)
    s = TokenState.start(x, track_source=True)
    s1 = merge_tokens(s, torch.tensor([[1]]), torch.tensor([[2]]), bools([[1]]))
    s2 = merge_tokens(s1, torch.tensor([[2]]), torch.tensor([[5]]), bools([[1]]))
    assert s2.source[0].tolist() == [0, 5, 5, 3, 4, 5]
    assert s2.size[0].tolist()[5] == 3.0
    torch.testing.assert_close(s2.x[0, 5], x[0, [1, 2, 5]].mean(0))
    s3 = drop_tokens(s2, bools([[0, 0, 0, 0, 0, 1]]))
    assert s3.source[0].tolist() == [0, -1, -1, 3, 4, -1]


def test_merge_nothing_is_identity():
    s = TokenState.start(torch.randn(2, 4, 3))
    empty = torch.zeros(2, 0, dtype=torch.long)
    assert merge_tokens(s, empty, empty, empty.bool()) is s
    out = merge_tokens(s, torch.tensor([[1], [2]]), torch.tensor([[0], [3]]), bools([[0], [0]]))
    torch.testing.assert_close(out.x, s.x)
    assert torch.equal(out.keep, s.keep) and torch.equal(out.size, s.size)


def test_merge_with_matching_end_to_end():
    g = gen(9)
    x = torch.randn(3, 10, 4, generator=g)
    pad = torch.arange(10)[None] >= torch.tensor([[10], [7], [2]])
    s = TokenState.start(x, num_protected=1, padding_mask=pad)
    eligible = s.live & ~s.protected
    src, dst, valid = bipartite_soft_matching(x, 3, eligible)
    out = merge_tokens(s, src, dst, valid)
    torch.testing.assert_close(live_size(out), live_size(s))
    assert (s.live_counts() - out.live_counts()).tolist() == valid.sum(1).tolist()
    assert out.live[:, 0].all()  # the protected CLS survives
    assert not (out.live & ~s.live).any()  # padding never becomes live


# -- drop_tokens --------------------------------------------------------------------------


def test_drop_never_drops_protected():
    extra = bools([[0, 0, 0, 1, 0]] * 2)
    s = TokenState.start(torch.randn(2, 5, 3), num_protected=1, protected=extra,
                         track_source=True)
    out = drop_tokens(s, torch.ones(2, 5, dtype=torch.bool))
    assert out.keep.tolist() == [[True, False, False, True, False]] * 2
    assert out.source.tolist() == [[0, -1, -1, 3, -1]] * 2
    assert out.has_dead
    torch.testing.assert_close(out.x, s.x)


def test_drop_soft_keep_and_stays_dropped():
    s = TokenState.start(torch.randn(1, 4, 3))
    s.keep = torch.tensor([[0.9, 0.4, 0.0, 1.0]])
    out = drop_tokens(s, bools([[0, 1, 0, 0]]))
    assert out.keep.tolist() == [[pytest.approx(0.9), 0.0, 0.0, 1.0]]
    out2 = drop_tokens(out, bools([[0, 0, 0, 0]]))
    assert out2.keep[0, 1] == 0 and out2.keep[0, 2] == 0


# -- fuse_tokens --------------------------------------------------------------------------


def test_fuse_hand_example_and_no_op_sample():
    x = torch.arange(2 * 5 * 2, dtype=torch.float32).reshape(2, 5, 2)
    s = TokenState.start(x, num_protected=1, track_source=True)
    s.size = torch.tensor([[1.0, 2.0, 1.0, 1.0, 3.0], [1.0] * 5])
    weights = torch.tensor([[9.0, 0.1, 5.0, 0.3, 0.6], [1.0] * 5])
    drop = bools([[0, 1, 0, 1, 1], [0, 0, 0, 0, 0]])
    out = fuse_tokens(s, drop, weights)
    w = torch.tensor([0.1, 0.3, 0.6])
    expected = (w[:, None] * x[0, [1, 3, 4]]).sum(0) / w.sum()
    torch.testing.assert_close(out.x[0, 1], expected)  # in the first dropped slot
    assert float(out.size[0, 1]) == 6.0
    assert out.keep[0].tolist() == [True, True, True, False, False]
    torch.testing.assert_close(out.x[0, [0, 2]], x[0, [0, 2]])
    assert out.source[0].tolist() == [0, 1, 2, 1, 1]
    # sample 1 dropped nothing: untouched
    torch.testing.assert_close(out.x[1], x[1])
    assert out.size[1].tolist() == [1.0] * 5 and bool(out.keep[1].all())
    assert out.source[1].tolist() == [0, 1, 2, 3, 4]
    torch.testing.assert_close(live_size(out), live_size(s))


def test_fuse_ignores_protected_and_dead():
    x = torch.randn(1, 5, 3)
    s = TokenState.start(x, num_protected=1, padding_mask=bools([[0, 0, 0, 0, 1]]))
    out = fuse_tokens(s, torch.ones(1, 5, dtype=torch.bool), torch.rand(1, 5) + 0.1)
    assert out.keep[0].tolist() == [True, True, False, False, False]
    torch.testing.assert_close(out.x[0, 0], x[0, 0])
    assert float(out.size[0, 1]) == 3.0  # tokens 1, 2, 3 only
    torch.testing.assert_close(live_size(out), live_size(s))


def test_fuse_zero_weights_fall_back_to_mean():
    x = torch.randn(1, 4, 3)
    s = TokenState.start(x)
    out = fuse_tokens(s, bools([[0, 1, 1, 0]]), torch.tensor([[1.0, 0.0, 0.0, 1.0]]))
    torch.testing.assert_close(out.x[0, 1], x[0, 1:3].mean(0))


def test_fuse_soft_keep():
    s = TokenState.start(torch.randn(1, 4, 3))
    s.keep = torch.tensor([[1.0, 0.5, 0.7, 0.0]])
    out = fuse_tokens(s, bools([[0, 1, 1, 1]]), torch.ones(1, 4))
    assert out.keep[0].tolist() == [1.0, 1.0, 0.0, 0.0]
    assert float(out.size[0, 1]) == 2.0


# -- topk_by_score ------------------------------------------------------------------------


@pytest.mark.parametrize(("e", "ratio", "k"), [
    (10, 0.5, 5), (10, 0.45, 5), (7, 0.5, 4), (5, 0.01, 1), (5, 0.0, 1), (1, 0.3, 1),
    (100, 0.07, 7), (30, 0.1, 3), (50, 0.14, 7), (9, 1.0, 9), (9, 1.5, 9), (0, 0.5, 0),
])
def test_topk_count(e, ratio, k):
    n = e + 3
    eligible = torch.zeros(1, n, dtype=torch.bool)
    eligible[0, 1:1 + e] = True
    scores = torch.randn(1, n)
    kept = topk_by_score(scores, ratio, eligible)
    assert int(kept.sum()) == k
    assert not (kept & ~eligible).any()


def test_topk_keeps_highest_and_never_ineligible():
    scores = torch.tensor([[9.0, 1.0, 5.0, 8.0, 2.0, 7.0], [0.0, 3.0, 2.0, 1.0, 100.0, 4.0]])
    eligible = bools([[0, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 1]])
    kept = topk_by_score(scores, 0.5, eligible)
    assert kept.tolist() == [[False, False, True, True, False, True],
                             [False, True, True, False, False, True]]


def test_topk_ties_go_to_earlier_position():
    scores = torch.ones(2, 8)
    eligible = bools([[1] * 8, [0, 1, 0, 1, 1, 1, 0, 1]])
    kept = topk_by_score(scores, 0.5, eligible)
    assert kept[0].nonzero().flatten().tolist() == [0, 1, 2, 3]
    assert kept[1].nonzero().flatten().tolist() == [1, 3, 4]


def test_topk_per_sample_counts():
    eligible = bools([[1] * 6, [1, 1, 0, 0, 0, 0], [0] * 6])
    kept = topk_by_score(torch.randn(3, 6), 0.34, eligible)
    assert kept.sum(1).tolist() == [3, 1, 0]


# -- compact ------------------------------------------------------------------------------


def test_compact_nothing_dead_returns_none():
    s = TokenState.start(torch.randn(2, 4, 3))
    out, idx = compact(s)
    assert idx is None and out is s
    s2 = drop_tokens(s, torch.zeros(2, 4, dtype=torch.bool))  # flagged, but nothing dead
    assert s2.has_dead
    out2, idx2 = compact(s2)
    assert idx2 is None and not out2.has_dead
    torch.testing.assert_close(out2.x, s.x)


def test_a_packed_batch_is_not_gathered_again_until_an_op_decides():
    """Samples that keep different counts stay padded after `compact`; compacting that state
    again (the next layer, with no op) does nothing, and a new decision packs again."""
    s = TokenState.start(torch.randn(2, 5, 3), num_protected=1)
    s = drop_tokens(s, bools([[0, 1, 0, 0, 0], [0, 1, 1, 1, 0]]))
    packed, idx = compact(s)
    assert idx is not None and packed.packed and packed.has_dead  # sample 1 padded
    again, idx2 = compact(packed.with_x(packed.x * 2))
    assert idx2 is None and again.packed
    torch.testing.assert_close(again.x, packed.x * 2)
    dropped = drop_tokens(again, bools([[0, 0, 1, 0], [0, 0, 0, 0]]))
    assert not dropped.packed
    out, idx3 = compact(dropped)
    assert idx3.tolist() == [[0, 1, 3], [0, 1, 2]] and out.live.sum(1).tolist() == [3, 2]


def test_compact_hand_example():
    x = torch.arange(2 * 5, dtype=torch.float32).reshape(2, 5, 1)
    s = TokenState.start(x, num_protected=1, track_source=True)
    s.size = torch.tensor([[1.0, 2.0, 3.0, 4.0, 5.0], [1.0, 7.0, 1.0, 1.0, 2.0]])
    s = drop_tokens(s, bools([[0, 1, 0, 1, 0], [0, 1, 1, 1, 0]]))
    out, idx = compact(s)
    assert idx.tolist() == [[0, 2, 4], [0, 4, 1]]
    assert out.x[..., 0][:, :2].tolist() == [[0.0, 2.0], [5.0, 9.0]]
    assert out.x[0, 2, 0] == 4.0
    assert out.keep.tolist() == [[True, True, True], [True, True, False]]
    assert out.protected.tolist() == [[True, False, False], [True, False, False]]
    assert out.size.tolist() == [[1.0, 3.0, 5.0], [1.0, 2.0, 1.0]]  # padding slot: size 1
    assert out.source.tolist() == [[0, -1, 1, -1, 2], [0, -1, -1, -1, 1]]
    assert out.has_dead  # sample 1 has a padding slot
    torch.testing.assert_close(out.x, x.gather(1, idx[..., None]))


def test_compact_padding_slot_is_dead_and_unprotected_even_if_gathered_protected():
    # a dead-but-protected slot may be gathered into padding; it must come out unprotected
    x = torch.randn(2, 3, 2)
    s = TokenState.start(x)
    s.keep = bools([[1, 1, 1], [0, 1, 0]])
    s.protected = bools([[0, 0, 0], [1, 0, 1]])
    s.has_dead = True
    out, _ = compact(s)
    assert out.keep.tolist() == [[True, True, True], [True, False, False]]
    assert not out.protected[1, 1:].any()
    assert out.size[1, 1:].tolist() == [1.0, 1.0]


def test_compact_all_samples_same_count_has_no_dead():
    s = TokenState.start(torch.randn(2, 4, 3))
    s = drop_tokens(s, bools([[0, 1, 0, 0], [0, 0, 0, 1]]))
    out, idx = compact(s)
    assert out.keep.shape == (2, 3) and bool(out.keep.all()) and not out.has_dead
    assert attention_bias(out, torch.float32, proportional=False) is None


def test_compact_soft_keep():
    s = TokenState.start(torch.randn(2, 4, 3))
    s.keep = torch.tensor([[0.5, 0.0, 1.0, 0.0], [0.2, 0.3, 0.0, 0.9]])
    s.has_dead = True
    out, idx = compact(s)
    torch.testing.assert_close(out.keep, torch.tensor([[0.5, 1.0, 0.0], [0.2, 0.3, 0.9]]))
    assert out.has_dead


# -- properties ---------------------------------------------------------------------------


def _random_state(seed, b, n, d=4, track_source=True):
    g = gen(seed)
    x = torch.randn(b, n, d, generator=g)
    lens = torch.randint(1, n + 1, (b,), generator=g)
    pad = torch.arange(n)[None] >= lens[:, None]
    nprot = int(torch.randint(0, 2, (1,), generator=g))
    s = TokenState.start(x, num_protected=nprot, padding_mask=pad, track_source=track_source)
    return s, g


@PROPS
@given(seed=st.integers(0, 2**31 - 1), b=st.integers(1, 3), n=st.integers(2, 12),
       r=st.integers(0, 8), rounds=st.integers(1, 3))
def test_prop_merge_conserves_total_size(seed, b, n, r, rounds):
    s, g = _random_state(seed, b, n)
    start_live = s.live_counts().to(s.size.dtype)
    for _ in range(rounds):
        eligible = s.live & ~s.protected
        metric = torch.randn(b, n, 3, generator=g)
        src, dst, valid = bipartite_soft_matching(metric, r, eligible)
        before = s.live_counts()
        s = merge_tokens(s, src, dst, valid)
        assert (before - s.live_counts()).tolist() == valid.sum(1).tolist()
        torch.testing.assert_close(live_size(s), start_live)
        # every live entry token is covered by a live slot; coverage equals size
        cover = torch.zeros(b, n).scatter_add(1, s.source.clamp_min(0),
                                              (s.source >= 0).float())
        torch.testing.assert_close(cover * s.live, s.size * s.live)
    assert torch.isfinite(s.x).all()


@PROPS
@given(seed=st.integers(0, 2**31 - 1), b=st.integers(1, 4), n=st.integers(1, 10),
       p=st.floats(0.0, 1.0))
def test_prop_compact_keeps_exactly_the_live_tokens_in_order(seed, b, n, p):
    s, g = _random_state(seed, b, n)
    s = drop_tokens(s, torch.rand(b, n, generator=g) < p)
    out, idx = compact(s)
    live = s.live
    m = int(live.sum(1).max())
    if idx is None:
        assert bool(live.all()) and out.x.shape == s.x.shape
        return
    assert out.x.shape[:2] == (b, m)
    for i in range(b):
        c = int(live[i].sum())
        torch.testing.assert_close(out.x[i, :c], s.x[i][live[i]])
        assert out.live[i, :c].all() and not out.live[i, c:].any()
        assert torch.equal(out.protected[i, :c], s.protected[i][live[i]])
        assert not out.protected[i, c:].any()
        # source still points at the same hidden state
        ok = s.source[i] >= 0
        torch.testing.assert_close(out.x[i, out.source[i][ok]], s.x[i, s.source[i][ok]])
        assert torch.equal(out.source[i] >= 0, ok)
    torch.testing.assert_close(live_size(out), live_size(s))


@PROPS
@given(seed=st.integers(0, 2**31 - 1), b=st.integers(1, 3), n=st.integers(1, 10),
       ratio=st.floats(0.0, 1.0), r=st.integers(0, 5), fuse=st.booleans(),
       dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16]))
def test_prop_pipeline_never_nan(seed, b, n, ratio, r, fuse, dtype):
    s, g = _random_state(seed, b, n)
    h, d = 2, 4
    s.x = s.x * 50  # large activations too
    q = torch.randn(b, h, n, d, generator=g)
    k = torch.randn(b, h, n, d, generator=g)
    bias = attention_bias(s, torch.float32, proportional=True)
    scores = query_attention(q[:, :, :1], k, bias, d ** -0.5)
    assert torch.isfinite(scores).all()
    eligible = s.live & ~s.protected
    keep = topk_by_score(scores, ratio, eligible)
    assert not (keep & ~eligible).any()
    assert (keep.sum(1) >= (eligible.sum(1) > 0).long()).all()
    drop = eligible & ~keep
    s = fuse_tokens(s, drop, scores) if fuse else drop_tokens(s, drop)
    src, dst, valid = bipartite_soft_matching(s.x, r, s.live & ~s.protected)
    s = merge_tokens(s, src, dst, valid)
    s, _ = compact(s)
    n2 = s.x.shape[1]
    assert (s.live_counts() >= 1).all()
    for t in (s.x, s.size):
        assert torch.isfinite(t).all()
    bias = attention_bias(s, dtype, proportional=True)
    if bias is not None:
        assert bias.dtype == dtype and torch.isfinite(bias).all()
    logits = torch.randn(b, h, n2, n2, generator=g).to(dtype)
    if bias is not None:
        logits = logits + bias
    probs = masked_softmax(logits.float(), s.live[:, None, None, :])
    assert torch.isfinite(probs).all()
    sdpa = torch.nn.functional.scaled_dot_product_attention(
        torch.randn(b, h, n2, d).to(dtype), torch.randn(b, h, n2, d).to(dtype),
        torch.randn(b, h, n2, d).to(dtype), attn_mask=bias)
    assert torch.isfinite(sdpa).all()


@settings(max_examples=40, deadline=None, derandomize=True)
@given(st.integers(1, 4), st.integers(0, 20), st.integers(0, 3), st.integers(0, 12))
def test_suffix_matching_equals_general_matching(batch, n_free, prefix, r):
    """The strided fast path (protected prefix, every other token eligible) returns exactly
    what the general gather-based path returns."""
    from trimkit.ops import _general_matching, _suffix_matching

    g = torch.Generator().manual_seed(batch * 1000 + n_free * 10 + prefix)
    n = prefix + n_free
    metric = torch.randn(batch, n, 5, generator=g)
    eligible = torch.zeros(batch, n, dtype=torch.bool)
    eligible[:, prefix:] = True
    fast = _suffix_matching(metric, r, prefix)
    slow = _general_matching(metric, r, eligible)
    for a, b in zip(fast, slow, strict=True):
        assert a.shape == b.shape and torch.equal(a, b)


def test_soft_keep_keeps_its_bias_through_compaction():
    """A fractional soft keep (no dead token) still weighs the keys after `compact`."""
    from trimkit.ops import additive_mask

    x = torch.randn(2, 4, 3)
    s = TokenState.start(x)
    keep = torch.tensor([[1.0, 0.5, 1.0, 1.0], [1.0, 1.0, 0.25, 1.0]])  # none dead
    s = TokenState(x=x, keep=keep, size=s.size, protected=s.protected, has_dead=True)
    out, _ = compact(s)
    bias = attention_bias(out, torch.float32, proportional=False)
    assert out.has_dead and bias is not None
    assert torch.isclose(bias[1, 0, 0, 2], torch.log(torch.tensor(0.25)))
    full = TokenState(x=x, keep=torch.ones(2, 4), size=s.size, protected=s.protected,
                      has_dead=True)
    assert not compact(full)[0].has_dead
    blocked = torch.tensor([[True, False]])
    assert torch.equal(additive_mask(blocked, torch.float32, blocked=True) < 0, blocked)
    assert torch.equal(additive_mask(blocked, torch.float32) < 0, ~blocked)
