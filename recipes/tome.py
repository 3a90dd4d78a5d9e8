"""ToMe (Bolya et al., ICLR 2023): bipartite soft matching in every block, proportional attention.

Defaults from the paper: ``r = 8`` merges per block (ViT-B/16: r = 13 gives about 2x fewer
FLOPs), a constant schedule, proportional attention on. CLS and other protected tokens are
never merged.
"""

from __future__ import annotations

from trimkit import ModelDescription, Option, Recipe, SitePlan, register_recipe
from trimkit.trimmers import MergeTokens


def schedule(r: int | list[int], n_layers: int, kind: str) -> list[int]:
    """Merges per layer: a list as given, a constant ``r``, or ToMe's decreasing schedule
    (inflection -0.5: linear from 1.5·r down to 0.5·r, about the same total)."""
    if isinstance(r, (list, tuple)):
        if len(r) != n_layers or not all(isinstance(v, int) and v >= 0 for v in r):
            raise ValueError(f"r as a list must hold {n_layers} non-negative ints, one per "
                             f"layer; got {r!r}")
        return list(r)
    if isinstance(r, bool) or not isinstance(r, int) or r < 0:
        raise ValueError(f"r must be a non-negative int or a list of them, got {r!r}")
    if kind == "constant":
        return [r] * n_layers
    if kind == "decreasing":
        lo, hi = 1.5 * r, 0.5 * r
        step = (hi - lo) / max(n_layers - 1, 1)
        return [int(lo + step * i) for i in range(n_layers)]
    raise ValueError(f"schedule must be 'constant' or 'decreasing', got {kind!r}")


@register_recipe
class ToMe(Recipe):
    name = "tome"
    summary = "Token merging by bipartite soft matching in every block (training-free)."
    options = {
        "r": Option(8, "tokens merged per layer: an int, or a list with one int per layer "
                          "that attends (`StreamDesc.attention_layers`)"),
        "schedule": Option("constant", "'constant' or 'decreasing' (ToMe's inflection -0.5)"),
        "proportional": Option(True, "add log(size) to attention logits (proportional attention)"),
        "stream": Option(None, "which stream to merge (default: the only one, or 'image')"),
    }

    def plan(self, desc: ModelDescription, options: dict) -> dict:
        name = options["stream"] or ("image" if "image" in desc.streams else None)
        try:
            stream = desc.stream(name)
        except KeyError:
            raise ValueError(f"stream must be one of {sorted(desc.streams)}, "
                             f"got {options['stream']!r}") from None
        # layers where the stream attends itself (matching uses that attention's keys)
        layers = stream.attention_layers()
        rs = schedule(options["r"], len(layers), options["schedule"])
        if stream.num_tokens is not None:
            n = stream.num_tokens - stream.num_protected
            for i, r in zip(layers, rs, strict=True):
                most = (n + 1) // 2 if n >= 2 else 0
                if r > most:
                    raise ValueError(f"r={r} at layer {i} is larger than possible: {n} mergeable "
                                     f"tokens are left there, so at most {most} can merge")
                n -= r
        return {(stream.name, i): SitePlan(post=[MergeTokens(r)] if r else [],
                                           proportional=bool(options["proportional"]))
                for i, r in zip(layers, rs, strict=True)}
