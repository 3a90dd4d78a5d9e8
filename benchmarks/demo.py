"""``trimkit demo``: every recipe on a real model and real data, in one command.

The model is the small METER of `easy_vqa` (a CLIP-style ViT on 64×64 images, the
pretrained MiniLM as its text encoder, co-attention fusion) trained on easy-VQA: the
baseline that ships with the project (``benchmarks/data/easy_vqa_baseline.pt``), else the
one cached in ``--cache-dir``, else one trained on the spot (about 8 minutes on 2 cores;
``--train-baseline`` trains it again whatever is there). The demo runs it untrimmed, with
the training-free recipes (ToMe, attention-score pruning, PuMer) at a few settings each,
with SmartTrim fine-tuned for ``--steps`` steps (cached), and with the *resize baseline*:
the untrimmed model on images shrunk to fewer patches (position embeddings interpolated),
since a token-reduction method is only worth using where it beats shrinking the input.

For each it measures the test accuracy (all 9,673 questions), the GFLOPs per example and
the FLOPs ratio against the untrimmed model (`trimkit.count_flops`; the frozen MiniLM runs
once per distinct question and is not counted), the measured speedup at batch 1 and 32
(median of alternating runs against the untrimmed model in this process), the activation
peak of one batch-32 forward, and the image tokens left at the last layer. It prints the
table and writes a report folder (``--out``): ``results.md`` and ``results.json`` (the
table), ``accuracy_vs_speedup.png`` (every recipe a curve) and ``kept_tokens.png`` (test
images with the patches each recipe kept: dropped ones dimmed, merged ones outlined by
group; the question, the true answer and each model's answer).
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import sys
import textwrap
import time
from collections.abc import Callable
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

#: training-free recipes: (option swept, its values, the value shown in the picture)
SWEEPS: dict[str, tuple[str, list, Any]] = {
    "tome": ("r", [4, 8, 12], 8),
    "attn_prune": ("keep_ratio", [0.7, 0.5, 0.3], 0.5),
    "pumer": ("prune_ratio", [0.2, 0.4, 0.6], 0.2),
}
#: the resize baseline's image sides (multiples of the 8-pixel patch; 64 is the native)
RESIZE_SIDES = [56, 48, 40]
RESIZE_SHOWN = 48
#: SmartTrim's fine-tuning in the demo (the full benchmark, ``trimkit bench-vqa``, uses 400)
DEMO_STEPS = 150

EPILOG = """\
examples:
  trimkit demo                          # everything, report in ./trimkit-demo
  trimkit demo --out report --steps 400 # SmartTrim fine-tuned as long as in bench-vqa
  trimkit demo --no-smarttrim           # training-free recipes only (about 3 minutes)
  trimkit demo --train-baseline         # train the baseline again (about 8 more minutes)"""


# ------------------------------------------------------------------------------ points


@dataclass
class Point:
    """One model of the demo: a recipe at one setting (or the untrimmed model, or a
    resize)."""

    recipe: str
    setting: str
    model: nn.Module = field(repr=False)
    #: what the images go through first (the resize baseline shrinks them)
    prepare: Callable[[torch.Tensor], torch.Tensor] = field(default=lambda x: x, repr=False)
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


def _points(base: nn.Module, args: argparse.Namespace, train_set, cache: Path) -> list[Point]:
    points = [Point("untrimmed", "", base)]
    for side in RESIZE_SIDES:
        model, prepare = _resized(base, side)
        points.append(Point("resize", f"{side}px", model, prepare, shown=side == RESIZE_SHOWN))
    for recipe, (option, values, shown) in SWEEPS.items():
        for v in values:
            # the frozen MiniLM is shared: these recipes place nothing in it, so apply
            # leaves it alone (and the cached text features start the text stream at the
            # fusion layers)
            model = copy.deepcopy(base, {id(base.text_transformer): base.text_transformer})
            model = trimkit.apply(model, recipe, **{option: v}).eval()
            points.append(Point(recipe, f"{option}={v}", model, shown=v == shown))
    if not args.no_smarttrim:
        options = smarttrim_options(trimkit.describe(base))
        cfg = dict(FINE_TUNE, steps=args.steps)
        for target in args.targets:
            model, info = _fine_tune(base, target, train_set, cache, cfg, options)
            points.append(Point("smarttrim", f"ratio={target:g}", model, shown=True,
                                trained=f"{args.steps} steps, {info['train_seconds']:.0f} s"))
    return points


