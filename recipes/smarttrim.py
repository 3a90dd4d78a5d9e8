"""SmartTrim (Wang et al., LREC-COLING 2024, arXiv 2305.15033): learned per-instance token and
head trimmers, trained with self-distillation, a cost loss and a curriculum.

Placement (default), as the paper puts it, within the layers of the whole backbone: in a
model with a fusion stack (some layer cross-attends to another stream: METER, BLIP), every
layer of each stream, except the first few of an image tower (a stream with a patch grid:
``skip`` of its encoder's layers, by default a sixth of them rounded up), so the uni-modal
encoders (the image tower, the text encoder) and the cross-modal layers; in a model without
one (a ViT), every layer after the first quarter of the depth. Each placed layer gets a
token trimmer and a head trimmer at its entry (`trimkit.learned`); a token trimmer's global
term reads its own stream's pooled token in a uni-modal layer, and its own and the other
stream's in a cross-modal one (``cross_modal=False``: its own only, the paper's ablation).

No head trimmer goes to a layer whose attention mixes its heads (talking heads, as in CaiT:
`LayerDesc.mixes_heads`). There every head's weights read every head's scores, so a head
gated off still runs (q, k, scores, softmax); only its output would be zeroed, and the
cost model (`trimkit.cost`) counts no saving. ``talking_heads=True`` places them anyway.
Asking for head trimmers where every chosen layer mixes its heads (``tokens=False``, or
``heads`` naming such streams) is a `ValueError`.

`apply` refuses (`ValueError`, the model unchanged) a ``ratio`` below the lowest cost ratio
the placement can reach (`trimkit.cost.lowest_ratio`: every token trimmer down to the
protected tokens and one more, every head trimmer to one head, the layers before the first
token trimmer of a stream untouched), and says which layers hold the cost it cannot reduce;
`trimkit.train` checks the same again when it builds the objective.

Training (``trimkit.train``, or `objective` in your own loop): the trimmed pass's task loss
+ ``lambda_sd`` · KL from the same model run untrimmed (temperature ``temperature``; its own
task loss too with ``teacher_loss``) + ``lambda_cost`` · (achieved cost ratio − target)²,
the target going linearly from 1 to ``ratio`` over the first ``warmup`` fraction of the
steps. Stable initialisation starts every keep logit at ``init_logit`` (everything kept);
the paper's ablation shows training collapses without it. The paper's ablations are options:
``stable_init=False``, ``warmup=0`` (no curriculum), ``lambda_sd=0`` (no self-distillation),
``cross_modal=False``, ``heads=False`` (tokens only), ``tokens=False`` (heads only).

trimkit adds stabilisers the paper does not have, on by default (docs/smarttrim.md says
what each changes and why): Gumbel noise annealed to 0 (``anneal_noise``), logits bounded
around the threshold (``span``), normalised pooled tokens (``norm_pooled``), thresholds
trained at ``threshold_scale`` × the trimmers' learning rate by ``trimkit.train``, and
``lambda_cost=1000``. ``preset="paper"`` turns them all off (options given explicitly still
win).

Inference keeps a token or head where its logit is positive (counts differ per instance;
a batch is packed to its longest survivor); ``budget`` instead keeps fixed fractions per
layer (top by logit), for a latency budget.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from trimkit import ModelDescription, Option, Recipe, SitePlan, register_recipe
from trimkit.cost import LowestRatio, Reach, lowest_ratio
from trimkit.learned import HeadTrimmer, TokenTrimmer
from trimkit.recipe import LAYERS, STREAMS, check_ratio

#: what ``preset="paper"`` sets, unless given explicitly: trimkit's stabilisers off
PAPER = dict(anneal_noise=False, span=None, norm_pooled=False, threshold_scale=1.0,
             lambda_cost=10.0)


def fused(desc: ModelDescription) -> bool:
    """Whether the model has a fusion stack: some layer reads another stream."""
    return any(layer.cross_stream is not None for s in desc.streams.values()
               for layer in s.layers)


def encoder_depth(stream) -> int:
    """The stream's leading layers that read no other stream (its uni-modal encoder)."""
    return next((i for i, layer in enumerate(stream.layers) if layer.cross_stream is not None),
                len(stream.layers))


