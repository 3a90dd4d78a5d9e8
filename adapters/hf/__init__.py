"""Hugging Face transformers (v5): BERT, CLIP and ViT encoders, trimmed through transformers'
`AttentionInterface` registry and hooks on their layers (see `trimkit.adapters.hf.adapter`
and docs/huggingface.md); BLIP (`trimkit.adapters.hf.blip`, docs/blip.md)."""

from . import bench
from .adapter import HFAdapter, UnsupportedConfigError, pooled_positions
from .attention import ATTN_IMPLEMENTATION, trimkit_attention
from .blip import BlipAdapter

__all__ = ["ATTN_IMPLEMENTATION", "BlipAdapter", "HFAdapter", "UnsupportedConfigError", "bench",
           "pooled_positions", "trimkit_attention"]
