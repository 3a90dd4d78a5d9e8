"""SmartTrim's learned trimmers, the cost model and the recipe's options (the invariants run
in the property tests of each adapter)."""

from __future__ import annotations

import math

import pytest
import timm
import torch
from trimkit.adapters.meter import METER, meter_tiny

import trimkit
from trimkit.api import _applied
from trimkit.cost import expected_ratio, layer_flops


def vit(depth: int = 4, heads: int = 4) -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32,
                             patch_size=4, embed_dim=16 * heads, depth=depth, num_heads=heads,
                             num_classes=5).eval()


def images(batch: int = 3) -> torch.Tensor:
    return torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def meter_inputs(batch: int = 3):
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(3, 100, (batch, 7), generator=g)
    mask = torch.ones(batch, 7, dtype=torch.long)
    mask[0, 4:] = 0
    return torch.randn(batch, 3, 32, 32, generator=g), ids.masked_fill(mask == 0, 1), mask


def perturb(model: torch.nn.Module, scale: float = 0.5) -> None:
    """Random trimmer weights, so that a stable-initialised trimmer starts deciding."""
    torch.manual_seed(3)
    with torch.no_grad():
        for p in model.trimkit.parameters():
            p.add_(torch.randn_like(p) * scale)


def test_stable_init_keeps_everything_and_gradients_reach_the_trimmers():
    model = trimkit.apply(vit(), "smarttrim")
    with torch.no_grad():
        model(images())
    stats = trimkit.last_stats(model).layers
    assert all(bool((s.tokens_in == 65).all()) for s in stats)
    assert all(isinstance(s.heads, int) or bool((s.heads == 4).all()) for s in stats)

    perturb(model, 0.1)
    model.train()
    ctx = _applied(model).ctx
    ctx.record_costs = True
    out = model(images())
    ratio = expected_ratio(_applied(model).description, ctx)
    (out.square().mean() + ratio.mean()).backward()
    grads = {n: p.grad for n, p in model.trimkit.named_parameters()}
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads.values())
    assert any(bool(g.abs().sum() > 0) for n, g in grads.items() if "local" in n)
    assert any(bool(g.abs().sum() > 0) for n, g in grads.items() if "mlp" in n)


def test_default_placement_skips_the_first_quarter_of_a_vit():
    model = trimkit.apply(vit(depth=8), "smarttrim")
    placed = sorted(int(k.split("_")[1]) for k, s in model.trimkit.items() if len(s.pre))
    assert placed == [2, 3, 4, 5, 6, 7]


def test_tokens_and_heads_can_name_streams():
    """``tokens=["image"]`` trims image tokens only; text layers keep their head trimmers."""
    from trimkit.learned import HeadTrimmer, TokenTrimmer

    meter = trimkit.apply(METER(meter_tiny()).eval(), "smarttrim", tokens=["image"])
    kinds = {k: {type(op) for op in s.pre} for k, s in meter.trimkit.items() if len(s.pre)}
    assert kinds["image_2"] == {TokenTrimmer, HeadTrimmer}
    assert kinds["text_0"] == kinds["text_1"] == {HeadTrimmer}
    with torch.no_grad():
        meter(*meter_inputs())
    text = [s for s in trimkit.last_stats(meter).layers if s.stream == "text"]
    assert all(s.tokens_in.tolist() == text[0].tokens_in.tolist() for s in text)
    for bad in (["audio"], 3):
        m = METER(meter_tiny()).eval()
        with pytest.raises(ValueError, match="tokens"):
            trimkit.apply(m, "smarttrim", tokens=bad)
        assert not trimkit.is_applied(m)


def test_training_masks_only_shrink_and_enter_attention_as_bias():
    model = trimkit.apply(vit(), "smarttrim", init_logit=0.0)
    perturb(model, 0.3)
    model.train()
    torch.manual_seed(0)
    model(images())
    stats = trimkit.last_stats(model).layers
    counts = [s.tokens_in for s in stats]
    assert all(bool((b <= a).all()) for a, b in zip(counts, counts[1:], strict=False))
    assert bool((counts[-1] < 65).any())
    state = trimkit.last_states(model)["image"]
    assert state.keep.dtype.is_floating_point and state.keep.shape == (3, 65)  # masked
    assert bool((state.keep[:, 0] == 1).all())  # CLS protected


