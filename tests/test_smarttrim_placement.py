"""SmartTrim where the paper puts it (image tower, text encoder, fusion layers), the check
that a target ratio is reachable, the ablation options and ``preset="paper"``."""

from __future__ import annotations

import pytest
import torch
from blip_models import inputs as blip_inputs
from blip_models import make as make_blip
from trimkit.adapters.meter import METER, meter_tiny
from trimkit.recipes.smarttrim import PAPER, reach

import trimkit
from trimkit.api import _applied
from trimkit.cost import expected_ratio
from trimkit.learned import HeadTrimmer, TokenTrimmer
from trimkit.testing import check_invariants


def meter(**cfg) -> METER:
    torch.manual_seed(0)
    return METER(meter_tiny(**cfg)).eval()


def meter_inputs(batch: int = 3, text: int = 7, image_size: int = 32, padded: bool = True):
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(3, 100, (batch, text), generator=g)
    mask = torch.ones(batch, text, dtype=torch.long)
    if padded:
        mask[0, text // 2:] = 0
    return (torch.randn(batch, 3, image_size, image_size, generator=g),
            ids.masked_fill(mask == 0, 1), mask)


def placed(model) -> dict[str, set[str]]:
    return {k: {type(op).__name__ for op in s.pre} for k, s in model.trimkit.items()
            if len(s.pre)}


def token_trimmer(model, key: str) -> TokenTrimmer:
    return next(op for op in model.trimkit[key].pre if isinstance(op, TokenTrimmer))


def all_off(model) -> None:
    """Stable-initialised trimmers decide from their biases alone: every one off."""
    for site in model.trimkit.values():
        for op in site.pre:
            with torch.no_grad():
                op.bias.fill_(-50.0)


# ------------------------------------------------------------------------------ placement


def test_meter_default_placement_covers_the_image_tower_the_text_encoder_and_fusion():
    """METER (6 CLIP blocks, 2 RoBERTa layers, 2 fusion layers): every layer but the first
    sixth of the image tower (rounded up: 1), all of the text encoder, all of fusion; the
    uni-modal layers' token trimmers read their own stream only, the fusion layers' the
    other stream too."""
    model = trimkit.apply(meter(vision_layers=6), "smarttrim")
    desc = _applied(model).description
    assert [layer.block for layer in desc.streams["text"].layers[:2]] == [
        "text_transformer.encoder.layer.0", "text_transformer.encoder.layer.1"]
    assert desc.streams["text"].entries == (0, 2)
    both = {"TokenTrimmer", "HeadTrimmer"}
    assert placed(model) == {**{f"image_{i}": both for i in range(1, 8)},
                             **{f"text_{i}": both for i in range(4)}}
    for key in ("image_1", "image_5", "text_0", "text_1"):  # the encoders
        assert token_trimmer(model, key).other_dim is None
    for key in ("image_6", "image_7", "text_2", "text_3"):  # fusion
        assert token_trimmer(model, key).other_dim == model.config.hidden_size
    trimkit.remove(model)
    model = trimkit.apply(model, "smarttrim", skip=3)
    assert sorted(k for k in placed(model) if k.startswith("image")) == [
        f"image_{i}" for i in range(3, 8)]


def test_blip_default_placement_covers_the_vision_tower_its_keys_and_the_text_layers():
    """BLIP (VQA): the vision tower but its first layer, the image tokens where each text
    layer reads them (keys-only layers: text-guided token trimmers) and the text encoder's
    layers, whose cross-attention makes them the fusion layers."""
    model = trimkit.apply(make_blip("vqa_model", layers=3), "smarttrim")
    desc = _applied(model).description
    assert [layer.keys_only for layer in desc.streams["image"].layers] == [False] * 3 + [True] * 3
    got = placed(model)
    assert got == {"image_1": {"TokenTrimmer", "HeadTrimmer"},
                   "image_2": {"TokenTrimmer", "HeadTrimmer"},
                   **{f"image_{i}": {"TokenTrimmer"} for i in (3, 4, 5)},
                   **{f"text_{i}": {"TokenTrimmer", "HeadTrimmer"} for i in range(3)}}
    assert token_trimmer(model, "image_1").other_dim is None
    for key in ("image_3", "text_0"):
        assert token_trimmer(model, key).other_dim is not None


def test_meter_text_encoder_is_trimmed_with_masked_and_compacted_agreeing():
    """Token trimmers in RoBERTa remove text tokens there (fewer text tokens entering its
    second layer in eval), and they stay removed through fusion; the invariants hold
    (masked, compacted and packed agree, batching, padding content, remove)."""
    model = trimkit.apply(meter(), "smarttrim", stable_init=False,
                          layers={"image": [], "text": [0]})
    inputs = meter_inputs()
    with torch.no_grad():
        model(*inputs)
    text = {s.layer: s for s in trimkit.last_stats(model).layers if s.stream == "text"}
    real = inputs[2].sum(1)
    assert sorted(text) == [0, 1, 2, 3]
    kept = text[0].tokens_in  # entering layer 0's attention, after its trimmer
    assert bool((kept <= real).all()) and bool((kept < real).any())
    assert bool((kept >= 2).all())  # the CLS and one more
    for i in (1, 2, 3):  # still removed in the encoder's next layer and through fusion
        assert text[i].tokens_in.tolist() == kept.tolist()

    trimkit.remove(model)
    for options in (dict(stable_init=False), dict(stable_init=False, cross_modal=False),
                    dict(stable_init=False, budget=0.5)):
        check_invariants(lambda: meter(), inputs, "smarttrim", options, {},
                         perturb_padding=lambda a: (a[0], a[1].masked_fill(a[2] == 0, 42),
                                                    a[2]))


def test_meter_text_embeds_start_the_text_stream_at_fusion():
    """Given text_embeds (the text encoder's output, computed once), the text stream starts
    afresh at the first fusion layer in every call, with its padding, whatever the call
    before left: the same result as from the ids."""
    model = trimkit.apply(meter(), "smarttrim", stable_init=False,
                          layers={"image": [1, 2, 3], "text": [2, 3]})
    images, ids, mask = meter_inputs()
    with torch.no_grad():
        embeds = model.encode_text(ids, mask)  # nothing trimmed in the encoder here
        ref = model(images, ids, mask)
        for _ in range(2):
            out = model(images, attention_mask=mask, text_embeds=embeds)
            torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)
        assert sorted(s.layer for s in trimkit.last_stats(model).layers
                      if s.stream == "text") == [2, 3]


