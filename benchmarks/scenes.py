"""Scenes: a VQA task built on easy-VQA where image tokens matter and the question picks them.

easy-VQA shows one shape per 64×64 image, so its answer can be read from anywhere in the
picture. A *scene* here is a 128×128 canvas with 4 to 7 objects in easy-VQA's shapes
(circle, rectangle, triangle) and colours (its eight RGB values, on its light random
background), of random sizes (16–36 px) at random non-overlapping positions. Each scene
gets four questions, each naming one object by one attribute:

- *color*: "what color is the triangle?" names the scene's only object of that shape (every
  scene has exactly one object of one of the shapes, the others drawn from the other two);
- *shape*: "what shape is the blue object?" names the only object of that colour (the
  colours in a scene are distinct);
- *exists*, twice: "is there a red circle?" names the red object; the answer is yes when it
  is a circle (half the time), else the circle is one of the other two shapes, often present
  elsewhere in the scene, so colour and shape must be bound to one object.

So every answer is unique by construction, every question names exactly one object (its
index and bounding box are recorded, and the patches it covers), and the answers are
balanced: each colour, each shape and yes/no are equally likely within their kind, whatever
the question's text. The answer vocabulary is easy-VQA's 13 words, in its order.

Everything is generated from integer seeds, never from global state: scene ``i`` of a split
draws from ``PCG64(SeedSequence([DATA_SEED, split_id, i]))`` (train and test have different
split ids, so their seeds are disjoint), only through uniform doubles (whose stream numpy
fixes), and is drawn with integer arithmetic on 4×4 supersampled coverage. The same
arguments give byte-identical images and questions on any machine, and the generator is
fast enough (about 2 ms a scene, 10 s for the train split) that no data ships.

`load_split` returns a `ScenesSplit`, an easy-VQA `VQASplit` with the scene records added,
so `easy_vqa.image_loader`, `fit`, `evaluate`, `text_features` and `flops_per_example` (and
the demo's and bench-vqa's example datasets) take it as they take easy-VQA. Its images are
stored as bytes and normalised when indexed (`NormalizedImages`).

The demo model for the task (`SCENES_MODEL`: 256 image tokens, width 192) and its training
(`SCENES_TRAINING`) are defined here; ``python -m trimkit.benchmarks.scenes train`` makes
the checkpoint and ``... measure`` times a few steps of each stage and estimates the whole
run (docs/scenes.md).
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import itertools
import json
import math
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from . import easy_vqa as ev

__all__ = [
    "ANSWERS",
    "COLORS",
    "DATA_SEED",
    "KINDS",
    "SCENES_MODEL",
    "SCENES_TRAINING",
    "SHIPPED_SMARTTRIM",
    "SMARTTRIM_RATIO",
    "SMARTTRIM_TUNING",
    "SHAPES",
    "SPLITS",
    "NormalizedImages",
    "PatchWarmup",
    "Scene",
    "SceneConfig",
    "SceneObject",
    "SceneQuestion",
    "ScenesSplit",
    "build_model",
    "load_baseline",
    "load_split",
    "make_scene",
    "object_coverage",
    "patch_loader",
    "predict",
    "sincos_positions",
    "smarttrim",
    "train_baseline",
]

#: easy-VQA's shapes and colours (the RGB values its images use)
SHAPES: tuple[str, ...] = ("circle", "rectangle", "triangle")
COLORS: dict[str, tuple[int, int, int]] = {
    "black": (0, 0, 0), "blue": (0, 0, 255), "brown": (165, 42, 42), "gray": (128, 128, 128),
    "green": (0, 255, 0), "red": (255, 0, 0), "teal": (0, 128, 128), "yellow": (255, 255, 0)}
_COLOR_NAMES = tuple(COLORS)
_RGB = np.array(list(COLORS.values()), dtype=np.int64)
#: easy-VQA's answer vocabulary, in its order (``easy_vqa.get_answers()``)
ANSWERS: tuple[str, ...] = ("circle", "green", "red", "gray", "yes", "teal", "black",
                            "rectangle", "yellow", "triangle", "brown", "blue", "no")
#: question kinds, and the phrasings of each (one drawn per question)
KINDS: tuple[str, ...] = ("color", "shape", "exists")
TEMPLATES: dict[str, tuple[str, ...]] = {
    "color": ("what color is the {shape}?", "what is the color of the {shape}?"),
    "shape": ("what shape is the {color} object?", "what is the {color} shape?"),
    "exists": ("is there a {color} {shape}?", "does the image contain a {color} {shape}?"),
}
#: the root of every scene's seed
DATA_SEED = 20231
#: split name -> (split id in the seed, number of scenes); four questions per scene
SPLITS: dict[str, tuple[int, int]] = {"train": (0, 5000), "test": (1, 500)}
_EQUILATERAL = math.sqrt(3.0) / 2.0


@dataclass(frozen=True)
class SceneConfig:
    """How scenes are drawn. ``objects`` and ``size`` are inclusive ranges (object side or
    diameter in pixels; a triangle is equilateral, base down), ``gap`` the least distance
    in pixels between two objects' boxes, ``supersample`` the coverage samples per pixel
    side (antialiasing), ``patch`` the side of the patch grid the records use, ``cover``
    the share of a patch an object must cover to own it."""

    canvas: int = 128
    objects: tuple[int, int] = (4, 7)
    size: tuple[int, int] = (16, 36)
    gap: int = 2
    supersample: int = 4
    patch: int = 8
    cover: float = 0.25

    def __post_init__(self):
        if self.canvas % self.patch:
            raise ValueError(f"canvas {self.canvas} is not a multiple of patch {self.patch}")
        if not 1 <= self.objects[0] <= self.objects[1] <= len(COLORS):
            raise ValueError(f"objects must lie in 1..{len(COLORS)} (distinct colours)")
        if self.objects[0] < 2:
            raise ValueError("a scene needs at least two objects (one of its shape alone)")
        if not 1 <= self.size[0] <= self.size[1] <= self.canvas:
            raise ValueError(f"size must lie in 1..canvas, got {self.size}")

    @property
    def grid(self) -> int:
        return self.canvas // self.patch


@dataclass(frozen=True)
class SceneObject:
    """One object: indices into `SHAPES` and `COLORS`, and its box ``(x0, y0, x1, y1)`` in
    pixels (x right, y down)."""

    shape: int
    color: int
    box: tuple[float, float, float, float]


@dataclass(frozen=True)
class SceneQuestion:
    """One question: its text, answer (a word of `ANSWERS`), kind (`KINDS`) and the index
    of the object it names."""

    text: str
    answer: str
    kind: str
    target: int


@dataclass
class Scene:
    """One scene: ``image`` H×W×3 uint8, its objects, ``owner`` (grid×grid int64: the object
    owning each patch, −1 for background) and its four questions."""

    image: np.ndarray
    objects: list[SceneObject]
    owner: np.ndarray
    questions: list[SceneQuestion]


# ------------------------------------------------------------------------------ generation


class _Rng:
    """Draws from ``PCG64(SeedSequence(key))`` through uniform doubles only, whose stream
    numpy keeps fixed across versions and machines (unlike its integer and choice methods)."""

    def __init__(self, *key: int):
        self.g = np.random.Generator(np.random.PCG64(np.random.SeedSequence(list(key))))

    def below(self, n: int) -> int:
        """An integer in ``[0, n)``."""
        return min(int(self.g.random() * n), n - 1)

    def between(self, lo: int, hi: int) -> int:
        """An integer in ``[lo, hi]``."""
        return lo + self.below(hi - lo + 1)

    def sample(self, n: int, k: int) -> list[int]:
        """``k`` distinct integers of ``[0, n)`` in random order."""
        pool = list(range(n))
        return [pool.pop(self.below(len(pool))) for _ in range(k)]


def _box(rng: _Rng, shape: int, cfg: SceneConfig) -> tuple[float, float, float, float]:
    lo, hi = cfg.size
    if SHAPES[shape] == "rectangle":
        w, h = float(rng.between(lo, hi)), float(rng.between(lo, hi))
    elif SHAPES[shape] == "circle":
        w = h = float(rng.between(lo, hi))
    else:
        w = float(rng.between(lo, hi))
        h = w * _EQUILATERAL
    x0 = rng.between(0, cfg.canvas - math.ceil(w))
    y0 = rng.between(0, cfg.canvas - math.ceil(h))
    return (float(x0), float(y0), x0 + w, y0 + h)


def _apart(a: tuple[float, ...], b: tuple[float, ...], gap: int) -> bool:
    return (a[2] + gap <= b[0] or b[2] + gap <= a[0] or a[3] + gap <= b[1]
            or b[3] + gap <= a[1])


def _coverage(shape: int, box: tuple[float, ...], s: int) -> tuple[int, int, np.ndarray]:
    """The object's pixel window ``(x, y, counts)``: per pixel of the window, how many of its
    ``s × s`` sample points (at ``(i + 0.5) / s``) lie inside the shape."""
    x0, y0, x1, y1 = box
    px0, py0, px1, py1 = math.floor(x0), math.floor(y0), math.ceil(x1), math.ceil(y1)
    xs = (px0 + (np.arange((px1 - px0) * s) + 0.5) / s)[None, :]
    ys = (py0 + (np.arange((py1 - py0) * s) + 0.5) / s)[:, None]
    if SHAPES[shape] == "rectangle":
        inside = (xs >= x0) & (xs <= x1) & (ys >= y0) & (ys <= y1)
    elif SHAPES[shape] == "circle":
        cx, cy, r = (x0 + x1) / 2, (y0 + y1) / 2, (x1 - x0) / 2
        inside = (xs - cx) ** 2 + (ys - cy) ** 2 <= r * r
    else:  # apex at the top middle, base at the bottom
        cx, half = (x0 + x1) / 2, (x1 - x0) / 2
        inside = (ys <= y1) & (np.abs(xs - cx) * (y1 - y0) <= (ys - y0) * half)
    counts = inside.reshape(py1 - py0, s, px1 - px0, s).sum(axis=(1, 3))
    return px0, py0, counts


def _questions(rng: _Rng, objects: list[SceneObject], alone: int) -> list[SceneQuestion]:
    """One color question (about object ``alone``, the only one of its shape), one shape
    question and two exists questions (each about a random object)."""
    def phrase(kind: str, **names: str) -> str:
        forms = TEMPLATES[kind]
        return forms[rng.below(len(forms))].format(**names)

    o = objects[alone]
    qs = [SceneQuestion(phrase("color", shape=SHAPES[o.shape]), _COLOR_NAMES[o.color],
                        "color", alone)]
    k = rng.below(len(objects))
    qs.append(SceneQuestion(phrase("shape", color=_COLOR_NAMES[objects[k].color]),
                            SHAPES[objects[k].shape], "shape", k))
    for _ in range(2):
        k = rng.below(len(objects))
        o = objects[k]
        yes = rng.below(2) == 0
        others = [s for s in range(len(SHAPES)) if s != o.shape]
        shape = o.shape if yes else others[rng.below(len(others))]
        qs.append(SceneQuestion(
            phrase("exists", color=_COLOR_NAMES[o.color], shape=SHAPES[shape]),
            "yes" if yes else "no", "exists", k))
    return qs


def make_scene(split_id: int, index: int, config: SceneConfig = SceneConfig()) -> Scene:
    """Scene ``index`` of the split with id ``split_id`` (see `SPLITS`): the same arguments
    give the same bytes on any machine."""
    cfg = config
    rng = _Rng(DATA_SEED, split_id, index)
    n = rng.between(*cfg.objects)
    colors = rng.sample(len(COLORS), n)
    alone = rng.below(len(SHAPES))  # the shape that appears exactly once
    rest = [s for s in range(len(SHAPES)) if s != alone]
    shapes = [alone] + [rest[rng.below(len(rest))] for _ in range(n - 1)]
    order = rng.sample(n, n)  # the lone shape at a random position among the objects
    shapes = [shapes[i] for i in order]
    boxes: list[tuple[float, float, float, float]] = []
    for _ in range(100):  # place in turn; start again when an object finds no room
        for _ in range(n):
            tries = (_box(rng, shapes[len(boxes)], cfg) for _ in range(200))
            box = next((c for c in tries if all(_apart(c, b, cfg.gap) for b in boxes)), None)
            if box is None:
                break
            boxes.append(box)
        if len(boxes) == n:
            break
        boxes = []
    else:
        raise ValueError(f"{n} objects of up to {cfg.size[1]} px do not fit on the canvas")
    objects = [SceneObject(s, c, b) for s, c, b in zip(shapes, colors, boxes, strict=True)]
    bg = np.array([rng.between(230, 255) for _ in range(3)], dtype=np.int64)

    s2 = cfg.supersample ** 2
    image = np.empty((cfg.canvas, cfg.canvas, 3), dtype=np.int64)
    image[:] = bg
    g, p = cfg.grid, cfg.patch
    best = np.zeros((g, g), dtype=np.int64)
    owner = np.full((g, g), -1, dtype=np.int64)
    plane = np.zeros((cfg.canvas, cfg.canvas), dtype=np.int64)
    for k, o in enumerate(objects):
        x, y, counts = _coverage(o.shape, o.box, cfg.supersample)
        h, w = counts.shape
        c = counts[..., None]
        # objects are at least `gap` >= 1 px apart, so no pixel is shared
        image[y:y + h, x:x + w] = (c * _RGB[o.color] + (s2 - c) * bg + s2 // 2) // s2
        plane[:] = 0
        plane[y:y + h, x:x + w] = counts
        per_patch = plane.reshape(g, p, g, p).sum(axis=(1, 3))
        wins = (per_patch > best) & (per_patch >= cfg.cover * p * p * s2)
        owner[wins], best[wins] = k, per_patch[wins]
    return Scene(image.astype(np.uint8), objects, owner,
                 _questions(rng, objects, order.index(0)))


# ------------------------------------------------------------------------------ splits


class NormalizedImages:
    """Images stored as bytes (``raw``, N×3×H×W uint8) that index like the float tensor of
    CLIP-normalised images `easy_vqa.VQASplit` holds: ``images[i]``, ``images[idx]``,
    ``len``, ``shape``. Scenes are 4× larger than easy-VQA's images, so 5,000 of them would
    take 1 GB as floats and 250 MB as bytes."""

    def __init__(self, raw: torch.Tensor):
        if raw.dtype != torch.uint8 or raw.ndim != 4:
            raise ValueError("raw must be N×3×H×W uint8")
        self.raw = raw

    def __getitem__(self, index) -> torch.Tensor:
        return (self.raw[index].float() / 255.0 - ev._MEAN) / ev._STD

    def __len__(self) -> int:
        return len(self.raw)

    @property
    def shape(self) -> torch.Size:
        return self.raw.shape


@dataclass
class ScenesSplit(ev.VQASplit):
    """A scenes split: easy-VQA's `VQASplit` fields (``images`` a `NormalizedImages`) and
    the scene records. Per question: ``kinds`` (index into `KINDS`), ``target`` (the named
    object's index in its scene) and ``boxes`` (its box, N_q×4 ``x0, y0, x1, y1`` pixels).
    Per scene: ``objects`` (N_img×K×2 shape and colour indices, −1 past its objects),
    ``object_boxes`` (N_img×K×4) and ``owner`` (N_img×G×G, the object owning each patch of
    the config's grid, −1 for background)."""

    kinds: torch.Tensor
    target: torch.Tensor
    boxes: torch.Tensor
    objects: torch.Tensor
    object_boxes: torch.Tensor
    owner: torch.Tensor
    config: SceneConfig

    def subset(self, num_images: int) -> ScenesSplit:
        """The first ``num_images`` scenes and their questions."""
        keep = self.image_index < num_images
        n = num_images
        return ScenesSplit(NormalizedImages(self.images.raw[:n]), self.image_index[keep],
                           self.questions, self.question_index[keep], self.labels[keep],
                           self.answers, self.kinds[keep], self.target[keep],
                           self.boxes[keep], self.objects[:n], self.object_boxes[:n],
                           self.owner[:n], self.config)

    def target_patches(self, i: int) -> torch.Tensor:
        """G×G bool: the patches the object named by question ``i`` owns."""
        return self.owner[int(self.image_index[i])] == int(self.target[i])

    def target_grid(self) -> torch.Tensor:
        """N_q×G·G bool, per question in the ViT's (row-major) patch order: the patches the
        object it names owns (`target_patches` for every question at once)."""
        owner = self.owner[self.image_index].flatten(1)
        return owner == self.target[:, None]

    def patch_labels(self) -> torch.Tensor:
        """N_img×G·G long, per patch in the ViT's (row-major) order: 0 for background, else
        ``1 + shape · 8 + colour`` of the object owning it (25 classes)."""
        obj = self.owner.flatten(1)
        rows = torch.arange(len(obj))[:, None].expand_as(obj)
        attrs = self.objects[rows, obj.clamp_min(0)]
        label = 1 + attrs[..., 0] * len(COLORS) + attrs[..., 1]
        return torch.where(obj >= 0, label, torch.zeros_like(label))


def object_coverage(kept: torch.Tensor, target: torch.Tensor
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Whether a trimmed model kept what the question is about. ``kept``: B×P bool, the
    patches some live token still covers after the last trimmed layer (merged ones count,
    dropped ones do not); ``target``: B×P bool, the patches the named object owns
    (`ScenesSplit.target_grid`). Returns per question the share of the object's patches
    kept (NaN where it owns none) and the share of all patches kept, so a trimmer that
    reads the question can be told from one that keeps a share of everything."""
    if kept.shape != target.shape or kept.ndim != 2:
        raise ValueError(f"kept and target must both be B×P, got {tuple(kept.shape)} and "
                         f"{tuple(target.shape)}")
    kept, target = kept.bool(), target.bool()
    owned = target.sum(1)
    on_object = (kept & target).sum(1).float() / owned.clamp_min(1)
    on_object = torch.where(owned > 0, on_object, torch.full_like(on_object, float("nan")))
    return on_object, kept.float().mean(1)


def generate(split: str, num_images: int | None = None,
             config: SceneConfig = SceneConfig()) -> ScenesSplit:
    """Make the ``"train"`` or ``"test"`` split (`SPLITS` sets its seed and default size)."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {sorted(SPLITS)}, got {split!r}")
    split_id, default = SPLITS[split]
    n = default if num_images is None else num_images
    scenes = [make_scene(split_id, i, config) for i in range(n)]
    k = max(len(s.objects) for s in scenes)
    objects = torch.full((n, k, 2), -1, dtype=torch.long)
    object_boxes = torch.zeros(n, k, 4)
    for i, s in enumerate(scenes):
        objects[i, :len(s.objects)] = torch.tensor([[o.shape, o.color] for o in s.objects])
        object_boxes[i, :len(s.objects)] = torch.tensor([o.box for o in s.objects])
    qs = [(i, q) for i, s in enumerate(scenes) for q in s.questions]
    texts = sorted({q.text for _, q in qs})
    row = {t: j for j, t in enumerate(texts)}
    image_index = torch.tensor([i for i, _ in qs])
    target = torch.tensor([q.target for _, q in qs])
    raw = torch.from_numpy(np.stack([s.image for s in scenes])).permute(0, 3, 1, 2)
    return ScenesSplit(
        images=NormalizedImages(raw.contiguous()), image_index=image_index, questions=texts,
        question_index=torch.tensor([row[q.text] for _, q in qs]),
        labels=torch.tensor([ANSWERS.index(q.answer) for _, q in qs]), answers=list(ANSWERS),
        kinds=torch.tensor([KINDS.index(q.kind) for _, q in qs]), target=target,
        boxes=object_boxes[image_index, target],
        objects=objects, object_boxes=object_boxes,
        owner=torch.from_numpy(np.stack([s.owner for s in scenes])), config=config)


@functools.lru_cache(maxsize=4)
def load_split(split: str, num_images: int | None = None,
               config: SceneConfig = SceneConfig()) -> ScenesSplit:
    """`generate`, kept for the process: ``"train"`` (20,000 questions on 5,000 scenes) or
    ``"test"`` (2,000 on 500) by default."""
    return generate(split, num_images, config)


# ------------------------------------------------------------------------------ model

#: The demo model for scenes: easy-VQA's small METER (`easy_vqa.SMALL`: the pretrained
#: MiniLM, frozen, as text encoder; 13 answers) with a CLIP tower of 4 blocks 192 wide on
#: 128×128 scenes in 8×8 patches (256 patch tokens and the CLS), and 2 + 2 co-attention
#: layers 192 wide; 6 heads of 32 everywhere.
SCENES_MODEL: dict = dict(
    ev.SMALL, image_size=128, patch_size=8, vision_width=192, vision_layers=4,
    vision_heads=6, hidden_size=192, num_fusion_layers=2, num_heads=6)

#: Its training, two stages with AdamW and one-cycle cosine schedules (`easy_vqa.fit`).
#: The tower's patch position embeddings start from 2-D sine-cosine values
#: (``positions="sincos"``, `sincos_positions`; ``None`` keeps the random ones), so it
#: knows which patches are neighbours before it learns shapes. Stage 1 (`PatchWarmup`):
#: the CLIP tower alone, taught what every patch shows, ``patch_epochs`` passes at
#: ``patch_lr`` over batches of ``patch_images_per_batch`` scenes (it learns colours in a
#: few dozen steps, shapes far more slowly). Stage 2: the fusion layers, poolers and
#: classifier on the questions, the tower frozen (`FrozenTower`: its outputs are computed
#: once per train scene), ``epochs`` passes at ``lr`` over batches of
#: ``questions_per_batch`` questions drawn at random. The answers are balanced by
#: construction, so no resampling. With ``autocast="bf16"`` the training
#: forwards run under CPU autocast in bfloat16 (the weights, the optimizer and evaluation
#: stay float32): on a CPU with AVX-512 BF16 a step takes 1.4–1.7× less time; ``None``
#: trains in float32.
SCENES_TRAINING: dict = dict(
    seed=0, positions="sincos", patch_epochs=2, patch_lr=2e-3, patch_images_per_batch=32,
    epochs=4, lr=1e-3, questions_per_batch=32, weight_decay=0.01, warmup=0.1,
    grad_clip=1.0, autocast="bf16")

#: the checkpoint `train_baseline` writes by default (``trimkit.benchmarks/data``)
SHIPPED_BASELINE = Path(__file__).parent / "data" / "scenes_baseline.pt"
_PATCH_CLASSES = 1 + len(SHAPES) * len(COLORS)


#: SmartTrim on the scenes model, as `trimkit demo --task scenes` shows it: the demo's
#: options (`bench_vqa.SMARTTRIM`: image tokens and every stream's heads, at the recipe's
#: default placement) at this target cost ratio, fine-tuned with `trimkit.train` as the
#: easy-VQA demo fine-tunes (`bench_vqa.FINE_TUNE`'s learning rates) for ``steps`` steps of
#: ``batch_size`` questions under bfloat16 CPU autocast. A step runs the trimmed and the
#: untrimmed model forward and backward, about 0.36 TFLOPs at batch 32, so the fine-tune
#: takes longer than the demo's budget: ``python -m trimkit.benchmarks.scenes smarttrim``
#: makes it once and the checkpoint ships (`SHIPPED_SMARTTRIM`).
SMARTTRIM_RATIO = 0.5
SMARTTRIM_TUNING: dict = dict(steps=80, batch_size=32, lr=2e-4, trimmer_lr=3e-3,
                              threshold_lr=3e-2, mixed_precision="bf16")
SHIPPED_SMARTTRIM = Path(__file__).parent / "data" / "scenes_smarttrim.pt"


def smarttrim(base: nn.Module, cache_dir: Path | None = None, *,
              ratio: float = SMARTTRIM_RATIO, options: dict | None = None,
              steps: int | None = None, out: Path | None = None,
              threads: int | None = None, shipped: bool = True) -> tuple[nn.Module, dict]:
    """SmartTrim at ``ratio`` fine-tuned from ``base`` on the train split with
    `SMARTTRIM_TUNING` (``steps`` replaces its steps) and ``options`` (default: the demo's,
    `bench_vqa.SMARTTRIM`; the ablations change them, e.g. ``cross_modal=False``). Loads
    the shipped checkpoint (unless not ``shipped``) when it was made with the same settings
    from the same baseline weights, else the one at ``out`` or cached in ``cache_dir``,
    else fine-tunes and saves it there.
    Returns the model (eval mode) and its fine-tuning summary (``path``: its file)."""
    from .bench_vqa import SMARTTRIM, _fine_tune, _Questions, weights_digest

    cache = Path(cache_dir) if cache_dir is not None else ev.default_cache_dir()
    cfg = dict(SMARTTRIM_TUNING, **({} if steps is None else {"steps": steps}))
    options = dict(SMARTTRIM) if options is None else options

    def questions() -> torch.utils.data.Dataset:
        train = load_split("train")
        return _Questions(train, *ev.text_features(train.questions, cache))

    with ev._threads(threads):
        # the train split is made only if a fine-tune runs (a shipped one needs none)
        return _fine_tune(base, ratio, _Lazy(questions), cache, cfg, options,
                          tag=f"scenes {weights_digest(base)}",
                          shipped=SHIPPED_SMARTTRIM if shipped else None, out=out)


class _Lazy(torch.utils.data.Dataset):
    """The dataset ``make()`` returns, made on first use."""

    def __init__(self, make: Callable[[], torch.utils.data.Dataset]):
        self.make, self.data = make, None

    def _get(self) -> torch.utils.data.Dataset:
        if self.data is None:
            self.data = self.make()
        return self.data

    def __len__(self) -> int:
        return len(self._get())

    def __getitem__(self, i: int):
        return self._get()[i]


def build_model(seed: int = 0) -> nn.Module:
    """`SCENES_MODEL` seeded with ``seed``, the pretrained MiniLM loaded and frozen."""
    return ev.build_model(seed, **SCENES_MODEL)


def sincos_positions(grid: int, width: int) -> torch.Tensor:
    """(1 + grid²)×width position embeddings: zeros for the CLS, then per patch (row-major)
    sines and cosines of its column and row at ``width / 4`` frequencies each (MAE's 2-D
    embedding)."""
    if width % 4:
        raise ValueError(f"width {width} is not a multiple of 4")
    d = width // 4
    omega = 1.0 / 10000 ** (torch.arange(d, dtype=torch.float64) / d)
    y, x = torch.meshgrid(torch.arange(grid, dtype=torch.float64),
                          torch.arange(grid, dtype=torch.float64), indexing="ij")
    ox, oy = x.flatten()[:, None] * omega, y.flatten()[:, None] * omega
    pe = torch.cat([ox.sin(), ox.cos(), oy.sin(), oy.cos()], dim=1)
    return torch.cat([torch.zeros(1, width, dtype=torch.float64), pe]).float()


class PatchWarmup(nn.Module):
    """Stage 1: METER's CLIP tower with a linear head on every patch token, trained to say
    what the patch shows (`ScenesSplit.patch_labels`: background, or the shape and colour
    of the object owning it; 25 classes). The generator knows every patch's content, so the
    tower learns to find and describe objects from 256 labels per scene instead of one
    answer per question, much as METER's own tower comes pretrained. Only ``vit_model`` is
    shared with the METER; the head is thrown away. ``forward(images)`` gives
    (B·256)×25 logits in the order of `patch_loader`'s labels."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.vit_model = model.vit_model
        object.__setattr__(self, "_meter", model)  # not a submodule: only its tower trains
        self.head = nn.Linear(model.config.vision_width, _PATCH_CLASSES)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self._meter.encode_image(images)[:, 1:]).flatten(0, 1)


class _Scenes(torch.utils.data.Dataset):
    def __init__(self, n: int):
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> int:
        return i


class _WithPatchLabels:
    """Collate scene indices into ``(images, labels)``, labels flattened to B·G·G."""

    def __init__(self, split: ScenesSplit):
        self.images, self.labels = split.images, split.patch_labels()

    def __call__(self, indices: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        idx = torch.as_tensor(indices, dtype=torch.long)
        return self.images[idx], self.labels[idx].flatten()


def patch_loader(split: ScenesSplit, batch_size: int, *, shuffle: bool = True,
                 seed: int = 0) -> DataLoader:
    """Batches ``(images, patch labels)`` of ``batch_size`` scenes for `PatchWarmup`,
    shuffled from ``seed`` (a new order each pass)."""
    return DataLoader(_Scenes(len(split.images)), batch_size=batch_size, shuffle=shuffle,
                      generator=torch.Generator().manual_seed(seed),
                      collate_fn=_WithPatchLabels(split))


def _patch_call(module: nn.Module, batch: tuple) -> torch.Tensor:
    return module(batch[0])


class FrozenTower(nn.Module):
    """Stage 2: the METER answering questions from its tower's cached outputs.

    The tower is frozen, so its output for a scene is the same at every step: it is
    computed once per train scene (`tower_outputs`) and the fusion layers, poolers and
    classifier train on it. A step then costs only the fusion work, and batches can draw
    questions at random instead of whole scenes. ``forward(tokens, text_embeds, text_mask)``
    takes the tower's tokens (B×(1+P)×width) where METER takes images; the tower's own
    parameters are frozen while the wrapper lives (`release` gives them back)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self._grad = [p.requires_grad for p in model.vit_model.parameters()]
        model.vit_model.requires_grad_(False)

    def release(self) -> nn.Module:
        """Unfreeze the tower as it was and return the METER."""
        for p, g in zip(self.model.vit_model.parameters(), self._grad, strict=True):
            p.requires_grad_(g)
        return self.model

    def forward(self, tokens: torch.Tensor, text_embeds: torch.Tensor,
                text_mask: torch.Tensor) -> torch.Tensor:
        model = self.model
        model.encode_image = _identity  # the instance attribute shadows the method
        try:
            return model(tokens, attention_mask=text_mask, text_embeds=text_embeds)
        finally:
            del model.encode_image

    @staticmethod
    @torch.no_grad()
    def tower_outputs(model: nn.Module, split: ScenesSplit, autocast: str | None,
                      batch_size: int = 64) -> torch.Tensor:
        """The tower's tokens for every scene of ``split`` (eval mode, bfloat16 to halve
        the memory: 5,000 scenes take 0.5 GB)."""
        n = len(split.images)
        out = None
        was = model.training
        model.eval()
        try:
            for i in range(0, n, batch_size):
                idx = torch.arange(i, min(n, i + batch_size))
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast is not None):
                    y = model.encode_image(split.images[idx])
                if out is None:
                    out = torch.empty(n, *y.shape[1:], dtype=torch.bfloat16)
                out[idx] = y.to(torch.bfloat16)
        finally:
            model.train(was)
        return out

    @staticmethod
    def loader(model: nn.Module, split: ScenesSplit, feats: torch.Tensor, mask: torch.Tensor,
               cfg: dict) -> DataLoader:
        """Batches ``(tokens, text_embeds, text_mask, labels)`` of ``questions_per_batch``
        random questions, their scenes' tokens from `tower_outputs`."""
        tokens = FrozenTower.tower_outputs(model, split, cfg["autocast"])
        return DataLoader(_Scenes(len(split)), batch_size=cfg["questions_per_batch"],
                          shuffle=True, generator=torch.Generator().manual_seed(cfg["seed"] + 1),
                          collate_fn=_WithTokens(split, tokens, feats, mask))


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x


class _WithTokens:
    """Collate question indices into ``(tokens, text_embeds, text_mask, labels)``."""

    def __init__(self, split: ScenesSplit, tokens: torch.Tensor, feats: torch.Tensor,
                 mask: torch.Tensor):
        self.split, self.tokens, self.feats, self.mask = split, tokens, feats, mask

    def __call__(self, indices: list[int]) -> tuple[torch.Tensor, ...]:
        s = self.split
        qs = torch.as_tensor(indices, dtype=torch.long)
        u = s.question_index[qs]
        return (self.tokens[s.image_index[qs]].float(), self.feats[u], self.mask[u],
                s.labels[qs])


def _frozen_call(module: nn.Module, batch: tuple) -> torch.Tensor:
    return module(*batch[:3])


class _Autocast:
    """``forward(module, batch)`` under CPU autocast to ``dtype`` (``"bf16"``), logits
    back in float32; ``None`` leaves it as it is. With ``record``, each call's loss and
    accuracy are kept (``steps``), so a short run shows whether it learns."""

    def __init__(self, forward: Callable, dtype: str | None, record: bool = False):
        if dtype not in (None, "bf16"):
            raise ValueError(f"autocast must be None or 'bf16', got {dtype!r}")
        self.forward, self.enabled = forward, dtype is not None
        self.steps: list[tuple[float, float]] | None = [] if record else None

    def __call__(self, module: nn.Module, batch: tuple) -> torch.Tensor:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.enabled):
            logits = self.forward(module, batch).float()
        if self.steps is not None:
            with torch.no_grad():
                loss = torch.nn.functional.cross_entropy(logits, batch[-1]).item()
                acc = (logits.argmax(-1) == batch[-1]).float().mean().item()
            self.steps.append((loss, acc))
        return logits


