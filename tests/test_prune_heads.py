"""Static head pruning (``recipe="prune_heads"``): weights sliced for real, head counts
updated, a plain model afterwards (no hooks), state_dicts that reload, importance, errors."""

from __future__ import annotations

import copy

import pytest
import timm
import torch
from timm.layers.attention import Attention
from torch import nn
from trimkit.adapters.meter import METER, meter_tiny

import trimkit
from trimkit.cost import layer_flops
from trimkit.heads import PrunedMultiheadAttention, head_rows, prune_linear, select_heads
from trimkit.testing import check_invariants

D, H = 32, 4  # ViT width and heads: heads of width 8


def vit(gated: bool = False, **kw) -> nn.Module:
    torch.manual_seed(0)
    cfg = dict(img_size=32, patch_size=8, embed_dim=D, depth=2, num_heads=H, num_classes=5)
    cfg.update(kw)
    model = timm.models.vision_transformer.VisionTransformer(**cfg)
    if gated:  # a per-head output gate (timm's `gated` attention), sliced like q
        model.blocks[0].attn = Attention(D, H, qkv_bias=True, gated=True)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return model.eval()


def meter() -> nn.Module:
    torch.manual_seed(0)
    return METER(meter_tiny()).eval()  # hidden 32, 2 heads of 16 everywhere


def images(batch: int = 2) -> torch.Tensor:
    return torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def meter_inputs(batch: int = 2, t: int = 6):
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(3, 100, (batch, t), generator=g)
    mask = torch.ones(batch, t, dtype=torch.long)
    mask[0, 4:] = 0
    return torch.randn(batch, 3, 32, 32, generator=g), ids.masked_fill(mask == 0, 1), mask


def silence(out_proj: nn.Linear, head: int, width: int) -> None:
    """Make a head contribute nothing: zero its columns of the output projection."""
    with torch.no_grad():
        out_proj.weight[:, head * width:(head + 1) * width] = 0


def params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def no_trace_of_trimkit(model: nn.Module) -> None:
    assert not trimkit.is_applied(model)
    for m in model.modules():
        assert "forward" not in m.__dict__
        assert not m._forward_hooks and not m._forward_pre_hooks
        assert not isinstance(m, (trimkit.Site, trimkit.TokenOp))
    assert "trimkit" not in model._modules


# ---------------------------------------------------------------------------- engine pieces


def test_head_rows_and_prune_linear_slice_by_head():
    assert head_rows([1], 2, 3).tolist() == [2, 3]
    assert head_rows([0, 2], 2, 3, sections=3).tolist() == [0, 1, 4, 5, 6, 7, 10, 11, 12, 13,
                                                             16, 17]
    torch.manual_seed(0)
    qkv, proj = nn.Linear(6, 18), nn.Linear(6, 5)
    x = torch.randn(4, 6)
    q, k, v = qkv(x).unflatten(-1, (3, 3, 2)).unbind(1)  # 3 heads of width 2
    q2, k2, v2 = prune_linear(qkv, [0, 2], 2, sections=3)(x).unflatten(-1, (3, 2, 2)).unbind(1)
    for a, b in ((q, q2), (k, k2), (v, v2)):
        assert torch.equal(a[:, [0, 2]], b)
    ctx = torch.randn(4, 6)
    ctx[:, 2:4] = 0  # head 1 silent
    small = prune_linear(proj, [0, 2], 2, side="in")
    assert small.weight.shape == (5, 4) and proj.weight.shape == (5, 6)
    assert torch.allclose(small(ctx[:, [0, 1, 4, 5]]), proj(ctx), atol=1e-6)


@pytest.mark.parametrize("batch_first, kdim, bias", [(True, None, True), (False, None, False),
                                                     (True, 6, True)])
def test_pruned_multihead_attention_is_mha_without_the_silent_head(batch_first, kdim, bias):
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(12, 3, bias=bias, batch_first=batch_first, kdim=kdim,
                                vdim=kdim).eval()
    silence(mha.out_proj, 1, 4)
    q = torch.randn(2, 5, 12)
    kv = torch.randn(2, 4, kdim) if kdim else q
    if not batch_first:
        q, kv = q.transpose(0, 1), kv.transpose(0, 1)
    pad = torch.tensor([[False] * 4, [False, False, True, True]])
    if kdim is None:
        pad = torch.cat([pad, torch.zeros(2, 1, dtype=torch.bool)], 1)
    blocked = torch.rand(5, pad.shape[1]) > 0.7
    blocked[:, 0] = False
    ref = mha(q, kv, kv, key_padding_mask=pad, attn_mask=blocked, need_weights=False)[0]
    small = PrunedMultiheadAttention.from_module(mha, [0, 2])
    out, w = small(q, kv, kv, key_padding_mask=pad, attn_mask=blocked, need_weights=False)
    assert w is None and torch.allclose(out, ref, atol=1e-5)
    assert small.num_heads == 2 and small.head_dim == 4 and small.embed_dim == 12
    assert list(small.state_dict()) == list(mha.state_dict())
    assert params(mha) - params(small) == (3 * 4 * 12 if kdim is None else 4 * (12 + 2 * kdim)) \
        + 4 * 12 + (3 * 4 if bias else 0)


