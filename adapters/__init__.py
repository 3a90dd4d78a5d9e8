"""Adapters shipped with trimkit; each registers itself on import."""

from . import hf as hf_adapter  # noqa: F401
from . import open_clip as open_clip_adapter  # noqa: F401
from . import timm_vit  # noqa: F401
from .meter import adapter as meter_adapter  # noqa: F401
from . import generic  # noqa: F401  (tried last: models no other adapter recognises)
