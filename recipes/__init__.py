"""Recipes shipped with trimkit; each registers itself on import."""

from . import attn_prune, tome  # noqa: F401
