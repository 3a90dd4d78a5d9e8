"""The conformance kit, `trimkit.testing.check_adapter`: every shipped adapter passes it on a
tiny model, with every built-in recipe that fits checked (none silently skipped), and
deliberately broken adapters fail it with messages that name the recipe, the invariant and
what to fix."""

from __future__ import annotations

import dataclasses
import sys

import blip_models
import generic_models
import pytest
import test_invariants_hf as hf
import test_invariants_meter as meter
import test_open_clip as oc
import torch
from open_clip.model import CLIP, CustomTextCLIP
from test_invariants_timm import factory as vit_factory
from timm.models.vision_transformer import ResPostBlock
from trimkit.adapters.meter import meter_tiny
from trimkit.adapters.timm_vit import TimmViTAdapter

import trimkit
from trimkit.registry import RECIPES
from trimkit.rewrite import ADDITIVE_MASK_FUNCTIONS
from trimkit.testing import (
    CASES,
    HINTS,
    Case,
    ConformanceError,
    ConformanceReport,
    check_adapter,
    layer_subsets,
    register_case,
)

ALL = {"tome", "attn_prune", "smarttrim", "pumer", "prune_heads"}
EXAMPLES = 5


def passes(report: ConformanceReport, checked: set[str],
           skipped: dict[str, str] | None = None) -> None:
    """Every recipe named was checked (with examples), the others skipped for the reason
    given; nothing failed."""
    assert isinstance(report, ConformanceReport) and not report.failures
    assert checked <= set(report.checked), report.summary()
    assert all(report.checked[r] >= 1 for r in checked)
    for recipe, reason in (skipped or {}).items():
        assert reason in report.skipped[recipe], report.summary()
    text = str(report)
    assert report.adapter in text and all(f"{r}: checked" in text for r in checked)


# ---------------------------------------------------------------- every shipped adapter


def images(size: int = 32):
    def make_inputs(b: int) -> tuple:
        return (torch.randn(b, 3, size, size, generator=torch.Generator().manual_seed(b)),)
    return make_inputs


@pytest.mark.parametrize("cfg, fused", [
    (dict(reg_tokens=2, init_values=0.5), True),  # CLS + registers, LayerScale
    (dict(class_token=False, global_pool="avg", qk_norm=True), True),  # the pooling patch
    (dict(distilled=True, block_fn=ResPostBlock), False),  # dist token, post-norm, explicit
], ids=["cls-registers", "avg-pool", "distilled-postnorm-explicit"])
def test_timm_vit(cfg, fused):
    cfg = dict(img_size=32, patch_size=8, embed_dim=16, depth=2, num_heads=2, num_classes=5,
               **cfg)
    report = check_adapter(vit_factory(cfg, fused), images(), max_examples=EXAMPLES)
    passes(report, ALL)
    assert report.adapter == "timm-vit" and report.entry == {"image": 16}
    assert "grid 4×4" in report.summary()


def hf_case(family: str, seq: int = 8):
    common = dict(hidden_size=16, num_attention_heads=2, intermediate_size=32,
                  num_hidden_layers=2, attn_implementation="sdpa")

    def make_inputs(b: int) -> tuple:
        # padded text with at least 6 real tokens, so one merge per layer always fits
        g = torch.Generator().manual_seed(b)
        ids = torch.randint(3, hf.VOCAB - 2, (b, seq), generator=g)
        ids[:, 0] = 1
        lengths = seq - torch.arange(b) % 3
        mask = (torch.arange(seq)[None] < lengths[:, None]).long()
        if family == "clip":  # CLIP's pooled EOS (the largest id) at each sample's end
            ids[torch.arange(b), lengths - 1] = hf.VOCAB - 1
        ids = ids.masked_fill(mask == 0, 0)
        if family == "clip":
            return ids, torch.randn(b, 3, 32, 32, generator=g), mask
        return ids, mask

    _, _, output, _ = hf.setup((family, common, dict(seq=seq, batch=1, masked=True, seed=0,
                                                     legacy_eos=False), 32))

    def perturb(args: tuple) -> tuple:
        ids, *rest = args
        noise = torch.randint(3, hf.VOCAB - 2, ids.shape, generator=torch.Generator()
                              .manual_seed(99))
        return (torch.where(args[-1].bool(), ids, noise), *rest)

    make = hf.factory(family, common, dict(legacy_eos=False), 32)
    return make, make_inputs, output, perturb


@pytest.mark.parametrize("family, streams", [("bert_cls", {"text"}), ("vit_cls", {"image"}),
                                             ("clip", {"text", "image"})])
