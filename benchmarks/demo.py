"""``trimkit demo``: every recipe on a real model and real data, in one command.

Two tasks (``--task``). *scenes* (`trimkit.benchmarks.scenes`): 128-px scenes of 4 to 7
easy-VQA shapes, each question naming one object, and its METER (a CLIP-style tower of 4
blocks 192 wide on 256 patches, the pretrained MiniLM, 2 + 2 co-attention layers; 1.9
GFLOPs per example), where the image tokens the question names are the ones that matter.
*easy-vqa*: one shape per 64-px image and the small METER of `easy_vqa` (0.1 GFLOPs),
where every token recipe keeps its accuracy. Each task's baseline ships with the project
(``benchmarks/data``); ``--baseline`` takes another, ``--train-baseline`` trains it again
into ``--cache-dir`` (easy-VQA about 8 minutes on 2 cores, scenes about an hour).

The demo runs the baseline untrimmed, with the training-free recipes (ToMe, attention-score
pruning, PuMer) at three settings each, with SmartTrim fine-tuned to ratio 0.5, and with
the *resize baseline*: the untrimmed model on images shrunk to fewer patches (position
embeddings interpolated), since a token-reduction method is only worth using where it beats
shrinking the input. On easy-VQA SmartTrim is fine-tuned here for ``--steps`` steps
(cached); on scenes a fine-tune costs more than the demo's budget, so the fine-tuned model
ships too (``python -m trimkit.benchmarks.scenes smarttrim`` makes it), and the table says
which.

For each it measures the test accuracy (easy-VQA: every test question; scenes: the first
1,000 of the 2,000 by default, to stay near 10 minutes), the GFLOPs per example and the
FLOPs ratio against the untrimmed model (`trimkit.count_flops`; the frozen MiniLM runs once
per distinct question and is not counted), the measured speedup at batch 1 and 32 (median
of alternating runs against the untrimmed model in this process), the activation peak of
one batch-32 forward, and the image tokens left at the last layer. On scenes it also
measures whether the kept tokens cover the object the question names: the share of that
object's patches still covered by a live token after the last trimmed layer, next to the
share of all patches. It prints the table and writes a report folder (``--out``):
``results.md`` and ``results.json`` (the table), ``accuracy_vs_speedup.png`` (every recipe
a curve) and ``kept_tokens.png`` (test images with the patches each recipe kept: dropped
ones dimmed, merged ones outlined by group, the named object boxed on scenes; the question,
the true answer and each model's answer).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import platform
import statistics
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

import trimkit
from trimkit.registry import Command, register_command
from trimkit.tools.bench import activation_peak, padded_flops, time_pair

from .bench_vqa import FINE_TUNE, _fine_tune, _Questions, _say, smarttrim_options

#: SmartTrim's fine-tuning in the easy-VQA demo (the full benchmark, ``trimkit bench-vqa``,
#: uses 400; on scenes the fine-tune ships, `scenes.SMARTTRIM_TUNING`)
DEMO_STEPS = 150


@dataclass(frozen=True)
class Task:
    """What the demo runs on: the recipes' sweeps (option, its values, the value shown in
    the picture), the resize baseline's image sides (multiples of the 8-pixel patch, below
    the native ``side``) and the one shown, the SmartTrim fine-tune's default steps, and
    the default test questions (0: all) and timed repeats, chosen so that the demo runs
    in about 10 minutes on a 2-core CPU."""

    name: str
    title: str
    side: int
    sweeps: dict[str, tuple[str, list, Any]]
    resize_sides: list[int]
    resize_shown: int
    steps: int | None
    questions: int = 0
    repeats: int = 5


TASKS: dict[str, Task] = {
    "scenes": Task(
        "scenes", "scenes", 128,
        # settings spread up to about 2× fewer FLOPs and past it where the recipe reaches
        # it (PuMer reduces only in the fusion layers, 40% of the FLOPs: at most ~1.5×)
        sweeps={"tome": ("r", [16, 28, 40], 40),
                "attn_prune": ("keep_ratio", [0.7, 0.55, 0.4], 0.55),
                "pumer": ("prune_ratio", [0.2, 0.4, 0.6], 0.6)},
        # SmartTrim's fine-tune ships: its steps are scenes.SMARTTRIM_TUNING's
        # 14 models of 1.9 GFLOPs or less per example: half the 2,000 test questions and 3
        # timed repeats keep the demo near 10 minutes on 2 cores (--questions 0: all)
        resize_sides=[112, 96, 88, 80], resize_shown=96, steps=None, questions=1000,
        repeats=3),
    "easy-vqa": Task(
        "easy-vqa", "easy-VQA", 64,
        sweeps={"tome": ("r", [4, 8, 12], 8),
                "attn_prune": ("keep_ratio", [0.7, 0.5, 0.3], 0.5),
                "pumer": ("prune_ratio", [0.2, 0.4, 0.6], 0.2)},
        resize_sides=[56, 48, 40], resize_shown=48, steps=DEMO_STEPS),
}
DEFAULT_TASK = "easy-vqa"

EPILOG = """\
examples:
  trimkit demo                          # everything, report in ./trimkit-demo
  trimkit demo --task scenes            # several objects, the question names one
  trimkit demo --task easy-vqa          # one shape per image (SmartTrim fine-tuned here)
  trimkit demo --no-smarttrim           # training-free recipes only
  trimkit demo --task easy-vqa --steps 400  # SmartTrim fine-tuned as long as in bench-vqa
  trimkit demo --train-baseline         # train the baseline again (scenes: about an hour)"""