def _settings_key() -> str:
    blob = json.dumps({"model": SCENES_MODEL, "train": SCENES_TRAINING,
                       "data": [DATA_SEED, SPLITS, asdict(SceneConfig())], "text": "minilm"},
                      sort_keys=True, default=str)
    return hashlib.sha1(blob.encode()).hexdigest()[:16]


def load_baseline(path: Path | str) -> tuple[nn.Module, dict] | None:
    """The model saved at ``path`` by `train_baseline` (eval mode) and its summary, or
    ``None`` when it was trained with other settings than today's."""
    saved = torch.load(path, weights_only=False)
    if saved.get("key") != _settings_key():
        return None
    model = build_model(seed=SCENES_TRAINING["seed"])
    missing, unexpected = model.load_state_dict(saved["state_dict"], strict=False)
    missing = [k for k in missing if not k.startswith("text_transformer.")]
    if missing or unexpected:
        raise RuntimeError(f"{path} does not fit the model: missing {missing}, "
                           f"unexpected {unexpected}")
    return model.eval(), saved["info"]


class _Take:
    """The first ``steps`` batches of ``loader``, with the time each one was handed out
    (``stamps``), so a short run times the steps of a long one."""

    def __init__(self, loader: DataLoader, steps: int):
        self.loader, self.steps, self.stamps = loader, steps, []

    def __len__(self) -> int:
        return min(self.steps, len(self.loader))

    def __iter__(self) -> Iterator:
        for i, batch in enumerate(self.loader):
            if i == len(self):
                break
            self.stamps.append(time.perf_counter())
            yield batch
        self.stamps.append(time.perf_counter())


