"""Hugging Face transformers (v5): BERT, CLIP and ViT encoders, trimmed through transformers'
`AttentionInterface` registry and hooks on their layers (see `trimkit.adapters.hf.adapter`
and docs/huggingface.md); BLIP (`trimkit.adapters.hf.blip`, docs/blip.md); ViLT
(`trimkit.adapters.hf.vilt`, a single-stream VLM whose image stream has the text as its
prefix); LLaVA (`trimkit.adapters.hf.llava`, a decoder VLM whose language model drops image
tokens from its later layers and KV cache, `trimkit.adapters.hf.decoder`, docs/llava.md);
Qwen2-VL and Qwen2.5-VL (`trimkit.adapters.hf.qwen2_vl`, FastV with multimodal rotary
positions, docs/qwen2_vl.md)."""

from . import bench, llava_bench, qwen2_vl_bench
from .adapter import HFAdapter, UnsupportedConfigError, pooled_positions
from .attention import ATTN_IMPLEMENTATION, trimkit_attention
from .blip import BlipAdapter
from .llava import LlavaAdapter
from .qwen2_vl import Qwen2VLAdapter
from .vilt import ViltAdapter

__all__ = ["ATTN_IMPLEMENTATION", "BlipAdapter", "HFAdapter", "LlavaAdapter",
           "Qwen2VLAdapter", "UnsupportedConfigError", "ViltAdapter", "bench", "llava_bench",
           "pooled_positions", "qwen2_vl_bench", "trimkit_attention"]