# ------------------------------------------------------------------------------ points


def _same(images: torch.Tensor) -> torch.Tensor:
    return images


@dataclass
class Point:
    """One model of the demo: a recipe at one setting (or the untrimmed model, or a
    resize)."""

    recipe: str
    setting: str
    model: nn.Module = field(repr=False)
    #: what the images go through first (the resize baseline shrinks them)
    prepare: Callable[[torch.Tensor], torch.Tensor] = field(default=_same, repr=False)
    shown: bool = False  # in the picture of kept tokens
    trained: str = ""
    result: dict = field(default_factory=dict)

    def __call__(self, images: torch.Tensor, mask: torch.Tensor, feats: torch.Tensor
                 ) -> torch.Tensor:
        return self.model(self.prepare(images), attention_mask=mask, text_embeds=feats)


def _resized(base: nn.Module, side: int) -> tuple[nn.Module, Callable]:
    """The untrimmed baseline on ``side``×``side`` images: the same weights, the patch
    position embeddings resized bicubically (as METER's loader does)."""
    from trimkit.adapters.meter import METER, MeterConfig
    from trimkit.adapters.meter.loader import interpolate_pos_embed

    cfg = MeterConfig(**{**asdict(base.config), "image_size": side})
    model = METER(cfg)
    state = dict(base.state_dict())
    key = "vit_model.positional_embedding"
    state[key] = interpolate_pos_embed(state[key], cfg.num_patches + 1)
    model.load_state_dict(state)

    def prepare(images: torch.Tensor) -> torch.Tensor:
        return F.interpolate(images, size=(side, side), mode="bilinear", antialias=True,
                             align_corners=False)

    return model.eval(), prepare


def _points(base: nn.Module, args: argparse.Namespace, train_set, cache: Path, task: Task
            ) -> list[Point]:
    points = [Point("untrimmed", "", base)]
    for side in task.resize_sides:
        model, prepare = _resized(base, side)
        points.append(Point("resize", f"{side}px", model, prepare,
                            shown=side == task.resize_shown))
    for recipe, (option, values, shown) in task.sweeps.items():
        for v in values:
            # the frozen MiniLM is shared: these recipes place nothing in it, so apply
            # leaves it alone (and the cached text features start the text stream at the
            # fusion layers)
            model = copy.deepcopy(base, {id(base.text_transformer): base.text_transformer})
            model = trimkit.apply(model, recipe, **{option: v}).eval()
            points.append(Point(recipe, f"{option}={v}", model, shown=v == shown))
    if not args.no_smarttrim:
        for target in args.targets:
            model, info = _smarttrim(base, target, args, train_set, cache, task)
            points.append(Point("smarttrim", f"ratio={target:g}", model, shown=True,
                                trained=_trained(info)))
    return points


