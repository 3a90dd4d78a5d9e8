"""`tome` computes what ToMe's reference code computes on timm ViTs.

`restated_tome` below is our own restatement of the algorithm of facebookresearch/ToMe
(`tome.patch.timm` with `tome.merge.bipartite_soft_matching` / `merge_wavg`), written from
its description as a plain loop over a timm model's blocks, one sample at a time. No
reference code is used. What it pins down:

- attention adds ``log(size)`` to the logits (proportional attention) when asked;
- the matching metric is the attention keys averaged over heads, compared by cosine;
- sets A and B alternate over *all* tokens: the CLS is A's first token and never a
  source, a distillation token is B's first and never a destination;
- ``r`` is clamped per block to ``(tokens − protected) // 2``; the ``r`` A tokens with the
  strongest links merge into their B tokens by size-weighted average;
- the merged sequence is [unmerged A tokens, then all B tokens]; the unmerged A tokens are
  in their order when there is a CLS (else in descending link score), and a distillation
  token is put back second. That order decides the next block's A/B split.
"""

from __future__ import annotations

import copy
import functools
import math

import pytest
import timm
import torch
import torch.nn.functional as F

import trimkit
from trimkit.ops import merge_tokens, permute_tokens, tome_matching
from trimkit.state import TokenState

TOL = 1e-4  # the bar: relative to the largest output


def rel_diff(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got - want).abs().max() / want.abs().max())


# ------------------------------------------------------------------ the restatement


