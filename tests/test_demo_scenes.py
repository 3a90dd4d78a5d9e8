"""The demo's scenes parts, at tiny sizes: whether the kept tokens cover the object a question
names (`scenes.object_coverage`, `demo.kept_patches`), the table's coverage columns, the
picture's questions, and SmartTrim fine-tunes reused only with their own settings."""

from __future__ import annotations

import math

import pytest
import torch
from trimkit.adapters.meter import METER, meter_tiny

import trimkit

sc = pytest.importorskip("trimkit.benchmarks.scenes")
demo = pytest.importorskip("trimkit.benchmarks.demo")
bv = pytest.importorskip("trimkit.benchmarks.bench_vqa")


def test_object_coverage_counts_the_named_object_and_the_whole_image():
    kept = torch.tensor([[1, 1, 0, 0, 0, 0, 1, 0],
                         [0, 0, 0, 0, 1, 1, 1, 1],
                         [1, 1, 1, 1, 1, 1, 1, 1]], dtype=torch.bool)
    target = torch.tensor([[1, 1, 1, 1, 0, 0, 0, 0],
                           [1, 1, 0, 0, 0, 0, 0, 0],
                           [0, 0, 0, 0, 0, 0, 0, 0]], dtype=torch.bool)
    on_object, on_all = sc.object_coverage(kept, target)
    assert on_object[:2].tolist() == [0.5, 0.0]
    assert math.isnan(on_object[2])  # an object owning no patch counts for nothing
    assert on_all.tolist() == [3 / 8, 4 / 8, 1.0]
    with pytest.raises(ValueError, match="B×P"):
        sc.object_coverage(kept, target[:, :4])


def test_target_grid_is_every_question_s_target_patches():
    split = sc.generate("test", 3)
    grid = split.target_grid()
    g = split.config.grid
    assert grid.shape == (len(split), g * g) and grid.dtype == torch.bool
    for i in range(len(split)):
        assert torch.equal(grid[i], split.target_patches(i).flatten())
        assert grid[i].any()  # each named object owns at least one patch
    # the patches of the object a question names lie inside its box
    for i in range(len(split)):
        x0, y0, x1, y1 = split.boxes[i].tolist()
        rows, cols = (grid[i].view(g, g)).nonzero().unbind(1)
        p = split.config.patch
        assert (cols * p + p > x0).all() and (cols * p < x1).all()
        assert (rows * p + p > y0).all() and (rows * p < y1).all()


def _tiny_meter_batch():
    torch.manual_seed(0)
    cfg = meter_tiny(num_heads=2, hidden_size=16, image_size=32)  # 4×4 patches
    model = METER(cfg).eval()
    g = torch.Generator().manual_seed(1)
    images = torch.randn(3, 3, 32, 32, generator=g)
    ids = torch.randint(3, cfg.vocab_size, (3, 6), generator=g)
    mask = torch.ones(3, 6, dtype=torch.long)
    return model, (images, ids, mask)


@pytest.mark.parametrize("recipe,options", [("attn_prune", {"keep_ratio": 0.5}),
                                            ("tome", {"r": 3}),
                                            ("pumer", {"prune_ratio": 0.5})])
def test_kept_patches_are_the_patches_live_tokens_cover(recipe, options):
    model, (images, ids, mask) = _tiny_meter_batch()
    trimkit.apply(model, recipe, **options)
    with torch.no_grad(), demo._tracking(model):
        model(images, ids, mask)
    kept = demo.kept_patches(model)
    assert kept.shape == (3, 16) and kept.dtype == torch.bool
    live = [s for s in trimkit.last_stats(model).layers if s.stream == "image"][-1].tokens_out
    if recipe == "attn_prune":  # dropped only: one kept patch per live token but the CLS
        assert kept.sum(1).tolist() == (live - 1).tolist()
        assert (kept.sum(1) < 16).all()
    elif recipe == "tome":  # merged only: every patch is still covered
        assert kept.all() and (live < 17).all()
    else:  # pruned, then merged: fewer patches kept, at least one per live token but the CLS
        assert (kept.sum(1) < 16).all() and (kept.sum(1) >= live - 1).all()
    # the same grid as the picture's
    groups = trimkit.tools.viz.token_groups(model, images, ids, mask)
    assert torch.equal(kept, groups.flatten(1) >= 0)
    # tracking stays on only within
    assert not trimkit.api._applied(model).ctx.track_source


def _row(recipe: str, setting: str = "", **kw) -> dict:
    row = dict(recipe=recipe, setting=setting, trained="", accuracy=0.9, delta=0.0,
               gflops=1.0, gflops_padded_32=None, flops_ratio=1.0, speedup_1=1.0,
               speedup_32=1.0, peak_mib_32=1.0, image_tokens=None, object_kept=None,
               patches_kept=None)
    return {**row, **kw}