def _smarttrim(base: nn.Module, target: float, args: argparse.Namespace, train_set,
               cache: Path, task: Task) -> tuple[nn.Module, dict]:
    """SmartTrim at ``target``: on scenes the shipped fine-tune (or one cached or made
    here, with `scenes.SMARTTRIM_TUNING`), on easy-VQA fine-tuned here (cached)."""
    if task.name == "scenes":
        from . import scenes

        return scenes.smarttrim(base, cache, ratio=target, steps=args.steps)
    options = smarttrim_options(trimkit.describe(base))
    return _fine_tune(base, target, train_set, cache, dict(FINE_TUNE, steps=args.steps), options)


def _trained(info: dict) -> str:
    """How a SmartTrim model was fine-tuned, and whether it shipped, for the table."""
    from . import scenes

    threads = f", {info['threads']} threads" if info.get("threads") else ""
    text = f"{info['steps']} steps, {info['train_seconds']:.0f} s{threads}"
    if info.get("path") and Path(info["path"]) == scenes.SHIPPED_SMARTTRIM:
        text += "; shipped checkpoint"
    return text


# ------------------------------------------------------------------------------ measures


@contextlib.contextmanager
def _tracking(model: nn.Module, on: bool = True) -> Iterator[None]:
    """Within: a trimmed ``model``'s forwards record which patches each token covers
    (`kept_patches` reads it after each)."""
    if not on:
        yield
        return
    ctx = trimkit.api._applied(model).ctx
    was, ctx.track_source = ctx.track_source, True
    try:
        yield
    finally:
        ctx.track_source = was


def kept_patches(model: nn.Module, stream: str = "image") -> torch.Tensor:
    """B×P bool, after a forward of a trimmed ``model`` under `_tracking`: the patches of
    ``stream`` (row-major) that some live token still covers at the end of the forward
    (merged into another token counts as covered, dropped does not)."""
    desc = trimkit.describe(model).streams[stream]
    state = trimkit.last_states(model).get(stream)
    if state is None or state.source is None:
        raise ValueError(f"the last forward did not track stream {stream!r} through a "
                         f"trimmed layer")
    return trimkit.tools.viz.patch_groups(state.source, desc.grid).flatten(1) >= 0


@torch.no_grad()
def _accuracy(point: Point, test_set, targets: torch.Tensor | None = None,
              batch_size: int = 256) -> dict:
    """Test accuracy, the mean live image tokens entering the last image layer and, where
    ``targets`` (N×P bool, the patches each question's object owns) are given, the mean
    shares of the object's patches and of all patches that the kept tokens cover."""
    from .scenes import object_coverage

    loader = torch.utils.data.DataLoader(test_set, batch_size=batch_size)
    correct, tokens, on_object, on_all = 0, [], [], []
    applied = trimkit.is_applied(point.model)
    track = applied and targets is not None
    with _tracking(point.model, track):
        for k, (images, feats, mask, labels) in enumerate(loader):
            correct += int((point(images, mask, feats).argmax(-1) == labels).sum())
            if applied:
                last = [s for s in trimkit.last_stats(point.model).layers
                        if s.stream == "image"][-1]
                tokens.append(last.tokens_out.float())
            if track:
                rows = targets[k * batch_size:k * batch_size + len(labels)]
                obj, every = object_coverage(kept_patches(point.model), rows)
                on_object.append(obj)
                on_all.append(every)
    out = {"accuracy": correct / len(test_set),
           "image_tokens": torch.cat(tokens).mean().item() if tokens else None,
           "object_kept": None, "patches_kept": None}
    if track:
        obj = torch.cat(on_object)
        out["object_kept"] = obj[~obj.isnan()].mean().item()
        out["patches_kept"] = torch.cat(on_all).mean().item()
    elif targets is not None and not applied and point.prepare is _same:
        out["object_kept"] = out["patches_kept"] = 1.0  # untrimmed: every patch
    return out


def _flops(point: Point, examples: list) -> float:
    """Mean FLOPs of one example, counted example by example."""
    return statistics.mean(trimkit.count_flops(point, images[None], mask[None], feats[None])
                           for images, feats, mask, _ in examples)


def _batches(examples: list) -> tuple[list[tuple], tuple]:
    singles = [(e[0][None], e[2][None], e[1][None]) for e in examples]
    batch = tuple(torch.stack([e[i] for e in examples]) for i in (0, 2, 1))
    return singles, batch