def _attention(attn, h: torch.Tensor, size: torch.Tensor | None
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """timm's attention written out, plus log(size) on the logits; returns its output and
    the keys averaged over heads (B×N×d)."""
    b, n, c = h.shape
    heads = attn.num_heads
    q, k, v = attn.qkv(h).view(b, n, 3, heads, c // heads).permute(2, 0, 3, 1, 4)
    logits = (q @ k.transpose(-1, -2)) * attn.scale
    if size is not None:
        logits = logits + size.log()[:, None, None, :]
    out = (logits.softmax(-1) @ v).transpose(1, 2).reshape(b, n, c)
    return attn.proj(out), k.mean(1)


def _merge_one(x: torch.Tensor, size: torch.Tensor, keys: torch.Tensor, members: list,
               r: int, cls: bool, dist: bool) -> tuple[torch.Tensor, torch.Tensor, list]:
    """One sample (N×D, N, N×d): ToMe's matching and size-weighted merge, in the reference's
    resulting order. ``members`` lists the entry tokens each token covers."""
    n = x.shape[0]
    r = min(r, (n - int(cls) - int(dist)) // 2)
    if r <= 0:
        return x, size, members
    a_slots, b_slots = list(range(0, n, 2)), list(range(1, n, 2))
    unit = F.normalize(keys, dim=-1)
    sim = unit[0::2] @ unit[1::2].T
    if cls:  # the CLS is A's first token
        sim[0, :] = -math.inf
    if dist:  # the distillation token is B's first token
        sim[:, 0] = -math.inf
    best, best_b = sim.max(-1)
    scores = best.tolist()
    ranked = sorted(range(len(a_slots)), key=lambda j: -scores[j])  # stable: ties by position
    merged, kept = ranked[:r], ranked[r:]
    if cls:
        kept = sorted(kept)
    total = x * size[:, None]
    size = size.clone()
    members = [set(m) for m in members]
    for j in merged:
        src, dst = a_slots[j], b_slots[int(best_b[j])]
        total[dst] = total[dst] + total[src]
        size[dst] = size[dst] + size[src]
        members[dst] |= members[src]
    kept_a = [a_slots[j] for j in kept]
    seq = kept_a + b_slots
    if dist:  # CLS, distillation token, then the rest
        seq = kept_a[:1] + b_slots[:1] + kept_a[1:] + b_slots[1:]
    seq_t = torch.tensor(seq)
    return total[seq_t] / size[seq_t, None], size[seq_t], [members[i] for i in seq]


def restated_tome(model, images: torch.Tensor, rs: list[int], proportional: bool
                  ) -> tuple[torch.Tensor, torch.Tensor, list]:
    """ToMe on a timm ViT, block by block: attention (with proportional attention), merge,
    MLP. Returns the model's output, the final tokens (after the last block, before the
    norm) and, per sample, the entry tokens each final token covers."""
    cls = model.cls_token is not None
    dist = getattr(model, "dist_token", None) is not None
    x = model.norm_pre(model.patch_drop(model._pos_embed(model.patch_embed(images))))
    bsz, n = x.shape[:2]
    size = torch.ones(bsz, n)
    members = [[{i} for i in range(n)] for _ in range(bsz)]
    for blk, r in zip(model.blocks, rs, strict=True):
        out, keys = _attention(blk.attn, blk.norm1(x), size if proportional else None)
        x = x + out
        parts = [_merge_one(x[i], size[i], keys[i], members[i], r, cls, dist)
                 for i in range(bsz)]
        x = torch.stack([p[0] for p in parts])
        size = torch.stack([p[1] for p in parts])
        members = [p[2] for p in parts]
        x = x + blk.mlp(blk.norm2(x))
    return model.forward_head(model.norm(x)), x, members


def decreasing(r: int, layers: int) -> list[int]:
    """The paper's decreasing schedule as the reference spells it, ``(r, -1)``: 2r to 0."""
    return [int(2 * r - 2 * r * i / (layers - 1)) for i in range(layers)]


# ------------------------------------------------------------------ models

TINY = {
    "vit_s": ("vit_small_patch16_224", dict(img_size=96, depth=4)),
    "vit_b": ("vit_base_patch16_224", dict(img_size=96, depth=3)),
    "deit_s_distilled": ("deit_small_distilled_patch16_224", dict(img_size=96, depth=4)),
}


@functools.cache
def _built(name: str, cfg: tuple) -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model(name, pretrained=False, **dict(cfg)).eval()


def build(name: str, **kw) -> torch.nn.Module:
    """A fresh copy of timm's ``name`` with random weights (built once per config)."""
    return copy.deepcopy(_built(name, tuple(sorted(kw.items()))))


def images(n: int = 2, side: int = 96) -> torch.Tensor:
    return torch.randn(n, 3, side, side, generator=torch.Generator().manual_seed(1))


def trimmed(model, **options) -> torch.nn.Module:
    trimkit.apply(model, "tome", **options)
    return model


def _members_of(state: TokenState, sample: int) -> list[set[int]]:
    """Per live slot (they lead), the entry tokens ``source`` puts there."""
    src = state.source[sample]
    live = int(state.live[sample].sum())
    return [set((src == j).nonzero().flatten().tolist()) for j in range(live)]


# ------------------------------------------------------------------ equality


@pytest.mark.parametrize("model_name", sorted(TINY))
@pytest.mark.parametrize("r", [1, 2, 8, 16, "list", "decreasing"])
@pytest.mark.parametrize("proportional", [True, False])
def test_equals_restated_reference(model_name, r, proportional):
    name, cfg = TINY[model_name]
    model = build(name, **cfg)
    depth = len(model.blocks)
    options = dict(proportional=proportional)
    if r == "list":
        rs = [3, 0, 9, 1][:depth]
        options["r"] = rs
    elif r == "decreasing":
        rs = decreasing(4, depth)
        options.update(r=4, schedule="decreasing")
    else:
        rs = [r] * depth
        options["r"] = r
    x = images()
    with torch.no_grad():
        want, want_tokens, want_members = restated_tome(model, x, rs, proportional)
        trimmed(model, track_source=True, **options)
        feats = {}
        for mode in ("compacted", "masked"):
            trimkit.set_mode(model, mode)
            feats[mode] = model.forward_features(x)
            got = model.forward_head(feats[mode])
            assert rel_diff(got, want) < TOL, (mode, rel_diff(got, want))
            state = trimkit.last_states(model)["image"]
            for i in range(x.shape[0]):
                assert _members_of(state, i) == want_members[i], mode
    # the token sequence itself, in the reference's order (masked: live tokens lead)
    with torch.no_grad():
        want_feats = model.norm(want_tokens)
    n = want_feats.shape[1]
    assert feats["compacted"].shape[1] == n
    for mode in ("compacted", "masked"):
        assert rel_diff(feats[mode][:, :n], want_feats) < TOL, mode


def test_full_vit_s_r8():
    model = build("vit_small_patch16_224")
    x = images(2, 224)
    with torch.no_grad():
        want, _, _ = restated_tome(model, x, [8] * 12, True)
        got = trimmed(model, r=8)(x)
    assert rel_diff(got, want) < TOL


def test_equals_with_padding_free_batch_of_one():
    """A sample's result does not depend on its batch: alone it equals the restatement."""
    model = build(*TINY["deit_s_distilled"][:1], **TINY["deit_s_distilled"][1])
    x = images(3)
    with torch.no_grad():
        want, _, _ = restated_tome(model, x, [8] * 4, True)
        trimmed(model, r=8)
        for i in range(3):
            assert rel_diff(model(x[i:i + 1]), want[i:i + 1]) < TOL


# ------------------------------------------------------------------ r: clamping, lists


def test_r_is_clamped_as_the_reference_and_last_stats_shows_it():
    model = build(*TINY["vit_s"][:1], **TINY["vit_s"][1])  # 36 patches + CLS
    x = images()
    with torch.no_grad():
        want, _, _ = restated_tome(model, x, [100] * 4, True)
        got = trimmed(model, r=100)(x)
    assert rel_diff(got, want) < TOL
    tokens, merged = 37, []
    for _ in range(4):
        merged.append(min(100, (tokens - 1) // 2))
        tokens -= merged[-1]
    stats = trimkit.last_stats(model).layers
    assert [int(s.tokens_in[0] - s.tokens_out[0]) for s in stats] == merged == [18, 9, 4, 2]
    assert [s.as_dict()["tokens_out"] for s in stats] == [19, 10, 6, 4]


def test_strict_refuses_what_a_layer_cannot_merge():
    model = build(*TINY["vit_s"][:1], **TINY["vit_s"][1])
    with pytest.raises(ValueError, match="r=19 at layer 0"):
        trimkit.apply(model, "tome", r=19, strict=True)  # (37 - 1) // 2 = 18
    assert not trimkit.is_applied(model)
    trimkit.apply(model, "tome", r=[18, 9, 4, 2], strict=True)  # exactly what fits
    trimkit.remove(model)
    with pytest.raises(ValueError, match="r=3 at layer 3"):
        trimkit.apply(model, "tome", r=[18, 9, 4, 3], strict=True)


def test_r_list_shorter_is_padded_with_zeros_longer_is_refused():
    model = build(*TINY["vit_s"][:1], **TINY["vit_s"][1])
    x = images()
    with torch.no_grad():
        want, _, _ = restated_tome(model, x, [4, 2, 0, 0], True)
        got = trimmed(model, r=[4, 2])(x)
    assert rel_diff(got, want) < TOL
    assert [int(s.tokens_in[0] - s.tokens_out[0]) for s in trimkit.last_stats(model).layers
            ] == [4, 2, 0, 0]
    trimkit.remove(model)
    with pytest.raises(ValueError, match="at most 4"):
        trimkit.apply(model, "tome", r=[1] * 5)
    with pytest.raises(ValueError, match="must hold 4"):
        trimkit.apply(model, "tome", r=[1, 2], strict=True)


def test_decreasing_schedule_is_the_papers():
    from trimkit.recipes.tome import schedule

    assert schedule(8, 12, "decreasing") == decreasing(8, 12)
    assert schedule(8, 12, "decreasing")[0] == 16 and schedule(8, 12, "decreasing")[-1] == 0
    assert schedule(8, 12, "constant") == [8] * 12
    assert schedule([1, 2], 4, "constant") == [1, 2, 0, 0]


# ------------------------------------------------------------------ the earlier order


def test_original_order_stays_available_and_differs():
    name, cfg = TINY["vit_s"]
    x = images()
    with torch.no_grad():
        want, _, _ = restated_tome(build(name, **cfg), x, [2] * 4, True)
        model = trimmed(build(name, **cfg), r=2, order="original")
        got = model(x)
        assert rel_diff(got, want) > 10 * TOL  # a different A/B split from the first block
        state = trimkit.last_states(model)["image"]
        assert state.x.shape[1] == 37 - 8
    ops = [m for m in model.modules() if type(m).__name__ == "MergeTokens"]
    assert ops and all(op.order == "original" for op in ops)


def test_pumer_keeps_its_own_matching():
    from trimkit.recipes.pumer import PuMer

    model = build(*TINY["vit_s"][:1], **TINY["vit_s"][1])
    plans = PuMer().plan(trimkit.describe(model), PuMer().resolve({}))
    ops = [op for plan in plans.values() for op in plan.post
           if type(op).__name__ == "MergeTokens"]
    assert ops and all(op.order == "original" for op in ops)


# ------------------------------------------------------------------ the ops


def _alone(metric, live, protected, r):
    """`tome_matching` per sample on its live tokens only, mapped back to slots."""
    out = []
    for b in range(metric.shape[0]):
        slots = live[b].nonzero().flatten()
        src, dst, valid, order = tome_matching(metric[b:b + 1, slots], r,
                                               torch.ones(1, len(slots), dtype=torch.bool),
                                               protected[b:b + 1, slots])
        pairs = {(int(slots[s]), int(slots[d])) for s, d, v in
                 zip(src[0], dst[0], valid[0], strict=True) if v}
        seq = slots.tolist() if order is None else slots[order[0]].tolist()
        out.append((pairs, seq))
    return out


@pytest.mark.parametrize("seed", range(8))
def test_matching_in_a_padded_batch_equals_each_sample_alone(seed):
    g = torch.Generator().manual_seed(seed)
    b, n = 4, 13
    metric = torch.randn(b, n, 5, generator=g)
    live = torch.rand(b, n, generator=g) > 0.25
    protected = torch.zeros(b, n, dtype=torch.bool)
    protected[:, 0] = True  # a CLS where it is live
    protected[1, 1] = True  # and a second leading one
    protected[2, 0] = False  # no protected token: unmerged A by link score
    protected[3, 5] = True  # one in the middle
    protected &= live
    state = TokenState.start(torch.randn(b, n, 3, generator=g), protected=protected,
                             padding_mask=~live, track_source=True)
    for r in (0, 1, 2, 3, 7):
        src, dst, valid, order = tome_matching(metric, r, live, protected)
        alone = _alone(metric, live, protected, r)
        for i in range(b):
            pairs = {(int(s), int(d)) for s, d, v in
                     zip(src[i], dst[i], valid[i], strict=True) if v}
            gone = {s for s, _ in pairs}
            slots = live[i].nonzero().flatten().tolist()
            free_a = sum(not protected[i, j] for j in slots[0::2])
            free_b = sum(not protected[i, j] for j in slots[1::2])
            t, p = len(slots), int(protected[i].sum())
            assert pairs == alone[i][0]
            assert len(pairs) == min(r, (t - p) // 2, free_a if free_b else 0)
            assert not gone & set(protected[i].nonzero().flatten().tolist())
            seq = list(range(n)) if order is None else order[i].tolist()
            assert ([j for j in seq if live[i, j] and j not in gone]
                    == [j for j in alone[i][1] if j not in gone])
        if order is None:
            assert r == 0
            continue
        out = permute_tokens(merge_tokens(state, src, dst, valid), order)
        counts = out.live.sum(1)
        for i in range(b):  # live tokens lead, in the merged order
            assert out.live[i, :counts[i]].all() and not out.live[i, counts[i]:].any()
        # source follows its token: every live token's size is what it covers
        cover = torch.zeros(b, n).scatter_add(1, out.source.clamp_min(0),
                                              (out.source >= 0).float())
        torch.testing.assert_close(cover * out.live, out.size * out.live)
        # protected entry tokens still sit, alone, in protected slots
        where = out.source[protected]
        assert out.protected.gather(1, out.source.clamp_min(0))[protected].all()
        assert (cover.gather(1, out.source.clamp_min(0))[protected] == 1).all()
        assert (where >= 0).all()


def test_dense_prefix_path_equals_the_general_one():
    g = torch.Generator().manual_seed(3)
    for p in (0, 1, 2):
        metric = torch.randn(3, 15, 4, generator=g)
        live = torch.ones(3, 15, dtype=torch.bool)
        protected = torch.zeros(3, 15, dtype=torch.bool)
        protected[:, :p] = True
        for r in (1, 4, 6, 9):
            fast = tome_matching(metric, r, live, protected, prefix=p)
            slow = tome_matching(metric, r, live, protected)
            for a, b_ in zip(fast[:3], slow[:3], strict=True):
                assert torch.equal(a, b_)
            assert torch.equal(fast[3], slow[3])
            assert fast[2].all() and fast[0].shape[1] == min(r, (15 - p) // 2)
            # the leading protected tokens stay first
            assert fast[3][:, :p].tolist() == [list(range(p))] * 3