def _stages(model: nn.Module, train: ScenesSplit, feats: torch.Tensor, mask: torch.Tensor,
            log: Callable[[str], None] | None, steps: int | None = None) -> dict:
    """Run both stages of `SCENES_TRAINING` (each cut to its first ``steps`` steps if given,
    one pass). Returns per stage the `easy_vqa.fit` result, its seconds and step stamps."""
    cfg = SCENES_TRAINING
    common = dict(weight_decay=cfg["weight_decay"], warmup=cfg["warmup"],
                  grad_clip=cfg["grad_clip"], log=log)
    out = {}
    if cfg["positions"] == "sincos":
        grid = model.config.image_size // model.config.patch_size
        with torch.no_grad():
            model.vit_model.positional_embedding.copy_(
                sincos_positions(grid, model.config.vision_width))
    elif cfg["positions"] is not None:
        raise ValueError(f"positions must be 'sincos' or None, got {cfg['positions']!r}")
    torch.manual_seed(cfg["seed"])
    warmup = PatchWarmup(model)
    for name, module, loader, kw in (
            ("patches", warmup,
             patch_loader(train, cfg["patch_images_per_batch"], seed=cfg["seed"]),
             dict(epochs=cfg["patch_epochs"], lr=cfg["patch_lr"],
                  forward=_Autocast(_patch_call, cfg["autocast"], steps is not None),
                  name="stage 1 (tower, patch labels)")),
            ("questions", lambda: FrozenTower(model),  # freezes the tower: made after stage 1
             lambda: FrozenTower.loader(model, train, feats, mask, cfg),
             dict(epochs=cfg["epochs"], lr=cfg["lr"], name="stage 2 (fusion, tower frozen)",
                  forward=_Autocast(_frozen_call, cfg["autocast"], steps is not None)))):
        t0 = time.perf_counter()
        if not isinstance(module, nn.Module):
            module = module()
        if callable(loader):  # stage 2 computes the tower's outputs first: its time counts
            loader = loader()
        if steps is not None:
            loader = _Take(loader, steps)
            kw["epochs"] = 1
        result = ev.fit(module, loader, **kw, **common)
        if isinstance(module, FrozenTower):
            module.release()
        out[name] = {"fit": result, "seconds": time.perf_counter() - t0,
                     "batches": len(loader) if steps is None else len(loader.loader),
                     "stamps": loader.stamps if steps is not None else [],
                     "steps": kw["forward"].steps or []}
    return out


