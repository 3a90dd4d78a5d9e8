"""SmartTrim (Wang et al., LREC-COLING 2024, arXiv 2305.15033): learned per-instance token and
head trimmers, trained with self-distillation, a cost loss and a curriculum.

Placement (default): every cross-modal layer of a stream that has them (METER's fusion
stack), else every layer after the first quarter of the depth (a ViT). Each placed layer gets
a cross-modal-aware token trimmer and a head trimmer at its entry (`trimkit.learned`).

Training (``trimkit.train``, or `objective` in your own loop): the trimmed pass's task loss
+ ``lambda_sd`` · KL from the same model run untrimmed (temperature ``temperature``; its own
task loss too with ``teacher_loss``) + ``lambda_cost`` · (achieved cost ratio − target)²,
the target going linearly from 1 to ``ratio`` over the first ``warmup`` fraction of the
steps. Stable initialisation starts every keep logit at ``init_logit`` (everything kept);
the paper's ablation shows training collapses without it. Both parts of the curriculum can
be switched off (``stable_init=False``, ``warmup=0``).

Inference keeps a token or head where its logit is positive (counts differ per instance;
a batch is packed to its longest survivor); ``budget`` instead keeps fixed fractions per
layer (top by logit), for a latency budget.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

from trimkit import ModelDescription, Option, Recipe, SitePlan, register_recipe
from trimkit.learned import HeadTrimmer, TokenTrimmer
from trimkit.recipe import check_ratio


def _default_layers(stream) -> list[int]:
    cross = [i for i, layer in enumerate(stream.layers) if layer.cross_attention]
    if cross:
        return cross
    depth = len(stream.layers)
    return list(range(depth // 4, depth))


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
    frac = check_ratio("budget", value)
    return frac, frac


@register_recipe
class SmartTrim(Recipe):
    name = "smarttrim"
    summary = ("Learned per-instance token and head trimmers (train with trimkit.train: "
               "self-distillation, cost loss, curriculum).")
    options = {
        "ratio": Option(0.5, "target cost ratio (trimmed / untrimmed FLOPs of the described "
                             "layers), e.g. 0.5 or 0.33"),
        "tokens": Option(True, "place token trimmers (True, False, or the streams to place "
                               "them in)"),
        "heads": Option(True, "place head trimmers (True, False, or the streams to place "
                              "them in)"),
        "streams": Option(None, "streams to trim (default: all)"),
        "layers": Option(None, "layer indices (a list for every trimmed stream, or a dict "
                               "stream -> list); default: the cross-modal layers, else the "
                               "layers after the first quarter"),
        "hidden": Option(None, "width of the trimmers' MLPs (default: width / 4)"),
        "rank": Option(None, "rank of the bilinear global score (default: width / 4)"),
        "tau": Option(1.0, "Gumbel-sigmoid temperature in training"),
        "anneal_noise": Option(True, "scale the Gumbel noise linearly from 1 to 0 over "
                                     "training, so the last steps train the decisions (and "
                                     "the cost) that inference makes"),
        "stable_init": Option(True, "start with every keep logit at init_logit (all kept)"),
        "init_logit": Option(4.0, "the starting keep logit under stable_init"),
        "span": Option(6.0, "how far a trimmer's input-dependent score may move a logit from "
                            "its layer's threshold (logit = threshold + span·tanh(score/span))"),
        "warmup": Option(0.5, "fraction of the training steps over which the target goes "
                              "linearly from 1 to ratio (0: no scheduler)"),
        "lambda_sd": Option(1.0, "weight of the self-distillation KL"),
        "temperature": Option(1.0, "temperature of the self-distillation KL"),
        "lambda_cost": Option(1000.0, "weight of the cost loss (ratio - target)^2; large, so "
                                      "the achieved ratio lands on the target"),
        "lambda_hidden": Option(0.0, "weight of the hidden-state distillation MSE"),
        "teacher_loss": Option(True, "the untrimmed pass also gets its task loss and "
                                     "gradients (shared weights)"),
        "budget": Option(None, "fixed-budget inference: a fraction of tokens and heads kept "
                               "at every trimmed layer, or a dict (stream, layer) -> "
                               "(token fraction, head fraction); default: learned thresholds"),
    }

    def _layers(self, desc: ModelDescription, options: dict) -> dict[str, list[int]]:
        names = options["streams"] or list(desc.streams)
        if isinstance(names, str):
            names = [names]
        unknown = [n for n in names if n not in desc.streams]
        if unknown:
            raise ValueError(f"streams must be among {sorted(desc.streams)}, got {unknown!r}")
        chosen = {}
        for name in names:
            stream = desc.streams[name]
            spec = options["layers"]
            if isinstance(spec, dict):
                spec = spec.get(name, [])
            layers = _default_layers(stream) if spec is None else spec
            if isinstance(layers, int):
                layers = [layers]
            depth = len(stream.layers)
            bad = [i for i in layers if isinstance(i, bool) or not isinstance(i, int)
                   or not 0 <= i < depth]
            if bad:
                raise ValueError(f"layers of stream {name!r} must be indices in [0, {depth}), "
                                 f"got {bad!r}")
            chosen[name] = sorted(set(layers))
        return chosen

    def plan(self, desc: ModelDescription, options: dict) -> dict:
        check_ratio("ratio", options["ratio"])
        tau = options["tau"]
        if isinstance(tau, bool) or not isinstance(tau, (int, float)) or tau <= 0:
            raise ValueError(f"tau must be a positive number, got {tau!r}")
        if not (options["tokens"] or options["heads"]):
            raise ValueError("smarttrim needs tokens=True or heads=True (or both)")
        tokens = _stream_set(desc, "tokens", options["tokens"])
        heads = _stream_set(desc, "heads", options["heads"])
        init = float(options["init_logit"]) if options["stable_init"] else None
        span = options["span"]
        if isinstance(span, bool) or not isinstance(span, (int, float)) or span <= 0:
            raise ValueError(f"span must be a positive number, got {span!r}")
        common = dict(hidden=options["hidden"], init_logit=init, tau=float(tau),
                      span=float(span))
        plans = {}
        for name, layers in self._layers(desc, options).items():
            for i in layers:
                layer = desc.streams[name].layers[i]
                tok_budget, head_budget = _budget(options["budget"], (name, i))
                ops: list[nn.Module] = []
                if name in tokens:
                    other = None
                    if layer.cross_stream is not None:
                        other = _paired_dim(desc, layer)
                    ops.append(TokenTrimmer(layer.dim, other_dim=other, rank=options["rank"],
                                            budget=tok_budget, **common))
                if name in heads and not layer.keys_only:  # its heads are the reader's
                    cross = 0
                    if layer.cross_attention:
                        cross = layer.cross_num_heads or layer.num_heads
                    ops.append(HeadTrimmer(layer.dim, layer.num_heads, cross_heads=cross,
                                           budget=head_budget, **common))
                if ops:
                    plans[(name, i)] = SitePlan(pre=ops)
        return plans

    def objective(self, model: nn.Module, loss_fn: Callable, forward: Callable | None,
                  total_steps: int, options: dict) -> Any:
        """The `trimkit.objectives.SelfDistillationObjective` that `trimkit.train` runs for
        this recipe (see the module docstring)."""
        from trimkit.objectives import (
            NoiseSchedule,
            RatioSchedule,
            SelfDistillationObjective,
        )

        warmup = float(options["warmup"])
        if not 0 <= warmup <= 1:
            raise ValueError(f"warmup must be a fraction of the steps in [0, 1], got {warmup!r}")
        schedule = RatioSchedule(options["ratio"], round(warmup * total_steps))
        return SelfDistillationObjective(
            model, loss_fn, schedule=schedule, forward=forward,
            lambda_sd=options["lambda_sd"], temperature=options["temperature"],
            lambda_cost=options["lambda_cost"], lambda_hidden=options["lambda_hidden"],
            teacher_loss=options["teacher_loss"],
            noise_schedule=NoiseSchedule(1.0, 0.0, total_steps) if options["anneal_noise"]
            else None)


def _stream_set(desc: ModelDescription, option: str, value: Any) -> set[str]:
    """The streams an on/off-or-streams option (``tokens``, ``heads``) names."""
    if isinstance(value, bool):
        return set(desc.streams) if value else set()
    names = [value] if isinstance(value, str) else value
    if not isinstance(names, (list, tuple, set)) or not all(isinstance(n, str) for n in names):
        raise ValueError(f"{option} must be True, False or a list of stream names, got "
                         f"{value!r}")
    unknown = sorted(set(names) - set(desc.streams))
    if unknown:
        raise ValueError(f"{option} names streams {unknown}; this model has "
                         f"{sorted(desc.streams)}")
    return set(names)


def _paired_dim(desc: ModelDescription, layer) -> int:
    """Width of the tokens ``layer``'s cross-attention reads (its paired layer's, if found)."""
    other = desc.streams.get(layer.cross_stream)
    if other is not None:
        for o in other.layers:
            if o.pair is not None and o.pair == layer.pair:
                return o.dim
    return layer.dim