def _speedups(base: Point, point: Point, examples: list, repeats: int) -> dict[int, float]:
    """Median time of the untrimmed model over this point's, at batch 1 (a run of single
    examples) and at batch ``len(examples)``; the two alternate."""
    singles, batch = _batches(examples)
    out = {}
    for bs, inputs in ((1, singles), (len(examples), batch)):
        tb, tt = time_pair(base, point, inputs, warmup=1, repeats=repeats)
        out[bs] = statistics.median(tb) / statistics.median(tt)
    return out


def _measure(points: list[Point], test_set, args: argparse.Namespace,
             targets: torch.Tensor | None = None) -> None:
    from tqdm.auto import tqdm

    step = max(1, len(test_set) // args.flops_examples)
    flop_examples = [test_set[i] for i in range(0, len(test_set), step)][:args.flops_examples]
    timed = [test_set[i] for i in range(32)]
    _, batch32 = _batches(timed)
    base = points[0]
    for p in tqdm(points, desc="measuring", unit="model", dynamic_ncols=True, file=sys.stderr):
        scores = _accuracy(p, test_set, targets)
        flops = _flops(p, flop_examples)
        speed = {1: 1.0, 32: 1.0} if p is base else _speedups(base, p, timed, args.repeats)
        padded = padded_flops(p.model, p, batch32)
        p.result = dict(recipe=p.recipe, setting=p.setting, trained=p.trained,
                        accuracy=scores["accuracy"], gflops=flops / 1e9, speedup_1=speed[1],
                        speedup_32=speed[32],
                        gflops_padded_32=None if padded is None else padded / 32 / 1e9,
                        peak_mib_32=activation_peak(p, *batch32),
                        image_tokens=scores["image_tokens"],
                        object_kept=scores["object_kept"], patches_kept=scores["patches_kept"])
    for p in points:
        p.result["flops_ratio"] = base.result["gflops"] / p.result["gflops"]
        p.result["delta"] = p.result["accuracy"] - base.result["accuracy"]
    base.result["image_tokens"] = float(trimkit.describe(base.model).streams["image"].num_tokens)


# ------------------------------------------------------------------------------ report


_HEADER = ("| recipe | setting | test acc | Δ acc | GFLOPs/ex | GFLOPs/ex padded b32 "
           "| FLOPs ratio | speedup b1 | speedup b32 | act MiB b32 | image tokens (last layer) |")
_COVERAGE = " named object's patches kept | all patches kept |"


def _share(value: float | None) -> str:
    return "-" if value is None else f"{value:.1%}"


def table(rows: list[dict]) -> str:
    """The demo's Markdown table, one line per model; where the rows measured it (scenes),
    two more columns: the share of the named object's patches and of all patches that the
    kept tokens cover after the last trimmed layer."""
    coverage = any(r.get("object_kept") is not None for r in rows)
    header = _HEADER + (_COVERAGE if coverage else "")
    lines = [header, "|" + "---|" * header.count(" | ") + "---|"]
    for r in rows:
        peak = "-" if r["peak_mib_32"] is None else f"{r['peak_mib_32']:.1f}"
        tokens = "-" if r["image_tokens"] is None else f"{r['image_tokens']:.1f}"
        setting = r["setting"] + (f" (fine-tuned {r['trained']})" if r["trained"] else "")
        padded = r.get("gflops_padded_32")
        padded = "-" if padded is None else f"{padded:.4f}"
        line = (f"| {r['recipe']} | {setting or '–'} | {r['accuracy']:.2%} | "
                f"{r['delta'] * 100:+.2f} | {r['gflops']:.4f} | {padded} | "
                f"{r['flops_ratio']:.2f}× | "
                f"{r['speedup_1']:.2f}× | {r['speedup_32']:.2f}× | {peak} | {tokens} |")
        if coverage:
            line += f" {_share(r.get('object_kept'))} | {_share(r.get('patches_kept'))} |"
        lines.append(line)
    return "\n".join(lines)


def coverage_lines(rows: list[dict], recipes: tuple[str, ...] = ("pumer", "smarttrim")
                   ) -> list[str]:
    """One line per row of a text-informed or cross-modal recipe (``recipes``): how much of
    the named object its kept tokens cover, next to how much of the image, and the ratio
    of the two (above 1: the kept tokens favour the object the question names)."""
    out = []
    for r in rows:
        if r["recipe"] not in recipes or r.get("object_kept") is None:
            continue
        ratio = r["object_kept"] / r["patches_kept"] if r["patches_kept"] else float("nan")
        out.append(f"{r['recipe']} {r['setting']}: the kept tokens cover "
                   f"{r['object_kept']:.1%} of the named object's patches and "
                   f"{r['patches_kept']:.1%} of all patches ({ratio:.2f}×)")
    return out


def _plot(rows: list[dict], path: Path, task: Task) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8))
    for ax, key, label in ((axes[0], "speedup_32", "measured speedup at batch 32 (×)"),
                           (axes[1], "flops_ratio", "FLOPs ratio, untrimmed / trimmed (×)")):
        for recipe in dict.fromkeys(r["recipe"] for r in rows):
            rs = sorted((r for r in rows if r["recipe"] == recipe), key=lambda r: r[key])
            xs, ys = [r[key] for r in rs], [r["accuracy"] * 100 for r in rs]
            if recipe == "untrimmed":
                ax.scatter(xs, ys, marker="*", s=220, color="black", zorder=3, label=recipe)
            else:
                ax.plot(xs, ys, marker="o", label=recipe)
                for r, x, y in zip(rs, xs, ys, strict=True):
                    ax.annotate(r["setting"], (x, y), textcoords="offset points",
                                xytext=(3, 5), fontsize=6, rotation=35)
        ax.set_xlabel(label)
        ax.set_ylabel(f"{task.title} test accuracy (%)")
        ax.grid(alpha=0.3)
    axes[0].axvline(1.0, color="grey", lw=0.8, ls="--")
    axes[0].legend(fontsize=8)
    fig.suptitle(f"trimkit demo: METER on {task.title}, every recipe against the untrimmed "
                 "model")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