def train_baseline(path: Path | str = SHIPPED_BASELINE, cache_dir: Path | None = None, *,
                   threads: int | None = None, log: Callable[[str], None] = print,
                   splits: tuple[ScenesSplit, ScenesSplit] | None = None
                   ) -> tuple[nn.Module, dict]:
    """Train `SCENES_MODEL` with `SCENES_TRAINING` on the train split, test it, and save it
    to ``path`` (without the frozen MiniLM, which loads from its package). Returns the
    model (eval mode) and its summary: test ``accuracy`` (overall and per kind),
    ``train_seconds``, ``threads`` and per-example GFLOPs (`easy_vqa.flops_per_example`).
    ``splits`` (train, test) replaces the standard splits, for quick checks."""
    path = Path(path)
    with ev._threads(threads):
        train, test = splits or (load_split("train"), load_split("test"))
        feats, mask = ev.text_features(train.questions, cache_dir)
        model = build_model(seed=SCENES_TRAINING["seed"])
        t0 = time.perf_counter()
        stages = _stages(model, train, feats, mask, log)
        train_seconds = time.perf_counter() - t0
        t1 = time.perf_counter()
        right = predict(model, test, cache_dir=cache_dir) == test.labels
        accuracy = right.float().mean().item()
        by_kind = {kind: right[test.kinds == k].float().mean().item()
                   for k, kind in enumerate(KINDS)}
        info = {
            "accuracy": accuracy, "accuracy_by_kind": by_kind,
            "train_accuracy": stages["questions"]["fit"]["history"][-1]["accuracy"],
            "train_seconds": train_seconds,
            "stage_seconds": {k: v["seconds"] for k, v in stages.items()},
            "eval_seconds": time.perf_counter() - t1,
            "steps": {k: v["fit"]["steps"] for k, v in stages.items()},
            "history": {k: v["fit"]["history"] for k, v in stages.items()},
            "threads": torch.get_num_threads(), "config": asdict(model.config),
            "training": dict(SCENES_TRAINING),
            "gflops": ev.flops_per_example(model, test, cache_dir)}
    g = info["gflops"]
    log(f"scenes baseline: test accuracy {accuracy:.2%} ("
        + ", ".join(f"{k} {v:.2%}" for k, v in by_kind.items())
        + f") after {train_seconds / 60:.1f} min of training ({info['threads']} thread(s)); "
        f"GFLOPs per example {g['total']:.3f}; saved to {path}")
    state = {k: v for k, v in model.state_dict().items() if not k.startswith("text_transformer.")}
    ev._save_atomic({"key": _settings_key(), "state_dict": state, "info": info}, path)
    return model.eval(), info


