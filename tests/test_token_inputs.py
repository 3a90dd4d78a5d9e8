"""Per-token side inputs (rotary tables, position ids) follow the tokens: the engine gathers
them at every layer (`trimkit.ops.gather_token_input`), the generic adapter finds them in
the fx graphs (`LayerDesc.token_inputs`), and timm's rotary ViTs (EVA-02, the RoPE ViTs)
pass the conformance kit with every token recipe. What the engine cannot follow, `apply`
refuses up front, leaving the model as it was."""

from __future__ import annotations

import generic_models
import pytest
import timm
import torch
import torch.nn.functional as F
from torch import nn

import trimkit
from trimkit.ops import drop_tokens, gather_token_input, merge_tokens
from trimkit.registry import RECIPES
from trimkit.sites import pack_state
from trimkit.state import TokenState
from trimkit.testing import check_adapter, check_invariants

TOKEN_RECIPES = {"tome", "attn_prune", "smarttrim", "pumer"}


def eva02() -> nn.Module:
    return timm.create_model("eva02_tiny_patch14_224", pretrained=False, img_size=42, depth=2)


def vit_rope() -> nn.Module:
    return timm.create_model("vit_small_patch16_rope_224", pretrained=False, img_size=48,
                             depth=2, embed_dim=64, num_heads=2)


def vit_rope_mixed() -> nn.Module:
    """Per-layer, per-head rotary tables (H×N×d): a table of another rank."""
    return timm.create_model("vit_small_patch16_rope_mixed_224", pretrained=False,
                             img_size=48, depth=2, embed_dim=64, num_heads=2)


ROTARY = {"eva02": (eva02, 42), "vit-rope": (vit_rope, 48), "vit-rope-mixed": (vit_rope_mixed, 48)}


def images(size: int):
    def make(b: int) -> tuple:
        return (torch.randn(b, 3, size, size, generator=torch.Generator().manual_seed(b)),)
    return make


# ------------------------------------------------------------------------ the gathering

def _state(b: int = 2, n: int = 6) -> TokenState:
    x = torch.randn(b, n, 4, generator=torch.Generator().manual_seed(0))
    return TokenState.start(x, num_protected=1, track_source=True)


def test_a_dropped_token_loses_its_row_a_merged_one_keeps_a_member_s_and_leading_tokens_get_none():
    state = _state()
    table = torch.arange(5.0)[:, None].expand(5, 3)  # rows for entry tokens 1..5 (not the CLS)
    drop = torch.zeros(2, 6, dtype=torch.bool)
    drop[0, 2] = drop[1, 4] = True
    state = drop_tokens(state, drop)
    state, _ = trimkit.ops.compact(state)
    out = gather_token_input(table, state, axis=-2, rank=3)
    assert out.shape == (2, 4, 3)  # per sample, one row per token after the CLS
    assert out[0, :, 0].tolist() == [0, 2, 3, 4] and out[1, :, 0].tolist() == [0, 1, 2, 4]
    # a 2-D table combined with per-head queries gains its batch axis and a head axis
    assert gather_token_input(table, state, axis=-2, rank=4).shape == (2, 1, 4, 3)
    # merged: token 3 into token 2, the pair keeps the destination's row (entry token 2's),
    # not its latest member's; and the other way round, token 2 into token 4
    merged = _state(1)
    one = torch.ones(1, 1, dtype=torch.bool)
    merged = merge_tokens(merged, torch.tensor([[3]]), torch.tensor([[2]]), one)
    merged, _ = trimkit.ops.compact(merged)
    assert merged.entry.tolist() == [[0, 1, 2, 4, 5]]
    rows = gather_token_input(table, merged, axis=-2, rank=3)[0, :, 0].tolist()
    assert rows == [0, 1, 3, 4]  # entry tokens 1, {2, 3} (at 2), 4, 5
    later = merge_tokens(_state(1), torch.tensor([[2]]), torch.tensor([[4]]), one)
    later, _ = trimkit.ops.compact(later)
    rows = gather_token_input(table, later, axis=-2, rank=3)[0, :, 0].tolist()
    assert rows == [0, 2, 3, 4]  # entry tokens 1, 3, {2, 4} (at 4), 5
    with pytest.raises(RuntimeError, match="3 lead uncovered"):
        gather_token_input(table[1:], state, leading=3)
    with pytest.raises(RuntimeError, match="7 rows"):
        gather_token_input(torch.zeros(7, 3), state)


