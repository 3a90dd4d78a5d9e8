"""Recipes shipped with trimkit; each registers itself on import."""

from . import attn_prune, prune_heads, smarttrim, tome  # noqa: F401
