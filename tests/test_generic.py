"""The generic adapter: discovery from fx graphs, the invariants (docs/architecture.md) on families
with no hand-written adapter, head pruning where it is safe, and errors that say what is missing."""

from __future__ import annotations

import pytest
import torch
from generic_models import ATTENTIONS, FAMILIES, VIT, TinyEncoder, TinyViT, inputs, jitter
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from timm.models.beit import Beit
from timm.models.deit import VisionTransformerDistilled
from timm.models.eva import Eva
from timm.models.vision_transformer import VisionTransformer
from torch import nn
from trimkit.adapters.generic import GenericAdapter

import trimkit
from trimkit.testing import check_invariants

SETTINGS = settings(max_examples=40, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.too_slow])
families = st.sampled_from(sorted(FAMILIES))


@SETTINGS
@given(families, st.integers(1, 3), st.integers(0, 4), st.sampled_from(["constant", "decreasing"]))
def test_tome_invariants(family, batch, r, schedule):
    make, kind, adapter = FAMILIES[family]
    check_invariants(jitter(make), inputs(kind, batch), "tome", dict(r=r, schedule=schedule),
                     dict(r=0), merges_only=True, adapter=adapter)


@SETTINGS
@given(families, st.integers(1, 3), st.floats(0.05, 1.0), st.booleans(),
       st.lists(st.integers(0, 1), min_size=1, max_size=2, unique=True))
def test_attn_prune_invariants(family, batch, keep, fuse, layers):
    make, kind, adapter = FAMILIES[family]
    check_invariants(jitter(make), inputs(kind, batch), "attn_prune",
                     dict(keep_ratio=keep, fuse=fuse, layers=layers), dict(keep_ratio=1.0),
                     adapter=adapter)


@SETTINGS
@given(families, st.integers(1, 3), st.sampled_from([None, 0.3, 0.75]), st.booleans(),
       st.booleans())
def test_smarttrim_invariants(family, batch, budget, tokens, heads):
    make, kind, adapter = FAMILIES[family]
    tokens = tokens or not heads
    # head trimmers alone leave the MLPs whole: the default ratio 0.5 is below their reach
    ratio = 0.5 if tokens else 0.9
    check_invariants(jitter(make), inputs(kind, batch), "smarttrim",
                     dict(stable_init=False, budget=budget, tokens=tokens, heads=heads,
                          ratio=ratio),
                     dict(tokens=tokens, heads=heads, ratio=ratio), adapter=adapter)


@SETTINGS
@given(families, st.integers(1, 3), st.floats(0.0, 0.5), st.booleans())
def test_pumer_invariants(family, batch, ratio, proportional):
    make, kind, adapter = FAMILIES[family]
    key = f"{kind}_merge_ratio"
    check_invariants(jitter(make), inputs(kind, batch), "pumer",
                     {key: ratio, "proportional": proportional, "layers": [0, 1]},
                     {key: 0.0}, merges_only=True, adapter=adapter)


# ------------------------------------------------------------------------------ discovery

@pytest.mark.parametrize("make", [
    lambda: VisionTransformer(**VIT, reg_tokens=2, qk_norm=True),
    lambda: VisionTransformerDistilled(**VIT),
    lambda: VisionTransformer(**VIT, class_token=False, global_pool="avg", init_values=0.5),
])
def test_generic_reads_what_the_hand_written_timm_adapter_states(make):
    """On timm ViTs, the graph gives the same layers, heads, widths, protected tokens and
    head layouts as the adapter written by hand."""
    model = make()
    hand, generic = trimkit.describe(model), trimkit.describe(model, "generic")
    assert hand.family == "timm-vit" and generic.family == "generic"
    a, b = hand.stream(), generic.stream()
    assert (b.name, b.num_protected) == (a.name, a.num_protected)
    for x, y in zip(a.layers, b.layers, strict=True):
        assert (y.block, y.attention, y.num_heads, y.dim, y.residual) == \
            (x.block, x.attention, x.num_heads, x.dim, x.residual)
        assert (y.heads.qkv, y.heads.out, y.heads.counts) == \
            (x.heads.qkv, x.heads.out, x.heads.counts)


def test_families_without_an_adapter_fall_back_to_the_generic_one():
    for name in ("prenorm-sdpa", "eva", "beit-relpos"):
        make, _, _ = FAMILIES[name]
        assert trimkit.find_adapter(make()).name == "generic", name
    beit = trimkit.describe(Beit(**VIT, use_rel_pos_bias=True)).stream()
    # its relative-position bias is a mask over the entry tokens: read at entry positions
    assert beit.positional and beit.num_protected == 1 and beit.layers[0].num_heads == 4
    enc = trimkit.describe(TinyEncoder()).stream()
    assert (enc.name, enc.num_protected, enc.layers[0].mlp_dim) == ("text", 0, 64)
    assert trimkit.describe(TinyEncoder(), GenericAdapter(num_protected=1)).stream() \
        .num_protected == 1


