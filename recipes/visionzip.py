"""VisionZip (Yang et al., 2024, arXiv 2412.04467): "longer is better but not necessary".
Training-free, in the vision tower of a VLM, on the tokens it hands to the projector.

At the layer whose output the VLM reads (``layer``: LLaVA reads ``vision_feature_layer``
= -2, the output of the tower's second-to-last layer), each image keeps

1. its ``dominant`` patch tokens with the most attention from the CLS query in that layer's
   self-attention (averaged over heads; a tower without a CLS, SigLIP, ranks by the mean
   query's attention), in their original order after the CLS; and
2. ``contextual`` tokens that summarise the rest: of the R remaining tokens (in order), every
   ``max(1, R // contextual)``-th is a target (the first ``contextual`` of them); each other
   remaining token joins the target whose key (averaged over heads) is most similar
   (cosine), and a target becomes the mean of its group (size-weighted: it carries the
   group's size). The contextual tokens follow the dominant ones.

The CLS (a protected token) stays first, so LLaVA's ``"default"`` strategy still drops it:
the projector gets ``dominant + contextual`` tokens per image, and the prompt must carry that
many ``<image>`` tokens (`trimkit.adapters.hf.llava.image_token_count`). Defaults from the
paper for LLaVA-1.5 (576 patches): 54 dominant, 10 contextual (the paper counts the CLS among
its 54 dominant tokens; here ``dominant`` counts patches). Counts larger than what an image
has are clamped. Layers after ``layer`` (whose output LLaVA does not read) run on the reduced
tokens too.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from trimkit import ModelDescription, Option, Recipe, SitePlan, TokenOp, register_recipe
from trimkit.ops import drop_tokens, keep_top, merge_tokens, permute_tokens
from trimkit.recipe import STREAM
from trimkit.sites import Site
from trimkit.state import TokenState

__all__ = ["VisionZip", "VisionZipReduce"]


class VisionZipReduce(TokenOp):
    """Keep ``dominant`` tokens by the scoring query's attention and fold the other
    unprotected live tokens into ``contextual`` tokens (VisionZip; see the module)."""

    needs = frozenset({"query_scores", "keys"})

    def __init__(self, dominant: int, contextual: int):
        super().__init__()
        self.dominant, self.contextual = int(dominant), int(contextual)

    def extra_repr(self) -> str:
        return f"dominant={self.dominant}, contextual={self.contextual}"

    def forward(self, state: TokenState, site: Site) -> TokenState:
        eligible = state.live & ~state.protected
        b, n = eligible.shape
        count = eligible.sum(1)
        dom = keep_top(site.captured["query_scores"], count.clamp(max=self.dominant), eligible)
        rest = eligible & ~dom
        r = rest.sum(1)
        c = r.clamp(max=self.contextual)
        step = (r // c.clamp(min=1)).clamp(min=1)
        rank = rest.long().cumsum(1) - 1
        target = rest & (rank % step[:, None] == 0) & (rank // step[:, None] < c[:, None])
        others = rest & ~target
        keys = F.normalize(site.captured["keys"].float(), dim=-1)
        sim = (keys @ keys.transpose(1, 2)).masked_fill(~target[:, None, :], float("-inf"))
        dst = sim.argmax(-1)
        src = torch.arange(n, device=dst.device).expand(b, n)
        merge = others & (c > 0)[:, None]
        state = merge_tokens(state, src, dst, merge)
        state = drop_tokens(state, others & ~merge)
        # protected and dominant tokens in their order, then the contextual ones, then dead
        pos = torch.arange(n, device=dst.device).expand(b, n)
        key = torch.where(state.live, torch.where(target, pos + n, pos), pos + 2 * n)
        return permute_tokens(state, key.argsort(dim=1))


@register_recipe
class VisionZip(Recipe):
    name = "visionzip"
    summary = ("Keep the dominant image tokens by the CLS's attention and merge the rest into "
               "a few contextual tokens, at the layer a VLM reads (training-free; VisionZip).")
    options = {
        "dominant": Option(54, "patch tokens kept by the attention the CLS (or the mean query) "
                               "pays them", kind=int, low=0),
        "contextual": Option(10, "tokens the other patches are merged into", kind=int, low=0),
        "layer": Option(-2, "the layer of the stream whose output the model reads (negative: "
                            "from the end; LLaVA's vision_feature_layer -2 is -2)", kind=int),
        "stream": Option("image", "the vision stream", kind=STREAM),
    }

    def plan(self, desc: ModelDescription, options: dict) -> dict:
        name = options["stream"]
        if name not in desc.streams:
            raise ValueError(f"visionzip reduces a vision stream; this {desc.family!r} model "
                             f"has streams {sorted(desc.streams)}")
        stream = desc.streams[name]
        depth, layer = len(stream.layers), options["layer"]
        if not -depth <= layer < depth:
            raise ValueError(f"layer must be in [{-depth}, {depth - 1}] for a stream of "
                             f"{depth} layers, got {layer}")
        index = layer % depth
        if index not in stream.attention_layers():
            raise ValueError(f"layer {layer} of stream {name!r} has no self-attention to "
                             f"score its tokens")
        if options["dominant"] + options["contextual"] < 1:
            raise ValueError("dominant + contextual must keep at least one token")
        return {(name, index): SitePlan(post=[VisionZipReduce(options["dominant"],
                                                              options["contextual"])])}
