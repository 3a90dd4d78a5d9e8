"""The invariants (docs/architecture.md) as hypothesis properties over tiny random BLIP models,
through each task's real code path: VQA answers from ``generate``, image-text matching (ITM) and the
contrastive path (ITC) of ``BlipForImageTextRetrieval``, and captions from ``generate`` (greedy and
beam search)."""

from __future__ import annotations

from blip_models import inputs, make, output
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from trimkit.testing import check_invariants

SETTINGS = settings(max_examples=25, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.too_slow])

KINDS = ["vqa", "itm", "itc", "caption", "caption_beams"]


@st.composite
def blips(draw):
    """A kind, 1 or 2 heads, 2 or 3 layers, 16 or 36 patches, a batch of 1 to 3 with 4 to 8
    text tokens, padded where the task's untrimmed model handles padding (ITM, ITC; BLIP's
    VQA decoder attends to a question's padding, see test_blip.py)."""
    kind = draw(st.sampled_from(KINDS))
    cfg = dict(heads=draw(st.sampled_from([1, 2])), layers=draw(st.integers(2, 3)),
               image_size=draw(st.sampled_from([32, 48])))
    padded = kind in ("itm", "itc") and draw(st.booleans())
    data = dict(batch=draw(st.integers(1, 3)), seq=draw(st.integers(4, 8)), padded=padded,
                seed=draw(st.integers(0, 9)))
    return kind, cfg, data


def setup(draw):
    kind, cfg, data = draw
    args = inputs(kind, data["batch"], data["seq"], data["padded"], cfg["image_size"],
                  data["seed"])
    perturb = None
    if data["padded"]:
        def perturb(a: tuple) -> tuple:
            mask = a[-1].bool()
            return (a[0].masked_fill(~mask, 7), *a[1:])
    return (lambda: make(kind, **cfg)), args, output(kind), perturb, kind


def _streams(kind: str, data) -> dict:
    if kind.startswith("caption"):
        return {}
    return {"stream": data.draw(st.sampled_from(["image", "text"]))}


@SETTINGS
@given(blips(), st.integers(0, 3), st.data())
def test_tome_invariants(draw, r, data):
    make_model, args, out, perturb, kind = setup(draw)
    extra = _streams(kind, data)
    if extra.get("stream") == "text":
        r = min(r, 1)  # 4 tokens, CLS protected: one merge per layer at most
    check_invariants(make_model, args, "tome", dict(r=r, **extra), dict(r=0, **extra),
                     output=out, merges_only=True, perturb_padding=perturb)


@SETTINGS
@given(blips(), st.floats(0.05, 1.0), st.booleans(), st.data())
def test_attn_prune_invariants(draw, keep, fuse, data):
    make_model, args, out, perturb, kind = setup(draw)
    extra = _streams(kind, data)
    check_invariants(make_model, args, "attn_prune", dict(keep_ratio=keep, fuse=fuse, **extra),
                     dict(keep_ratio=1.0, **extra), output=out, perturb_padding=perturb)


@SETTINGS
@given(blips(), st.sampled_from([None, 0.3, 0.75]), st.booleans(), st.booleans())
def test_smarttrim_invariants(draw, budget, tokens, heads):
    """Random initialisation drops for real, in the vision encoder, in the image tokens the
    text cross-attends to (guided by the text) and in the text; stable initialisation keeps
    everything."""
    make_model, args, out, perturb, kind = setup(draw)
    if not (tokens or heads):
        tokens = True
    # the default placement: every kind of layer; no cost loss, so no target to reach
    opts = dict(tokens=tokens, heads=heads, lambda_cost=0.0)
    check_invariants(make_model, args, "smarttrim", dict(stable_init=False, budget=budget, **opts),
                     opts, output=out, perturb_padding=perturb)


@SETTINGS
@given(blips(), st.floats(0.0, 0.9), st.floats(0.0, 0.5), st.floats(0.0, 0.5), st.booleans(),
       st.data())
def test_pumer_invariants(draw, prune, image_merge, text_merge, proportional, data):
    """Reducers at random text layers (image tokens reduced before the next text layer reads
    them); captioning has no text to guide pruning, so it merges only, in the vision tower."""
    make_model, args, out, perturb, kind = setup(draw)
    layers = data.draw(st.lists(st.integers(0, draw[1]["layers"] - 1), min_size=1,
                                max_size=2))
    opts = dict(image_merge_ratio=image_merge, text_merge_ratio=text_merge,
                proportional=proportional, layers=layers)
    if not kind.startswith("caption"):
        opts["prune_ratio"] = prune
    check_invariants(make_model, args, "pumer", opts,
                     dict(prune_ratio=0.0, image_merge_ratio=0.0, text_merge_ratio=0.0),
                     output=out, perturb_padding=perturb)
