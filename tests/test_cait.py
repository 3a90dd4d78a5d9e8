"""timm's CaiT: the patches are trimmed in its self-attention blocks (LayerScale, talking
heads), its class-attention blocks read the survivors as keys. The adapter passes the
conformance kit, the invariants hold as hypothesis properties over random tiny CaiTs in
every execution form, and the class attention reads what the patches stand for."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from timm.models.cait import Cait

import trimkit
from trimkit.rewrite import find_attention, trace_module
from trimkit.testing import check_adapter, check_invariants

TOKEN_RECIPES = ["attn_prune", "pumer", "smarttrim", "tome"]
SETTINGS = settings(max_examples=5, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.too_slow])


def factory(heads: int = 2, depth: int = 2, depth_token_only: int = 2, pool: str = "token",
            fused: bool = True, img_size: int = 32):
    """A tiny CaiT with random weights, its biases and LayerScale moved off their inits so
    tokens differ and talking heads have biases."""

    def make() -> Cait:
        torch.manual_seed(0)
        m = Cait(img_size=img_size, patch_size=8, embed_dim=16 * heads, depth=depth,
                 num_heads=heads, depth_token_only=depth_token_only, num_classes=5,
                 global_pool=pool, init_values=0.5)
        for blk in m.blocks_token_only:
            blk.attn.fused_attn = fused
        with torch.no_grad():
            for p in m.parameters():
                p.add_(torch.randn_like(p) * 0.05)
        return m
    return make


def images(size: int = 32):
    def make(b: int) -> tuple:
        return (torch.randn(b, 3, size, size, generator=torch.Generator().manual_seed(b)),)
    return make


# -------------------------------------------------------------------- the conformance kit

def test_cait_passes_the_conformance_kit_with_every_token_recipe():
    report = check_adapter(factory(), images(), max_examples=3, batch_sizes=(1, 3))
    assert report.adapter == "timm-cait" and not report.failures
    assert set(TOKEN_RECIPES) <= set(report.checked), report.summary()
    # talking heads mix every head: none can be removed alone
    assert "prune_heads" not in report.checked


# ----------------------------------------------------------- the invariants as properties

@st.composite
def caits(draw):
    """A tiny CaiT: 1, 2 or 4 heads, 1–2 self- and 1–2 class-attention blocks, class-token
    or average pooling, fused or explicit class attention, 16 or 36 patches; a batch."""
    cfg = dict(heads=draw(st.sampled_from([1, 2, 4])), depth=draw(st.integers(1, 2)),
               depth_token_only=draw(st.integers(1, 2)),
               pool=draw(st.sampled_from(["token", "avg"])), fused=draw(st.booleans()),
               img_size=draw(st.sampled_from([32, 48])))
    return cfg, draw(st.integers(1, 3))


@SETTINGS
@given(caits(), st.integers(1, 8), st.sampled_from(["constant", "decreasing"]))
def test_tome_invariants(cait, r, schedule):
    cfg, batch = cait
    check_invariants(factory(**cfg), images(cfg["img_size"])(batch), "tome",
                     dict(r=r, schedule=schedule), dict(r=0), merges_only=True)


@SETTINGS
@given(caits(), st.floats(0.05, 0.9), st.booleans(), st.data())
def test_attn_prune_invariants(cait, keep, fuse, data):
    cfg, batch = cait
    layers = data.draw(st.lists(st.integers(0, cfg["depth"] - 1), min_size=1, max_size=2))
    check_invariants(factory(**cfg), images(cfg["img_size"])(batch), "attn_prune",
                     dict(keep_ratio=keep, fuse=fuse, layers=layers), dict(keep_ratio=1.0))


@SETTINGS
@given(caits(), st.floats(0.05, 0.5), st.booleans())
def test_pumer_invariants(cait, merge, proportional):
    """A single stream gets PuMer's merging half."""
    cfg, batch = cait
    layers = list(range(cfg["depth"]))
    check_invariants(factory(**cfg), images(cfg["img_size"])(batch), "pumer",
                     dict(image_merge_ratio=merge, proportional=proportional, layers=layers),
                     dict(image_merge_ratio=0.0), merges_only=True)


