"""The public API: apply/remove, errors that change nothing, statistics, modes."""

from __future__ import annotations

import copy

import pytest
import timm
import torch
from torch import nn

import trimkit
from trimkit.registry import RECIPES
from trimkit.testing import check_invariants


def tiny_vit(**kw):
    torch.manual_seed(0)
    cfg = dict(img_size=32, patch_size=8, embed_dim=16, depth=3, num_heads=2, num_classes=4)
    cfg.update(kw)
    return timm.models.vision_transformer.VisionTransformer(**cfg).eval()


def snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}, dict(model.__dict__)


def assert_untouched(model, snap, x, ref):
    sd, d = snap
    assert list(model.state_dict()) == list(sd)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in sd.items())
    assert set(model.__dict__) == set(d)
    assert not trimkit.is_applied(model)
    assert all("forward" not in m.__dict__ for m in model.modules())
    assert torch.equal(model(x), ref)


def test_lists():
    assert {"tome", "attn_prune"} <= set(trimkit.list_recipes())
    assert "timm-vit" in trimkit.list_adapters()


def test_unsupported_model_names_adapters_and_changes_nothing():
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU())
    x = torch.randn(2, 4)
    ref = model(x)
    snap = snapshot(model)
    with pytest.raises(trimkit.UnsupportedModelError) as err:
        trimkit.apply(model, "tome")
    msg = str(err.value)
    assert "timm-vit" in msg and "register_adapter" in msg and "Sequential" in msg
    assert_untouched(model, snap, x, ref)


@pytest.mark.parametrize("recipe, kw, name", [
    ("tome", dict(r=100, strict=True), "r"),
    ("tome", dict(r=-1), "r"),
    ("tome", dict(r=[1, 2, 3, 4]), "r"),
    ("tome", dict(r=[1, 2], strict=True), "r"),
    ("tome", dict(order="sorted"), "order"),
    ("tome", dict(schedule="zigzag"), "schedule"),
    ("tome", dict(ratio=0.5), "ratio"),
    ("attn_prune", dict(keep_ratio=0.0), "keep_ratio"),
    ("attn_prune", dict(keep_ratio=1.5), "keep_ratio"),
    ("attn_prune", dict(layers=[7]), "layers"),
    ("attn_prune", dict(stream="text"), "stream"),
    ("nope", {}, "recipe"),
])
def test_invalid_options_raise_and_change_nothing(recipe, kw, name):
    model = tiny_vit()
    x = torch.randn(2, 3, 32, 32)
    ref = model(x)
    snap = snapshot(model)
    with pytest.raises(ValueError, match=name):
        trimkit.apply(model, recipe, **kw)
    assert_untouched(model, snap, x, ref)


def test_bad_mode_and_double_apply():
    model = tiny_vit()
    with pytest.raises(ValueError, match="mode"):
        trimkit.apply(model, "tome", mode="fast")
    trimkit.apply(model, "tome", r=2)
    with pytest.raises(ValueError, match="already"):
        trimkit.apply(model, "tome", r=2)
    with pytest.raises(ValueError, match="mode"):
        trimkit.set_mode(model, "fast")
    trimkit.remove(model)
    with pytest.raises(ValueError, match="no trimming"):
        trimkit.remove(model)


def test_family_api_and_type_survive():
    model = tiny_vit()
    cls = type(model)
    trimkit.apply(model, "tome", r=3)
    assert type(model) is cls and isinstance(model, cls)
    x = torch.randn(2, 3, 32, 32)
    feats = model.forward_features(x)
    assert feats.shape == (2, 17 - 9, 16)  # 16 patches + CLS, 3 merges in each of 3 layers
    assert model.forward_head(feats).shape == (2, 4)
    other = tiny_vit()  # per instance: another model of the class is untouched
    assert other.forward_features(x).shape == (2, 17, 16)


def test_stats_and_flops():
    model = tiny_vit()
    x = torch.randn(2, 3, 32, 32)
    base = trimkit.count_flops(model, x)
    trimkit.apply(model, "tome", r=4)
    stats = trimkit.forward_stats(model, x)
    assert stats.flops < base
    assert [s["tokens_in"] for s in stats.table()] == [17, 13, 9]
    assert [s["tokens_out"] for s in stats.table()] == [13, 9, 5]
    assert all(s["heads"] == 2 for s in stats.table())


def test_layers_that_trim_nothing_add_no_exit_hooks_and_stats_count_when_read():
    from trimkit.hooks import Exit

    def exits(model):
        return [i for i, block in enumerate(model.blocks)
                if any(isinstance(h, Exit) for h in block._forward_hooks.values())]

    x = torch.randn(2, 3, 32, 32)
    model = tiny_vit()
    ref = model(x)
    trimkit.apply(model, "tome", r=0)
    assert exits(model) == []  # nothing trims: no layer can pack, so no exit point
    torch.testing.assert_close(model(x), ref, atol=1e-5, rtol=0)
    stats = trimkit.last_stats(model).layers
    assert [s.tokens_in.tolist() for s in stats] == [[17, 17]] * 3
    assert all(s.tokens_out.dtype == torch.long for s in stats)
    trimkit.remove(model)
    trimkit.apply(model, "tome", r=[0, 2, 0])
    assert exits(model) == [1, 2]  # from the first layer with an op on
    model(x)
    stats = trimkit.last_stats(model).layers
    assert [s.tokens_in.tolist() for s in stats] == [[17, 17], [17, 17], [15, 15]]
    assert [s.tokens_out.tolist() for s in stats] == [[17, 17], [15, 15], [15, 15]]