@torch.no_grad()
def picture_questions(image_index: torch.Tensor, count: int) -> list[int]:
    """``count`` questions on distinct images, for the picture: of the ``j``-th image with
    questions, its ``j``-th question (cycling), so the kinds of question vary."""
    out: list[int] = []
    for img in dict.fromkeys(image_index.tolist()):
        qs = (image_index == img).nonzero().flatten().tolist()
        out.append(qs[len(out) % len(qs)])
        if len(out) == count:
            break
    return out


@torch.no_grad()
def _picture(points: list[Point], test, test_set, path: Path, count: int = 4) -> list[dict]:
    """Test images (a question each on distinct images), with the patches each shown recipe
    kept (on scenes, the object the question names boxed), the question, the true answer
    and every model's answer."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    from .easy_vqa import _MEAN, _STD

    picks = picture_questions(test.image_index[:len(test_set)], count)
    count = len(picks)
    examples = [test_set[i] for i in picks]
    _, (images, mask, feats) = _batches(examples)
    shown = [points[0]] + [p for p in points if p.shown]
    answers = {id(p): p(images, mask, feats).argmax(-1).tolist() for p in shown}
    raw = (images * _STD + _MEAN).clamp(0, 1)
    scale = max(1, 256 // raw.shape[-1])
    big = F.interpolate(raw, scale_factor=scale, mode="nearest")
    boxes = getattr(test, "boxes", None)  # scenes: the named object's box, in pixels
    fig, axes = plt.subplots(count, len(shown), figsize=(2.3 * len(shown), 2.9 * count),
                             squeeze=False)
    records = []
    for p in shown:
        if trimkit.is_applied(p.model):
            groups = trimkit.tools.viz.token_groups(p.model, p.prepare(images), attention_mask=mask,
                                              text_embeds=feats)
            pics = [trimkit.tools.viz.draw(big[k], groups[k]) for k in range(count)]
        else:  # what the (maybe shrunk) untrimmed model sees
            seen_img = (p.prepare(images) * _STD + _MEAN).clamp(0, 1)
            pics = [F.interpolate(seen_img[k:k + 1], size=big.shape[-2:], mode="nearest")[0]
                    .permute(1, 2, 0) for k in range(count)]
        for k in range(count):
            ans = test.answers[answers[id(p)][k]]
            ok = ans == test.answers[int(test.labels[picks[k]])]
            ax = axes[k][shown.index(p)]
            ax.imshow(pics[k].numpy())
            if boxes is not None:
                x0, y0, x1, y1 = (boxes[picks[k]] * scale).tolist()
                ax.add_patch(Rectangle((x0 - 0.5, y0 - 0.5), x1 - x0, y1 - y0, fill=False,
                                       lw=1.2, ls="--", color="magenta"))
            ax.set_xticks([])
            ax.set_yticks([])
            name = p.recipe + (f" {p.setting}" if p.setting else "")
            ax.set_title(f"{name}\n→ {ans}", fontsize=8, color="green" if ok else "red")
    for k, i in enumerate(picks):
        q = test.texts[i]
        truth = test.answers[int(test.labels[i])]
        axes[k][0].set_ylabel("\n".join(textwrap.wrap(q, 28)) + f"\n(true: {truth})",
                              fontsize=8)
        records.append({"question": q, "true": truth,
                        **{f"{p.recipe} {p.setting}".strip(): test.answers[answers[id(p)][k]]
                           for p in shown}})
    fig.suptitle("patches each recipe kept at the last layer: dropped dimmed, merged outlined "
                 "by group; green = right answer"
                 + ("; dashed: the object the question names" if boxes is not None else ""),
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return records


# ------------------------------------------------------------------------------ command


def _splits(task: Task, train: bool) -> tuple[Any, Any]:
    """The task's test split, and its train split when ``train`` (else ``None``)."""
    if task.name == "scenes":
        from .scenes import load_split
    else:
        from .easy_vqa import load_split
    return load_split("test"), (load_split("train") if train else None)