def test_select_heads_per_layer_and_global():
    scores = {("s", 0, "self"): [3.0, 1.0, 2.0, 0.0], ("s", 1, "self"): [0.0, 0.0, 0.0, 5.0]}
    assert select_heads(scores, 0.5) == {("s", 0, "self"): [0, 2], ("s", 1, "self"): [0, 3]}
    assert select_heads(scores, 0.1) == {("s", 0, "self"): [0], ("s", 1, "self"): [3]}
    # global: 3 of 8 heads; layer 1's zeros never beat layer 0's normalised scores
    assert select_heads(scores, 0.375, "global") == {("s", 0, "self"): [0, 2],
                                                     ("s", 1, "self"): [3]}
    assert select_heads(scores, 0.01, "global") == {("s", 0, "self"): [0], ("s", 1, "self"): [3]}


# ---------------------------------------------------------------------------- timm ViT


@pytest.mark.parametrize("gated", [False, True])
def test_vit_silent_heads_go_with_their_params_and_flops(gated):
    model = vit(gated)
    d = D // H
    silence(model.blocks[0].attn.proj, 1, d)
    silence(model.blocks[1].attn.proj, 3, d)
    x = images()
    with torch.no_grad():
        ref = model(x)
    p0, f0 = params(model), trimkit.count_flops(model, x)
    assert trimkit.apply(model, "prune_heads", heads={"image.0": [1], ("image", 1): [3]}) \
        is model
    with torch.no_grad():
        assert torch.allclose(model(x), ref, atol=1e-5)
    for blk in model.blocks:
        assert blk.attn.num_heads == H - 1 and blk.attn.attn_dim == (H - 1) * d
        assert blk.attn.qkv.weight.shape == (3 * (H - 1) * d, D)
        assert blk.attn.proj.weight.shape == (D, (H - 1) * d)
    assert [layer.num_heads for layer in trimkit.describe(model).stream().layers] == [H - 1] * 2
    # per removed head: q, k, v rows and biases, the output projection's columns, the gate's
    per_head = 3 * d * D + 3 * d + d * D
    assert params(model) == p0 - 2 * per_head - (d * D + d if gated else 0)
    n, b = 17, x.shape[0]
    flops = 2 * b * n * (4 * d * D) + 4 * b * n * n * d  # projections, scores and sum
    flops_gate = 2 * b * n * d * D if gated else 0
    assert f0 - trimkit.count_flops(model, x) == 2 * flops + flops_gate
    no_trace_of_trimkit(model)
    assert trimkit.pruned_heads(model) == {"image.0": [1], "image.1": [3]}


def test_vit_state_dict_reloads_after_repeated_pruning_and_other_recipes_apply():
    model = vit()
    trimkit.apply(model, "prune_heads", heads=[("image", 0, 1)])
    trimkit.apply(model, "prune_heads", heads={"image.0": [0], "image.1": [2, 3]})
    spec = trimkit.pruned_heads(model)
    assert spec == {"image.0": [0, 1], "image.1": [2, 3]}  # indices of the original heads
    fresh = vit()
    with torch.no_grad():
        fresh.blocks[0].attn.qkv.weight.mul_(2)  # shapes come from the spec, weights from sd
    trimkit.apply(fresh, "prune_heads", heads=spec)
    fresh.load_state_dict(model.state_dict())
    x = images()
    with torch.no_grad():
        assert torch.equal(fresh(x), model(x))
    check_invariants(lambda: copy.deepcopy(model), (x,), "tome", dict(r=2), dict(r=0),
                     merges_only=True)