def test_the_text_encoder_is_left_alone_where_no_op_acts_in_it():
    """A recipe with nothing in the text encoder does not touch it (its attention keeps the
    model's implementation), so copies sharing one frozen encoder trim independently."""
    from trimkit.adapters.hf.attention import ATTN_IMPLEMENTATION

    model = trimkit.apply(meter(), "tome", r=2)
    assert model.text_transformer.config._attn_implementation != ATTN_IMPLEMENTATION
    assert not any(m._forward_pre_hooks for m in model.text_transformer.modules())
    trimkit.remove(model)
    model = trimkit.apply(model, "smarttrim")
    assert model.text_transformer.config._attn_implementation == ATTN_IMPLEMENTATION


# ------------------------------------------------------------------------------ reachability


def test_lowest_ratio_is_what_everything_trimmed_costs():
    """The floor of the cost model is the ratio a forward achieves with every trimmer at its
    minimum (one unprotected token, one head), trimmers included, from either entry of the
    text stream (ids, or text_embeds at the first fusion layer)."""
    model = trimkit.apply(meter(), "smarttrim", reach_tokens=7)
    all_off(model)
    applied = _applied(model)
    images, ids, mask = meter_inputs(1, padded=False)
    measured = []
    with torch.no_grad(), trimkit.trimming_disabled(model):
        embeds = model.encode_text(ids, mask)
    with torch.no_grad():
        for kwargs in (dict(input_ids=ids), dict(text_embeds=embeds)):
            with trimkit.recording_costs(model) as costs:
                model(images, attention_mask=mask, **kwargs)
            measured.append(float(costs.ratio()[0]))
    ops = {(s.stream, s.layer): list(s.pre) for s in model.trimkit.values()}
    floor = reach(applied.description, ops, applied.options)
    assert floor.ratio == pytest.approx(min(measured), rel=1e-6)
    assert floor.entries == {"image": 0, "text": 2 if measured[1] < measured[0] else 0}