@SETTINGS
@given(caits(), st.sampled_from([None, 0.3, 0.75]), st.booleans())
def test_smarttrim_invariants(cait, budget, heads):
    """Random (not stable) initialisation, so the trimmers drop per instance for real; head
    gates act on talking heads' mixed outputs (placed there only on request: they save
    nothing)."""
    cfg, batch = cait
    layers = list(range(cfg["depth"]))
    check_invariants(factory(**cfg), images(cfg["img_size"])(batch), "smarttrim",
                     dict(stable_init=False, budget=budget, heads=heads, lambda_cost=0.0,
                          layers=layers, talking_heads=True),
                     dict(heads=heads, layers=layers, lambda_cost=0.0, talking_heads=True))


# ------------------------------------------------------------------ what the blocks read

def test_the_fx_pass_finds_talking_heads_and_the_site_writes_them_out():
    make = factory()
    spec = find_attention(trace_module(make().blocks[0].attn))
    assert len(spec) == 1 and spec[0]["mix"] == ("proj_l", "proj_w")
    assert find_attention(trace_module(make().blocks_token_only[0].attn))[0]["mix"] is None


def _cls_from_patches(model: Cait, patches: torch.Tensor) -> torch.Tensor:
    """The untrimmed class-attention blocks, norm and head on the given patches."""
    x = model.forward_cls(patches)
    return model.forward_head(model.norm(x))


def test_class_attention_reads_only_the_surviving_patches():
    """attn_prune drops half the patches at the last self-attention block: the logits are the
    untouched class-attention blocks run on the survivors alone."""
    model = factory(depth=1)().eval()
    (x,) = images()(2)
    trimkit.apply(model, "attn_prune", keep_ratio=0.5, layers=[0], mode="compacted")
    feats = {}
    hook = model.blocks.register_forward_hook(lambda m, a, o: feats.setdefault("x", o))
    with torch.no_grad():
        out = model(x)
    hook.remove()
    assert feats["x"].shape == (2, 8, 32)  # the survivors, as the trimmed blocks left them
    trimkit.remove(model)
    with torch.no_grad():
        ref = _cls_from_patches(model, feats["x"])
    assert torch.allclose(out, ref, atol=1e-5)


def test_class_attention_weighs_a_merged_patch_by_its_size():
    """Under ToMe's proportional attention, a patch that stands for s patches weighs as s
    copies of it: the logits are the untouched class-attention blocks run on every surviving
    patch repeated by its size."""
    model = factory(depth=2)().eval()
    (x,) = images()(2)
    trimkit.apply(model, "tome", r=4, mode="compacted")
    feats = {}
    hook = model.blocks.register_forward_hook(lambda m, a, o: feats.setdefault("x", o))
    with torch.no_grad():
        out = model(x)
    hook.remove()
    size = trimkit.last_states(model)["image"].size
    assert size.max() > 1 and torch.equal(size.sum(1), torch.full((2,), 16.0))
    trimkit.remove(model)
    with torch.no_grad():
        for i in range(2):
            repeated = feats["x"][i].repeat_interleave(size[i].long(), dim=0)[None]
            assert torch.allclose(out[i:i + 1], _cls_from_patches(model, repeated), atol=1e-5)


