"""Recipes shipped with trimkit; each registers itself on import."""

from . import attn_prune, prune_heads, pumer, smarttrim, tome  # noqa: F401
