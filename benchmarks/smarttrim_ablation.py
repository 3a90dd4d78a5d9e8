"""``trimkit smarttrim-ablation``: the SmartTrim paper's ablations on the demo's tasks.

The demo's model and data (`trimkit demo`; ``--task easy-vqa``, the default here: the small
METER of `easy_vqa` from the shipped baseline; ``--task scenes``: the scenes METER from its
shipped baseline), SmartTrim fine-tuned as the demo fine-tunes it (its options
`bench_vqa.SMARTTRIM`, ``--steps`` steps of `trimkit.train`, cached in ``--cache-dir``; on
scenes `scenes.SMARTTRIM_TUNING`, and the ``trimkit`` variant is the shipped fine-tune) once
per variant:

- ``trimkit``: the recipe as it ships (trimkit's stabilisers on);
- ``paper``: ``preset="paper"``, the stabilisers off (no Gumbel noise annealing, unbounded
  logits, raw pooled tokens, thresholds at the trimmers' learning rate, ``lambda_cost=10``);
- the paper's ablations, each one change from ``trimkit``: ``cross_modal=False`` (token
  trimmers read their own stream only), ``stable_init=False``, no curriculum
  (``warmup=0``), no self-distillation (``lambda_sd=0``), tokens only (``heads=False``) and
  heads only (``tokens=False``; heads alone cannot reach the target, so it gets the lowest
  target its placement reaches, rounded up to 0.05, plus 0.05).

For each: test accuracy (the first ``--questions`` test questions), the FLOPs ratio against
the untrimmed model (`trimkit.count_flops` per example, trimmers included, the frozen MiniLM
excluded as in the demo), and the achieved cost ratio (`trimkit.recording_costs`, the mean
over the test questions) next to its target; on scenes also the share of the named object's
patches and of all patches that the kept tokens cover after the last trimmed layer (as in
the demo). A fine-tune on scenes costs several minutes, so there only ``trimkit`` and
``cross_modal=False`` run unless ``--variants`` says otherwise: the paper's check that
cross-modal-aware token trimmers beat local-only ones at equal FLOPs. The paper's trends are
printed under the table to compare with; these are toy tasks and short fine-tunes, so read
the table for what it shows on them, not as a reproduction.
"""

from __future__ import annotations

import argparse
import copy
import math
import statistics
import time
from pathlib import Path

import torch
from torch import nn

import trimkit
from trimkit.registry import Command, register_command

from .bench_vqa import FINE_TUNE, SMARTTRIM, _fine_tune, _forward, _Questions, _say

#: the demo's ratio; ``--steps``: short enough for the whole easy-VQA table in about 10
#: minutes on two cores (the demo fine-tunes 150 steps; on scenes: the shipped fine-tune's)
RATIO = 0.5
STEPS = 60
#: the variants run on scenes by default: the cross-modal check
SCENES_VARIANTS = ["trimkit", "cross_modal=False"]

#: (name, options changed from the demo's SmartTrim)
VARIANTS: list[tuple[str, dict]] = [
    ("trimkit", {}),
    ("paper", {"preset": "paper"}),
    ("cross_modal=False", {"cross_modal": False}),
    ("stable_init=False", {"stable_init": False}),
    ("warmup=0", {"warmup": 0.0}),
    ("lambda_sd=0", {"lambda_sd": 0.0}),
    ("tokens only", {"heads": False}),
    ("heads only", {"tokens": False}),
]

PAPER_TRENDS = """\
The paper's trends (its Table of ablations, METER on VQA and NLVR2, 2-3x fewer FLOPs):
- without stable initialisation, NLVR2 collapses to chance (81.89 -> 50.85) while VQA drops
  76.56 -> 74.72;
- cross-modal-aware token trimmers beat local-only ones at equal FLOPs;
- the curriculum, self-distillation, and trimming both tokens and heads each help."""


def options_for(change: dict) -> dict:
    """The demo's SmartTrim options with ``change``; under ``preset="paper"`` the demo's own
    stabiliser settings give way to the preset's."""
    from trimkit.recipes.smarttrim import PAPER

    base = dict(SMARTTRIM)
    if change.get("preset") == "paper":
        base = {k: v for k, v in base.items() if k not in PAPER}
    return {**base, **change}


def target_for(base: nn.Module, options: dict, ratio: float) -> float:
    """``ratio``, or for a placement that cannot reach it (heads only) the lowest target it
    reaches, rounded up to 0.05, plus 0.05."""
    from trimkit.recipes.smarttrim import reach

    model = trimkit.apply(copy.deepcopy(base), "smarttrim", **dict(options, lambda_cost=0.0))
    applied = trimkit.api._applied(model)
    ops = {(s.stream, s.layer): list(s.pre) for s in model.trimkit.values()}
    floor = reach(applied.description, ops, applied.options).ratio
    if ratio >= floor:
        return ratio
    return min(1.0, math.ceil(floor / 0.05 - 1e-9) * 0.05 + 0.05)