@torch.no_grad()
def predict(model: nn.Module, split: ScenesSplit, batch_size: int = 256,
            cache_dir: Path | None = None) -> torch.Tensor:
    """The answer index ``model`` gives to every question of ``split``, in order (eval
    mode, batches of about ``batch_size`` questions grouped by scene, `easy_vqa.model_call`)."""
    per_image = max(1, round(batch_size / (len(split) / max(len(split.images), 1))))
    loader = ev.image_loader(split, shuffle=False, images_per_batch=per_image,
                             cache_dir=cache_dir)
    order = torch.tensor(list(itertools.chain.from_iterable(loader.batch_sampler)))
    was = model.training
    model.eval()
    try:
        answers = torch.cat([ev.model_call(model, b).argmax(-1) for b in loader])
    finally:
        model.train(was)
    out = torch.empty_like(answers)
    out[order] = answers
    return out


# ------------------------------------------------------------------------------ commands


def _step_flops(module: nn.Module, batch: tuple, forward: Callable) -> float:
    """FLOPs of one training step's forward and backward on ``batch``."""
    from torch.utils.flop_counter import FlopCounterMode

    module.train()
    with FlopCounterMode(display=False) as counter:
        loss = torch.nn.functional.cross_entropy(forward(module, batch), batch[-1])
        loss.backward()
    module.zero_grad(set_to_none=True)
    return float(counter.get_total_flops())


