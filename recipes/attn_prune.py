"""Attention-score pruning (EViT, Liang et al., ICLR 2022; FastV's family).

At chosen layers keep the tokens that the CLS token attends to most, computed from one query
row so the main attention stays fused. The row: the first token where the stream protects
its leading tokens (its CLS; in a single-stream VLM such as ViLT, the text CLS its pooler
reads), the mean of the live queries where it protects none, and in a positional (causal)
stream its first protected token, else its last live one. Defaults from EViT on DeiT-S/B:
keep 70% of the remaining tokens at the 4th, 7th and 10th of 12 blocks (a quarter, half and
three quarters of the depth for other depths); ``fuse=True`` folds the dropped tokens into
one, weighted by that attention (EViT's inattentive-token fusion). ``keep_ratio`` is relative to the
tokens alive at that layer, rounded up.
"""

from __future__ import annotations

from trimkit import ModelDescription, Option, Recipe, SitePlan, register_recipe
from trimkit.recipe import INTS, STREAM
from trimkit.trimmers import PruneByQueryScore


@register_recipe
class AttentionPrune(Recipe):
    name = "attn_prune"
    summary = "Keep the top tokens by the attention CLS pays them (training-free; EViT)."
    options = {
        "keep_ratio": Option(0.7, "fraction of the live unprotected tokens kept at each layer",
                             kind=float, low=0, high=1, low_open=True),
        "layers": Option(None, "layer indices that prune (default: 1/4, 1/2, 3/4 of the depth)",
                         kind=INTS),
        "fuse": Option(False, "fuse the dropped tokens into one token (EViT)", kind=bool),
        "stream": Option(None, "which stream to prune (default: the only one, or 'image')",
                         kind=STREAM),
    }

    def plan(self, desc: ModelDescription, options: dict) -> dict:
        keep = options["keep_ratio"]
        name = options["stream"] or ("image" if "image" in desc.streams else None)
        try:
            stream = desc.stream(name)
        except KeyError:
            raise ValueError(f"stream must be one of {sorted(desc.streams)}, "
                             f"got {options['stream']!r}") from None
        # scores come from a layer's own attention: layers that only serve as another
        # stream's keys (`LayerDesc.keys_only`) cannot prune
        own = stream.attention_layers()
        depth = len(own)
        layers = options["layers"]
        if layers is None:
            layers = sorted({own[depth // 4], own[depth // 2], own[(3 * depth) // 4]})
        if isinstance(layers, int):
            layers = [layers]
        bad = [i for i in layers if i not in own]
        if bad:
            where = (f"in [0, {depth})" if own == list(range(depth))
                     else f"among the layers that attend, {own}")
            raise ValueError(f"layers must be indices {where}, got {bad!r}")
        return {(stream.name, i): SitePlan(post=[PruneByQueryScore(keep, bool(options["fuse"]))],
                                           proportional=bool(options["fuse"]))
                for i in sorted(set(layers))}
