"""Packed sequences: pack/unpack round trips, length groups, and attention within segments
equal to each sample's own attention, as hypothesis properties over ragged batches."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from timm.models.vision_transformer import VisionTransformer

import trimkit
from trimkit.ops import drop_tokens, fuse_tokens
from trimkit.packed import Segments, length_groups, pack, segment_attention, unpack
from trimkit.registry import RECIPES
from trimkit.testing import check_invariants

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


@pytest.mark.parametrize("case", range(4))
def test_flex_backend_equals_each_samples_own(case):
    """The FlexAttention backend (CUDA's default; eager here) gives each sample's own
    attention, as the grouped one does, with key bias and cross segments; a sample with no
    keys gets zeros on both."""
    g = torch.Generator().manual_seed(case)
    ls = [[5, 9, 3], [1, 16, 2, 7], [4], [3, 0, 6]][case]
    qs = Segments.from_lengths(ls)
    ks = qs if case % 2 == 0 else Segments.from_lengths([2, 0, 4, 1][:len(ls)])
    h, d = 2, 8
    q = torch.randn(1, h, qs.total, d, generator=g)
    k, v = (torch.randn(1, h, ks.total, d, generator=g) for _ in range(2))
    bias = torch.randn(ks.total, generator=g) if case > 1 else None
    flex = segment_attention(q, k, v, qs, ks, bias, scale=0.3, backend="flex")
    grouped = segment_attention(q, k, v, qs, ks, bias, scale=0.3, backend="groups")
    keyless = [i for i in range(len(ls)) if not ks.lengths[i]]
    want = _reference(q, k, v, qs, ks, bias, 0.3)
    for i in keyless:
        want[..., qs.offsets[i]:qs.offsets[i + 1], :] = 0
    torch.testing.assert_close(flex, want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grouped, want, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="backend must be one of"):
        segment_attention(q, k, v, qs, ks, backend="varlen")


def test_segment_attention_refuses_mismatched_segments():
    q = torch.randn(1, 1, 3, 2)
    try:
        segment_attention(q, q, q, Segments.from_lengths([1, 2]), Segments.from_lengths([3]))
    except ValueError as e:
        assert "2 query segments but 1 key ones" in str(e)
    else:
        raise AssertionError("mismatched segments were accepted")


# -- packed execution of a whole model ---------------------------------------------------

class _KeepCounts(trimkit.TokenOp):
    """Keeps ``counts[j]`` unprotected tokens (the largest first feature) of the sample whose
    CLS token is nearest ``refs[j]`` (so a sample keeps its count alone or in any batch),
    merging the rest into one token when ``merge`` (sizes follow), and gates one head per
    sample when ``gate``: ragged decisions of any shape on demand."""

    def __init__(self, counts: list[int], refs: torch.Tensor, merge: bool, gate: bool):
        super().__init__()
        self.counts, self.refs, self.merge, self.gate = counts, refs, merge, gate

    def forward(self, state, site):
        b, n = state.keep.shape
        which = torch.cdist(state.x[:, 0], self.refs).argmin(1)
        eligible = state.live & ~state.protected
        score = state.x[..., 0].masked_fill(~eligible, float("-inf"))
        order = score.argsort(1, descending=True)
        rank = torch.empty_like(order).scatter_(1, order, torch.arange(n).expand(b, n))
        drop = eligible & (rank >= torch.tensor(self.counts)[which][:, None])
        if self.gate:
            gates = torch.ones(b, site.num_heads)
            gates[torch.arange(b), which % site.num_heads] = 0
            site.head_gates = gates
        if not self.merge:
            return drop_tokens(state, drop)
        return fuse_tokens(state, drop, drop.float())


class _Ragged(trimkit.Recipe):
    name = "_ragged"
    options = {"counts": trimkit.Option([], "kept per sample"),
               "refs": trimkit.Option(None, "each sample's CLS entering layer 1"),
               "merge": trimkit.Option(False, "fuse the dropped tokens"),
               "gate": trimkit.Option(False, "gate a head per sample"),
               "on": trimkit.Option(True, "trim or not")}

    def plan(self, desc, options):
        s = desc.stream()
        op = _KeepCounts(options["counts"], options["refs"], options["merge"], options["gate"])
        return {(s.name, 1): trimkit.SitePlan(pre=[op] if options["on"] else [])}


def _refs(x: torch.Tensor) -> torch.Tensor:
    """Each sample's CLS token entering the untrimmed model's layer 1."""
    got = []
    model = _vit()
    model.blocks[1].register_forward_pre_hook(lambda m, a: got.append(a[0][:, 0]))
    with torch.no_grad():
        model(x)
    return got[0]


def _vit() -> VisionTransformer:
    torch.manual_seed(0)
    m = VisionTransformer(img_size=32, patch_size=8, embed_dim=16, depth=3, num_heads=2,
                          num_classes=5)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return m.eval()


@settings(max_examples=12, deadline=None, derandomize=True)
@given(st.lists(st.integers(1, 16), min_size=2, max_size=5), st.booleans(), st.booleans())
def test_packed_execution_equals_masked_and_compacted(counts, merge, gate):
    """A sample with 1 live token, one with all 16 kept, merged tokens with sizes, head
    gates per sample: the invariants, with packed execution among the forms compared,
    and the stream really packed between its layers."""
    RECIPES["_ragged"] = _Ragged()
    try:
        x = torch.randn(len(counts), 3, 32, 32, generator=torch.Generator().manual_seed(1))
        options = dict(counts=counts, refs=_refs(x), merge=merge, gate=gate)
        check_invariants(_vit, (x,), "_ragged", options, dict(on=False),
                         merges_only=merge)
        model = trimkit.apply(_vit(), "_ragged", mode="packed", **options)
        seen = []
        model.blocks[2].register_forward_pre_hook(
            lambda m, a: seen.append(trimkit.api._applied(model).ctx.call.states["image"]))
        with torch.no_grad():
            model(x)
        assert seen[0].segments is not None
        # the CLS, the kept tokens, and the fused one where something was fused
        lengths = tuple(1 + c + (merge and c < 16) for c in counts)
        assert seen[0].segments.lengths == lengths
        assert seen[0].x.shape[:2] == (1, sum(lengths))
        assert trimkit.last_states(model)["image"].segments is None  # one row per sample again
    finally:
        del RECIPES["_ragged"]


def test_auto_packs_within_layers_where_it_pays(monkeypatch):
    """``"auto"`` packs a ragged batch inside each layer (attention and MLP run on the live
    tokens only) and hands it back one row per sample between layers, as the model's own
    code expects; fixed counts never pack; ``"packed"`` stays packed between layers; all
    three give the compacted outputs."""
    monkeypatch.setattr("trimkit.sites.AUTO_PACK_MIN_WIDTH", 16)  # this ViT is 16 wide
    RECIPES["_ragged"] = _Ragged()
    try:
        x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(3))
        refs = _refs(x)
        inside: dict = {}
        between: dict = {}
        outs = {}
        for mode, counts in (("auto", [1, 16, 2, 3]), ("auto fixed", [5, 5, 5, 5]),
                             ("compacted", [1, 16, 2, 3]), ("packed", [1, 16, 2, 3])):
            model = trimkit.apply(_vit(), "_ragged", mode=mode.split()[0], counts=counts,
                                  refs=refs)
            ctx = trimkit.api._applied(model).ctx
            model.blocks[2].register_forward_pre_hook(
                lambda m, a, ctx=ctx, mode=mode: between.__setitem__(
                    mode, (ctx.call.states["image"].segments, a[0].shape)))
            model.blocks[1].mlp.register_forward_pre_hook(
                lambda m, a, ctx=ctx, mode=mode: inside.__setitem__(mode, a[0].shape))
            with torch.no_grad():
                outs[mode] = model(x)
        assert inside["auto"] == (1, 2 + 17 + 3 + 4, 16)  # packed inside the layer
        assert between["auto"][0] is None and between["auto"][1] == (4, 17, 16)
        assert inside["auto fixed"] == (4, 6, 16) and between["auto fixed"][0] is None
        assert inside["compacted"] == (4, 17, 16) and between["compacted"][0] is None
        assert between["packed"][0].lengths == (2, 17, 3, 4)
        for mode in ("auto", "packed"):
            torch.testing.assert_close(outs[mode], outs["compacted"], rtol=1e-5, atol=1e-6)
    finally:
        del RECIPES["_ragged"]


def test_auto_packs_only_where_enough_slots_are_padding():
    from trimkit.sites import AUTO_PACK_MIN_WIDTH, AUTO_PACK_WASTE, pays_to_pack
    from trimkit.state import TokenState

    def state(counts: list[int], n: int, width: int = AUTO_PACK_MIN_WIDTH) -> TokenState:
        keep = torch.arange(n)[None, :] < torch.tensor(counts)[:, None]
        return TokenState.start(torch.zeros(len(counts), n, width), padding_mask=~keep)

    n = 20
    waste = int(AUTO_PACK_WASTE * 2 * n)
    assert pays_to_pack(state([n, n - waste], n))  # exactly the share: packs
    assert not pays_to_pack(state([n, n - waste + 1], n))
    assert not pays_to_pack(state([3], n))  # one sample: nothing to pack
    assert not pays_to_pack(state([n, n], n))
    assert not pays_to_pack(state([n, 1], n, width=AUTO_PACK_MIN_WIDTH - 1))  # too narrow