@torch.no_grad()
def evaluate(model: nn.Module, test_set, flop_examples: list, batch_size: int = 256,
             targets: torch.Tensor | None = None) -> dict:
    """Accuracy, achieved cost ratio (mean per question), mean FLOPs per example, image
    tokens entering the last image layer and, with ``targets`` (N×P bool: the patches each
    question's object owns, scenes), the mean shares of the object's patches and of all
    patches the kept tokens cover (`scenes.object_coverage`)."""
    from .demo import _tracking, kept_patches
    from .scenes import object_coverage

    loader = torch.utils.data.DataLoader(test_set, batch_size=batch_size)
    correct, ratios, tokens, on_object, on_all = 0, [], [], [], []
    applied = trimkit.is_applied(model)
    track = applied and targets is not None
    if applied:  # padded, one row per sample: the recorded counts are per sample
        trimkit.set_mode(model, "compacted")
    for k, batch in enumerate(loader):
        if applied:
            with trimkit.recording_costs(model) as costs, _tracking(model, track):
                out = _forward(model, batch)
            ratios.append(costs.ratio())
            last = [s for s in trimkit.last_stats(model).layers if s.stream == "image"][-1]
            tokens.append(last.tokens_in.float())
            if track:
                rows = targets[k * batch_size:k * batch_size + len(batch[-1])]
                obj, every = object_coverage(kept_patches(model), rows)
                on_object.append(obj)
                on_all.append(every)
        else:
            out = _forward(model, batch)
        correct += int((out.argmax(-1) == batch[-1]).sum())
    if applied:
        trimkit.set_mode(model, "auto")
    coverage = dict(object_kept=None, patches_kept=None)
    if on_object:
        obj = torch.cat(on_object)
        coverage = dict(object_kept=obj[~obj.isnan()].mean().item(),
                        patches_kept=torch.cat(on_all).mean().item())
    flops = statistics.mean(
        trimkit.count_flops(model, images[None], attention_mask=mask[None],
                            text_embeds=feats[None])
        for images, feats, mask, _ in flop_examples)
    return dict(accuracy=correct / len(test_set), flops=flops,
                achieved=torch.cat(ratios).mean().item() if ratios else 1.0,
                image_tokens=torch.cat(tokens).mean().item() if tokens else None, **coverage)


