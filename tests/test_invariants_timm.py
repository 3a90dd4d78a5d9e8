"""The invariants (docs/architecture.md) as hypothesis properties over random tiny timm ViTs."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from timm.models.deit import VisionTransformerDistilled
from timm.models.vision_transformer import Block, ResPostBlock, VisionTransformer

import trimkit
from trimkit.testing import check_invariants

SETTINGS = settings(max_examples=60, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.too_slow])


@st.composite
def vits(draw):
    """A tiny ViT config: registers, LayerScale, qk_norm, pre- or post-norm blocks, fused or
    explicit attention, CLS or average pooling, a distillation token, 16 or 36 patches."""
    heads = draw(st.sampled_from([1, 2, 4]))
    cfg = dict(
        img_size=draw(st.sampled_from([32, 48])), patch_size=8, embed_dim=8 * heads,
        depth=draw(st.integers(2, 3)), num_heads=heads, num_classes=5,
        reg_tokens=draw(st.sampled_from([0, 2])),
        init_values=draw(st.sampled_from([None, 0.5])),
        qk_norm=draw(st.booleans()),
        class_token=draw(st.booleans()),
    )
    cfg["block_fn"] = draw(st.sampled_from([Block, ResPostBlock]))
    if not cfg["class_token"]:
        cfg["global_pool"] = "avg"
    elif draw(st.booleans()):
        cfg["distilled"] = True
    fused = draw(st.booleans())
    batch = draw(st.integers(1, 4))
    return cfg, fused, batch


def factory(cfg: dict, fused: bool):
    def make():
        torch.manual_seed(0)
        kw = dict(cfg)
        cls = VisionTransformerDistilled if kw.pop("distilled", False) else VisionTransformer
        m = cls(**kw)
        for blk in m.blocks:
            blk.attn.fused_attn = fused
        # random non-zero biases/LayerScale so tokens differ in interesting ways
        with torch.no_grad():
            for p in m.parameters():
                p.add_(torch.randn_like(p) * 0.02)
        return m
    return make


def images(cfg: dict, batch: int) -> tuple:
    g = torch.Generator().manual_seed(batch)
    return (torch.randn(batch, 3, cfg["img_size"], cfg["img_size"], generator=g),)


@SETTINGS
@given(vits(), st.integers(0, 8), st.sampled_from(["constant", "decreasing"]))
def test_tome_invariants(vit, r, schedule):
    cfg, fused, batch = vit
    n = (cfg["img_size"] // 8) ** 2
    r = min(r, n // (2 * cfg["depth"]))  # always feasible at every layer
    check_invariants(factory(cfg, fused), images(cfg, batch), "tome",
                     dict(r=r, schedule=schedule), dict(r=0), merges_only=True)


@SETTINGS
@given(vits(), st.floats(0.05, 1.0), st.booleans(), st.data())
def test_attn_prune_invariants(vit, keep, fuse, data):
    cfg, fused, batch = vit
    layers = data.draw(st.lists(st.integers(0, cfg["depth"] - 1), min_size=1, max_size=3))
    check_invariants(factory(cfg, fused), images(cfg, batch), "attn_prune",
                     dict(keep_ratio=keep, fuse=fuse, layers=layers), dict(keep_ratio=1.0))


@pytest.mark.parametrize("r", [8, 100])
def test_extreme_merging_keeps_one_token(r):
    """Invariant 8 at the edge: the largest possible merges leave tokens and no NaN."""
    cfg = dict(img_size=32, patch_size=8, embed_dim=16, depth=4, num_heads=2, num_classes=3)
    if r == 100:  # clamped per layer as the reference does; strict refuses it
        with pytest.raises(ValueError, match="r="):
            check_invariants(factory(cfg, True), images(cfg, 2), "tome",
                             dict(r=r, strict=True), dict(r=0))
        check_invariants(factory(cfg, True), images(cfg, 2), "tome", dict(r=r), dict(r=0),
                         merges_only=True)
        return
    check_invariants(factory(cfg, True), images(cfg, 2), "tome",
                     dict(r=[8, 4, 2, 1]), dict(r=0), merges_only=True)


@SETTINGS
@given(vits(), st.sampled_from([None, 0.3, 0.75]), st.booleans(), st.booleans(), st.data())
def test_smarttrim_invariants(vit, budget, tokens, heads, data):
    """Learned trimmers with random (not stable) initialisation, so they drop for real;
    stable initialisation keeps everything, so it is the zero-trimming case."""
    cfg, fused, batch = vit
    if not (tokens or heads):
        tokens = True
    layers = data.draw(st.lists(st.integers(0, cfg["depth"] - 1), min_size=1, max_size=3))
    check_invariants(factory(cfg, fused), images(cfg, batch), "smarttrim",
                     dict(stable_init=False, budget=budget, tokens=tokens, heads=heads,
                          lambda_cost=0.0, layers=layers),
                     dict(tokens=tokens, heads=heads, layers=layers, lambda_cost=0.0))


@SETTINGS
@given(vits(), st.floats(0.0, 0.5), st.booleans(), st.data())
def test_pumer_invariants(vit, merge, proportional, data):
    """A single stream gets PuMer's merging half at the chosen layers."""
    cfg, fused, batch = vit
    layers = data.draw(st.lists(st.integers(0, cfg["depth"] - 1), min_size=1, max_size=3))
    check_invariants(factory(cfg, fused), images(cfg, batch), "pumer",
                     dict(image_merge_ratio=merge, proportional=proportional, layers=layers),
                     dict(image_merge_ratio=0.0), merges_only=True)


def test_average_pool_under_trimming_disabled_ignores_the_last_trimmed_state():
    """Masked (training) execution keeps shapes, so the state of the last trimmed forward
    matches an untrimmed one's tokens; a teacher pass under `trimming_disabled` must still
    pool the plain mean, as the model alone does."""
    cfg = dict(img_size=32, patch_size=8, embed_dim=16, depth=2, num_heads=2, num_classes=3,
               class_token=False, global_pool="avg")
    model = factory(cfg, True)().eval()
    (x,) = images(cfg, 2)
    with torch.no_grad():
        ref = model(x)
        trimkit.apply(model, "tome", r=3, mode="masked")
        trimmed = model(x)
        with trimkit.trimming_disabled(model):
            full = model(x)
    assert not torch.allclose(trimmed, ref, atol=1e-4)  # the trimmed pass did merge
    assert torch.allclose(full, ref, atol=1e-5)
