"""Recipes shipped with trimkit; each registers itself on import."""

from . import (  # noqa: F401
    attn_prune,
    cases,  # noqa: F401  (conformance cases of the recipes above)
    combined,
    fastv,
    prune_heads,
    pumer,
    smarttrim,
    tome,
    visionzip,
)
