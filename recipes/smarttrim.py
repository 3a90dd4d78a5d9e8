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
from trimkit.recipe import LAYERS, STREAMS, check_ratio


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
                               "stream -> list); default: the cross-modal layers, else the "
                               "layers after the first quarter", kind=LAYERS),
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
                            "its layer's threshold (logit = threshold + span·tanh(score/span))",
                       kind=float, low=0, low_open=True),
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
    }

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
            layers = _default_layers(stream) if spec is None else spec
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
        """The `trimkit.tools.objectives.SelfDistillationObjective` that `trimkit.train` runs for
        this recipe (see the module docstring)."""
        from trimkit.tools.objectives import (
            NoiseSchedule,
            RatioSchedule,
            SelfDistillationObjective,
        )

        schedule = RatioSchedule(options["ratio"], round(options["warmup"] * total_steps))
        return SelfDistillationObjective(
            model, loss_fn, schedule=schedule, forward=forward,
            lambda_sd=options["lambda_sd"], temperature=options["temperature"],
            lambda_cost=options["lambda_cost"], lambda_hidden=options["lambda_hidden"],
            teacher_loss=options["teacher_loss"],
            noise_schedule=NoiseSchedule(1.0, 0.0, total_steps) if options["anneal_noise"]
            else None)


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