def test_hugging_face(family, streams):
    """BERT with a classification head (padded text), ViT with one, and CLIP: both towers,
    the text one causal with its EOS pooler protected wherever it sits."""
    make, make_inputs, output, perturb = hf_case(family)
    if family == "vit_cls":
        make_inputs, perturb = images(), None
    report = check_adapter(make, make_inputs, output=output, perturb_padding=perturb,
                           max_examples=EXAMPLES)
    passes(report, ALL)
    assert report.adapter == "hf" and set(report.streams) == streams


@pytest.mark.parametrize("cls, causal, vision_pool, text_pool", [
    (CLIP, True, "tok", "argmax"), (CustomTextCLIP, False, "avg", "last")])
def test_open_clip(cls, causal, vision_pool, text_pool):
    case = dict(cls=cls, causal=causal, pool=text_pool,
                vision=dict(image_size=32, patch_size=8, width=16, head_width=8, layers=2,
                            pool_type=vision_pool),
                text=dict(context_length=10, vocab_size=oc.VOCAB, width=16, heads=2, layers=2,
                          no_causal_mask=not causal, pool_type=text_pool, eos_id=oc.EOT))

    def make_inputs(b: int) -> tuple:
        pixels = torch.randn(b, 3, 32, 32, generator=torch.Generator().manual_seed(b))
        return pixels, oc.token_ids(b, 10, [9 - i % 3 for i in range(b)], seed=b)

    report = check_adapter(oc.factory(case), make_inputs, output=oc.both,
                           perturb_padding=oc.padding_perturbation(case),
                           max_examples=EXAMPLES)
    passes(report, ALL)
    assert report.adapter == "open_clip"


@pytest.mark.parametrize("kind", ["vqa", "itm", "caption"])
def test_blip(kind):
    """VQA through ``generate`` and image-text matching with padded text (image tokens
    trimmed where the text reads them: keys-only layers); captioning: the vision tower
    only, whose heads cannot be pruned."""
    padded = kind == "itm"

    def make_inputs(b: int) -> tuple:
        return blip_models.inputs(kind, b, 6, padded, 32, b)

    def perturb(args: tuple) -> tuple:
        return (args[0].masked_fill(~args[-1].bool(), 7), *args[1:])

    report = check_adapter(lambda: blip_models.make(kind, heads=2, layers=2), make_inputs,
                           output=blip_models.output(kind),
                           perturb_padding=perturb if padded else None, max_examples=EXAMPLES)
    assert report.adapter == "blip"
    if kind != "caption":
        passes(report, ALL)
        assert len(report.streams["image"].attention_layers()) == 2  # + 2 keys-only layers
    else:
        passes(report, ALL - {"prune_heads"},
               skipped={"prune_heads": "no layer states a prunable HeadLayout"})


def test_meter():
    """Two parallel streams with cross-attention: PuMer's text-informed pruning is drawn."""
    cfg = meter_tiny(num_heads=2, hidden_size=16, num_fusion_layers=2, image_size=32)

    def make_inputs(b: int) -> tuple:
        g = torch.Generator().manual_seed(b)
        images = torch.randn(b, 3, 32, 32, generator=g)
        ids = torch.randint(3, cfg.vocab_size, (b, 8), generator=g)
        lengths = torch.tensor([8] + [5 + i % 3 for i in range(b - 1)])
        mask = (torch.arange(8)[None] < lengths[:, None]).long()
        return images, ids.masked_fill(mask == 0, 1), mask

    report = check_adapter(meter.factory(cfg), make_inputs,
                           perturb_padding=meter.perturb_padding, max_examples=EXAMPLES)
    passes(report, ALL)
    assert report.description.parallel and report.adapter == "meter"


#: the generic adapter's families whose head layout a pruned module could not run with
UNPRUNABLE = {"prenorm-sdpa": "reshapes the heads' outputs to a width",
              "eva": "not a reshaping of an nn.Linear", "beit-relpos": "not a reshaping"}


@pytest.mark.parametrize("family", sorted(generic_models.FAMILIES))
def test_generic(family):
    """Families with no hand-written adapter (and timm ViTs forced through it)."""
    make, kind, adapter = generic_models.FAMILIES[family]
    report = check_adapter(generic_models.jitter(make),
                           lambda b: generic_models.inputs(kind, b),
                           adapter=adapter, max_examples=3)
    assert report.adapter == "generic"
    if family in UNPRUNABLE:
        passes(report, ALL - {"prune_heads"}, skipped={"prune_heads": UNPRUNABLE[family]})
    else:
        passes(report, ALL)


# ---------------------------------------------------------------- broken adapters


CFG = dict(img_size=32, patch_size=8, embed_dim=16, depth=2, num_heads=2, num_classes=5)


def _replace_layers(desc: trimkit.ModelDescription, **changes) -> trimkit.ModelDescription:
    s = desc.streams["image"]
    layers = tuple(dataclasses.replace(layer, **changes) for layer in s.layers)
    return dataclasses.replace(desc, streams={"image": dataclasses.replace(s, layers=layers)})


