"""Adapters shipped with trimkit; each registers itself on import (the generic one is tried
last, for models no other adapter recognises: `Adapter.fallback`)."""

from . import generic, timm_cait, timm_vit  # noqa: F401
from . import hf as hf_adapter  # noqa: F401
from . import open_clip as open_clip_adapter  # noqa: F401
from .meter import adapter as meter_adapter  # noqa: F401
