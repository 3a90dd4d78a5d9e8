"""Recipes made of others (`trimkit.recipe.Combined`), applied together by one
`trimkit.apply`.

``"visionzip+fastv"``: VisionZip in a decoder VLM's vision tower (the projector gets
``dominant + contextual`` tokens per image), then FastV in its language model (after layer
K it keeps the top ``keep`` of those image tokens by the last prompt token's attention).
The two reductions compound: with the defaults, 64 of LLaVA-1.5's 576 image tokens reach
the language model and 32 of them its layers after K. VisionZip's ``layer`` and ``stream``
are ``vision_layer`` and ``vision_stream`` here; every other option keeps its name.
"""

from __future__ import annotations

from trimkit import register_recipe
from trimkit.recipe import Combined

from .fastv import FastV
from .visionzip import VisionZip

__all__ = ["VisionZipFastV"]


@register_recipe
class VisionZipFastV(Combined):
    name = "visionzip+fastv"
    summary = ("VisionZip in a VLM's vision tower, then FastV in its language model, in one "
               "apply (training-free).")
    parts = ((VisionZip, {"vision_layer": "layer", "vision_stream": "stream"}), (FastV, {}))