def test_attn_prune_scores_with_the_mean_live_query_through_talking_heads():
    """No token of CaiT's self-attention blocks is a CLS, so attn_prune scores with the mean
    query of the live tokens (the rule of streams that protect nothing), its logits mixed
    across heads before the softmax as the block mixes its own."""
    model = factory(heads=2, depth=1)().eval()
    (x,) = images()(2)
    with torch.no_grad():
        h = model.patch_embed(x) + model.pos_embed
        attn = model.blocks[0].attn
        b, n, c = h.shape
        q, k, _ = attn.qkv(model.blocks[0].norm1(h)).reshape(b, n, 3, 2, -1).permute(
            2, 0, 3, 1, 4)
        logits = (q * attn.scale).mean(2, keepdim=True) @ k.transpose(-2, -1)
        logits = attn.proj_l(logits.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        scores = logits.softmax(-1).mean(1)[:, 0]
        expected = scores.topk(math.ceil(0.5 * n), dim=-1).indices.sort(-1).values
    trimkit.apply(model, "attn_prune", keep_ratio=0.5, layers=[0], track_source=True)
    with torch.no_grad():
        model(x)
    source = trimkit.last_states(model)["image"].source
    kept = [torch.nonzero(source[i] >= 0).flatten() for i in range(2)]
    assert all(torch.equal(kept[i], expected[i]) for i in range(2))


def test_head_gates_leave_talking_heads_projections_whole_and_prune_heads_refuses():
    """Head skipping slices the q, k, v rows of the heads a batch gated off; talking heads
    read every head, so CaiT's projections stay whole, and `prune_heads` refuses before any
    change."""
    model = factory()().eval()
    trimkit.apply(model, "smarttrim", stable_init=False, lambda_cost=0.0)
    assert all("forward" not in blk.attn.qkv.__dict__ for blk in model.blocks)
    trimkit.remove(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="talking heads"):
        trimkit.apply(model, "prune_heads", ratio=0.5, data=[images()(2)])
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert "forward" not in model.blocks[0].attn.__dict__


def test_a_dead_key_is_read_by_no_head_after_the_mix():
    """proj_w's bias reaches every key alike: masked execution (dead keys kept in place)
    must not let it read them, so masked equals compacted with per-instance counts."""
    model = factory(heads=4)().eval()
    (x,) = images()(3)
    trimkit.apply(model, "smarttrim", stable_init=False, lambda_cost=0.0, heads=False)
    outs = {}
    with torch.no_grad():
        for mode in ("masked", "compacted", "packed"):
            trimkit.set_mode(model, mode)
            outs[mode] = model(x)
    counts = trimkit.last_stats(model).layers[-1].tokens_out
    assert len(set(counts.tolist())) > 1  # per-instance counts: padding and packing for real
    assert model.blocks[0].attn.proj_w.bias.abs().max() > 0
    for mode in ("masked", "packed"):
        assert torch.allclose(outs[mode], outs["compacted"], atol=1e-5), mode


def test_average_pooling_weighs_live_patches_by_size_and_deep_copies_work():
    import copy

    model = factory(pool="avg")().eval()
    (x,) = images()(2)
    with torch.no_grad():
        ref = model(x)
        trimkit.apply(model, "tome", r=4)
        out = model(x)
        twin = copy.deepcopy(model)
        assert torch.equal(twin(x), out)
        trimkit.remove(twin)
        assert torch.equal(twin(x), ref)
        with trimkit.trimming_disabled(model):
            assert torch.allclose(model(x), ref, atol=1e-6)


def test_flops_are_counted_on_cait_and_fall_when_trimmed():
    """CaiT hands its expanded class token (a view of a parameter, made under no_grad) to
    each class-attention block; the flop counter's module tracking must not trip on it."""
    model = factory()().eval()
    (x,) = images()(2)
    full = trimkit.count_flops(model, x)
    trimkit.apply(model, "tome", r=4)
    assert 0 < trimkit.count_flops(model, x) < full


def test_masked_training_reaches_the_token_trimmers_through_talking_heads():
    """In training the keep mask is soft: it enters the mixed attention as log(keep) and as
    the weight of proj_w's bias on each key, and the gradient reaches the trimmers."""
    model = factory()().train()
    (x,) = images()(2)
    trimkit.apply(model, "smarttrim", heads=False, lambda_cost=0.0)
    model(x).square().mean().backward()
    grads = [p.grad for n, p in model.named_parameters() if n.startswith("trimkit.")]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)


def test_class_attention_on_patches_of_its_own_reads_them_all():
    """Patches handed to `forward_cls` by the caller, not left by this call's blocks, are
    read as the model reads them, whatever the last trimmed forward left."""
    model = factory()().eval()
    (x,) = images()(2)
    with torch.no_grad():
        patches = model.blocks(model.patch_embed(x) + model.pos_embed)
        ref = model.forward_cls(patches)
        trimkit.apply(model, "tome", r=4, mode="compacted")
        model(x)
        assert trimkit.last_states(model)["image"].keep.shape == (2, 8)
        assert torch.allclose(model.forward_cls(patches), ref, atol=1e-6)