def table(rows: list[dict]) -> str:
    """The ablation table; with the coverage columns where the rows measured them."""
    coverage = any(r.get("object_kept") is not None for r in rows)
    lines = ["| variant | options | target | test acc | Δ acc | FLOPs ratio | achieved ratio "
             "| image tokens (last layer) | fine-tune |"
             + (" named object's patches kept | all patches kept |" if coverage else ""),
             "|---|---|---|---|---|---|---|---|---|" + ("---|---|" if coverage else "")]
    for r in rows:
        change = ", ".join(f"{k}={v!r}" for k, v in r["change"].items()) or "–"
        tokens = "-" if r["image_tokens"] is None else f"{r['image_tokens']:.1f}"
        target = "–" if r["target"] is None else f"{r['target']:g}"
        trained = "–" if r["seconds"] is None else f"{r['steps']} steps, {r['seconds']:.0f} s"
        line = (f"| {r['variant']} | {change} | {target} | {r['accuracy']:.2%} | "
                f"{r['delta'] * 100:+.2f} | {r['flops_ratio']:.2f}× | {r['achieved']:.3f} | "
                f"{tokens} | {trained} |")
        if coverage:
            line += "".join(" - |" if r.get(k) is None else f" {r[k]:.1%} |"
                            for k in ("object_kept", "patches_kept"))
        lines.append(line)
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    from . import easy_vqa, scenes
    from .demo import TASKS, _baseline, _splits

    start = time.perf_counter()
    on_scenes = args.task == "scenes"
    if args.steps is None:
        args.steps = scenes.SMARTTRIM_TUNING["steps"] if on_scenes else STEPS
    if args.variants is None:
        args.variants = SCENES_VARIANTS if on_scenes else [n for n, _ in VARIANTS]
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.steps < 1 or args.questions < 1 or args.flops_examples < 1:
        _say("error: --steps, --questions and --flops-examples must be >= 1")
        return 2
    unknown = [v for v in args.variants if v not in dict(VARIANTS)]
    if unknown:
        _say(f"error: unknown variant(s) {unknown}; variants: {', '.join(dict(VARIANTS))}")
        return 2
    cache = Path(args.cache_dir) if args.cache_dir else easy_vqa.default_cache_dir()
    base, _ = _baseline(argparse.Namespace(task=args.task, train_baseline=False,
                                           baseline=args.baseline), cache)
    test, train = _splits(TASKS[args.task], True)
    train_set = _Questions(train, *easy_vqa.text_features(train.questions, cache))
    test_set = _Questions(test, *easy_vqa.text_features(test.questions, cache))
    test_set = torch.utils.data.Subset(test_set, range(min(args.questions, len(test_set))))
    targets = test.target_grid()[:len(test_set)] if on_scenes else None
    step = max(1, len(test_set) // args.flops_examples)
    flop_examples = [test_set[i] for i in range(0, len(test_set), step)][:args.flops_examples]

    reference = evaluate(base, test_set, flop_examples)
    rows = [dict(variant="untrimmed", change={}, target=None, steps=None, seconds=None,
                 **reference)]
    cfg = dict(FINE_TUNE, steps=args.steps)
    chosen = [(name, change) for name, change in VARIANTS if name in args.variants]
    for name, change in chosen:
        options = options_for(change)
        target = target_for(base, options, args.ratio)
        _say(f"{name}: fine-tuning to ratio {target:g} ({args.steps} steps)")
        if on_scenes:
            model, info = scenes.smarttrim(base, cache, ratio=target, options=options,
                                           steps=args.steps)
        else:
            model, info = _fine_tune(base, target, train_set, cache, cfg, options)
        got = evaluate(model, test_set, flop_examples, targets=targets)
        rows.append(dict(variant=name, change=change, target=target, steps=info["steps"],
                         seconds=info.get("train_seconds"), **got))
        _say(f"{name}: accuracy {got['accuracy']:.2%}, achieved ratio {got['achieved']:.3f}")
    for r in rows:
        r["flops_ratio"] = reference["flops"] / r["flops"]
        r["delta"] = r["accuracy"] - reference["accuracy"]
    title = "scenes (the scenes METER" if on_scenes else "easy-VQA (the demo's METER"
    print(f"SmartTrim ablations on {title}; {len(test_set)} test questions; {args.steps} "
          f"fine-tuning steps; target {args.ratio:g})\n")
    print(table(rows))
    print()
    print(PAPER_TRENDS)
    _say(f"smarttrim-ablation finished in {(time.perf_counter() - start) / 60:.1f} min")
    return 0


def configure(p: argparse.ArgumentParser) -> None:
    p.add_argument("--task", choices=["easy-vqa", "scenes"], default="easy-vqa",
                   help="the demo's task (default: easy-vqa; scenes: several objects, the "
                        "question names one)")
    p.add_argument("--steps", type=int, default=None,
                   help=f"fine-tuning steps per variant (default: easy-vqa {STEPS}, scenes "
                        f"those of the shipped fine-tune; cached)")
    p.add_argument("--ratio", type=float, default=RATIO,
                   help=f"target cost ratio (default: {RATIO})")
    p.add_argument("--variants", nargs="+", default=None,
                   metavar="NAME", help=f"variants to run (default: easy-vqa all: "
                                        f"{', '.join(n for n, _ in VARIANTS)}; scenes "
                                        f"{', '.join(SCENES_VARIANTS)})")
    p.add_argument("--questions", type=int, default=2000,
                   help="test questions evaluated (the first N; default: 2000)")
    p.add_argument("--flops-examples", type=int, default=20,
                   help="test examples whose FLOPs are counted one by one (default: 20)")
    p.add_argument("--baseline", default=None, metavar="PATH",
                   help="a baseline checkpoint (default: the shipped one)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--cache-dir", default=None,
                   help="where text features and fine-tuned models are cached (default: "
                        "$TRIMKIT_CACHE or ~/.cache/trimkit/easy_vqa)")


register_command(Command(
    "smarttrim-ablation", help="the SmartTrim paper's ablations on easy-VQA or scenes: "
                               "accuracy, FLOPs ratio and achieved ratio per variant",
    description=__doc__.split("\n\n", 1)[1], configure=configure, run=run, epilog="""\
examples:
  trimkit smarttrim-ablation                        # every variant, 60 steps each
  trimkit smarttrim-ablation --steps 150            # as long as the demo's fine-tune
  trimkit smarttrim-ablation --variants trimkit cross_modal=False --questions 9673
  trimkit smarttrim-ablation --task scenes          # cross-modal vs local-only trimmers"""))
