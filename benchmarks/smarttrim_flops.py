"""``trimkit smarttrim-flops``: SmartTrim's FLOPs on METER-base and BLIP-VQA-base.

Both models at their published sizes with random weights (nothing is downloaded), one
example (batch 1): METER-CLIP-ViT-B/16-RoBERTa on a 288 px image and 40 text tokens, the
whole forward (CLIP tower, RoBERTa, fusion, VQA head); BLIP-VQA-base on a 384 px image and a
question of 18 tokens, the encoding that answer generation runs first (the vision tower,
then the question encoder cross-attending to the image); the answer decoder is not trimmed
and not counted.

SmartTrim goes in at its default placement (the image tower but its first sixth, the text
encoder, the fusion layers; docs/smarttrim.md) with randomly initialised trimmers
(``stable_init=False``, so every token and head gets its own input-dependent score), and
each target ratio is reached by the trimmers' own decisions: every trimmer's threshold is
moved by one common amount, found by bisection, until the FLOPs counter
(`trimkit.count_flops`, trimmers included) gives at most the target fraction of the
untrimmed model's FLOPs. That is the shift the cost loss makes the thresholds take in
training; which tokens and heads survive is the trimmers' decision (trained trimmers pick
better ones, not fewer). The table gives the GFLOPs, the reduction, the cost model's ratio
(`trimkit.cost`: the described layers only) and the tokens left, beside the lowest ratio the
placement can reach (`trimkit.cost.lowest_ratio`).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

import trimkit
from trimkit.api import _applied
from trimkit.registry import Command, register_command

#: the operating points of the paper (2× and 3× fewer FLOPs)
TARGETS = (0.5, 0.33)


def _say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


@dataclass
class Case:
    """One model: what one example's forward is (``call(model)``), and its name."""

    name: str
    model: nn.Module
    call: Callable[[nn.Module], object]


def meter(preset: str = "base") -> Case:
    from trimkit.adapters.meter.adapter import bench_model

    model, make_inputs = bench_model(preset, text_len=40 if preset == "base" else 7)
    inputs = make_inputs(1)
    return Case(f"meter-{preset}", model, lambda m: m(*inputs))


def blip_vqa_base() -> Case:
    from trimkit.adapters.hf.bench import blip_model

    model, make_inputs, tasks = blip_model("blip-vqa-base", text_len=16)
    inputs = make_inputs(1)
    encode = tasks["encode"]
    return Case("blip-vqa-base", model, lambda m: encode(m, *inputs))


#: the published models; ``meter-tiny`` (a few thousand parameters) checks the command fast
CASES = {"meter-base": meter, "blip-vqa-base": blip_vqa_base,
         "meter-tiny": lambda: meter("tiny")}
PUBLISHED = ["meter-base", "blip-vqa-base"]


def _flops(case: Case) -> float:
    return float(trimkit.count_flops(lambda: case.call(case.model)))


def _thresholds(model: nn.Module) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Every trimmer's threshold (its bias) and its value as initialised."""
    out = []
    for site in model.trimkit.values():
        for op in site.pre:
            out.append((op.bias, op.bias.detach().clone()))
    return out


def _shift(thresholds: list, delta: float) -> None:
    with torch.no_grad():
        for bias, start in thresholds:
            bias.copy_(start + delta)


def reach_target(case: Case, target: float, full: float, iters: int) -> dict:
    """The largest common threshold shift whose counted FLOPs are at most ``target`` of
    ``full``, by bisection; the model is left at it. Returns what was measured there."""
    thresholds = _thresholds(case.model)
    lo, hi = -8.0, 8.0  # beyond ±(span + spread) every decision is the same
    _shift(thresholds, lo)
    best = (lo, _flops(case))
    if best[1] > target * full:
        raise RuntimeError(f"{case.name}: even everything trimmed spends "
                           f"{best[1] / full:.3f} of the FLOPs, above {target}")
    for _ in range(iters):
        mid = (lo + hi) / 2
        _shift(thresholds, mid)
        flops = _flops(case)
        if flops <= target * full:
            lo, best = mid, (mid, flops)
        else:
            hi = mid
    _shift(thresholds, best[0])
    return _measure(case, full, best[0], best[1])


