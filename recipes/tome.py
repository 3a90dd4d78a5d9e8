"""ToMe (Bolya et al., ICLR 2023): bipartite soft matching in every block, proportional attention.

Defaults from the paper: ``r = 8`` merges per block (ViT-B/16: r = 13 gives about 2x fewer
FLOPs), a constant schedule, proportional attention on. CLS and other protected tokens are
never merged.

By default the recipe computes what ToMe's reference code (facebookresearch/ToMe,
``tome.patch.timm``) computes: sets A and B alternate over all tokens (CLS in A, never
linked), the merged sequence is [protected tokens, unmerged A tokens, B tokens], which
decides the next block's split, and ``r`` is clamped per block to ``(T − P) // 2`` of its
T tokens and P protected ones. ``order="original"`` keeps trimkit's earlier matching
(alternation over mergeable tokens only, tokens stay in their slots); ``strict=True``
refuses an ``r`` that some block cannot merge instead of clamping it.
"""

from __future__ import annotations

from trimkit import ModelDescription, Option, Recipe, SitePlan, register_recipe
from trimkit.recipe import INTS, STREAM
from trimkit.trimmers import MergeTokens


def schedule(r: int | list[int], n_layers: int, kind: str, strict: bool = False) -> list[int]:
    """Merges per layer, as ToMe's reference turns ``r`` into one count per block: a list
    as given, shorter ones padded with zeros (``strict``: one int per layer exactly); a
    constant ``r``; or the paper's decreasing schedule (the reference's inflection −1:
    ``int(2r − 2r · i / (L − 1))``, from 2r down to 0, the same total).

    ToMe's `Option` declarations check ``r``'s type and sign and ``kind``; the length of a
    list depends on the model."""
    if isinstance(r, (list, tuple)):
        if len(r) > n_layers or (strict and len(r) != n_layers):
            raise ValueError(f"r as a list must hold {'' if strict else 'at most '}{n_layers} "
                             f"non-negative ints, one per layer that attends; got {r!r}")
        return list(r) + [0] * (n_layers - len(r))
    if kind == "constant":
        return [r] * n_layers
    start, stop = int(2 * r), 0  # "decreasing": the reference's (r, -1.0)
    step = (stop - start) / max(n_layers - 1, 1)
    return [int(start + step * i) for i in range(n_layers)]


def merge_limit(tokens: int, protected: int, order: str) -> int:
    """The most merges one block can make among ``tokens`` tokens, ``protected`` of them
    protected: the reference's ``(T − P) // 2``, or, with ``order="original"`` (A/B over
    the E = T − P mergeable tokens only), the ``ceil(E / 2)`` A tokens (0 when E < 2)."""
    free = tokens - protected
    if order == "reference":
        return max(free // 2, 0)
    return (free + 1) // 2 if free >= 2 else 0


@register_recipe
class ToMe(Recipe):
    name = "tome"
    summary = "Token merging by bipartite soft matching in every block (training-free)."
    options = {
        "r": Option(8, "tokens merged per layer: an int, or a list with one int per layer "
                          "that attends (`StreamDesc.attention_layers`; a shorter list merges "
                          "nothing in the layers it leaves out); clamped per layer to what "
                          "the layer can merge unless strict", kind=INTS, low=0),
        "schedule": Option("constant", "'constant' or 'decreasing' (the paper's: from 2r "
                                       "down to 0, the reference's inflection -1)",
                           choices=("constant", "decreasing")),
        "order": Option("reference", "'reference': match and order tokens as ToMe's "
                                     "reference code (A/B alternate over all tokens, merged "
                                     "sequence [protected, unmerged A, B]); 'original': "
                                     "alternate over the mergeable tokens only, tokens keep "
                                     "their slots", choices=MergeTokens.ORDERS),
        "strict": Option(False, "refuse (ValueError) an r larger than a layer can merge, and "
                                "a list r shorter than the layers, instead of clamping / "
                                "padding with zeros as the reference does", kind=bool),
        "proportional": Option(True, "add log(size) to attention logits (proportional "
                                     "attention)", kind=bool),
        "stream": Option(None, "which stream to merge (default: the only one, or 'image')",
                         kind=STREAM),
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
        order, strict = options["order"], bool(options["strict"])
        rs = schedule(options["r"], len(layers), options["schedule"], strict)
        if stream.num_tokens is not None and strict:
            n, p = stream.num_tokens, stream.num_protected
            for i, r in zip(layers, rs, strict=True):
                most = merge_limit(n, p, order)
                if r > most:
                    raise ValueError(f"r={r} at layer {i} is larger than possible: {n} tokens "
                                     f"({p} protected) are left there, so at most {most} can "
                                     f"merge (strict=False clamps r there)")
                n -= r
        # each layer clamps r to what it can merge (the reference's min(r, (T - P) // 2)),
        # also where the token count is known only at run time; `last_stats` shows it
        return {(stream.name, i): SitePlan(post=[MergeTokens(r, order=order)] if r else [],
                                           proportional=bool(options["proportional"]))
                for i, r in zip(layers, rs, strict=True)}