def test_table_shows_coverage_only_where_it_was_measured():
    plain = demo.table([_row("untrimmed"), _row("tome", "r=8")])
    assert "named object" not in plain
    rows = [_row("untrimmed", object_kept=1.0, patches_kept=1.0),
            _row("resize", "96px"),
            _row("pumer", "prune_ratio=0.4", object_kept=0.9, patches_kept=0.45),
            _row("tome", "r=40", object_kept=1.0, patches_kept=1.0)]
    md = demo.table(rows)
    lines = md.splitlines()
    assert "named object's patches kept" in lines[0]
    assert all(line.count("|") == lines[0].count("|") for line in lines)
    assert lines[4].endswith("| 90.0% | 45.0% |") and lines[3].endswith("| - | - |")
    # printed for the text-informed and cross-modal recipes only
    said = demo.coverage_lines(rows)
    assert said == ["pumer prune_ratio=0.4: the kept tokens cover 90.0% of the named "
                    "object's patches and 45.0% of all patches (2.00×)"]


def test_picture_questions_are_on_distinct_images_and_vary():
    image_index = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 3, 3, 3, 4])
    got = demo.picture_questions(image_index, 4)
    assert got == [0, 5, 8, 10]  # image 0 q0, image 1 q1, image 2 and 3 cycled back to q0
    assert len({int(image_index[i]) for i in got}) == 4
    assert demo.picture_questions(torch.tensor([0, 0]), 4) == [0]


def _questions(n: int, cfg) -> list:
    g = torch.Generator().manual_seed(2)
    return [(torch.randn(3, cfg.image_size, cfg.image_size, generator=g),
             torch.randn(5, cfg.text_hidden, generator=g), torch.ones(5, dtype=torch.long),
             int(torch.randint(0, cfg.vqa_labels, (), generator=g))) for _ in range(n)]


def test_a_shipped_fine_tune_is_used_only_with_its_own_settings(tmp_path, capsys):
    torch.manual_seed(0)
    cfg = meter_tiny(num_heads=2, hidden_size=16, image_size=32, tasks=("vqa",))
    base = METER(cfg).eval()
    data = _questions(8, cfg)
    tune = dict(steps=1, batch_size=4, lr=1e-3, trimmer_lr=1e-2, threshold_lr=1e-1)
    options = dict(lambda_cost=0.0, tokens=["image"])
    shipped = tmp_path / "shipped.pt"
    tag = bv.weights_digest(base)
    made, info = bv._fine_tune(base, 0.8, data, tmp_path / "cache", tune, options, tag=tag,
                               out=shipped)
    assert info["path"] == str(shipped) and shipped.exists()
    assert info["steps"] == 1 and info["threads"] >= 1
    # the same settings and baseline: loaded, not trained
    again, info2 = bv._fine_tune(base, 0.8, data, tmp_path / "cache", tune, options, tag=tag,
                                 shipped=shipped)
    assert info2["path"] == str(shipped) and "loaded" in capsys.readouterr().err
    for (k, a), b in zip(made.state_dict().items(), again.state_dict().values(), strict=True):
        assert torch.equal(a, b), k
    # another baseline (its weights differ): the shipped one is skipped, a new one is made
    other = METER(cfg).eval()
    assert bv.weights_digest(other) != tag
    _, info3 = bv._fine_tune(other, 0.8, data, tmp_path / "cache", tune, options,
                             tag=bv.weights_digest(other), shipped=shipped)
    assert "other settings; skipped" in capsys.readouterr().err
    assert info3["path"] != str(shipped) and (tmp_path / "cache").exists()


def test_the_ablation_measures_coverage_where_targets_are_given():
    ab = pytest.importorskip("trimkit.benchmarks.smarttrim_ablation")
    torch.manual_seed(0)
    cfg = meter_tiny(num_heads=2, hidden_size=16, image_size=32, tasks=("vqa",))
    model = trimkit.apply(METER(cfg).eval(), "attn_prune", keep_ratio=0.5)
    data = _questions(6, cfg)
    plain = ab.evaluate(model, data, data[:2], batch_size=4)
    assert plain["object_kept"] is None and plain["patches_kept"] is None
    every = ab.evaluate(model, data, data[:2], batch_size=4,
                        targets=torch.ones(6, 16, dtype=torch.bool))
    # an object owning every patch keeps what the whole image keeps
    assert every["object_kept"] == pytest.approx(every["patches_kept"])
    assert 0 < every["patches_kept"] < 1 and every["accuracy"] == plain["accuracy"]
    corner = torch.zeros(6, 16, dtype=torch.bool)
    corner[:, 0] = True  # one patch: kept or not, per question
    got = ab.evaluate(model, data, data[:2], batch_size=4, targets=corner)
    assert min(abs(got["object_kept"] - k / 6) for k in range(7)) < 1e-6
    md = ab.table([dict(variant="x", change={}, target=0.5, steps=1, seconds=1.0,
                        flops_ratio=2.0, delta=0.0, **got)])
    assert "named object's patches kept" in md and md.splitlines()[2].endswith(
        f"| {got['object_kept']:.1%} | {got['patches_kept']:.1%} |")