def measure(steps: int = 30, cache_dir: Path | None = None, *, threads: int | None = 1,
            log: Callable[[str], None] = print) -> dict:
    """Time the first ``steps`` steps of each training stage (on as many train scenes as
    they need), count the FLOPs of a step and of an inference example, and estimate the
    whole `train_baseline` run from the median step times."""
    cfg = SCENES_TRAINING
    per_step = max(cfg["patch_images_per_batch"], cfg["questions_per_batch"])
    with ev._threads(threads):
        t0 = time.perf_counter()
        train = generate("train", num_images=steps * per_step)
        test = generate("test", num_images=8)
        gen_seconds = time.perf_counter() - t0
        feats, mask = ev.text_features(train.questions, cache_dir)
        model = build_model(seed=cfg["seed"])
        warm = PatchWarmup(model)
        patch_batch = next(iter(patch_loader(train, cfg["patch_images_per_batch"])))
        frozen = FrozenTower(model)
        q_batch = next(iter(FrozenTower.loader(model, train, feats, mask, cfg)))
        flops = {"patches": _step_flops(warm, patch_batch, _patch_call),
                 "questions": _step_flops(frozen, q_batch, _frozen_call)}
        frozen.release()
        log(f"timing {steps} steps of each stage at {torch.get_num_threads()} thread(s), "
            f"autocast {cfg['autocast']}")
        stages = _stages(model, train, feats, mask, None, steps=steps)
        gflops = ev.flops_per_example(model, test, cache_dir)
        threads_used = torch.get_num_threads()
    full = {"patches": math.ceil(SPLITS["train"][1] / cfg["patch_images_per_batch"])
            * cfg["patch_epochs"],
            "questions": math.ceil(4 * SPLITS["train"][1] / cfg["questions_per_batch"])
            * cfg["epochs"]}
    out = {"threads": threads_used, "steps_timed": steps,
           "generate_seconds_per_scene": gen_seconds / (steps * per_step + 8),
           "inference_gflops": gflops, "stages": {}}
    total = 0.0
    for name, st in stages.items():
        gaps = np.diff(st["stamps"])[1:]  # the first step warms up
        median = float(np.median(gaps))
        batch_items = {"patches": cfg["patch_images_per_batch"],
                       "questions": cfg["questions_per_batch"]}[name]
        first, last = np.mean(st["steps"][:5], axis=0), np.mean(st["steps"][-5:], axis=0)
        out["stages"][name] = {
            "loss_first_5": float(first[0]), "loss_last_5": float(last[0]),
            "accuracy_first_5": float(first[1]), "accuracy_last_5": float(last[1]),
            "seconds_per_step": median, "steps_full": full[name],
            "minutes_full": median * full[name] / 60,
            "gflops_per_step": flops[name] / 1e9,
            "gflops_per_item": flops[name] / 1e9 / batch_items,
            "gflops_per_second": flops[name] / 1e9 / median}
        total += median * full[name]
    out["minutes_full_training"] = total / 60
    for name, s in out["stages"].items():
        log(f"{name}: {s['seconds_per_step']:.3f} s/step ({s['gflops_per_step']:.1f} GFLOPs "
            f"per step, {s['gflops_per_second']:.1f} GFLOP/s); the full run: "
            f"{s['steps_full']} steps, about {s['minutes_full']:.1f} min; training loss "
            f"{s['loss_first_5']:.3f} -> {s['loss_last_5']:.3f}, accuracy "
            f"{s['accuracy_first_5']:.1%} -> {s['accuracy_last_5']:.1%} (first and last 5 "
            f"steps)")
    log(f"inference: {gflops['total']:.3f} GFLOPs per example (vision {gflops['vision']:.3f}, "
        f"fusion {gflops['fusion']:.3f}, heads {gflops['heads']:.4f}); generation "
        f"{out['generate_seconds_per_scene'] * 1e3:.2f} ms per scene")
    log(f"estimated training time at {threads_used} thread(s): "
        f"{out['minutes_full_training']:.1f} min (evaluation not included)")
    return out