def test_a_packed_stream_s_input_is_packed_with_the_same_segments():
    state = _state(3, 5)
    state = TokenState.start(state.x, num_protected=0, track_source=True)
    drop = torch.zeros(3, 5, dtype=torch.bool)
    drop[0, [1, 2, 3]] = drop[2, 0] = True
    state, _ = trimkit.ops.compact(drop_tokens(state, drop))
    packed = pack_state(state)
    assert tuple(packed.segments.lengths) == (2, 5, 4)
    table = torch.arange(5.0)[:, None]
    out = gather_token_input(table, packed, axis=-2, rank=3)
    assert out.shape == (1, 11, 1)
    assert out[0, :, 0].tolist() == [0, 4, 0, 1, 2, 3, 4, 1, 2, 3, 4]
    with pytest.raises(RuntimeError, match="packed"):
        gather_token_input(table[1:], packed, rank=3)


# ------------------------------------------------------------------ timm's rotary ViTs

@pytest.mark.parametrize("family", ["eva02", "vit-rope"])  # mixed: in the families test
def test_rotary_vits_pass_the_conformance_kit_with_every_token_recipe(family):
    """The generic adapter finds the rotary table each block receives and declares it; the
    invariants (masked, compacted, packed and auto agree; zero trimming is the identity;
    batch independence…) hold for tome, attn_prune, smarttrim and pumer."""
    make, size = ROTARY[family]
    model = make()
    desc = trimkit.find_adapter(model).describe(model)
    layers = desc.stream().layers
    assert all(layer.token_inputs and layer.token_inputs[0].arg == "rope" for layer in layers)
    report = check_adapter(generic_models.jitter(make), images(size),
                           recipes=sorted(TOKEN_RECIPES), max_examples=2, batch_sizes=(1, 3))
    assert report.adapter == "generic" and not report.failures
    assert TOKEN_RECIPES <= set(report.checked), report.summary()


def test_eva02_trims_and_its_rotary_rows_follow_the_tokens():
    """Trimmed for real (tokens dropped at the first layer), EVA-02's attention sees the
    rotary rows of the tokens that survived: the same output as the model run with those
    rows given by hand, through timm's own batched-rope path."""
    torch.manual_seed(0)
    model = eva02().eval()
    x = images(42)(2)[0]
    trimkit.apply(model, "attn_prune", keep_ratio=0.5, layers=[0])
    with torch.no_grad():
        out = model.forward_features(x)
    states = trimkit.last_states(model)["image"]
    live = states.source  # entry token -> slot, -1 once dropped
    assert (live < 0).any() and (live[:, 0] == 0).all()
    trimkit.remove(model)
    # by hand: run block 0 untrimmed, keep the same tokens, give block 1 their rows
    with torch.no_grad():
        h = model.norm_pre(model._pos_embed(model.patch_embed(x))[0])
        rope = model.rope.get_embed()
        h = model.blocks[0](h, rope=rope)
        kept = [torch.nonzero(live[i] >= 0).flatten() for i in range(2)]
        order = [k[torch.argsort(live[i][k])] for i, k in enumerate(kept)]
        h = torch.stack([h[i, o] for i, o in enumerate(order)])
        rows = torch.stack([rope[o[1:] - 1] for o in order])[:, None]
        ref = model.norm(model.blocks[1](h, rope=rows))
    assert torch.allclose(out[:, :1], ref[:, :1], atol=1e-5)


def test_a_merged_eva02_token_takes_its_destination_s_rotary_row_in_every_mode():
    """ToMe merges set A (even positions) into set B (odd ones): a merged token stands at
    its B destination's entry position, so the next block rotates it with the destination's
    row, not with its latest member's; masked, compacted and packed execution agree."""
    torch.manual_seed(0)
    model = eva02().eval()
    x = images(42)(3)[0]
    rope = model.rope.get_embed()
    trimkit.apply(model, "tome", r=[4], track_source=True)
    seen = []
    model.blocks[1].attn.register_forward_pre_hook(
        lambda m, a, k: seen.append(k["rope"]), with_kwargs=True)
    outs = {}
    with torch.no_grad():
        for mode in ("masked", "compacted", "packed"):
            trimkit.set_mode(model, mode)
            outs[mode] = model.forward_features(x)[:, 0]
            state = trimkit.last_states(model)["image"]
            if mode == "compacted":
                source, entry, rows = state.source, state.entry, seen[-1]
    assert torch.allclose(outs["masked"], outs["compacted"], atol=1e-5)
    assert torch.allclose(outs["packed"], outs["compacted"], atol=1e-5)
    later = 0  # groups whose latest member is not their destination
    for b in range(3):
        for slot in range(1, entry.shape[1]):
            members = torch.nonzero(source[b] == slot).flatten().tolist()
            dest = [e for e in members if e % 2] if len(members) > 1 else members
            assert len(dest) == 1 and entry[b, slot] == dest[0], (b, slot, members)
            assert torch.equal(rows[b, 0, slot - 1], rope[dest[0] - 1])
            later += max(members) != dest[0]
    assert later > 0


