"""Adapters shipped with trimkit; each registers itself on import."""

from . import timm_vit  # noqa: F401
from .meter import adapter as meter_adapter  # noqa: F401