def preview(path: Path | str, count: int = 8, split: str = "test") -> None:
    """A picture of the first ``count`` scenes of ``split`` with the object each question
    names boxed, its questions and answers below (for looking, not for tests)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    data = generate(split, num_images=count)
    cols = min(count, 4)
    rows = math.ceil(count / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.4 * cols, 4.4 * rows), squeeze=False)
    for i, ax in enumerate(axes.flat):
        ax.axis("off")
        if i >= count:
            continue
        ax.imshow(data.images.raw[i].permute(1, 2, 0).numpy())
        qs = (data.image_index == i).nonzero().flatten().tolist()
        lines = []
        for j, q in enumerate(qs):
            x0, y0, x1, y1 = data.boxes[q].tolist()
            ax.add_patch(Rectangle((x0 - 0.5, y0 - 0.5), x1 - x0, y1 - y0, fill=False,
                                   lw=1, ls="--", color=f"C{j}"))
            lines.append(f"{data.texts[q]} {data.answers[int(data.labels[q])]}")
        ax.set_title("\n".join(lines), fontsize=7, loc="left")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    """``python -m trimkit.benchmarks.scenes {train,smarttrim,measure,preview}``."""
    p = argparse.ArgumentParser(prog="python -m trimkit.benchmarks.scenes",
                                description=__doc__.split("\n\n", 1)[0])
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="train the scenes baseline (SCENES_MODEL, "
                       "SCENES_TRAINING) and save it")
    t.add_argument("--out", default=str(SHIPPED_BASELINE),
                   help="checkpoint path (default: the shipped one)")
    m = sub.add_parser("measure", help="time a few training steps, estimate the whole run")
    m.add_argument("--steps", type=int, default=30, help="steps timed per stage (default 30)")
    m.add_argument("--json", default=None, help="also write the figures to this file")
    f = sub.add_parser("smarttrim", help="fine-tune SmartTrim from the baseline "
                       "(SMARTTRIM_TUNING) and save it (default: the shipped checkpoint)")
    f.add_argument("--baseline", default=str(SHIPPED_BASELINE),
                   help="the baseline to start from (default: the shipped one)")
    f.add_argument("--out", default=str(SHIPPED_SMARTTRIM),
                   help="checkpoint path (default: the shipped one)")
    f.add_argument("--steps", type=int, default=None,
                   help=f"fine-tuning steps (default: {SMARTTRIM_TUNING['steps']})")
    v = sub.add_parser("preview", help="draw a few scenes with their questions")
    v.add_argument("--out", default="scenes.png")
    v.add_argument("--count", type=int, default=8)
    for q in (t, m, f):
        q.add_argument("--threads", type=int, default=None,
                       help="torch threads (default: torch's for train and smarttrim, 1 for "
                            "measure)")
        q.add_argument("--cache-dir", default=None, help="where MiniLM features are cached "
                       "(default: $TRIMKIT_CACHE or ~/.cache/trimkit/easy_vqa)")
    args = p.parse_args(argv)
    cache = Path(args.cache_dir) if getattr(args, "cache_dir", None) else None
    if args.command == "train":
        train_baseline(args.out, cache, threads=args.threads)
    elif args.command == "smarttrim":
        loaded = load_baseline(args.baseline)
        if loaded is None:
            p.error(f"{args.baseline} was trained with other settings than today's")
        out = Path(args.out)
        if out.exists():  # never load what is to be made again
            out.unlink()
        _, info = smarttrim(loaded[0], cache, steps=args.steps, out=out, threads=args.threads,
                            shipped=False)
        print(f"scenes smarttrim: ratio {SMARTTRIM_RATIO:g}, {info['steps']} steps in "
              f"{info['train_seconds'] / 60:.1f} min ({info['threads']} thread(s)); saved to "
              f"{out}")
    elif args.command == "measure":
        if args.steps < 3:
            p.error("--steps must be at least 3")
        out = measure(args.steps, cache, threads=args.threads or 1)
        if args.json:
            Path(args.json).write_text(json.dumps(out, indent=2))
    else:
        preview(args.out, args.count)
    return 0


if __name__ == "__main__":
    sys.exit(main())
