"""Hugging Face transformers (v5): BERT, CLIP and ViT encoders, trimmed through transformers'
`AttentionInterface` registry and hooks on their layers (see `trimkit.adapters.hf.adapter`
and docs/huggingface.md); BLIP (`trimkit.adapters.hf.blip`, docs/blip.md); ViLT
(`trimkit.adapters.hf.vilt`, a single-stream VLM whose image stream has the text as its
prefix)."""

from . import bench
from .adapter import HFAdapter, UnsupportedConfigError, pooled_positions
from .attention import ATTN_IMPLEMENTATION, trimkit_attention
from .blip import BlipAdapter
from .vilt import ViltAdapter

__all__ = ["ATTN_IMPLEMENTATION", "BlipAdapter", "HFAdapter", "UnsupportedConfigError",
           "ViltAdapter", "bench", "pooled_positions", "trimkit_attention"]