def test_an_unreachable_ratio_is_refused_and_the_model_left_unchanged():
    """Fusion layers only, on a METER whose image tower holds most of the cost: the target
    is out of reach; apply says so, names the layers, and changes nothing."""
    model = meter(image_size=64, vision_layers=4, vision_width=64)
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    inputs = meter_inputs(image_size=64)
    with torch.no_grad():
        ref = model(*inputs)
    fusion = {"image": [4, 5], "text": [2, 3]}
    with pytest.raises(ValueError, match=r"ratio=0.3 is below .*image 0-3.*layers=") as err:
        trimkit.apply(model, "smarttrim", ratio=0.3, layers=fusion)
    assert "the default placement, layers=None, reaches" in str(err.value)
    assert not trimkit.is_applied(model)
    now = model.state_dict()
    assert list(now) == list(sd) and all(torch.equal(now[k], sd[k]) for k in sd)
    with torch.no_grad():
        assert torch.equal(model(*inputs), ref)
    assert not any("forward" in m.__dict__ for m in model.modules())
    # the default placement reaches it; no cost loss, no target to reach
    trimkit.remove(trimkit.apply(model, "smarttrim", ratio=0.3))
    trimkit.remove(trimkit.apply(model, "smarttrim", ratio=0.3, layers=fusion, lambda_cost=0))


def test_a_placement_that_cannot_save_says_turn_the_target_off():
    """A head trimmer on a one-head ViT costs something and saves nothing (floor above 1):
    no ratio is reachable, so the error points at lambda_cost=0, which applies."""
    from timm.models.vision_transformer import VisionTransformer

    model = VisionTransformer(img_size=16, patch_size=4, embed_dim=8, depth=2, num_heads=1,
                              num_classes=3).eval()
    with pytest.raises(ValueError, match=r"lambda_cost=0 \(these trimmers cost more"):
        trimkit.apply(model, "smarttrim", ratio=1.0, tokens=False, layers=[0])
    assert not trimkit.is_applied(model)
    trimkit.remove(trimkit.apply(model, "smarttrim", ratio=1.0, tokens=False, layers=[0],
                                 lambda_cost=0))


def test_train_checks_the_target_again():
    """A target set after apply (here in the applied options) is checked when trimkit.train
    builds the objective, before any step: the model is unchanged."""
    from torch.utils.data import DataLoader, TensorDataset

    model = meter(image_size=64, vision_layers=4, vision_width=64, tasks=("vqa",))
    trimkit.apply(model, "smarttrim", ratio=0.9, layers={"image": [4, 5], "text": [2, 3]})
    _applied(model).options["ratio"] = 0.3
    before = {k: v.clone() for k, v in model.state_dict().items()}
    images, ids, mask = meter_inputs(4, image_size=64)
    data = DataLoader(TensorDataset(images, ids, mask, torch.zeros(4, dtype=torch.long)),
                      batch_size=2)
    with pytest.raises(ValueError, match="ratio=0.3 is below"):
        trimkit.train(model, data, lambda out, b: out.logsumexp(-1).mean(), steps=1,
                      progress=False, cpu=True)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


# ------------------------------------------------------------------------------ ablations


def test_cross_modal_false_reads_no_other_stream():
    """Without cross-modal awareness a fusion layer's token trimmer reads only its own
    stream: its logits do not change with the other stream's tokens (they do with it)."""
    logits = {}
    for cross in (True, False):
        model = trimkit.apply(meter(), "smarttrim", stable_init=False, cross_modal=cross)
        trimmer = token_trimmer(model, "text_2")
        assert (trimmer.other_dim is not None) == cross
        site = model.trimkit["text_2"]
        state = trimkit.TokenState.start(torch.randn(2, 5, 32), num_protected=1)
        got = []
        for seed in (0, 1):
            other = torch.randn(2, 17, 32, generator=torch.Generator().manual_seed(seed))
            site.ctx.states["image"] = trimkit.TokenState.start(other, num_protected=1)
            with torch.no_grad():
                got.append(trimmer.logits(state, site))
        logits[cross] = got
        assert not any(isinstance(op, TokenTrimmer) and op.other_dim is not None
                       for s in model.trimkit.values() for op in s.pre) or cross
    assert not torch.equal(*logits[True])
    assert torch.equal(*logits[False])