def default_layers(desc: ModelDescription, name: str, skip: int | None = None) -> list[int]:
    """SmartTrim's default layers in stream ``name`` (see the module docstring): with a
    fusion stack, all but the first ``skip`` layers of an image tower (default: a sixth of
    it, rounded up) and every other layer; without one, the layers after the first
    quarter."""
    stream = desc.streams[name]
    depth = len(stream.layers)
    if not fused(desc):
        return list(range(depth // 4, depth))
    start = 0
    if stream.grid is not None:  # an image tower: its first layers stay
        encoder = encoder_depth(stream)
        start = min(encoder, math.ceil(encoder / 6) if skip is None else skip)
    return list(range(start, depth))


def _budget(value: Any, key: tuple[str, int]) -> tuple[float | None, float | None]:
    """(token fraction, head fraction) of a layer under the ``budget`` option."""
    if value is None:
        return None, None
    if isinstance(value, dict):
        got = value.get(key, value.get(f"{key[0]}:{key[1]}"))
        if got is None:
            return 1.0, 1.0
        tok, head = got if isinstance(got, (tuple, list)) else (got, got)
        return (check_ratio(f"budget[{key}] tokens", tok),
                check_ratio(f"budget[{key}] heads", head))
    return value, value  # a fraction (checked by its Option)


def _check_budget_keys(desc: ModelDescription, value: Any) -> None:
    """A `ValueError` unless every key of a ``budget`` dict is a ``(stream, layer)`` (or
    ``"stream:layer"``) of this model."""
    for key in value if isinstance(value, dict) else ():
        parts = key.split(":") if isinstance(key, str) else key
        ok = isinstance(parts, (tuple, list)) and len(parts) == 2 and parts[0] in desc.streams
        if ok:
            layer = parts[1]
            if isinstance(layer, str) and layer.isdigit():
                layer = int(layer)
            ok = (isinstance(layer, int) and not isinstance(layer, bool)
                  and 0 <= layer < len(desc.streams[parts[0]].layers))
        if not ok:
            raise ValueError(f"budget has the key {key!r}, which is no (stream, layer) of this "
                             f"model: keys are (stream, layer index) tuples or "
                             f"'stream:index' strings, streams {sorted(desc.streams)}")


@register_recipe
class SmartTrim(Recipe):
    name = "smarttrim"
    summary = ("Learned per-instance token and head trimmers (train with trimkit.train: "
               "self-distillation, cost loss, curriculum).")
    options = {
        "ratio": Option(0.5, "target cost ratio (trimmed / untrimmed FLOPs of the described "
                             "layers), e.g. 0.5 or 0.33", kind=float, low=0, high=1,
                        low_open=True),
        "tokens": Option(True, "place token trimmers (True, False, or the streams to place "
                               "them in)", kind=(bool, STREAMS)),
        "heads": Option(True, "place head trimmers (True, False, or the streams to place "
                              "them in)", kind=(bool, STREAMS)),
        "streams": Option(None, "streams to trim (default: all)", kind=STREAMS),
        "layers": Option(None, "layer indices (a list for every trimmed stream, or a dict "
                               "stream -> list); default: with a fusion stack, every layer "
                               "but the first few of an image tower (skip), else the layers "
                               "after the first quarter", kind=LAYERS),
        "talking_heads": Option(False, "also place head trimmers in layers whose attention "
                                       "mixes its heads (talking heads, e.g. CaiT): their "
                                       "gates zero heads' outputs but every head still runs, "
                                       "so they save no compute and the cost counts none",
                                kind=bool),
        "skip": Option(None, "layers of an image tower left untrimmed at its start under the "
                             "default placement of a model with a fusion stack (default: a "
                             "sixth of the tower, rounded up)", kind=int, low=0),
        "cross_modal": Option(True, "token trimmers of cross-modal layers also read the other "
                                    "stream's pooled token (False: their own stream's only, "
                                    "the paper's ablation)", kind=bool),
        "hidden": Option(None, "width of the trimmers' MLPs (default: width / 4)", kind=int,
                         low=1),
        "rank": Option(None, "rank of the bilinear global score (default: width / 4)",
                       kind=int, low=1),
        "tau": Option(1.0, "Gumbel-sigmoid temperature in training", kind=float, low=0,
                      low_open=True),
        "anneal_noise": Option(True, "scale the Gumbel noise linearly from 1 to 0 over "
                                     "training, so the last steps train the decisions (and "
                                     "the cost) that inference makes", kind=bool),
        "stable_init": Option(True, "start with every keep logit at init_logit (all kept)",
                              kind=bool),
        "init_logit": Option(4.0, "the starting keep logit under stable_init", kind=float),
        "span": Option(6.0, "how far a trimmer's input-dependent score may move a logit from "
                            "its layer's threshold (logit = threshold + span·tanh(score/span); "
                            "None: unbounded, threshold + score)",
                       kind=float, low=0, low_open=True, none=True),
        "norm_pooled": Option(True, "the pooled tokens enter a token trimmer's global score "
                                    "layer-normalised", kind=bool),
        "threshold_scale": Option(10.0, "trimkit.train's default optimizer trains the "
                                        "trimmers' thresholds at this multiple of trimmer_lr "
                                        "(when threshold_lr is not given)", kind=float, low=0,
                                  low_open=True),
        "warmup": Option(0.5, "fraction of the training steps over which the target goes "
                              "linearly from 1 to ratio (0: no scheduler)", kind=float, low=0,
                         high=1),
        "lambda_sd": Option(1.0, "weight of the self-distillation KL", kind=float, low=0),
        "temperature": Option(1.0, "temperature of the self-distillation KL", kind=float,
                              low=0, low_open=True),
        "lambda_cost": Option(1000.0, "weight of the cost loss (ratio - target)^2; large, so "
                                      "the achieved ratio lands on the target", kind=float,
                              low=0),
        "lambda_hidden": Option(0.0, "weight of the hidden-state distillation MSE", kind=float,
                                low=0),
        "teacher_loss": Option(True, "the untrimmed pass also gets its task loss and "
                                     "gradients (shared weights)", kind=bool),
        "budget": Option(None, "fixed-budget inference: a fraction of tokens and heads kept "
                               "at every trimmed layer, or a dict (stream, layer) -> "
                               "(token fraction, head fraction); default: learned thresholds",
                         kind=(float, dict), low=0, high=1, low_open=True),
        "reach_tokens": Option(32, "tokens entering a stream whose length varies per input "
                                   "(text), as the check that ratio is reachable assumes",
                               kind=int, low=1),
        "preset": Option("trimkit", "'trimkit' (its stabilisers on) or 'paper' (off: "
                                    f"{', '.join(f'{k}={v}' for k, v in PAPER.items())}; "
                                    "options given explicitly win)",
                         choices=("trimkit", "paper")),
    }

    def resolve(self, overrides: dict[str, Any]) -> dict[str, Any]:
        """The options, with ``preset="paper"``'s values where not given explicitly."""
        if overrides.get("preset") == "paper":
            overrides = {**PAPER, **overrides}
        return super().resolve(overrides)

    def _layers(self, desc: ModelDescription, options: dict) -> dict[str, list[int]]:
        names = options["streams"] or list(desc.streams)
        if isinstance(names, str):
            names = [names]
        chosen = {}
        for name in names:
            stream = desc.streams[name]
            spec = options["layers"]
            if isinstance(spec, dict):
                spec = spec.get(name, [])
            layers = default_layers(desc, name, options["skip"]) if spec is None else spec
            if isinstance(layers, int):
                layers = [layers]
            depth = len(stream.layers)
            bad = [i for i in layers if not 0 <= i < depth]
            if bad:
                raise ValueError(f"layers of stream {name!r} must be indices in [0, {depth}), "
                                 f"got {bad!r}")
            chosen[name] = sorted(set(layers))
        return chosen

    def plan(self, desc: ModelDescription, options: dict) -> dict:
        if not (options["tokens"] or options["heads"]):
            raise ValueError("smarttrim needs tokens=True or heads=True (or both)")
        _check_budget_keys(desc, options["budget"])
        tokens = _stream_set(desc, options["tokens"])
        heads = _stream_set(desc, options["heads"])
        init = options["init_logit"] if options["stable_init"] else None
        common = dict(hidden=options["hidden"], init_logit=init, tau=options["tau"],
                      span=options["span"])
        plans = {}
        mixing: list[tuple[str, int]] = []  # head trimmers left out: the heads mix
        for name, layers in self._layers(desc, options).items():
            for i in layers:
                layer = desc.streams[name].layers[i]
                tok_budget, head_budget = _budget(options["budget"], (name, i))
                ops: list[nn.Module] = []
                # gates of heads that mix save nothing (a cross-attention's gates still do)
                mixes = (bool(layer.mixes_heads) and layer.cross_attention is None
                         and not options["talking_heads"])
                if name in heads and mixes and not layer.keys_only:
                    mixing.append((name, i))
                heads_here = name in heads and not mixes
                if name in tokens:
                    other = None
                    if layer.cross_stream is not None and options["cross_modal"]:
                        other = _paired_dim(desc, layer)
                    ops.append(TokenTrimmer(layer.dim, other_dim=other, rank=options["rank"],
                                            budget=tok_budget, norm_pooled=options["norm_pooled"],
                                            **common))
                if heads_here and not layer.keys_only:  # its heads are the reader's
                    cross = 0
                    if layer.cross_attention:
                        cross = layer.cross_num_heads or layer.num_heads
                    ops.append(HeadTrimmer(layer.dim, layer.num_heads, cross_heads=cross,
                                           budget=head_budget, **common))
                if ops:
                    plans[(name, i)] = SitePlan(pre=ops)
        _check_mixing(plans, mixing, tokens, options["heads"])
        if options["budget"] is None:  # a budget keeps fixed fractions; `train` checks then
            check_reachable(desc, {k: p.pre for k, p in plans.items()}, options,
                            lambda: self._default_floor(desc, options))
        return plans

    def _default_floor(self, desc: ModelDescription, options: dict) -> float | None:
        """The lowest ratio of the default placement, where the options chose another."""
        if options["layers"] is None and options["streams"] is None:
            return None
        default = dict(options, layers=None, streams=None, lambda_cost=0.0)
        try:
            plans = self.plan(desc, default)
        except ValueError:  # e.g. heads alone, and the default layers' heads all mix
            return None
        return reach(desc, {k: p.pre for k, p in plans.items()}, options).ratio

    def objective(self, model: nn.Module, loss_fn: Callable, forward: Callable | None,
                  total_steps: int, options: dict) -> Any:
        """The `trimkit.tools.objectives.SelfDistillationObjective` that `trimkit.train` runs for
        this recipe (see the module docstring)."""
        from trimkit.api import _applied
        from trimkit.tools.objectives import (
            NoiseSchedule,
            RatioSchedule,
            SelfDistillationObjective,
        )

        desc = _applied(model).description
        check_reachable(desc, {(site.stream, site.layer): list(site.pre)
                               for site in model.trimkit.values()}, options)
        schedule = RatioSchedule(options["ratio"], round(options["warmup"] * total_steps))
        return SelfDistillationObjective(
            model, loss_fn, schedule=schedule, forward=forward,
            lambda_sd=options["lambda_sd"], temperature=options["temperature"],
            lambda_cost=options["lambda_cost"], lambda_hidden=options["lambda_hidden"],
            teacher_loss=options["teacher_loss"],
            noise_schedule=NoiseSchedule(1.0, 0.0, total_steps) if options["anneal_noise"]
            else None)


class _OpsFlops:
    """The ops' own FLOPs on ``n`` tokens entering their layer (`Reach.flops`)."""

    def __init__(self, ops: list[nn.Module]):
        self.ops = ops

    def __call__(self, n: float) -> float:
        tokens = torch.tensor([float(n)])
        return float(sum(float(torch.as_tensor(op.flops(tokens)).reshape(-1)[0])
                         for op in self.ops))


def reach(desc: ModelDescription, ops: Mapping[tuple[str, int], list[nn.Module]],
          options: dict) -> LowestRatio:
    """The lowest cost ratio SmartTrim's ``ops`` (per ``(stream, layer)``) can reach
    (`trimkit.cost.lowest_ratio`), with ``reach_tokens`` entering a stream of varying
    length."""
    spec = {}
    for key, got in ops.items():
        heads = [op for op in got if isinstance(op, HeadTrimmer)]
        spec[key] = Reach(tokens=any(isinstance(op, TokenTrimmer) for op in got),
                          heads=bool(heads), cross_heads=any(op.cross_heads for op in heads),
                          flops=_OpsFlops(list(got)))
    tokens = {name: float(options["reach_tokens"]) for name in desc.streams}
    return lowest_ratio(desc, spec, tokens)


def _ranges(layers: list[int]) -> str:
    """``[0, 1, 2, 5]`` as ``"0-2, 5"``."""
    out, start = [], None
    for a, b in zip(layers, [*layers[1:], None], strict=True):
        start = a if start is None else start
        if b != a + 1:
            out.append(f"{start}" if start == a else f"{start}-{a}")
            start = None
    return ", ".join(out)


def check_reachable(desc: ModelDescription, ops: Mapping[tuple[str, int], list[nn.Module]],
                    options: dict, default: Callable[[], float | None] | None = None) -> None:
    """A `ValueError` when ``options["ratio"]`` is below the lowest cost ratio ``ops`` can
    reach (`reach`), naming the layers that hold the cost no trimmer reduces; nothing when
    the cost loss is off (``lambda_cost=0``: no target is pursued)."""
    if options["lambda_cost"] <= 0:
        return
    got = reach(desc, ops, options)
    target = options["ratio"]
    if target >= got.ratio:
        return
    spec = {k: Reach(tokens=any(isinstance(op, TokenTrimmer) for op in v))
            for k, v in ops.items()}
    untrimmed = got.untrimmed(spec)
    full = sum(hi for _, hi in got.layers.values())
    held = sum(got.layers[(s, i)][1] for s, layers in untrimmed.items() for i in layers)
    where = "; ".join(f"{s} {_ranges(costly)}" for s, v in sorted(untrimmed.items())
                      if (costly := [i for i in v if got.layers[(s, i)][1] > 0]))
    varying = [s for s, d in desc.streams.items() if d.num_tokens is None]
    assumed = (f" with {options['reach_tokens']} tokens entering "
               f"{' and '.join(varying)} (reach_tokens)" if varying else "")
    entered = [f"{s} from its layer {e}" for s, e in got.entries.items() if e]
    if entered:
        assumed += f", {' and '.join(entered)}"
    hint = ""
    floor = default() if default is not None else None
    if floor is not None and floor <= target:
        hint = f" (the default placement, layers=None, reaches {floor:.3f})"
    last = (f"or set ratio >= {got.ratio:.3f}" if got.ratio <= 1 else
            "or turn the cost target off with lambda_cost=0 (these trimmers cost more than "
            "they can save)")
    raise ValueError(
        f"smarttrim: ratio={target:g} is below {got.ratio:.3f}, the lowest cost ratio this "
        f"placement can reach{assumed}: every token trimmer down to its protected tokens and "
        f"one more, every head trimmer to one head. The layers with no token trimmer at or "
        f"before them ({where or 'none'}) hold {held / full:.0%} of the cost untrimmed. Add "
        f"trimmers there with layers=...{hint}, {last}. Nothing was changed.")


def _check_mixing(plans: Mapping[tuple[str, int], SitePlan], mixing: list[tuple[str, int]],
                  tokens: set[str], asked: Any) -> None:
    """A `ValueError` when head trimmers were asked for (``tokens=False``, or ``heads``
    naming streams) and none was placed because the chosen layers mix their heads
    (``mixing``)."""
    asked_for = not tokens or not isinstance(asked, bool)
    placed = any(isinstance(op, HeadTrimmer) for plan in plans.values() for op in plan.pre)
    if not mixing or not asked_for or placed:
        return
    streams = {name for name, _ in mixing}
    where = "; ".join(f"{s} {_ranges(sorted(i for n, i in mixing if n == s))}"
                      for s in sorted(streams))
    raise ValueError(
        f"smarttrim: head trimmers were asked for, but every chosen layer ({where}) mixes "
        f"its heads (talking heads): a head gated off there still runs, so head trimmers "
        f"save nothing. Trim tokens (tokens=True), or place them anyway with "
        f"talking_heads=True (their gates zero heads' outputs; the cost counts no saving). "
        f"Nothing was changed.")


def _stream_set(desc: ModelDescription, value: Any) -> set[str]:
    """The streams an on/off-or-streams option (``tokens``, ``heads``) names (checked by
    its `Option`)."""
    if isinstance(value, bool):
        return set(desc.streams) if value else set()
    return {value} if isinstance(value, str) else set(value)


def _paired_dim(desc: ModelDescription, layer) -> int:
    """Width of the tokens ``layer``'s cross-attention reads (its paired layer's, if found)."""
    other = desc.streams.get(layer.cross_stream)
    if other is not None:
        for o in other.layers:
            if o.pair is not None and o.pair == layer.pair:
                return o.dim
    return layer.dim