def test_inference_counts_differ_per_instance_and_batches_pack_to_the_longest():
    model = trimkit.apply(vit(), "smarttrim", stable_init=False)
    with torch.no_grad():
        model(images(6))
    stats = trimkit.last_stats(model).layers
    assert any(len(set(s.tokens_in.tolist())) > 1 for s in stats)
    last = stats[-1]
    state = trimkit.last_states(model)["image"]
    assert state.x.shape[1] == int(last.tokens_out.max())


@pytest.mark.parametrize("frac", [0.25, 0.6])
def test_fixed_budget_keeps_the_same_fraction_per_instance(frac):
    model = trimkit.apply(vit(), "smarttrim", stable_init=False, budget=frac)
    with torch.no_grad():
        model(images(4))
    stats = trimkit.last_stats(model).layers
    n = 64  # unprotected tokens entering the first trimmed layer (layer 1)
    for s in stats[1:]:
        n = math.ceil(frac * n)
        assert s.tokens_in.tolist() == [n + 1] * 4
        assert s.heads.tolist() == [math.ceil(frac * 4)] * 4


def test_budget_per_layer_dict_and_option_errors():
    model = trimkit.apply(vit(), "smarttrim", stable_init=False,
                          budget={("image", 2): (0.5, 0.25)})
    with torch.no_grad():
        model(images(2))
    stats = trimkit.last_stats(model).layers
    assert stats[1].tokens_in.tolist() == [65, 65] and stats[2].tokens_in.tolist() == [33, 33]
    assert stats[2].heads.tolist() == [1, 1]
    for bad, match in ((dict(ratio=1.5), "ratio"), (dict(tau=0), "tau"), (dict(span=-1), "span"),
                       (dict(layers=[9]), "layers"), (dict(streams=["audio"]), "streams"),
                       (dict(tokens=False, heads=False), "tokens"), (dict(budget=2.0), "budget"),
                       (dict(ratoi=0.5), "ratoi")):
        m = vit()
        with pytest.raises(ValueError, match=match):
            trimkit.apply(m, "smarttrim", **bad)
        assert not trimkit.is_applied(m)