def test_token_only_head_only_stable_init_and_self_distillation_switches():
    model = trimkit.apply(meter(), "smarttrim", heads=False)
    assert all(kinds == {"TokenTrimmer"} for kinds in placed(model).values())
    trimkit.remove(model)
    # heads alone cannot reach 0.5 (the FFNs stay): the check says so, a higher target runs
    with pytest.raises(ValueError, match="below"):
        trimkit.apply(model, "smarttrim", tokens=False, ratio=0.5)
    model = trimkit.apply(model, "smarttrim", tokens=False, ratio=0.9)
    assert all(kinds == {"HeadTrimmer"} for kinds in placed(model).values())
    trimkit.remove(model)

    model = trimkit.apply(model, "smarttrim", stable_init=False)
    with torch.no_grad():
        model(*meter_inputs())
    image = [s.tokens_in for s in trimkit.last_stats(model).layers if s.stream == "image"]
    assert bool((image[-1] < 17).all())  # trimming from the first step
    trimkit.remove(model)

    from trimkit.tools.training import objective_for

    model = trimkit.apply(model, "smarttrim", lambda_sd=0.0, warmup=0.0)
    objective = objective_for(model, lambda out, b: out.sum(), None, 10)
    assert objective.lambda_sd == 0.0 and objective.schedule(0) == 0.5
    model.train()
    _, logs = objective(model, meter_inputs() + (None,), 0)
    assert "sd" not in logs and logs["target"] == 0.5


def test_preset_paper_turns_the_stabilisers_off(monkeypatch):
    from trimkit.tools import training
    from trimkit.tools.training import objective_for

    assert PAPER == dict(anneal_noise=False, span=None, norm_pooled=False,
                         threshold_scale=1.0, lambda_cost=10.0)
    model = trimkit.apply(meter(tasks=("vqa",)), "smarttrim", preset="paper")
    options = _applied(model).options
    assert {k: options[k] for k in PAPER} == PAPER
    for site in model.trimkit.values():
        for op in site.pre:
            assert op.span is None
            if isinstance(op, TokenTrimmer):
                assert not op.norm_pooled and op.other_norm is None
    objective = objective_for(model, lambda out, b: out.sum(), None, 10)
    assert objective.noise is None and objective.lambda_cost == 10.0
    # unbounded: the logit is the threshold plus the raw score
    op = token_trimmer(model, "text_2")
    with torch.no_grad():
        op.local[-1].weight.fill_(10.0)
        state = trimkit.TokenState.start(torch.randn(1, 5, 32), num_protected=1)
        assert op.logits(state, model.trimkit["text_2"]).abs().max() > 4.0 + 6.0

    # trimkit.train trains the thresholds at the trimmers' learning rate
    seen = {}

    def groups(model, lr, *, trimmer_lr=None, threshold_lr=None):
        seen.update(trimmer_lr=trimmer_lr, threshold_lr=threshold_lr)
        raise RuntimeError("stop")

    monkeypatch.setattr(training, "param_groups", groups)
    with pytest.raises(RuntimeError, match="stop"):
        trimkit.train(model, torch.utils.data.DataLoader([0]), lambda o, b: o, steps=1,
                      trimmer_lr=1e-3, progress=False, cpu=True)
    assert seen == dict(trimmer_lr=1e-3, threshold_lr=1e-3)
    trimkit.remove(model)
    with pytest.raises(RuntimeError, match="stop"):
        trimkit.train(trimkit.apply(model, "smarttrim"), torch.utils.data.DataLoader([0]),
                      lambda o, b: o, steps=1, trimmer_lr=1e-3, progress=False, cpu=True)
    assert seen == dict(trimmer_lr=1e-3, threshold_lr=1e-2)
    trimkit.remove(model)

    # what is given explicitly wins over the preset
    model = trimkit.apply(model, "smarttrim", preset="paper", span=3.0, lambda_cost=100.0)
    options = _applied(model).options
    assert options["span"] == 3.0 and options["lambda_cost"] == 100.0
    assert options["anneal_noise"] is False
    assert all(op.span == 3.0 for s in model.trimkit.values() for op in s.pre)


def test_blip_text_and_keys_trimmers_agree_masked_and_compacted():
    """BLIP under the default placement, trimmers deciding at random: the invariants."""
    from blip_models import output

    args = blip_inputs("itm", 2, 6, True)
    check_invariants(lambda: make_blip("itm"), args, "smarttrim",
                     dict(stable_init=False), {}, output=output("itm"),
                     perturb_padding=lambda a: (a[0].masked_fill(a[3] == 0, 7), *a[1:]))


def test_expected_ratio_counts_the_text_encoder():
    """The cost ratio of a forward from the ids includes the text encoder's layers."""
    model = trimkit.apply(meter(), "smarttrim")
    ctx = _applied(model).ctx
    ctx.record_costs = True
    with torch.no_grad():
        model(*meter_inputs())
    assert {(c.stream, c.layer) for c in ctx.costs} >= {("text", 0), ("text", 1)}
    assert expected_ratio(_applied(model).description, ctx).shape == (3,)
    assert all(isinstance(op, (TokenTrimmer, HeadTrimmer)) for s in model.trimkit.values()
               for op in s.pre)