class WrongAttentionPath(TimmViTAdapter):
    name = "broken: attention path"

    def describe(self, model):
        return _replace_layers(super().describe(model), attention="self_attn")


class NoPoolingPatch(TimmViTAdapter):
    """Forgets timm's average pooling over the live tokens, weighted by size."""

    name = "broken: no pooling patch"

    def install(self, model, desc, sites, ctx):
        return trimkit.install_fx_sites(model, desc, sites)


class ForgottenRegisters(TimmViTAdapter):
    """Protects the CLS token only, not the register tokens after it."""

    name = "broken: registers"

    def describe(self, model):
        desc = super().describe(model)
        image = dataclasses.replace(desc.streams["image"], num_protected=1)
        return dataclasses.replace(desc, streams={"image": image})


class LeavesExplicitAttention(TimmViTAdapter):
    """Switches the layers that trim to timm's explicit attention and never switches back:
    the undo list misses that change (outputs after remove differ in the last bits)."""

    name = "broken: undo"

    def install(self, model, desc, sites, ctx):
        undo = super().install(model, desc, sites, ctx)
        for (_, i), site in sites.items():
            if len(site.pre) or len(site.post):
                model.blocks[i].attn.fused_attn = False
        return undo


class KeepsABuffer(TimmViTAdapter):
    """Registers a buffer on the model in install and never removes it."""

    name = "broken: buffer"

    def install(self, model, desc, sites, ctx):
        model.register_buffer("token_sizes", torch.ones(1))
        return super().install(model, desc, sites, ctx)


class LeavesBeforeTheResidual(TimmViTAdapter):
    """Trims the attention's output before the residual addition of a pre-norm block."""

    name = "broken: leave point"

    def describe(self, model):
        return _replace_layers(super().describe(model), leave_after="attn", residual=False)


def failing(adapter, cfg=CFG, **kw) -> ConformanceError:
    with pytest.raises(ConformanceError) as info:
        check_adapter(vit_factory(cfg, True), images(), adapter=adapter,
                      max_examples=kw.pop("max_examples", 5), **kw)
    return info.value


def test_structural_error_names_the_missing_path():
    err = failing(WrongAttentionPath())
    msg = str(err)
    assert "structural" in msg and "no recipe can be checked" in msg
    assert "LayerDesc.attention 'self_attn' is not a module under its block 'blocks.0'" in msg
    assert "'blocks.1'" in msg  # every problem, not only the first
    assert err.report is None and err.failures == []


class WrongArguments(TimmViTAdapter):
    name = "broken: arguments"

    def describe(self, model):
        return _replace_layers(super().describe(model), stream_arg=3, num_heads=3,
                               head_dim=None, cross_stream="text")


def test_structural_errors_name_each_field():
    msg = str(failing(WrongArguments()))
    assert "stream 'image' layer 0: stream_arg=3, but Block.forward takes 3 positional " \
           "arguments ['x', 'attn_mask', 'is_causal']" in msg
    assert "dim=16 is not a multiple of num_heads=3; give LayerDesc.head_dim" in msg
    assert "cross_stream 'text' names no stream (streams: ['image'])" in msg


def test_an_undo_missing_even_with_nothing_trimmed_fails_before_any_recipe():
    msg = str(failing(KeepsABuffer()))
    assert "no recipe can be checked" in msg
    assert "invariant 9: state_dict after remove differs" in msg and HINTS[9] in msg


def test_missing_pooling_patch_breaks_invariant_5_in_every_trimming_recipe():
    cfg = dict(CFG, class_token=False, global_pool="avg")
    err = failing(NoPoolingPatch(), cfg)
    msg = str(err)
    failed = {f.recipe for f in err.failures}
    # not only the first
    assert failed == {"tome", "attn_prune", "smarttrim", "pumer", "visionzip"}
    assert "prune_heads: checked" in msg  # static pruning installs nothing
    hint = "the install points do not cover every attention, or masks are applied twice " \
           "(masks_are_padding)"
    assert hint in HINTS[5]
    for f in err.failures:
        assert f.invariants == (5,) and f.batch_size in (1, 3)
        assert f"{f.recipe}: batch size {f.batch_size}, options {f.options!r}" in msg
    assert msg.count(hint) == len(failed) and "invariant 5 (masked vs compacted)" in msg
    # the smallest example: shrunk to batch size 1 and one merge
    tome = next(f for f in err.failures if f.recipe == "tome")
    assert tome.batch_size == 1 and tome.options["r"] == 1
    assert "check_invariants(make_model, make_inputs(1), 'tome'" in msg


