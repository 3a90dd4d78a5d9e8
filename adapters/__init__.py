"""Adapters shipped with trimkit; each registers itself on import."""

from . import timm_vit  # noqa: F401