def _measure(case: Case, full: float, delta: float, flops: float) -> dict:
    model = case.model
    with torch.no_grad(), trimkit.recording_costs(model) as costs:
        case.call(model)
    ratio = float(costs.ratio().mean())
    trimmers = sum(float(torch.as_tensor(c.trimmers).sum()) for c in _applied(model).ctx.costs)
    stats = trimkit.last_stats(model).layers

    def last(stream: str) -> float | None:
        """Tokens the stream's last layer with an attention of its own keeps."""
        layers = _applied(model).description.streams[stream].layers
        got = [s for s in stats if s.stream == stream and not layers[s.layer].keys_only]
        return float(got[-1].tokens_out.float().mean()) if got else None

    desc = _applied(model).description
    heads = [float(torch.as_tensor(s.heads).float().mean())
             / desc.streams[s.stream].layers[s.layer].num_heads
             for s in stats if not desc.streams[s.stream].layers[s.layer].keys_only]
    return dict(shift=delta, gflops=flops / 1e9, fewer=full / flops, counter_ratio=flops / full,
                cost_ratio=ratio, trimmer_gflops=trimmers / 1e9,
                image_tokens=last("image"), text_tokens=last("text"),
                heads=sum(heads) / len(heads) if heads else None)


def run(args: argparse.Namespace) -> int:
    from trimkit.recipes.smarttrim import reach

    if args.threads:
        torch.set_num_threads(args.threads)
    start = time.perf_counter()
    rows = []
    for name in args.models:
        _say(f"{name}: building (random weights)")
        case = CASES[name]()
        full = _flops(case)
        desc = trimkit.describe(case.model)
        entry = {s: d.num_tokens for s, d in desc.streams.items()}
        for target in args.targets:
            torch.manual_seed(0)
            trimkit.apply(case.model, "smarttrim", ratio=target, stable_init=False)
            applied = _applied(case.model)
            ops = {(s.stream, s.layer): list(s.pre) for s in case.model.trimkit.values()}
            floor = reach(applied.description, ops, applied.options).ratio
            _say(f"{name}: ratio {target}: bisecting the thresholds ({args.iters} steps)")
            got = reach_target(case, target, full, args.iters)
            rows.append(dict(model=name, target=target, gflops_full=full / 1e9, floor=floor,
                             image_entry=entry.get("image"), **got))
            trimkit.remove(case.model)
        del case
    print(table(rows))
    _say(f"smarttrim-flops finished in {(time.perf_counter() - start) / 60:.1f} min")
    return 0


def table(rows: list[dict]) -> str:
    lines = ["| model | target | GFLOPs untrimmed | GFLOPs SmartTrim (trimmers incl.) | "
             "fewer FLOPs | cost-model ratio | lowest reachable | trimmers' GFLOPs | "
             "image tokens left | text tokens left | heads kept |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        def fmt(v, spec):
            return "-" if v is None else format(v, spec)
        lines.append(
            f"| {r['model']} | {r['target']:g} | {r['gflops_full']:.4g} | {r['gflops']:.4g} | "
            f"{r['fewer']:.2f}× | {r['cost_ratio']:.3f} | {r['floor']:.3f} | "
            f"{r['trimmer_gflops']:.3g} | {fmt(r['image_tokens'], '.0f')} of "
            f"{fmt(r['image_entry'], 'd')} | {fmt(r['text_tokens'], '.0f')} | "
            f"{fmt(r['heads'], '.0%')} |")
    return "\n".join(lines)


def configure(p: argparse.ArgumentParser) -> None:
    p.add_argument("--models", nargs="+", choices=list(CASES), default=PUBLISHED,
                   help="models to measure (default: meter-base and blip-vqa-base)")
    p.add_argument("--targets", type=float, nargs="+", default=list(TARGETS),
                   help="target cost ratios (default: 0.5 0.33)")
    p.add_argument("--iters", type=int, default=10,
                   help="bisection steps on the common threshold shift (default: 10)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")


register_command(Command(
    "smarttrim-flops",
    help="SmartTrim's FLOPs on meter-base and blip-vqa-base at ratios 0.5 and 0.33",
    description=__doc__.split("\n\n", 1)[1], configure=configure, run=run, epilog="""\
examples:
  trimkit smarttrim-flops                          # both models, ratios 0.5 and 0.33
  trimkit smarttrim-flops --models meter-base --targets 0.5 --iters 6"""))