def run(args: argparse.Namespace) -> int:
    from . import easy_vqa

    start = time.perf_counter()
    task = TASKS[args.task]
    if args.steps is None:
        from .scenes import SMARTTRIM_TUNING

        args.steps = task.steps if task.steps is not None else SMARTTRIM_TUNING["steps"]
    args.questions = task.questions if args.questions is None else args.questions
    args.repeats = task.repeats if args.repeats is None else args.repeats
    if args.threads:
        torch.set_num_threads(args.threads)
    if min(args.steps, args.repeats, args.flops_examples) < 1 or 0 < args.questions < 32 \
            or args.questions < 0:
        _say("error: --steps, --repeats and --flops-examples must be >= 1, --questions 0 (all) "
             "or >= 32 (the batch timed)")
        return 2
    cache = Path(args.cache_dir) if args.cache_dir else easy_vqa.default_cache_dir()
    out = Path(args.out)
    base, info = _baseline(args, cache)
    # scenes: SmartTrim's fine-tune ships; scenes.smarttrim makes the train split if needed
    test, train = _splits(task, not args.no_smarttrim and task.name != "scenes")
    test_set = _Questions(test, *easy_vqa.text_features(test.questions, cache))
    if args.questions:
        test_set = torch.utils.data.Subset(test_set, range(min(args.questions, len(test_set))))
    train_set = None
    if train is not None:
        train_set = _Questions(train, *easy_vqa.text_features(train.questions, cache))
    # scenes record the patches each question's object owns: the coverage columns
    targets = test.target_grid()[:len(test_set)] if hasattr(test, "target_grid") else None
    points = _points(base, args, train_set, cache, task)
    _measure(points, test_set, args, targets)
    rows = [p.result for p in points]
    out.mkdir(parents=True, exist_ok=True)
    _plot(rows, out / "accuracy_vs_speedup.png", task)
    examples = _picture(points, test, test_set, out / "kept_tokens.png")
    md = table(rows)
    covered = coverage_lines(rows)
    setup = (f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} "
             f"thread(s), torch {torch.__version__}")
    model = ("the small METER on easy-VQA" if task.name == "easy-vqa"
             else "the scenes METER (scenes.SCENES_MODEL) on scenes")
    notes = ""
    if covered:
        notes = ("\n\nThe kept tokens and the object each question names (share of its "
                 "patches still covered by a live token after the last trimmed layer, next "
                 "to the share of all patches):\n\n" + "\n".join(f"- {c}" for c in covered))
    (out / "results.md").write_text(
        f"# trimkit demo\n\n{model[0].upper() + model[1:]} ({len(test_set)} test "
        f"questions), {setup}. Speedups are medians of {args.repeats} alternating runs "
        f"against the untrimmed model; GFLOPs per example exclude the frozen MiniLM.\n\n"
        f"{md}{notes}\n\n![accuracy vs speedup](accuracy_vs_speedup.png)\n\n"
        f"![kept tokens](kept_tokens.png)\n")
    (out / "results.json").write_text(json.dumps({
        "task": task.name, "rows": rows, "examples": examples, "setup": setup,
        "repeats": args.repeats,
        "baseline": {k: info[k] for k in ("accuracy", "train_seconds", "gflops") if k in info},
        "command": "trimkit demo " + " ".join(sys.argv[2:])}, indent=2))
    print(md)
    if covered:
        print("\nthe kept tokens and the object each question names (text-informed and "
              "cross-modal recipes):")
        for c in covered:
            print(f"  {c}")
    print(f"\nreport: {out}/results.md, results.json, accuracy_vs_speedup.png, "
          f"kept_tokens.png ({(time.perf_counter() - start) / 60:.1f} min)")
    print("next: the same recipes at METER-base sizes, where trimming pays more: "
          "trimkit bench --model meter-base --recipe pumer --batch-size 1 32")
    return 0