def test_rewritten_forwards_find_their_graph_by_the_call_and_retrace_nothing():
    model = tiny_vit()
    trimkit.apply(model, "tome", r=2)
    x = torch.randn(2, 3, 32, 32)
    ref = model(x)
    specs = [m.__dict__["forward"] for m in model.modules() if "forward" in m.__dict__]
    assert specs
    caches = [(len(s.cache), len(s._positional)) for s in specs]
    assert all(n >= 1 for _, n in caches)
    assert torch.equal(model(x), ref)
    model.train()
    model(x)
    model.eval()
    assert torch.equal(model(x), ref)
    assert [(len(s.cache), len(s._positional)) for s in specs] == [
        (a + 1, b + 1) for a, b in caches]  # one more graph each: training mode


def test_training_uses_masked_execution_and_backpropagates():
    model = tiny_vit().train()
    trimkit.apply(model, "tome", r=4)
    x = torch.randn(2, 3, 32, 32)
    out = model(x)
    out.sum().backward()
    assert model.patch_embed.proj.weight.grad is not None
    states = trimkit.last_states(model)
    assert states["image"].keep.shape == (2, 17)  # masked: tokens stay in place
    assert int(states["image"].live.sum(1)[0]) == 5
    model.eval()
    model(x)
    assert trimkit.last_states(model)["image"].keep.shape == (2, 5)  # compacted


def test_trimming_disabled_is_the_untrimmed_model():
    model = tiny_vit()
    x = torch.randn(2, 3, 32, 32)
    ref = model(x)
    trimkit.apply(model, "attn_prune", keep_ratio=0.3)
    assert not torch.allclose(model(x), ref)
    with trimkit.trimming_disabled(model):
        assert torch.equal(model(x), ref)


def test_deepcopy_of_trimmed_model():
    model = tiny_vit()
    trimkit.apply(model, "tome", r=3)
    x = torch.randn(2, 3, 32, 32)
    twin = copy.deepcopy(model)
    assert torch.allclose(twin(x), model(x))
    trimkit.remove(twin)
    assert trimkit.is_applied(model)


class _DropBelowMean(trimkit.TokenOp):
    """Per-instance counts: drop tokens whose CLS score is below the sample's mean."""

    needs = frozenset({"query_scores"})

    def forward(self, state, site):
        from trimkit.ops import drop_tokens

        s = site.captured["query_scores"]
        eligible = state.live & ~state.protected
        mean = (s * eligible).sum(1, keepdim=True) / eligible.sum(1, keepdim=True)
        drop = eligible & (s < mean)  # the best-scored token is never below the mean
        return drop_tokens(state, drop)


class _PerInstance(trimkit.Recipe):
    name = "_per_instance"
    options = {"on": trimkit.Option(True, "trim or not")}

    def plan(self, desc, options):
        s = desc.stream()
        return {(s.name, i): trimkit.SitePlan(post=[_DropBelowMean()] if options["on"] else [])
                for i in range(len(s.layers))}


def test_per_instance_counts_pack_and_mask():
    """Compaction pads to the longest survivor: batches stay independent (invariant 6) and
    masked and compacted agree (5) when samples keep different counts."""
    RECIPES["_per_instance"] = _PerInstance()
    try:
        x = torch.randn(4, 3, 32, 32)
        check_invariants(tiny_vit, (x,), "_per_instance", {}, dict(on=False))
        model = trimkit.apply(tiny_vit(), "_per_instance")
        model(x)
        counts = trimkit.last_stats(model).layers[-1].tokens_out
        assert len(set(counts.tolist())) > 1, "the test needs different counts per sample"
        assert trimkit.last_states(model)["image"].has_dead  # padded batch
    finally:
        del RECIPES["_per_instance"]


class _GateHead(trimkit.TokenOp):
    """Switch one head off in every sample (what a head trimmer decides per instance)."""

    def __init__(self, head: int):
        super().__init__()
        self.head = head

    def forward(self, state, site):
        gates = torch.ones(state.x.shape[0], site.num_heads)
        gates[:, self.head] = 0
        site.head_gates = gates
        return state


class _HeadOff(trimkit.Recipe):
    name = "_head_off"
    options = {"head": trimkit.Option(1, "head to switch off")}

    def plan(self, desc, options):
        s = desc.stream()
        return {(s.name, i): trimkit.SitePlan(pre=[_GateHead(options["head"])])
                for i in range(len(s.layers))}


def test_head_gates_remove_a_head_output():
    """A zero gate equals a model whose output projection ignores that head."""
    RECIPES["_head_off"] = _HeadOff()
    try:
        x = torch.randn(2, 3, 32, 32)
        reference = tiny_vit()
        with torch.no_grad():
            for blk in reference.blocks:
                d = blk.attn.head_dim
                blk.attn.proj.weight[:, d:2 * d] = 0  # head 1's columns
            expected = reference(x)
        model = trimkit.apply(tiny_vit(), "_head_off", head=1)
        with torch.no_grad():
            assert torch.allclose(model(x), expected, atol=1e-5)
        assert [s["heads"] for s in trimkit.last_stats(model).table()] == [1, 1, 1]
    finally:
        del RECIPES["_head_off"]
