"""Static head pruning: remove attention heads from the weights, once, for real.

Transformers 5 dropped ``prune_heads``; this recipe provides it for every adapted family.
Heads are chosen explicitly (``heads=``) or ranked, and the top ``ratio`` kept: by the
gradient × output importance of Michel et al. ("Are Sixteen Heads Really Better than
One?", NeurIPS 2019) on batches the user passes (``data=``), or by scores the user has
(``scores=``, e.g. a learned head trimmer's average keep rates). There is no data-free
default ranking: weight norms say little about what a head does for a task. The result is
a smaller plain model with no trimkit code in its forward (see ``docs/prune_heads.md``).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn

from trimkit import ModelDescription, Option, Recipe, register_recipe
from trimkit.adapter import Adapter
from trimkit.heads import (
    KINDS,
    AttentionHeads,
    HeadKey,
    head_importance,
    head_key,
    head_key_name,
    heads_to_keep,
    locate_heads,
    prunable_heads,
    record_pruned,
    select_heads,
)
from trimkit.recipe import LAYERS, STREAMS

_RANKING = ("ratio", "scope", "data", "scores", "loss_fn", "forward", "streams", "layers")


def _indices(name: str, value: Any) -> list[int]:
    if isinstance(value, int) and not isinstance(value, bool):
        value = [value]
    if (not isinstance(value, (list, tuple)) or not all(
            isinstance(i, int) and not isinstance(i, bool) for i in value)):
        raise ValueError(f"heads[{name!r}] must be a list of head indices, got {value!r}")
    return list(value)


def parse_heads(heads: Any, desc: ModelDescription) -> dict[HeadKey, list[int]]:
    """The heads to prune per attention, from ``{attention: [indices]}`` (attention as in
    `trimkit.heads.head_key`: ``"image.3"``, ``("image", 3, "cross")``, …) or a list of
    ``(attention..., head)`` tuples such as ``("image", 3, 0)`` or ``("text", 1, "cross", 2)``."""
    out: dict[HeadKey, list[int]] = {}
    if isinstance(heads, Mapping):
        items = [(head_key(k, desc), _indices(str(k), v)) for k, v in heads.items()]
    elif isinstance(heads, (list, tuple)):
        items = []
        for t in heads:
            if not isinstance(t, (tuple, list)) or len(t) < 2:
                raise ValueError(f"a heads list holds (stream, layer[, 'cross'], head) tuples, "
                                 f"got {t!r}")
            attn = tuple(t[:-1]) if len(t) > 2 else t[0]
            items.append((head_key(attn, desc), _indices(str(t), t[-1])))
    else:
        raise ValueError(f"heads must be a dict {{attention: [head indices]}} or a list of "
                         f"(stream, layer[, 'cross'], head) tuples, got {heads!r}")
    for key, idx in items:
        out.setdefault(key, []).extend(idx)
    return out


def _streams(value: Any) -> list[str]:
    """The streams of the ``streams`` option (its `Option` checks that the model has them)."""
    names = [value] if isinstance(value, str) else list(value)
    if not names:
        raise ValueError(f"streams must name at least one stream, got {value!r}")
    return names


def _layers(value: Any, streams: list[str], desc: ModelDescription) -> dict[str, list[int]]:
    per = value if isinstance(value, Mapping) else dict.fromkeys(streams, value)
    out = {}
    for name, idx in per.items():
        if name not in streams:
            raise ValueError(f"layers names stream {name!r}; the streams pruned are {streams}")
        n = len(desc.streams[name].layers)
        if (not isinstance(idx, (list, tuple)) or not idx or not all(
                isinstance(i, int) and not isinstance(i, bool) and 0 <= i < n for i in idx)):
            raise ValueError(f"layers of stream {name!r} must be a list of indices in "
                             f"0..{n - 1}, got {idx!r}")
        out[name] = list(idx)
    return out


def _scores(scores: Any, keys: list[HeadKey], desc: ModelDescription,
            heads: Mapping) -> dict[HeadKey, torch.Tensor]:
    given = {head_key(k, desc): v for k, v in scores.items()}
    out = {}
    for key in keys:
        if key not in given:
            raise ValueError(f"scores has no entry for {head_key_name(key)}")
        try:
            s = torch.as_tensor(given[key], dtype=torch.float64).flatten()
        except (TypeError, ValueError, RuntimeError):
            raise ValueError(f"scores[{head_key_name(key)!r}] is not a list of numbers") from None
        h = heads[key].num_heads
        if s.numel() != h or not torch.isfinite(s).all():
            raise ValueError(f"scores[{head_key_name(key)!r}] must hold {h} finite numbers, "
                             f"got {s.tolist()}")
        out[key] = s
    return out


@register_recipe
class PruneHeads(Recipe):
    name = "prune_heads"
    summary = ("Remove attention heads from the weights for real (static; chosen, or ranked "
               "by gradient x output importance).")
    transforms = True
    options = {
        "heads": Option(None, "heads to remove: {'image.3': [0, 2], 'text.1.cross': [1]} (or "
                              "(stream, layer[, 'cross']) keys), or a list of (stream, layer[, "
                              "'cross'], head) tuples; indices of the model's current heads. "
                              "trimkit.pruned_heads(model) gives this form", kind=(dict, list)),
        "ratio": Option(None, "fraction of heads kept (rounded, at least one per attention); "
                              "needs data or scores to rank them", kind=float, low=0, high=1,
                        low_open=True),
        "scope": Option("layer", "'layer': ratio of every attention's heads; 'global': of all "
                                 "heads together, ranked by scores normalised per attention",
                        choices=("layer", "global")),
        "data": Option(None, "batches (any iterable) for gradient x output importance",
                       kind=Iterable),
        "loss_fn": Option(None, "loss_fn(output, batch) -> scalar for the importance; default: "
                                "the output's loss, else cross-entropy against its own argmax",
                          kind=callable),
        "forward": Option(None, "forward(model, batch) -> output; default model(*batch), "
                                "model(**batch) or model(batch)", kind=callable),
        "scores": Option(None, "importance per attention instead of data: {'image.3': [one "
                               "number per head], ...}, e.g. from trimkit.head_scores",
                         kind=dict),
        "streams": Option(None, "streams whose heads may go (default: all)", kind=STREAMS),
        "layers": Option(None, "layer indices whose heads may go, in every chosen stream, or "
                               "{stream: [indices]} (default: all)", kind=LAYERS),
        "cross": Option(True, "whether cross-attention heads may go too", kind=bool),
    }

    def transform(self, model: nn.Module, adapter: Adapter, desc: ModelDescription,
                  options: dict[str, Any]) -> nn.Module:
        if options["heads"] is not None:
            given = [k for k in _RANKING if options[k] != self.options[k].default]
            if given or options["cross"] is not True:
                bad = given[0] if given else "cross"
                raise ValueError(f"prune_heads: {bad}= ranks heads, heads= names them: give "
                                 f"one or the other")
            prune = parse_heads(options["heads"], desc)
            heads = locate_heads(model, desc, prune)
            keep = heads_to_keep(heads, prune)
        else:
            heads, keep = self._rank(model, desc, options)
        keep = {k: v for k, v in keep.items() if len(v) < heads[k].num_heads}
        empty = [head_key_name(k) for k, v in keep.items() if not v]
        if empty:
            raise ValueError(f"every head of {empty[0]} would be pruned; keep at least one")
        adapter.prune_heads(model, desc, keep)
        record_pruned(model, heads, keep)
        return model

    def _rank(self, model: nn.Module, desc: ModelDescription, options: dict[str, Any]
              ) -> tuple[dict[HeadKey, AttentionHeads], dict[HeadKey, list[int]]]:
        """Locate the candidate attentions, score their heads and select the kept ones."""
        if options["ratio"] is None:
            raise ValueError("prune_heads needs heads=... (which heads to remove) or ratio=... "
                             "(the fraction to keep) with data=... (batches to rank heads by "
                             "gradient x output importance) or scores=...; there is no "
                             "data-free default ranking")
        ratio = options["ratio"]
        if (options["data"] is None) == (options["scores"] is None):
            raise ValueError("ratio= ranks heads by data=... (gradient x output importance) or "
                             "by scores=...: give exactly one of them")
        for name in ("loss_fn", "forward"):
            if options[name] is not None and options["data"] is None:
                raise ValueError(f"{name}= is used with data=... only")
        streams = (list(desc.streams) if options["streams"] is None
                   else _streams(options["streams"]))
        if options["layers"] is None:
            keys = prunable_heads(desc, streams, cross=options["cross"])
        else:  # named layers must be prunable: locate_heads says why not
            layers = _layers(options["layers"], streams, desc)
            keys = [(s, i, kind) for s in streams for i in layers.get(s, ())
                    for kind in KINDS if kind == "self" or options["cross"]
                    and desc.streams[s].layers[i].cross_attention is not None]
        if not keys:
            reasons = sorted({lay.heads.unprunable or lay.heads.unsupported
                              for s in streams for lay in desc.streams[s].layers
                              if lay.heads is not None
                              and (lay.heads.unprunable or lay.heads.unsupported)})
            why = ("; ".join(reasons) if reasons
                   else "its adapter describes no HeadLayout there")
            raise ValueError(f"no attention of this {desc.family!r} model can be head-pruned "
                             f"in streams {streams}: {why}")
        heads = locate_heads(model, desc, keys)
        if options["scores"] is not None:
            scores = _scores(options["scores"], keys, desc, heads)
        else:
            if isinstance(options["data"], (str, bytes, torch.Tensor)) or not hasattr(
                    options["data"], "__iter__"):
                raise ValueError("data must be an iterable of batches (a list, a DataLoader…)")
            scores = head_importance(model, heads, options["data"], loss_fn=options["loss_fn"],
                                     forward=options["forward"])
        return heads, select_heads(scores, ratio, options["scope"])