def _baseline(args: argparse.Namespace, cache: Path) -> tuple[nn.Module, dict]:
    """The shipped baseline of ``args.task`` (default easy-VQA), else the cached one, else
    a fresh one (``--train-baseline`` forces the last)."""
    from . import easy_vqa, scenes

    on_scenes = getattr(args, "task", "easy-vqa") == "scenes"
    module = scenes if on_scenes else easy_vqa
    cached = cache / ("scenes_baseline.pt" if on_scenes else "baseline.pt")
    if not args.train_baseline:
        for path in (Path(args.baseline) if args.baseline else module.SHIPPED_BASELINE, cached):
            if path.exists():
                loaded = module.load_baseline(path)
                if loaded is not None:
                    _say(f"baseline: {path} (test accuracy {loaded[1]['accuracy']:.2%})")
                    return loaded
                _say(f"baseline: {path} was trained with other settings; skipped")
            elif args.baseline:
                raise SystemExit(f"error: --baseline {path} does not exist")
        _say("baseline: none found; training it ("
             + ("about an hour" if on_scenes else "about 8 minutes") + " on 2 cores)")
    if on_scenes:
        return scenes.train_baseline(cached, cache, log=_say)
    return easy_vqa.train_baseline(cache, retrain=args.train_baseline, log=_say)


def configure(p: argparse.ArgumentParser) -> None:
    p.add_argument("--task", choices=list(TASKS), default=DEFAULT_TASK,
                   help=f"scenes (several objects, the question names one; SmartTrim's "
                        f"fine-tune ships) or easy-vqa (one shape per image; SmartTrim is "
                        f"fine-tuned here) (default: {DEFAULT_TASK})")
    p.add_argument("--out", default="trimkit-demo",
                   help="report folder (default: ./trimkit-demo)")
    p.add_argument("--steps", type=int, default=None,
                   help=f"SmartTrim fine-tuning steps (default: easy-vqa {DEMO_STEPS}, cached; "
                        f"scenes those of the shipped fine-tune)")
    p.add_argument("--targets", type=float, nargs="+", default=[0.5],
                   help="SmartTrim target cost ratios (default: 0.5)")
    p.add_argument("--no-smarttrim", action="store_true",
                   help="skip SmartTrim (the only recipe here that trains)")
    p.add_argument("--questions", type=int, default=None, metavar="N",
                   help="evaluate on the first N test questions only, 0 for all (default: "
                        + ", ".join(f"{t.name} {t.questions or 'all'}" for t in TASKS.values())
                        + "; scenes has 2,000, easy-VQA 9,673)")
    p.add_argument("--repeats", type=int, default=None,
                   help="timed runs of each (default: "
                        + ", ".join(f"{t.name} {t.repeats}" for t in TASKS.values()) + ")")
    p.add_argument("--flops-examples", type=int, default=50,
                   help="test examples whose FLOPs are counted one by one (default: 50)")
    p.add_argument("--baseline", default=None, metavar="PATH",
                   help="a baseline checkpoint to use (default: the shipped one)")
    p.add_argument("--train-baseline", action="store_true",
                   help="train the baseline again into --cache-dir and use it")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--cache-dir", default=None,
                   help="where text features, a trained baseline and fine-tuned models are "
                        "cached (default: $TRIMKIT_CACHE or ~/.cache/trimkit/easy_vqa)")


register_command(Command(
    "demo", help="every recipe on scenes or easy-VQA: accuracy, FLOPs, speed, memory, "
                 "pictures",
    description=__doc__.split("\n\n", 1)[1], configure=configure, run=run, epilog=EPILOG))
