"""PuMer: the reducers' counts, placement on METER and BLIP, the merging half on single-stream
models, padding, option errors, and fine-tuning with KL from the untrimmed model."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from blip_models import inputs as blip_inputs
from blip_models import make as make_blip
from hypothesis import given, settings
from hypothesis import strategies as st
from trimkit.adapters.meter import METER, meter_tiny

import trimkit
from trimkit.api import SITES_ATTR
from trimkit.ops import bipartite_soft_matching, merge_count
from trimkit.sites import CrossScores, Site
from trimkit.state import TokenState
from trimkit.trimmers import MergeTokens, ReduceByCrossAttention

PROPS = settings(max_examples=60, deadline=None, derandomize=True)


def _site_with_scores(state: TokenState, scores: torch.Tensor, keys: torch.Tensor,
                      pair: int = 0) -> Site:
    site = Site("image", 3, 2)
    site.ctx.cross_scores[("image", pair)] = CrossScores(scores, keys)
    return site


def _image_state(batch: int, n: int, protected: int, seed: int) -> tuple:
    g = torch.Generator().manual_seed(seed)
    state = TokenState.start(torch.randn(batch, n, 4, generator=g), num_protected=protected)
    return state, torch.rand(batch, n, generator=g), torch.randn(batch, n, 6, generator=g)


@PROPS
@given(st.integers(1, 3), st.integers(1, 300), st.integers(0, 1), st.floats(0.0, 1.0),
       st.floats(0.0, 1.0), st.integers(0, 99))
def test_image_reducer_counts_match_the_formula_for_every_length(batch, n, protected, p, m,
                                                                 seed):
    """Of N unprotected tokens: keep N - round(p*N) (at least 1) by score, then merge
    min(round(m*N), kept // 2) pairs; protected tokens stay."""
    state, scores, keys = _image_state(batch, n + protected, protected, seed)
    op = ReduceByCrossAttention(p, m, pair=0)
    out = op(state, _site_with_scores(state, scores, keys))
    kept = max(n - round(p * n), 1) if p > 0 else n
    merged = min(round(m * n), kept // 2) if m > 0 else 0
    live = out.live & ~out.protected
    assert live.sum(1).tolist() == [kept - merged] * batch
    assert out.live[:, :protected].all()
    assert torch.allclose((out.size * out.live).sum(1), torch.full((batch,), float(
        kept + protected)))  # merging conserves what pruning kept
    if m == 0:  # the kept ones are the top scores
        top = scores[:, protected:].topk(kept, dim=1).indices + protected
        assert out.live.gather(1, top).all()


@PROPS
@given(st.lists(st.integers(1, 40), min_size=1, max_size=4), st.floats(0.0, 1.0),
       st.integers(0, 99))
def test_text_merging_never_mixes_padding_and_real_tokens(lengths, t, seed):
    """round(t*T) merges of each sample's T real unprotected tokens, capped at T // 2; every
    merged token covers real positions only, and real sizes are conserved."""
    n = max(lengths) + 1
    g = torch.Generator().manual_seed(seed)
    real = torch.arange(n)[None] < torch.tensor(lengths)[:, None] + 1
    state = TokenState.start(torch.randn(len(lengths), n, 4, generator=g), num_protected=1,
                             padding_mask=~real, track_source=True)
    site = Site("text", 0, 2)
    site.captured["keys"] = torch.randn(len(lengths), n, 6, generator=g)
    out = MergeTokens(ratio=t)(state, site)
    for b, length in enumerate(lengths):
        r = min(round(t * length), length // 2) if t > 0 else 0
        assert int(out.live[b].sum()) == length + 1 - r
        covered = out.source[b]
        assert (covered[length + 1:] == -1).all()  # padding covers into nothing
        assert (covered[: length + 1] >= 0).all()
        live_slots = out.live[b].nonzero().flatten()
        assert set(covered[covered >= 0].tolist()) <= set(live_slots.tolist())
    assert torch.equal((out.size * out.live).sum(1), real.sum(1).float())


def test_per_sample_merge_counts_are_the_batch_counts_of_each_sample_alone():
    g = torch.Generator().manual_seed(0)
    metric = torch.randn(3, 12, 5, generator=g)
    eligible = torch.arange(12)[None] < torch.tensor([[12], [7], [3]])
    r = merge_count(eligible, 0.4)
    assert r.tolist() == [min(round(0.4 * e), e // 2) for e in (12, 7, 3)]
    src, dst, valid = bipartite_soft_matching(metric, r, eligible)
    for b in range(3):
        s1, d1, v1 = bipartite_soft_matching(metric[b:b + 1], int(r[b]), eligible[b:b + 1])
        assert valid[b].sum() == v1.sum() == r[b]
        pairs = set(zip(src[b][valid[b]].tolist(), dst[b][valid[b]].tolist(), strict=True))
        assert pairs == set(zip(s1[0][v1[0]].tolist(), d1[0][v1[0]].tolist(), strict=True))


def test_a_reducer_without_its_cross_attention_read_says_so():
    state, scores, keys = _image_state(2, 9, 1, 0)
    site = Site("image", 4, 2)
    with pytest.raises(RuntimeError, match="no cross-attention of that pair"):
        ReduceByCrossAttention(0.2, 0.2, pair=1)(state, site)
    site.ctx.cross_scores[("image", 1)] = CrossScores(scores[:, :5], keys[:, :5])
    with pytest.raises(RuntimeError, match="read 5"):
        ReduceByCrossAttention(0.2, 0.2, pair=1)(state, site)


# ------------------------------------------------------------------------------ METER


def _meter(fusion: int = 6, image_size: int = 64) -> METER:
    torch.manual_seed(0)
    return METER(meter_tiny(image_size=image_size, num_fusion_layers=fusion)).eval()


def _meter_inputs(lengths=(12, 7, 3), image_size: int = 64) -> tuple:
    g = torch.Generator().manual_seed(0)
    t = max(lengths)
    images = torch.randn(len(lengths), 3, image_size, image_size, generator=g)
    ids = torch.randint(3, 100, (len(lengths), t), generator=g)
    mask = (torch.arange(t)[None] < torch.tensor(lengths)[:, None]).long()
    return images, ids.masked_fill(mask == 0, 1), mask


def _plan(model) -> dict:
    sites = getattr(model, SITES_ATTR)
    return {k: ([type(o).__name__ for o in s.pre], [type(o).__name__ for o in s.post])
            for k, s in sites.items() if len(s.pre) or len(s.post)}


@pytest.mark.parametrize("image_size", [32, 48, 64])
def test_meter_default_placement_and_counts_per_layer(image_size):
    """Fusion blocks 0-3: the text layer merges after its cross-attention; the image layer
    beside it reduces before its attention, by what the text layer's cross-attention saw.
    Every count follows the formula, the same for the whole batch."""
    model = trimkit.apply(_meter(image_size=image_size), "pumer")
    # each stream's layers: its encoder's first (CLIP tower, text encoder), then the fusion
    vision, text = model.config.vision_layers, model.config.text_layers
    assert _plan(model) == {
        **{f"text_{text + i}": ([], ["MergeTokens"]) for i in range(4)},
        **{f"image_{vision + i}": (["ReduceByCrossAttention"], []) for i in range(4)}}
    args = _meter_inputs(image_size=image_size)
    with torch.no_grad():
        model(*args)
    stats = {(s.stream, s.layer): s for s in trimkit.last_stats(model).layers}
    n = (image_size // model.config.patch_size) ** 2
    for i in range(6):
        got = stats[("image", vision + i)].tokens_in
        if i < 4:
            kept = max(n - round(0.2 * n), 1)
            n = kept - min(round(0.2 * (n)), kept // 2)
        assert got.tolist() == [n + 1] * 3, f"fusion layer {i}"
    real = args[2].sum(1).tolist()
    t = [length - 1 for length in real]
    for i in range(6):
        if i < 4:
            t = [e - min(round(0.2 * e), e // 2) for e in t]
        assert [int(v) - 1 for v in stats[("text", text + i)].tokens_out] == t, \
            f"text layer {i}"


def test_meter_batch_stays_dense_and_matches_masked_execution():
    model = trimkit.apply(_meter(), "pumer", text_merge_ratio=0.0)
    args = _meter_inputs(lengths=(9, 9, 9))
    with torch.no_grad():
        out = model(*args)
        states = trimkit.last_states(model)
        assert not states["image"].has_dead and not states["text"].has_dead  # dense
        trimkit.set_mode(model, "masked")
        assert torch.allclose(model(*args), out, atol=1e-5)


def test_scored_cross_attention_equals_the_fused_product():
    """Scoring keys writes the cross-attention out; with nothing pruned or merged the
    model's output is the untrimmed one."""
    base = _meter()
    args = _meter_inputs()
    with torch.no_grad():
        ref = base(*args)
        model = trimkit.apply(copy.deepcopy(base), "pumer", prune_ratio=1e-6,
                              image_merge_ratio=0.0, text_merge_ratio=0.0)
        out = model(*args)
    assert trimkit.api._applied(model).ctx.scored == {"image"}
    assert torch.allclose(out, ref, atol=1e-5)


def test_prune_scores_are_the_attention_real_text_pays_each_image_token():
    """The recorded scores equal the cross-attention map computed by hand from the text
    layer's own projections, averaged over heads and real text tokens only."""
    model = trimkit.apply(_meter(fusion=1), "pumer")
    images, ids, mask = _meter_inputs()
    with torch.no_grad():
        model(images, ids, mask)
        ctx = trimkit.api._applied(model).ctx
        got = ctx.cross_scores[("image", 0)].scores
        trimkit.remove(model)
        x = model.cross_modal_text_transform(model.encode_text(ids, mask))
        x = x + model.token_type_embeddings.weight[0]
        y = model.cross_modal_image_transform(model.encode_image(images))
        y = y + model.token_type_embeddings.weight[1]
        layer = model.cross_modal_text_layers[0]
        h = layer.attention(x, mask.bool())
        att = layer.crossattention.self
        heads, d = att.num_attention_heads, att.attention_head_size
        q = att.query(h).unflatten(-1, (heads, d)).transpose(1, 2)
        k = att.key(y).unflatten(-1, (heads, d)).transpose(1, 2)
        probs = torch.softmax(q @ k.transpose(-1, -2) / d ** 0.5, -1).mean(1)  # B×T×N
        w = mask.float()
        want = (probs * w[..., None]).sum(1) / w.sum(1, keepdim=True)
    assert torch.allclose(got, want, atol=1e-5)


# ------------------------------------------------------------------------------- BLIP


def test_blip_image_reducers_sit_before_the_next_text_layer_reads_the_image():
    model = trimkit.apply(make_blip("vqa", layers=4, image_size=48), "pumer")
    # fusion layers 0, 1, 2 (default for 4 text layers); image layers 0-3 are the vision
    # tower, 4-7 the keys-only layers of text layers 0-3
    assert _plan(model) == {
        "text_0": ([], ["MergeTokens"]), "text_1": ([], ["MergeTokens"]),
        "text_2": ([], ["MergeTokens"]),
        "image_5": (["ReduceByCrossAttention"], []), "image_6": (["ReduceByCrossAttention"], []),
        "image_7": (["ReduceByCrossAttention"], [])}
    args = blip_inputs("vqa", 2, 8, False, 48)
    with torch.no_grad():
        model(*args)
    stats = {(s.stream, s.layer): s.tokens_in.tolist() for s in trimkit.last_stats(model).layers}
    n = 36
    assert stats[("image", 4)] == [n + 1] * 2
    for layer in (5, 6, 7):
        kept = max(n - round(0.2 * n), 1)
        n = kept - min(round(0.2 * n), kept // 2)
        assert stats[("image", layer)] == [n + 1] * 2


def test_blip_last_fusion_layer_reduces_only_the_text():
    model = trimkit.apply(make_blip("itm", layers=2), "pumer", layers=[1])
    assert _plan(model) == {"text_1": ([], ["MergeTokens"])}


def test_blip_captioning_gets_the_merging_half_in_the_vision_tower():
    model = make_blip("caption", layers=4)
    with pytest.raises(ValueError, match="prune_ratio needs text that cross-attends"):
        trimkit.apply(model, "pumer", prune_ratio=0.2)
    assert not trimkit.is_applied(model)
    trimkit.apply(model, "pumer")
    assert _plan(model) == {f"image_{i}": ([], ["MergeTokens"]) for i in (0, 1, 2)}


# ----------------------------------------------------------------- single stream, errors


def test_single_stream_default_layers_are_the_same_relative_depths():
    import timm

    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32,
                            patch_size=8, depth=12, num_classes=3).eval()
    trimkit.apply(vit, "pumer")
    assert _plan(vit) == {f"image_{i}": ([], ["MergeTokens"]) for i in (0, 2, 4, 6)}
    with torch.no_grad():
        vit(torch.randn(2, 3, 32, 32))
    stats = {s.layer: s.tokens_out.tolist() for s in trimkit.last_stats(vit).layers}
    assert stats[0] == [16 + 1 - round(0.2 * 16)] * 2


@pytest.mark.parametrize("options, match", [
    (dict(prune_ratio=1.5), "prune_ratio must be a number in"),
    (dict(image_merge_ratio=-0.1), "image_merge_ratio must be"),
    (dict(text_merge_ratio="a"), "text_merge_ratio must be"),
    (dict(layers=[6]), r"layers must be indices in \[0, 6\) of the fusion stack"),
    (dict(teacher="ema"), "teacher must be 'frozen' or 'self'"),
    (dict(ratio=0.5), "has no option 'ratio'"),
])
def test_bad_options_are_refused_and_change_nothing(options, match):
    model = _meter()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    forward = model.forward
    with pytest.raises(ValueError, match=match):
        trimkit.apply(model, "pumer", **options)
    assert not trimkit.is_applied(model) and model.forward == forward
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


# ---------------------------------------------------------------------------- training


def _batches(n: int, batch: int = 4):
    g = torch.Generator().manual_seed(1)
    for _ in range(n):
        images, ids, mask = _meter_inputs(lengths=tuple(int(v) for v in torch.randint(
            3, 10, (batch,), generator=g)), image_size=32)
        yield images, ids, mask, torch.randint(0, 7, (batch,), generator=g)


def _loss(out, batch):
    return F.cross_entropy(out, batch[-1])


@pytest.mark.parametrize("teacher", ["frozen", "self"])
def test_fine_tune_with_kl_from_the_untrimmed_model(teacher, tmp_path):
    """`trimkit.train` runs the reducers (hard, fixed counts) with KL from the untrimmed
    model; a frozen teacher keeps the starting weights (and resumes with them)."""
    torch.manual_seed(0)
    base = METER(meter_tiny(image_size=32, num_fusion_layers=2, drop_rate=0.0))
    start = copy.deepcopy(base).eval()
    model = trimkit.apply(base, "pumer", teacher=teacher)
    data = list(_batches(6))
    loader = torch.utils.data.DataLoader(data, batch_size=None)
    res = trimkit.train(model, loader, _loss, steps=6, lr=1e-3, cpu=True, seed=0,
                        checkpoint_dir=tmp_path, save_every=3)
    assert {"task", "sd"} <= set(res.history[-1]) and "ratio" not in res.history[-1]
    now, before = model.state_dict(), start.state_dict()
    assert set(before) <= set(now)
    assert any(not torch.equal(now[k], v) for k, v in before.items())  # it trained
    objective = trimkit.tools.training.objective_for(model, _loss, None, 6)
    if teacher == "self":
        assert objective.frozen is None
        return
    # the teacher pass of a frozen objective built from the start weights is the start
    # model's own output, whatever the model has learned since
    frozen = trimkit.tools.objectives.SelfDistillationObjective(
        start, _loss, lambda_cost=0.0, teacher_loss=False, frozen_teacher=True)
    objective.load_state_dict(frozen.state_dict())
    batch = data[0]
    model.eval()
    with torch.no_grad():
        got = objective._teacher(model, model, batch)
        want = start(*batch[:-1])
    assert torch.allclose(got, want, atol=1e-5)
    # the run's own teacher: the weights when training began, kept in its checkpoints
    saved = torch.load(tmp_path / "step_6" / "objective.pt", weights_only=False)
    assert set(saved["frozen_teacher"]) == set(objective.frozen)
    for name, p in start.named_parameters():
        assert torch.equal(saved["frozen_teacher"][f"model.{name}"], p), name