def gate_half_of_the_heads_off(model: torch.nn.Module) -> None:
    """Every head trimmer of ``model`` (stable init: its logits are its biases) keeps the first
    half of each attention's heads and gates the second half off, in every instance."""
    from trimkit.learned import HeadTrimmer

    for site in model.trimkit.values():
        for op in site.pre:
            if isinstance(op, HeadTrimmer):
                bias = [4.0] * (op.heads - op.heads // 2) + [-4.0] * (op.heads // 2)
                if op.cross_heads:
                    bias += [4.0] * (op.cross_heads - op.cross_heads // 2)
                    bias += [-4.0] * (op.cross_heads // 2)
                with torch.no_grad():
                    op.bias.copy_(torch.tensor(bias))


def test_a_head_off_in_every_instance_is_not_computed():
    """At inference a head gated off in the whole batch costs nothing: not its attention
    product, not its rows of the fused qkv projection, not its columns of the output
    projection (timm reshapes the qkv output to (B, N, 3, H, d): it still gets that shape).
    The output equals the masked execution that computes every head and zeroes the gated
    ones; the cost model counts what the FLOPs counter sees; `remove` restores it all."""
    model = trimkit.apply(vit(heads=4), "smarttrim", tokens=False, layers=[1, 2, 3],
                          lambda_cost=0)  # heads alone cannot reach the default target
    x = images(2)
    full = trimkit.count_flops(model, x)
    gate_half_of_the_heads_off(model)
    gated = trimkit.count_flops(model, x)
    with torch.no_grad():
        out = model(x)
        trimkit.set_mode(model, "masked")
        masked = model(x)
        trimkit.set_mode(model, "auto")
    n, dim, d = 65, 64, 16
    products, projections = 2 * 2 * n * n * d, 4 * 2 * n * dim * d  # one head, one instance
    assert full - gated == 3 * 2 * 2 * (products + projections)  # 3 layers, 2 heads, batch 2
    layer = _applied(model).description.stream().layers[1]
    saved = layer_flops(layer, n, n) - layer_flops(layer, n, n, heads=2)
    assert full - gated == 3 * 2 * saved
    torch.testing.assert_close(out, masked, atol=1e-5, rtol=0)

    # a site that records keys for its ops (they average over every head) computes every
    # head's q, k and v; the output projection still skips
    model.trimkit["image_1"].needs = frozenset({"keys"})
    assert trimkit.count_flops(model, x) - gated == 2 * 2 * 3 * 2 * n * dim * d
    model.trimkit["image_1"].needs = frozenset()

    # disabled trimming computes everything, whatever gates the last forward left
    with trimkit.trimming_disabled(model):
        assert trimkit.count_flops(model, x) == trimkit.count_flops(vit(heads=4), x)
    trimkit.remove(model)
    assert not any("forward" in m.__dict__ for m in model.modules())
    with torch.no_grad():
        torch.testing.assert_close(model(x), vit(heads=4)(x), atol=0, rtol=0)



def test_sliced_projection_weights_are_reused_and_follow_weight_changes():
    """Batches that keep the same heads reuse the sliced weights (no copy per forward); an
    in-place change of the weights is seen at the next forward."""
    model = trimkit.apply(vit(heads=4), "smarttrim", tokens=False, layers=[1], lambda_cost=0)
    gate_half_of_the_heads_off(model)
    x = images(2)
    qkv = model.blocks[1].attn.qkv
    with torch.no_grad():
        first = model(x)
        (w, _), = qkv.forward._cache.values()
        second = model(x)
        (w2, _), = qkv.forward._cache.values()
        assert w2 is w and torch.equal(first, second)
        qkv.weight.mul_(0.5)
        changed = model(x)
        (w3, _), = qkv.forward._cache.values()
        assert w3 is not w
        trimkit.set_mode(model, "masked")  # computes every head from the weights as they are
        torch.testing.assert_close(changed, model(x), atol=1e-5, rtol=0)
    assert not torch.allclose(changed, first)


def test_meter_skips_gated_off_heads_in_self_and_cross_attention():
    """METER, with head trimmers in a CLIP tower layer (nn.MultiheadAttention, routed through
    the core), in the RoBERTa text encoder (transformers' attention, through trimkit's
    AttentionInterface entry) and in the fusion layers (self-attention, and cross-attention
    whose k and v project the other stream): half of every attention's heads off in the
    whole batch saves their attention products and all their projections, as the cost model
    counts; outputs equal the masked execution; the cost ratio's savings are the measured
    ones."""
    torch.manual_seed(0)
    chosen = {"image": [1, 2, 3], "text": [0, 1, 2, 3]}
    model = trimkit.apply(METER(meter_tiny(num_heads=4, vision_heads=4)).eval(), "smarttrim",
                          tokens=False, layers=chosen, lambda_cost=0)
    pixels, ids, _ = meter_inputs(2)
    inputs = (pixels, ids, torch.ones_like(ids))  # no padding: 7 text tokens, 17 image tokens
    full = trimkit.count_flops(model, *inputs)
    gate_half_of_the_heads_off(model)
    gated = trimkit.count_flops(model, *inputs)

    desc = _applied(model).description
    tokens = {"image": 17, "text": 7}
    saved, by_formula = 0, 0
    for name, layers in chosen.items():
        for i in layers:
            layer = desc.streams[name].layers[i]
            n, dim, d = tokens[name], layer.dim, layer.head_dim
            off = layer.num_heads // 2
            m = tokens[layer.cross_stream] if layer.cross_stream else None
            saved += (layer_flops(layer, n, n, None, m, None)
                      - layer_flops(layer, n, n, layer.num_heads - off, m,
                                    None if m is None else layer.num_heads - off))
            by_formula += off * (4 * n * n * d + 8 * n * dim * d)  # self: products, q/k/v/out
            if m is not None:  # cross: products, q and out on n tokens, k and v on m keys
                by_formula += off * (4 * n * m * d + 4 * n * dim * d + 4 * m * dim * d)
    assert full - gated == 2 * saved == 2 * by_formula  # batch 2

    with torch.no_grad():
        out = model.infer(*inputs)
        trimkit.set_mode(model, "masked")
        masked = model.infer(*inputs)
        trimkit.set_mode(model, "auto")
    for key in ("text_feats", "image_feats", "cls_feats"):
        torch.testing.assert_close(out[key], masked[key], atol=1e-5, rtol=0)

    ctx = _applied(model).ctx
    ctx.record_costs = True
    with torch.no_grad():
        model(*inputs)
    for c in ctx.costs:
        c.trimmers = 0.0
    ratio = expected_ratio(desc, ctx)
    untrimmed = sum(layer_flops(desc.streams[c.stream].layers[c.layer], tokens[c.stream],
                                tokens[c.stream], None, tokens.get(desc.streams[c.stream]
                                                                   .layers[c.layer].cross_stream))
                    for c in ctx.costs)
    torch.testing.assert_close((1 - ratio) * untrimmed, torch.full((2,), float(saved)),
                               rtol=1e-5, atol=0)


def test_layer_flops_matches_the_flop_counter_for_a_block():
    model = vit(heads=4)
    block = model.blocks[0]
    layer = trimkit.describe(model).stream().layers[0]
    for n in (65, 20):
        with trimkit.api.flop_counter() as counter, torch.no_grad():
            block(torch.randn(1, n, 64))
        assert counter.get_total_flops() == layer_flops(layer, n, n)


def test_expected_ratio_is_the_cost_of_the_kept_tokens():
    """In eval with hard decisions, the cost ratio equals the described layers' FLOPs at the
    recorded counts over their FLOPs at the entry counts, per sample."""
    model = trimkit.apply(METER(meter_tiny()).eval(), "smarttrim", stable_init=False)
    ctx = _applied(model).ctx
    ctx.record_costs = True
    with torch.no_grad():
        model(*meter_inputs())
    ratio = expected_ratio(_applied(model).description, ctx)
    assert ratio.shape == (3,) and bool(((ratio > 0) & (ratio < 1)).all())
    trimkit.remove(model)
    model = trimkit.apply(model, "smarttrim")  # stable init: nothing trimmed
    ctx = _applied(model).ctx
    ctx.record_costs = True
    with torch.no_grad():
        model(*meter_inputs())
    desc = _applied(model).description
    with_trimmers = expected_ratio(desc, ctx)
    assert bool(((with_trimmers > 1) & (with_trimmers < 1.1)).all())  # their own cost
    for c in ctx.costs:
        c.trimmers = 0.0
    torch.testing.assert_close(expected_ratio(desc, ctx), torch.ones(3), atol=1e-6, rtol=0)


def test_trimmer_flops_match_the_flop_counter():
    """The trimmers' own cost, as the cost model counts it, is what the FLOPs counter sees."""
    model = trimkit.apply(METER(meter_tiny()).eval(), "smarttrim")
    site = model.trimkit["image_2"]
    state = trimkit.TokenState.start(torch.randn(2, 17, 32), num_protected=1)
    site.ctx.states["text"] = trimkit.TokenState.start(torch.randn(2, 5, 32), num_protected=1)
    for op in site.pre:
        with trimkit.api.flop_counter() as counter, torch.no_grad():
            op(state, site)
        assert counter.get_total_flops() == float(op.flops(torch.tensor([17.0]))[0]) * 2


# ------------------------------------------------------------------------------ training


def vqa_loader(n: int = 16, batch: int = 4):
    from torch.utils.data import DataLoader, TensorDataset

    g = torch.Generator().manual_seed(5)
    ids = torch.randint(3, 100, (n, 6), generator=g)
    mask = torch.ones(n, 6, dtype=torch.long)
    mask[::3, 4:] = 0
    data = TensorDataset(torch.randn(n, 3, 32, 32, generator=g), ids.masked_fill(mask == 0, 1),
                         mask, torch.randint(0, 7, (n,), generator=g))
    return DataLoader(data, batch_size=batch, shuffle=True)


def ce(out, batch):
    return torch.nn.functional.cross_entropy(out, batch[-1])


QUIET = dict(progress=False, seed=0, cpu=True)


def test_training_follows_the_curriculum_and_the_cost_loss_pulls_the_ratio_down():
    torch.manual_seed(0)
    # every layer but the first CLIP block samples its decisions (keep probability
    # sigmoid(init_logit) per layer at the start): start high enough to begin near 1
    model = trimkit.apply(METER(meter_tiny(tasks=("vqa",))), "smarttrim", ratio=0.4,
                          warmup=0.5, lambda_cost=100.0, init_logit=2.0)
    res = trimkit.train(model, vqa_loader(), ce, steps=30, lr=3e-3, **QUIET)
    targets = [h["target"] for h in res.history]
    assert targets[0] == 1.0 and targets[15:] == [0.4] * 15
    assert all(b <= a for a, b in zip(targets, targets[1:], strict=False))
    ratios = [h["ratio"] for h in res.history]
    assert max(ratios[:3]) > 0.75 and sum(ratios[-5:]) / 5 < 0.6
    assert {"task", "full", "sd"} <= set(res.history[-1])
    model.eval()
    with torch.no_grad():
        model(*meter_inputs())
    assert any(bool((s.tokens_in < s.tokens_in.max()).any()) or int(s.tokens_in.max()) < 17
               for s in trimkit.last_stats(model).layers if s.stream == "image")


def test_curriculum_switches_for_the_ablation():
    """warmup=0: the final target from step 0; stable_init=False: trimming from step 0."""
    torch.manual_seed(0)
    model = trimkit.apply(METER(meter_tiny(tasks=("vqa",))), "smarttrim", ratio=0.5,
                          warmup=0.0, stable_init=False)
    res = trimkit.train(model, vqa_loader(), ce, steps=2, lr=1e-3, **QUIET)
    assert [h["target"] for h in res.history] == [0.5, 0.5]
    assert res.history[0]["ratio"] < 0.9


def test_resume_continues_the_curriculum_and_the_optimizer(tmp_path):
    def run(steps, resume):
        torch.manual_seed(0)
        model = trimkit.apply(METER(meter_tiny(tasks=("vqa",))), "smarttrim", ratio=0.5,
                              warmup=1.0, init_logit=1.0)
        res = trimkit.train(model, vqa_loader(), ce, steps=steps, lr=1e-3,
                            checkpoint_dir=tmp_path / "ckpt", save_every=3, resume=resume,
                            **QUIET)
        return model, res

    full, res_full = run(6, False)
    resumed, res_resumed = run(6, tmp_path / "ckpt" / "step_3")
    assert [h["target"] for h in res_resumed.history] == [h["target"]
                                                          for h in res_full.history[3:]]
    for a, b in zip(full.parameters(), resumed.parameters(), strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)


def test_noise_annealing_reaches_the_inference_decisions():
    """With the Gumbel noise scaled to 0, a training forward makes exactly the decisions of
    inference (so the trained cost is the inference cost); the schedule goes 1 → 0."""
    from trimkit.learned import set_noise
    from trimkit.tools.objectives import NoiseSchedule

    sched = NoiseSchedule(1.0, 0.0, 10)
    assert [sched(0), sched(5), sched(10), sched(20)] == [1.0, 0.5, 0.0, 0.0]
    model = trimkit.apply(METER(meter_tiny()).eval(), "smarttrim", stable_init=False)
    inputs = meter_inputs()
    with torch.no_grad():
        model(*inputs)
        infer = [s.tokens_in.tolist() for s in trimkit.last_stats(model).layers]
        model.train()
        set_noise(model, 0.0)
        model(*inputs)
        train = [s.tokens_in.tolist() for s in trimkit.last_stats(model).layers]
    assert train == infer