def test_forgotten_undo_breaks_invariant_9():
    # tome's zero (r=0) places no op, so only the trimmed apply switches the path: its
    # remove then leaves it switched (other recipes would re-trace the explicit path, see
    # test_forced_timm_adapter_on_explicit_attention)
    err = failing(LeavesExplicitAttention(), recipes=["tome"])
    (f,) = err.failures
    msg = str(err)
    assert f.recipe == "tome" and f.invariants == (9,) and f.options["r"] >= 1
    assert "tome: batch size" in msg and "invariant 9: outputs after remove differ" in msg
    assert "install's undo list misses a change" in msg


def test_forgotten_register_tokens_fail_the_grid_check():
    err = failing(ForgottenRegisters(), dict(CFG, reg_tokens=2), recipes=["tome"])
    msg = str(err)
    assert "tome: batch size" in msg and "states a 4×4 patch grid" in msg
    assert "num_protected must count every token before the patches" in msg


def test_a_leave_point_before_the_residual_fails_with_the_error_and_where():
    err = failing(LeavesBeforeTheResidual(), recipes=["attn_prune"], max_examples=3)
    (f,) = err.failures
    msg = str(err)
    assert "attn_prune: batch size" in msg and "RuntimeError" in msg
    assert "leave_after" in msg and "raised at" in msg and f.invariants == ()


# ---------------------------------------------------------------- third-party recipes


class KeepTop(trimkit.Recipe):
    """A recipe the kit does not know: keep the top tokens by CLS attention at one layer."""

    name = "_conformance_keep_top"
    options = {"keep_ratio": trimkit.Option(0.5, "fraction kept"),
               "layer": trimkit.Option(0, "the layer that prunes")}

    def plan(self, desc, options):
        from trimkit.trimmers import PruneByQueryScore

        return {(desc.stream().name, options["layer"]):
                trimkit.SitePlan(post=[PruneByQueryScore(options["keep_ratio"])])}


@pytest.fixture
def keep_top():
    """Registered only while the test runs (other tests list the recipes)."""
    trimkit.register_recipe(KeepTop)
    yield KeepTop.name
    RECIPES.pop(KeepTop.name, None)
    CASES.pop(KeepTop.name, None)


def test_a_recipe_without_a_case_is_skipped_until_one_is_registered(keep_top):
    make = vit_factory(CFG, True)
    report = check_adapter(make, images(), recipes=[keep_top, "tome"], max_examples=2)
    assert report.skipped == {keep_top: "no conformance case; register one with "
                                        "`register_case(name, case)`"}
    assert f"{keep_top}: skipped, no conformance case" in str(report)

    def strategy(desc, entry):
        from hypothesis import strategies as st

        @st.composite
        def trial(draw):
            layer = draw(layer_subsets(desc, "image", max_size=1))[0]
            return (dict(keep_ratio=draw(st.floats(0.1, 1.0)), layer=layer),
                    dict(keep_ratio=1.0, layer=layer), False)
        return trial()

    register_case(keep_top, Case(strategy))
    report = check_adapter(make, images(), recipes=[keep_top], max_examples=4)
    assert report.checked == {keep_top: 4}


def test_unknown_recipes_and_bad_arguments_are_refused():
    make = vit_factory(CFG, True)
    with pytest.raises(ValueError, match="unknown recipes"):
        check_adapter(make, images(), recipes=["no_such_recipe"])
    with pytest.raises(ValueError, match="batch_sizes"):
        check_adapter(make, images(), batch_sizes=())
    with pytest.raises(TypeError, match="Case"):
        register_case("tome", lambda desc, entry: None)


def test_forced_timm_adapter_on_explicit_attention():
    """Forced by name, the adapter's detect never runs; describe still teaches the rewrite
    timm's mask helper, so explicit attention is found."""
    from timm.layers.attention import maybe_add_mask

    had = maybe_add_mask in ADDITIVE_MASK_FUNCTIONS
    ADDITIVE_MASK_FUNCTIONS.discard(maybe_add_mask)  # as in a fresh process
    try:
        check_adapter(vit_factory(CFG, False), images(), adapter="timm-vit",
                      recipes=["tome"], max_examples=1)
    finally:
        if had:
            ADDITIVE_MASK_FUNCTIONS.add(maybe_add_mask)


def test_hypothesis_is_needed_only_when_checking(monkeypatch):
    monkeypatch.setitem(sys.modules, "hypothesis", None)  # as if it were not installed
    with pytest.raises(ImportError, match="pip install hypothesis"):
        check_adapter(vit_factory(CFG, True), images())


def test_an_unrecognised_model_is_a_structural_error():
    with pytest.raises(ConformanceError, match="the model is not recognised: "
                                               "UnsupportedModelError"):
        check_adapter(lambda: torch.nn.Sequential(torch.nn.Linear(4, 4)), lambda b: (
            torch.randn(b, 4),))