# ----------------------------------------- a table over every token: packed execution too

class _TableAttention(nn.Module):
    """Fused qkv, SDPA; an optional per-token table (N×d) added to q and k."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, table: torch.Tensor | None = None,
                extra: torch.Tensor | None = None) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        if table is not None:
            q, k = q + table, k * table.sigmoid()
        if extra is not None:  # a per-token input that reaches the values: cannot follow
            v = v + extra
        x = F.scaled_dot_product_attention(q, k, v)
        return self.proj(x.transpose(1, 2).reshape(b, n, c))


class _TableBlock(nn.Module):
    def __init__(self, dim: int, num_heads: int, misuse: str | None):
        super().__init__()
        self.misuse = misuse
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = _TableAttention(dim, num_heads)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, x: torch.Tensor, table: torch.Tensor | None = None) -> torch.Tensor:
        if self.misuse == "values":
            x = x + self.attn(self.norm1(x), extra=table)
        else:
            x = x + self.attn(self.norm1(x), table=table)
        if self.misuse == "mlp" and table is not None:  # shifts the MLP: cannot follow
            return x + self.mlp(self.norm2(x) + table.mean(-1, keepdim=True))
        return x + self.mlp(self.norm2(x))


class TableViT(nn.Module):
    """No CLS, mean pooling, a learnt per-token table (one row per patch) given to every
    block: a side input that covers every token, so the stream may pack."""

    def __init__(self, dim: int = 32, heads: int = 4, depth: int = 2, misuse: str | None = None):
        super().__init__()
        self.patch = nn.Conv2d(3, dim, 8, 8)
        self.table = nn.Parameter(torch.randn(16, dim // heads))
        self.blocks = nn.ModuleList(_TableBlock(dim, heads, misuse) for _ in range(depth))
        self.head = nn.Linear(dim, 5)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.patch(images).flatten(2).transpose(1, 2)
        for blk in self.blocks:
            x = blk(x, table=self.table)
        return self.head(x.mean(1))


class _DropNegative(trimkit.TokenOp):
    """Drops the tokens whose first feature is negative (the largest one stays): counts
    that differ per sample, whatever else is in the batch."""

    def forward(self, state, site):
        eligible = state.live & ~state.protected
        score = state.x[..., 0].masked_fill(~eligible, float("-inf"))
        top = score.argmax(1, keepdim=True)
        drop = eligible & (score < 0)
        return drop_tokens(state, drop.scatter(1, top, False))


class _Ragged(trimkit.Recipe):
    name = "_ragged_table"
    options = {"on": trimkit.Option(True, "trim or not")}

    def plan(self, desc, options):
        s = desc.stream()
        return {(s.name, 0): trimkit.SitePlan(post=[_DropNegative()] if options["on"] else [])}


def test_a_table_over_every_token_is_packed_with_its_stream():
    """A table that covers every token lets its stream pack: ragged counts per sample run
    packed, the table packed with the same segments, and agree with masked and compacted
    execution (invariant 5) and with each sample alone (6)."""
    model = TableViT()
    stream = trimkit.find_adapter(model).describe(model).stream()
    assert stream.layers[0].token_inputs[0].leading == 0 and not stream.positional
    make = generic_models.jitter(TableViT)
    x = images(32)(4)
    RECIPES[_Ragged.name] = _Ragged()
    try:
        check_invariants(make, x, _Ragged.name, {}, dict(on=False))
        model = trimkit.apply(make().eval(), _Ragged.name, mode="packed")
        seen = []
        model.blocks[1].attn.register_forward_pre_hook(
            lambda m, a, k: seen.append((a[0].shape, k["table"].shape)), with_kwargs=True)
        with torch.no_grad():
            model(*x)
        counts = trimkit.last_stats(model).layers[0].tokens_out.tolist()
        assert len(set(counts)) > 1  # ragged
        assert seen[0] == ((1, sum(counts), 32), (1, 1, sum(counts), 8))
    finally:
        del RECIPES[_Ragged.name]
    report = check_adapter(make, images(32), recipes=["tome"], max_examples=2)
    assert not report.failures and "tome" in report.checked


@pytest.mark.parametrize("family", sorted(ROTARY))
def test_rotary_vits_with_a_cls_run_packed_with_ragged_counts(family):
    """EVA-02's and the RoPE ViTs' tables leave the CLS uncovered; the generic adapter finds
    the row that leaves a token unrotated (sines 0, cosines 1), so the stream packs: the
    block after a ragged drop sees one 1×ΣN sequence and a table of ΣN − 1 rows (every
    sample's CLS but the first takes the neutral row), and packed, compacted and masked
    execution agree, also with each sample run alone."""
    make, size = ROTARY[family]
    make = generic_models.jitter(make)
    x = images(size)(4)
    stream = trimkit.find_adapter(make()).describe(make()).stream()
    spec = stream.layers[0].token_inputs[0]
    assert spec.leading is None and spec.neutral == "sin-cos" and stream.num_protected == 1
    RECIPES[_Ragged.name] = _Ragged()
    try:
        torch.manual_seed(0)
        model = trimkit.apply(make().eval(), _Ragged.name)
        seen = []
        model.blocks[1].attn.register_forward_pre_hook(
            lambda m, a, k: seen.append((a[0].shape, k["rope"].shape)), with_kwargs=True)
        outs = {}
        with torch.no_grad():
            for mode in ("packed", "compacted", "masked"):
                trimkit.set_mode(model, mode)
                outs[mode] = model(*x)
                if mode == "packed":
                    counts = trimkit.last_stats(model).layers[0].tokens_out.tolist()
            alone = torch.cat([model(x[0][i:i + 1]) for i in range(4)])
    finally:
        del RECIPES[_Ragged.name]
    assert len(set(counts)) > 1  # ragged
    total = sum(counts)
    assert seen[0][0] == (1, total, model.embed_dim) and seen[0][1][-2] == total - 1
    assert seen[1][0][:2] == (4, max(counts))  # compacted: padded to the longest
    for mode in ("compacted", "masked"):
        assert torch.allclose(outs["packed"], outs[mode], atol=1e-5), mode
    assert torch.allclose(outs["packed"], alone, atol=1e-5)


# ------------------------------------------------------------- apply refuses up front

CANNOT_FOLLOW = {
    "values": "neither masks the scores nor acts on the queries and keys only",
    "mlp": "uses its input 'table' outside its attention",
}


@pytest.mark.parametrize("misuse", sorted(CANNOT_FOLLOW))
def test_an_input_the_engine_cannot_follow_is_refused_by_apply(misuse):
    model = TableViT(misuse=misuse)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(trimkit.UnsupportedModelError, match=CANNOT_FOLLOW[misuse]):
        trimkit.apply(model, "tome", r=1)
    assert not trimkit.is_applied(model) and "trimkit" not in model._modules
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert "forward" not in model.blocks[0].__dict__


def _families() -> dict:
    """name -> (factory, inputs of a batch of 2, adapter to force)"""
    fams = {name: (f, generic_models.inputs(kind, 2), adapter)
            for name, (f, kind, adapter) in generic_models.FAMILIES.items()}
    fams.update({name: (make, images(size)(2), None) for name, (make, size) in ROTARY.items()})
    fams.update({"table": (TableViT, images(32)(2), None),
                 **{f"table-{m}": (lambda m=m: TableViT(misuse=m), images(32)(2), None)
                    for m in CANNOT_FOLLOW}})
    return fams


#: options that trim for real on the tiny models (smarttrim's default ratio may be refused)
OPTIONS = {"tome": dict(r=2), "attn_prune": dict(keep_ratio=0.5, layers=[0]),
           "smarttrim": dict(ratio=0.9), "pumer": {}}


def test_the_generic_adapter_s_families_either_run_trimmed_or_are_refused_by_apply():
    """Never accepted and then failing at the first forward: for each family and token
    recipe, `apply` either raises with the model unchanged, or every execution mode runs a
    batch and trims."""
    accepted, refused = set(), set()
    for name, (make, x, adapter) in _families().items():
        torch.manual_seed(0)
        model = make().eval()  # one instance: the generic adapter reads its graphs once
        before = {k: v.clone() for k, v in model.state_dict().items()}
        for recipe, options in OPTIONS.items():
            try:
                trimkit.apply(model, recipe, adapter=adapter, **options)
            except (trimkit.UnsupportedModelError, ValueError):
                assert not trimkit.is_applied(model), (name, recipe)
                assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
                refused.add((name, recipe))
                continue
            with torch.no_grad():
                for mode in ("compacted", "masked", "packed"):
                    trimkit.set_mode(model, mode)
                    assert torch.isfinite(model(*x)).all(), (name, recipe, mode)
                    layers = trimkit.last_stats(model).layers
                    if recipe == "tome":  # it trimmed
                        assert (layers[-1].tokens_out < layers[0].tokens_in).all(), name
            accepted.add((name, recipe))
            trimkit.remove(model)
    names = {n for n, _ in accepted}
    assert {"eva02", "vit-rope", "vit-rope-mixed", "eva", "beit-relpos", "table"} <= names
    assert {n for n, _ in refused} >= {f"table-{m}" for m in CANNOT_FOLLOW}
    assert all(("eva02", r) in accepted for r in ("tome", "attn_prune", "smarttrim"))