def test_importance_ranks_an_important_head_above_a_silent_one():
    model = vit()
    d = D // H
    silence(model.blocks[0].attn.proj, 2, d)
    with torch.no_grad():
        model.blocks[0].attn.proj.weight[:, 0:d] *= 20  # head 0 now dominates the block
    for p in model.parameters():
        p.requires_grad_(False)  # frozen models work too, and no .grad is written
    data = [(images(2),), (images(3),)]
    scores = trimkit.head_scores(model.train(), data)  # scored in eval, mode given back
    assert model.training
    s0 = scores["image.0"]
    assert s0[2] == 0 and s0[0] == max(s0) and s0[0] > 0
    assert all(p.grad is None for p in model.parameters())
    model.eval()
    no_trace_of_trimkit(model)
    trimkit.apply(model, "prune_heads", ratio=0.5, data=data, layers=[0],
                  loss_fn=lambda out, batch: out.logsumexp(-1).sum())
    assert trimkit.pruned_heads(model)["image.0"] == sorted(
        set(range(H)) - set(select_heads({0: s0}, 0.5)[0]))
    assert 2 in trimkit.pruned_heads(model)["image.0"] and "image.1" not in \
        trimkit.pruned_heads(model)
    # explicit scores, global scope: the zero head of each layer goes first
    model = vit()
    scores = {"image.0": [1, 1, 0, 1], "image.1": [0, 1, 1, 1]}
    trimkit.apply(model, "prune_heads", ratio=0.75, scope="global", scores=scores)
    assert trimkit.pruned_heads(model) == {"image.0": [2], "image.1": [0]}


def test_unsupported_layouts_say_why():
    model = vit(scale_attn_norm=True)
    with pytest.raises(ValueError, match="scale_norm"):
        trimkit.apply(model, "prune_heads", heads={"image.0": [0]})
    with pytest.raises(ValueError, match="no attention .* can be head-pruned"):
        trimkit.apply(model, "prune_heads", ratio=0.5, scores={})


def snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}, dict(model.__dict__)


@pytest.mark.parametrize("kw, match", [
    (dict(), "needs heads=.* or ratio="),
    (dict(ratio=0.5), "exactly one of"),
    (dict(ratio=1.5, data=[]), "ratio"),
    (dict(ratio=0.5, data=[], scope="tree"), "scope"),
    (dict(ratio=0.5, data=[]), "no batch"),
    (dict(ratio=0.5, data=5), "iterable"),
    (dict(ratio=0.5, data=[(images(),)], loss_fn=3), "callable"),
    (dict(ratio=0.5, data=[(images(),)], loss_fn=lambda o, b: o), "scalar"),
    (dict(ratio=0.5, scores={"image.0": [1, 2]}), "4 finite"),
    (dict(ratio=0.5, scores={"image.0": [1, 2, 3, 4]}), "no entry for image.1"),
    (dict(ratio=0.5, scores={}, streams=["audio"]), "streams"),
    (dict(ratio=0.5, scores={}, layers=[7]), "layers"),
    (dict(heads={"image.0": [0]}, ratio=0.5), "one or the other"),
    (dict(heads={"image.0": [0, 1, 2, 3]}), "keep at least one"),
    (dict(heads={"image.0": [4]}), "out of range"),
    (dict(heads={"image.0": ["a"]}), "list of head indices"),
    (dict(heads={"image.5": [0]}), "layers 0..1"),
    (dict(heads={"image.0.cross": [0]}), "no cross-attention"),
    (dict(heads={"text.0": [0]}), "stream must be"),
    (dict(heads=[(0, 1, 2, 3, 4)]), "cannot read"),
    (dict(heads="image.0"), "must be a dict"),
    (dict(hedas={}), "no option 'hedas'"),
])
def test_bad_options_are_clear_and_change_nothing(kw, match):
    model = vit()
    x = images()
    with torch.no_grad():
        ref = model(x)
    snap = snapshot(model)
    with pytest.raises(ValueError, match=match):
        trimkit.apply(model, "prune_heads", **kw)
    sd, d = snap
    assert list(model.state_dict()) == list(sd)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in sd.items())
    assert set(model.__dict__) == set(d) and model.training is False
    no_trace_of_trimkit(model)
    with torch.no_grad():
        assert torch.equal(model(x), ref)


def test_one_shot_recipe_refuses_modes_and_trimmed_models():
    model = vit()
    with pytest.raises(ValueError, match="installs nothing"):
        trimkit.apply(model, "prune_heads", mode="compacted", heads={"image.0": [0]})
    trimkit.apply(model, "tome", r=1)
    with pytest.raises(ValueError, match="already has recipe 'tome'"):
        trimkit.apply(model, "prune_heads", heads={"image.0": [0]})
    trimkit.remove(model)
    assert model.blocks[0].attn.num_heads == H


# ---------------------------------------------------------------------------- METER


