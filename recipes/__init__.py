"""Recipes shipped with trimkit; each registers itself on import."""

from . import attn_prune, smarttrim, tome  # noqa: F401
