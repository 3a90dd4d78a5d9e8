"""The invariants (docs/architecture.md) as hypothesis properties over random tiny METER variants,
with text padding, batch sizes 1–4, and trimming in either stream (the image stream from the CLIP
tower's blocks on, the text stream from the RoBERTa encoder's layers on)."""

from __future__ import annotations

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from trimkit.adapters.meter import METER, meter_tiny

from trimkit.testing import check_invariants

SETTINGS = settings(max_examples=25, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.too_slow])


@st.composite
def meters(draw):
    """A tiny METER config and a padded batch for it."""
    heads = draw(st.sampled_from([1, 2, 4]))
    cfg = meter_tiny(num_heads=heads, hidden_size=8 * heads,
                     num_fusion_layers=draw(st.integers(1, 3)),
                     image_size=draw(st.sampled_from([32, 48])))
    batch = draw(st.integers(1, 4))
    t = draw(st.integers(3, 10))
    lengths = draw(st.lists(st.integers(2, t), min_size=batch, max_size=batch))
    g = torch.Generator().manual_seed(batch * 100 + t)
    images = torch.randn(batch, 3, cfg.image_size, cfg.image_size, generator=g)
    ids = torch.randint(3, cfg.vocab_size, (batch, t), generator=g)
    mask = (torch.arange(t)[None] < torch.tensor(lengths)[:, None]).long()
    ids = ids.masked_fill(mask == 0, 1)
    return cfg, (images, ids, mask)


def factory(cfg):
    def make():
        torch.manual_seed(0)
        return METER(cfg)
    return make


def depth(cfg, stream: str) -> int:
    """Layers of a stream: the image stream starts in the CLIP tower, the text stream in
    the RoBERTa encoder."""
    return cfg.num_fusion_layers + (cfg.vision_layers if stream == "image" else cfg.text_layers)


def perturb_padding(inputs):
    images, ids, mask = inputs
    return images, ids.masked_fill(mask == 0, 42), mask


@SETTINGS
@given(meters(), st.integers(0, 6), st.sampled_from(["image", "text"]))
def test_tome_invariants(case, r, stream):
    cfg, inputs = case
    if stream == "image":
        r = min(r, (cfg.image_size // cfg.patch_size) ** 2 // (2 * depth(cfg, stream)))
    check_invariants(factory(cfg), inputs, "tome", dict(r=r, stream=stream),
                     dict(r=0, stream=stream), merges_only=True, perturb_padding=perturb_padding)


@SETTINGS
@given(meters(), st.floats(0.05, 1.0), st.booleans(), st.sampled_from(["image", "text"]),
       st.data())
def test_attn_prune_invariants(case, keep, fuse, stream, data):
    cfg, inputs = case
    layers = data.draw(st.lists(st.integers(0, depth(cfg, stream) - 1), min_size=1,
                                max_size=3))
    check_invariants(factory(cfg), inputs, "attn_prune",
                     dict(keep_ratio=keep, fuse=fuse, layers=layers, stream=stream),
                     dict(keep_ratio=1.0, stream=stream), perturb_padding=perturb_padding)


@SETTINGS
@given(meters(), st.sampled_from([None, 0.3, 0.75]), st.booleans(), st.booleans(),
       st.sampled_from([None, ["image"], ["text"]]))
def test_smarttrim_invariants(case, budget, tokens, heads, streams):
    """Token and head trimmers at the default placement (the CLIP tower but its first block,
    the RoBERTa encoder, the fusion layers; cross-modal-aware there), random initialisation
    so they drop; stable initialisation is the zero case."""
    cfg, inputs = case
    if not (tokens or heads):
        heads = True
    zero = dict(tokens=tokens, heads=heads, streams=streams, lambda_cost=0.0)  # no target
    check_invariants(factory(cfg), inputs, "smarttrim", dict(zero, stable_init=False,
                                                             budget=budget),
                     zero, perturb_padding=perturb_padding)


@SETTINGS
@given(meters(), st.floats(0.0, 0.9), st.floats(0.0, 0.5), st.floats(0.0, 0.5), st.booleans(),
       st.data())
def test_pumer_invariants(case, prune, image_merge, text_merge, proportional, data):
    """Text-informed image pruning and merging in both streams at random fusion layers."""
    cfg, inputs = case
    layers = data.draw(st.lists(st.integers(0, cfg.num_fusion_layers - 1), min_size=1,
                                max_size=3))
    check_invariants(factory(cfg), inputs, "pumer",
                     dict(prune_ratio=prune, image_merge_ratio=image_merge,
                          text_merge_ratio=text_merge, proportional=proportional,
                          layers=layers),
                     dict(prune_ratio=0.0, image_merge_ratio=0.0, text_merge_ratio=0.0),
                     perturb_padding=perturb_padding)
