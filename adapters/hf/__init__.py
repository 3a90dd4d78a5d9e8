"""Hugging Face transformers (v5): BERT, CLIP and ViT encoders, trimmed through transformers'
`AttentionInterface` registry and hooks on their layers (see `trimkit.adapters.hf.adapter`
and docs/huggingface.md)."""

from . import bench
from .adapter import HFAdapter, UnsupportedConfigError, pooled_positions
from .attention import ATTN_IMPLEMENTATION, trimkit_attention

__all__ = ["ATTN_IMPLEMENTATION", "HFAdapter", "UnsupportedConfigError", "bench",
           "pooled_positions", "trimkit_attention"]
