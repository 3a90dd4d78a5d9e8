"""SmartTrim's cost model against the FLOPs counter where heads are gated off: on talking
heads (CaiT, or a model only the generic adapter knows) a gated head still runs (its scores
feed every head through the mixes), so the cost counts it as running; on a plain ViT a head
gated off in the whole batch is skipped, and the cost counts it as saved. Either way the
ratio SmartTrim trains toward and reports is the one the counter measures."""

from __future__ import annotations

import pytest
import torch
from generic_models import TinyViT
from test_cait import factory as cait_factory
from test_cait import images as cait_images
from test_smarttrim import vit
from timm.models.cait import TalkingHeadAttn
from timm.models.vision_transformer import Attention

import trimkit
from trimkit.api import _applied
from trimkit.cost import layer_flops
from trimkit.learned import HeadTrimmer, TokenTrimmer


def gate_heads(model: torch.nn.Module, off: int) -> None:
    """Every head trimmer keeps all but its last ``off`` heads, in every instance (biases
    beyond the bounded input-dependent term)."""
    for site in model.trimkit.values():
        for op in site.pre:
            if isinstance(op, HeadTrimmer):
                with torch.no_grad():
                    op.bias.fill_(10.0)
                    op.bias[op.heads - off:op.heads] = -10.0


def block_flops(model: torch.nn.Module, x: torch.Tensor) -> float:
    """FLOPs the counter attributes to the described layers' blocks in one forward (the
    trimmers run inside them); the rest of the model is outside the cost model."""
    desc = _applied(model).description
    with torch.no_grad(), trimkit.api.flop_counter() as counter:
        model(x)
    counts = counter.get_flop_counts()
    prefix = type(model).__name__
    return float(sum(sum(counts.get(f"{prefix}.{layer.block}", {}).values())
                     for stream in desc.streams.values() for layer in stream.layers))


def reported_ratio(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The cost ratio SmartTrim's objective reads for one forward (`trimkit.recording_costs`)."""
    with torch.no_grad(), trimkit.recording_costs(model) as costs:
        model(x)
    return costs.ratio()


def test_layer_flops_counts_a_talking_heads_block_as_it_runs():
    """The counter's FLOPs of a CaiT block, mixes included, are the cost model's, and gating
    heads off changes neither."""
    model = cait_factory(heads=4, depth=1)().eval()
    layer = trimkit.describe(model).stream().layers[0]
    assert layer.mixes_heads
    for n in (16, 7):
        with trimkit.api.flop_counter() as counter, torch.no_grad():
            model.blocks[0](torch.randn(1, n, 64))
        assert counter.get_total_flops() == layer_flops(layer, n, n)
        assert layer_flops(layer, n, n, heads=1) == layer_flops(layer, n, n)


def tiny_vit(attention: str) -> torch.nn.Module:
    """A model only the generic adapter knows, its attentions timm's talking heads or timm's
    attention with a norm over all heads' outputs (its heads' projections cannot be told
    apart, so only their attention products are skipped)."""
    torch.manual_seed(0)
    model = TinyViT(dim=32, heads=4, depth=4)
    for blk in model.blocks:
        blk.attn = (TalkingHeadAttn(32, num_heads=4, qkv_bias=True) if attention == "talking"
                    else Attention(32, num_heads=4, qkv_bias=True, scale_norm=True,
                                   norm_layer=torch.nn.LayerNorm))
    return model.eval()


MODELS = {
    "cait": lambda: cait_factory(heads=4, depth=4)().eval(),
    "vit": lambda: vit(heads=4),
    "generic-talking-heads": lambda: tiny_vit("talking"),
    "generic-scale-norm": lambda: tiny_vit("scale_norm"),
}
#: where a gated-off head runs all the same
MIXING = {"cait", "generic-talking-heads"}


@pytest.mark.parametrize("family", sorted(MODELS))
def test_the_reported_cost_is_the_counted_cost_with_heads_gated_off(family: str):
    """Tokens trimmed and half the heads gated off at every trimmed layer, one instance: the
    ratio SmartTrim reports equals the counted FLOPs of the described layers (trimmers'
    own included) over their counted FLOPs untrimmed. Gating saves work where the heads do
    not mix and none where they do, and the reported ratio says so."""
    model = MODELS[family]()
    x = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    assert all(layer.mixes_heads == (2 if family in MIXING else 0)
               for layer in trimkit.describe(model).stream().layers)
    trimkit.apply(model, "smarttrim", stable_init=False, talking_heads=True, lambda_cost=0.0)
    assert any(isinstance(op, HeadTrimmer) for s in model.trimkit.values() for op in s.pre)
    with trimkit.trimming_disabled(model):
        full = block_flops(model, x)

    gate_heads(model, off=2)
    ratio = reported_ratio(model, x)
    stats = trimkit.last_stats(model).layers
    gated = [s for s in stats if not isinstance(s.heads, int)]
    assert gated and all(int(s.heads) == 2 for s in gated)
    assert min(int(s.tokens_in) for s in stats) < int(stats[0].tokens_in)
    torch.testing.assert_close(ratio, torch.tensor([block_flops(model, x) / full]),
                               rtol=1e-6, atol=0)

    # heads alone (token decisions follow the hidden states, which the gates change): what
    # gating saves in the whole model is what the reported ratio says it saves
    trimkit.remove(model)
    trimkit.apply(model, "smarttrim", tokens=False, talking_heads=True, lambda_cost=0.0)
    gate_heads(model, off=0)
    on, on_ratio = trimkit.count_flops(model, x), reported_ratio(model, x)
    gate_heads(model, off=2)
    off, off_ratio = trimkit.count_flops(model, x), reported_ratio(model, x)
    torch.testing.assert_close((on_ratio - off_ratio) * full,
                               torch.tensor([float(on - off)]), rtol=1e-6, atol=1e-3)
    if family in MIXING:
        assert off == on and float(on_ratio) > 1.0  # the trimmers' own cost, nothing saved
    else:
        assert off < on


def test_smarttrim_places_no_head_trimmers_on_talking_heads_by_default():
    """By default the head trimmers go only where gating saves work: none on CaiT. Asking
    for heads alone there is refused with the model unchanged; ``talking_heads=True``
    places them, and the reach check knows they save nothing."""
    model = cait_factory(heads=4, depth=4)().eval()
    (x,) = cait_images()(2)
    with torch.no_grad():
        ref = model(x)
    before = {k: v.clone() for k, v in model.state_dict().items()}

    trimkit.apply(model, "smarttrim")
    ops = [op for s in model.trimkit.values() for op in s.pre]
    assert ops and all(isinstance(op, TokenTrimmer) for op in ops)
    trimkit.remove(model)

    with pytest.raises(ValueError, match="talking_heads=True"):
        trimkit.apply(model, "smarttrim", tokens=False)
    with pytest.raises(ValueError, match="mixes its heads"):
        trimkit.apply(model, "smarttrim", tokens=False, heads=["image"])
    with pytest.raises(ValueError, match="cost more than they can save"):
        trimkit.apply(model, "smarttrim", tokens=False, talking_heads=True, ratio=0.9)
    assert not trimkit.is_applied(model)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    with torch.no_grad():
        assert torch.equal(model(x), ref)

    trimkit.apply(model, "smarttrim", tokens=False, talking_heads=True, lambda_cost=0.0)
    assert sum(isinstance(op, HeadTrimmer) for s in model.trimkit.values() for op in s.pre) == 3