def test_post_norm_inside_the_attention_module_is_found():
    """A block whose attention child adds its input back and normalises itself (the
    BERT layout) trims that child's output, not a residual sum in the block."""

    class AddNormAttention(nn.Module):
        def __init__(self, dim: int):
            super().__init__()
            self.inner = ATTENTIONS["fused"](dim, 2)
            self.norm = nn.LayerNorm(dim)

        def forward(self, x):
            return self.norm(x + self.inner(x))

    class Layer(nn.Module):
        def __init__(self, dim: int):
            super().__init__()
            self.attention = AddNormAttention(dim)
            self.ffn = nn.Linear(dim, dim)

        def forward(self, x):
            return self.ffn(self.attention(x))

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = nn.ModuleList(Layer(16) for _ in range(2))

        def forward(self, x):
            for layer in self.layers:
                x = layer(x)
            return x[:, 0]

    layer = trimkit.describe(Net()).stream().layers[0]
    assert (layer.attention, layer.residual, layer.num_heads) == ("attention.inner", False, 2)
    check_invariants(jitter(Net), (torch.randn(2, 12, 16),), "tome", dict(r=2), dict(r=0),
                     merges_only=True)


# ------------------------------------------------------------------------------ head pruning

def _loss(out, *batch):
    return out.float().pow(2).mean()


@pytest.mark.parametrize("family", ["postnorm-softmax", "prenorm-mha-meanpool",
                                    "torch-encoder-postnorm"])
def test_prune_heads_where_the_graph_shows_the_layout(family):
    make, kind, adapter = FAMILIES[family]
    model = jitter(make)().eval()
    x = inputs(kind, 2)
    trimkit.apply(model, "prune_heads", ratio=0.5, data=[x], loss_fn=_loss,
                  adapter=adapter or "generic")
    assert [lay.num_heads for lay in trimkit.describe(model, adapter).stream().layers] == [2, 2]
    assert torch.isfinite(model(*x)).all()


def test_prune_heads_refuses_a_forward_that_reads_its_width_at_run_time():
    model = TinyViT(attention="fused").eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="reshapes the heads' outputs to a width"):
        trimkit.apply(model, "prune_heads", ratio=0.5, data=[inputs("image", 2)],
                      loss_fn=_loss)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


# ---------------------------------------------------------------------------------- errors

class _CrossBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.self_attn = nn.MultiheadAttention(16, 2, batch_first=True)
        self.cross = nn.MultiheadAttention(16, 2, batch_first=True)

    def forward(self, x):
        x = x + self.self_attn(x, x, x, need_weights=False)[0]
        return x + self.cross(x, x, x, need_weights=False)[0]


class _SeqFirstBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = nn.MultiheadAttention(16, 2)

    def forward(self, x):
        return x + self.attn(x, x, x, need_weights=False)[0]


class _MaskedBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = ATTENTIONS["fused"](16, 2)

    def forward(self, x, mask):
        return x + self.attn(x) * mask[..., None]


class _Gate(nn.Module):
    """Attention-like work behind data-dependent control flow: fx cannot trace it."""

    def forward(self, x):
        if x.sum() > 0:
            return x.softmax(dim=-1)
        return x


class _HiddenBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = ATTENTIONS["fused"](16, 2)
        self.gate = _Gate()

    def forward(self, x):
        return x + self.attn(x) + self.gate(x)


class _Stack(nn.Module):
    def __init__(self, block: type[nn.Module]):
        super().__init__()
        self.blocks = nn.ModuleList(block() for _ in range(2))

    def forward(self, x):
        for blk in self.blocks:
            x = blk(x)
        return x


@pytest.mark.parametrize("model, says", [
    (_Stack(_CrossBlock), "cross-attention needs a hand-written adapter"),
    (_Stack(_SeqFirstBlock), "batch_first=False"),
    (_Stack(_MaskedBlock), "takes further required inputs ['mask']"),
    (_Stack(_HiddenBlock), "blocks.0 has a module the graphs cannot read (blocks.0.gate)"),
    (nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU()), "no module computes an attention product"),
])
def test_what_the_generic_adapter_cannot_place_is_said_and_nothing_changes(model, says):
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(trimkit.UnsupportedModelError) as err:
        trimkit.apply(model, "tome", r=1)
    assert says in str(err.value) and "'generic' adapter" in str(err.value)
    assert "docs/adapters.md" in str(err.value)
    assert not trimkit.is_applied(model) and "trimkit" not in model._modules
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_rotary_embeddings_are_found_and_follow_the_tokens():
    """EVA-02 style rotary embeddings are per-token inputs: the generic adapter declares
    them (`LayerDesc.token_inputs`) and the engine gathers them at the trimmed tokens
    (tests/test_token_inputs.py checks the rest)."""
    model = Eva(**VIT, use_rot_pos_emb=True).eval()
    x = inputs("image", 2)
    ref = model(*x)
    trimkit.apply(model, "tome", r=2)
    assert [t.arg for t in trimkit.describe(model).stream().layers[1].token_inputs] == ["rope"]
    assert model(*x).shape == ref.shape
    with trimkit.trimming_disabled(model):
        assert torch.equal(model(*x), ref)
    trimkit.remove(model)
