"""FastV (Chen et al., ECCV 2024, arXiv 2403.06764): "an image is worth 1/2 tokens after
layer 2". Training-free, inside the language model of a decoder VLM (LLaVA, Qwen2-VL).

In the prefill, the first ``layer`` = K layers of the language model run on every token.
The K-th ranks the image tokens by the attention the last prompt token pays them in its
self-attention, averaged over heads (one query row computed from that layer's q and k, so
the attention itself stays on SDPA); each sample keeps the top ``ceil(keep · E)`` of its E
image tokens (at least one), and the later layers, with their KV cache, run without the
others: every decoding step reads only the kept image tokens there. Text tokens are never
dropped; each kept token keeps its original position id (rotary tables follow it).

Defaults from the paper: K = 2, R = 50% of the image tokens dropped (``keep = 1 − R =
0.5``). ``layer`` counts layers as the paper does (K = 2: layers 0 and 1 see everything,
layer 1's attention ranks). ``keep=1`` drops nothing: the model's outputs are unchanged.
The paper's reference rounds the kept count; trimkit rounds up (they differ by at most one
token).

Where it runs: a model whose adapter describes its language model as a ``"language"``
stream (`trimkit.adapters.hf.llava`, and `trimkit.adapters.hf.qwen2_vl` for Qwen2-VL and
Qwen2.5-VL, whose kept tokens keep their multimodal rotary positions); the adapter does the
dropping, masking and caching (`trimkit.adapters.hf.decoder`).
"""

from __future__ import annotations

from trimkit import ModelDescription, Option, Recipe, SitePlan, register_recipe
from trimkit.trimmers import PruneByQueryScore

LANGUAGE = "language"


@register_recipe
class FastV(Recipe):
    name = "fastv"
    summary = ("Drop image tokens in a decoder VLM's language model after layer K, by the "
               "attention the last prompt token pays them (training-free; FastV).")
    options = {
        "layer": Option(2, "K: the layers that see every image token (the K-th ranks them); "
                           "the later layers and their KV cache keep only the top ones",
                        kind=int, low=1),
        "keep": Option(0.5, "fraction of each sample's image tokens kept, rounded up, at "
                            "least one (the paper's R is 1 - keep)",
                       kind=float, low=0, high=1, low_open=True),
    }

    def plan(self, desc: ModelDescription, options: dict) -> dict:
        stream = desc.streams.get(LANGUAGE)
        if stream is None:
            raise ValueError(f"fastv drops image tokens inside the language model of a "
                             f"decoder VLM (a {LANGUAGE!r} stream, e.g. LLaVA's or "
                             f"Qwen2-VL's); this "
                             f"{desc.family!r} model has streams {sorted(desc.streams)}")
        depth, k = len(stream.layers), options["layer"]
        if not 1 <= k < depth:
            raise ValueError(f"layer must be in [1, {depth - 1}] for a language model of "
                             f"{depth} layers (K layers see every token, at least one runs "
                             f"after them), got {k}")
        return {(LANGUAGE, k - 1): SitePlan(post=[PruneByQueryScore(options["keep"])])}