# ------------------------------------------------------------------------------ measures


@torch.no_grad()
def _accuracy(point: Point, test_set, batch_size: int = 256) -> tuple[float, float | None]:
    """Test accuracy, and the mean live image tokens entering the last image layer."""
    loader = torch.utils.data.DataLoader(test_set, batch_size=batch_size)
    correct, tokens = 0, []
    applied = trimkit.is_applied(point.model)
    for images, feats, mask, labels in loader:
        correct += int((point(images, mask, feats).argmax(-1) == labels).sum())
        if applied:
            last = [s for s in trimkit.last_stats(point.model).layers if s.stream == "image"][-1]
            tokens.append(last.tokens_out.float())
    return correct / len(test_set), (torch.cat(tokens).mean().item() if tokens else None)


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


def _measure(points: list[Point], test_set, args: argparse.Namespace) -> None:
    from tqdm.auto import tqdm

    step = max(1, len(test_set) // args.flops_examples)
    flop_examples = [test_set[i] for i in range(0, len(test_set), step)][:args.flops_examples]
    timed = [test_set[i] for i in range(32)]
    _, batch32 = _batches(timed)
    base = points[0]
    for p in tqdm(points, desc="measuring", unit="model", dynamic_ncols=True, file=sys.stderr):
        acc, tokens = _accuracy(p, test_set)
        flops = _flops(p, flop_examples)
        speed = {1: 1.0, 32: 1.0} if p is base else _speedups(base, p, timed, args.repeats)
        padded = padded_flops(p.model, p, batch32)
        p.result = dict(recipe=p.recipe, setting=p.setting, trained=p.trained, accuracy=acc,
                        gflops=flops / 1e9, speedup_1=speed[1], speedup_32=speed[32],
                        gflops_padded_32=None if padded is None else padded / 32 / 1e9,
                        peak_mib_32=activation_peak(p, *batch32), image_tokens=tokens)
    for p in points:
        p.result["flops_ratio"] = base.result["gflops"] / p.result["gflops"]
        p.result["delta"] = p.result["accuracy"] - base.result["accuracy"]
    base.result["image_tokens"] = float(trimkit.describe(base.model).streams["image"].num_tokens)


# ------------------------------------------------------------------------------ report


_HEADER = ("| recipe | setting | test acc | Δ acc | GFLOPs/ex | GFLOPs/ex padded b32 "
           "| FLOPs ratio | speedup b1 | speedup b32 | act MiB b32 | image tokens (last layer) |")


def table(rows: list[dict]) -> str:
    """The demo's Markdown table, one line per model."""
    lines = [_HEADER, "|" + "---|" * _HEADER.count(" | ") + "---|"]
    for r in rows:
        peak = "-" if r["peak_mib_32"] is None else f"{r['peak_mib_32']:.1f}"
        tokens = "-" if r["image_tokens"] is None else f"{r['image_tokens']:.1f}"
        setting = r["setting"] + (f" (fine-tuned {r['trained']})" if r["trained"] else "")
        padded = r.get("gflops_padded_32")
        padded = "-" if padded is None else f"{padded:.4f}"
        lines.append(
            f"| {r['recipe']} | {setting or '–'} | {r['accuracy']:.2%} | "
            f"{r['delta'] * 100:+.2f} | {r['gflops']:.4f} | {padded} | "
            f"{r['flops_ratio']:.2f}× | "
            f"{r['speedup_1']:.2f}× | {r['speedup_32']:.2f}× | {peak} | {tokens} |")
    return "\n".join(lines)


def _plot(rows: list[dict], path: Path) -> None:
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
        ax.set_ylabel("easy-VQA test accuracy (%)")
        ax.grid(alpha=0.3)
    axes[0].axvline(1.0, color="grey", lw=0.8, ls="--")
    axes[0].legend(fontsize=8)
    fig.suptitle("trimkit demo: small METER on easy-VQA, every recipe against the untrimmed "
                 "model")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


@torch.no_grad()
def _picture(points: list[Point], test, test_set, path: Path, count: int = 4) -> list[dict]:
    """Test images (first questions of distinct images), with the patches each shown recipe
    kept, the question, the true answer and every model's answer."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .easy_vqa import _MEAN, _STD

    picks, seen = [], set()
    for i in range(len(test_set)):
        img = int(test.image_index[i])
        if img not in seen:
            seen.add(img)
            picks.append(i)
        if len(picks) == count:
            break
    examples = [test_set[i] for i in picks]
    _, (images, mask, feats) = _batches(examples)
    shown = [points[0]] + [p for p in points if p.shown]
    answers = {id(p): p(images, mask, feats).argmax(-1).tolist() for p in shown}
    raw = (images * _STD + _MEAN).clamp(0, 1)
    big = F.interpolate(raw, scale_factor=4, mode="nearest")
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
                 "by group; green = right answer", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return records


# ------------------------------------------------------------------------------ command


def run(args: argparse.Namespace) -> int:
    from . import easy_vqa

    start = time.perf_counter()
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
    test = easy_vqa.load_split("test")
    test_set = _Questions(test, *easy_vqa.text_features(test.questions, cache))
    if args.questions:
        test_set = torch.utils.data.Subset(test_set, range(min(args.questions, len(test_set))))
    train_set = None
    if not args.no_smarttrim:
        train = easy_vqa.load_split("train")
        train_set = _Questions(train, *easy_vqa.text_features(train.questions, cache))
    points = _points(base, args, train_set, cache)
    _measure(points, test_set, args)
    rows = [p.result for p in points]
    out.mkdir(parents=True, exist_ok=True)
    _plot(rows, out / "accuracy_vs_speedup.png")
    examples = _picture(points, test, test_set, out / "kept_tokens.png")
    md = table(rows)
    setup = (f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} "
             f"thread(s), torch {torch.__version__}")
    (out / "results.md").write_text(
        f"# trimkit demo\n\nSmall METER on easy-VQA ({len(test_set)} test questions), "
        f"{setup}. Speedups are medians of {args.repeats} alternating runs against the "
        f"untrimmed model; GFLOPs per example exclude the frozen MiniLM.\n\n{md}\n\n"
        f"![accuracy vs speedup](accuracy_vs_speedup.png)\n\n"
        f"![kept tokens](kept_tokens.png)\n")
    (out / "results.json").write_text(json.dumps({
        "rows": rows, "examples": examples, "setup": setup, "repeats": args.repeats,
        "baseline": {k: info[k] for k in ("accuracy", "train_seconds", "gflops") if k in info},
        "command": "trimkit demo " + " ".join(sys.argv[2:])}, indent=2))
    print(md)
    print(f"\nreport: {out}/results.md, results.json, accuracy_vs_speedup.png, "
          f"kept_tokens.png ({(time.perf_counter() - start) / 60:.1f} min)")
    print("next: the same recipes at METER-base sizes, where trimming pays more: "
          "trimkit bench --model meter-base --recipe pumer --batch-size 1 32")
    return 0


def _baseline(args: argparse.Namespace, cache: Path) -> tuple[nn.Module, dict]:
    """The shipped baseline, else the cached one, else a fresh one (``--train-baseline``
    forces the last)."""
    from . import easy_vqa

    if not args.train_baseline:
        for path in (Path(args.baseline) if args.baseline else easy_vqa.SHIPPED_BASELINE,
                     cache / "baseline.pt"):
            if path.exists():
                loaded = easy_vqa.load_baseline(path)
                if loaded is not None:
                    _say(f"baseline: {path} (test accuracy {loaded[1]['accuracy']:.2%})")
                    return loaded
                _say(f"baseline: {path} was trained with other settings; skipped")
            elif args.baseline:
                raise SystemExit(f"error: --baseline {path} does not exist")
        _say("baseline: none found; training it (about 8 minutes on 2 cores)")
    return easy_vqa.train_baseline(cache, retrain=args.train_baseline, log=_say)


def configure(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="trimkit-demo",
                   help="report folder (default: ./trimkit-demo)")
    p.add_argument("--steps", type=int, default=DEMO_STEPS,
                   help=f"SmartTrim fine-tuning steps (default: {DEMO_STEPS}; cached)")
    p.add_argument("--targets", type=float, nargs="+", default=[0.5],
                   help="SmartTrim target cost ratios (default: 0.5)")
    p.add_argument("--no-smarttrim", action="store_true",
                   help="skip SmartTrim (the only recipe here that trains)")
    p.add_argument("--questions", type=int, default=0, metavar="N",
                   help="evaluate on the first N test questions only (default: all 9,673)")
    p.add_argument("--repeats", type=int, default=5, help="timed runs of each (default: 5)")
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
    "demo", help="every recipe on easy-VQA: accuracy, FLOPs, speed, memory, pictures",
    description=__doc__.split("\n\n", 1)[1], configure=configure, run=run, epilog=EPILOG))