def test_meter_silent_heads_go_everywhere_and_the_model_reloads():
    model = meter()
    cfg = model.config
    d = cfg.hidden_size // cfg.num_heads
    w = cfg.vision_width // cfg.vision_heads
    silence(model.vit_model.transformer.resblocks[1].attn.out_proj, 0, w)
    silence(model.cross_modal_text_layers[0].attention.output.dense, 1, d)
    silence(model.cross_modal_image_layers[1].crossattention.output.dense, 0, d)
    r = cfg.text_hidden // cfg.text_heads
    silence(model.text_transformer.encoder.layer[1].attention.output.dense, 0, r)
    x = meter_inputs()
    with torch.no_grad():
        ref = model(*x)
    p0, f0 = params(model), trimkit.count_flops(model, *x)
    # the text stream is RoBERTa's 2 layers, then the fusion layers
    spec = {"image.1": [0], "text.1": [0], "text.2": [1], "image.3.cross": [0]}
    trimkit.apply(model, "prune_heads", heads=spec)
    with torch.no_grad():
        assert torch.allclose(model(*x), ref, atol=1e-5)
    mha = model.vit_model.transformer.resblocks[1].attn
    assert isinstance(mha, PrunedMultiheadAttention) and mha.num_heads == 1
    sa = model.cross_modal_text_layers[0].attention.self
    assert (sa.num_attention_heads, sa.all_head_size, sa.query.out_features) == (1, d, d)
    ca = model.cross_modal_image_layers[1].crossattention.self
    assert (ca.num_attention_heads, ca.all_head_size) == (1, d)
    layers = trimkit.describe(model).streams["image"].layers
    assert layers[1].num_heads == 1 and layers[3].cross_num_heads == 1 and layers[3].num_heads == 2
    roberta = model.text_transformer.encoder.layer[1].attention.self
    assert (roberta.num_attention_heads, roberta.all_head_size) == (1, r)
    assert trimkit.describe(model).streams["text"].layers[1].num_heads == 1
    # params: four heads' q, k, v (+ bias) and output columns
    assert p0 - params(model) == (2 * (4 * w * cfg.vision_width + 3 * w) + (4 * d * 32 + 3 * d)
                                  + (4 * r * 32 + 3 * r))
    b, n, t = 2, 17, 6  # image tokens, text tokens
    proj = lambda rows, width: 2 * b * rows * width * 32  # noqa: E731
    expected = (proj(n, 4 * w) + 4 * b * n * n * w  # CLIP block: q, k, v, out; attention
                + proj(t, 4 * r) + 4 * b * t * t * r  # RoBERTa self-attention
                + proj(t, 4 * d) + 4 * b * t * t * d  # text self-attention
                + proj(n, 2 * d) + proj(t, 2 * d) + 4 * b * n * t * d)  # image cross-attention
    assert f0 - trimkit.count_flops(model, *x) == expected
    no_trace_of_trimkit(model)
    assert trimkit.pruned_heads(model) == spec

    fresh = meter()
    trimkit.apply(fresh, "prune_heads", heads=trimkit.pruned_heads(model))
    fresh.load_state_dict(model.state_dict())
    with torch.no_grad():
        assert torch.equal(fresh(*x), model(*x))
        assert torch.equal(fresh.encode_image(x[0]), model.encode_image(x[0]))


def test_meter_ratio_from_data_then_tome_keeps_the_invariants():
    model = meter()
    x = meter_inputs()
    trimkit.apply(model, "prune_heads", ratio=0.5, data=[x], streams="image", cross=False)
    spec = trimkit.pruned_heads(model)
    assert sorted(spec) == [f"image.{i}" for i in range(4)]
    assert all(len(v) == 1 for v in spec.values())
    no_trace_of_trimkit(model)
    check_invariants(lambda: copy.deepcopy(model), x, "tome", dict(r=2), dict(r=0),
                     merges_only=True)


def test_cost_model_counts_the_pruned_width():
    model = meter()
    trimkit.apply(model, "prune_heads", heads={"image.2": [0], "image.3.cross": [1]})
    layers = trimkit.describe(model).streams["image"].layers
    x, y = torch.randn(1, 17, 32), torch.randn(1, 6, 32)
    on = torch.ones(1, 17, dtype=torch.bool), torch.ones(1, 6, dtype=torch.bool)
    for i in (2, 3):
        with trimkit.api.flop_counter() as counter, torch.no_grad():
            model.cross_modal_image_layers[i - 2](x, y, *on)
        assert counter.get_total_flops() == layer_flops(layers[i], 17, 17, cross_keys=6)
