"""Tiny random LLaVA models for the tests: a CLIP (or SigLIP) vision tower of 16 patches and
a Llama (or Qwen2) language model with grouped-query attention, and prompts around them."""

from __future__ import annotations

import torch
from transformers import (
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    Qwen2Config,
    SiglipVisionConfig,
)

VOCAB = 100
IMAGE_TOKEN = 99
PAD = 0
PATCHES = 16  # a 32×32 image in 8×8 patches


def config(text: str = "llama", vision: str = "clip", layers: int = 4) -> LlavaConfig:
    """LLaVA with a 3-layer vision tower (LLaVA reads layer -2) and a ``layers``-deep
    language model of width 32: 4 query heads sharing 2 key/value heads."""
    vis = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
               image_size=32, patch_size=8)
    vis_cfg = CLIPVisionConfig(**vis) if vision == "clip" else SiglipVisionConfig(**vis)
    txt = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
               num_attention_heads=4, num_key_value_heads=2, vocab_size=VOCAB,
               max_position_embeddings=256, pad_token_id=PAD)
    txt_cfg = LlamaConfig(**txt) if text == "llama" else Qwen2Config(**txt)
    return LlavaConfig(vision_config=vis_cfg, text_config=txt_cfg, image_token_id=IMAGE_TOKEN,
                       vision_feature_layer=-2, image_seq_length=PATCHES,
                       vision_feature_select_strategy="default" if vision == "clip" else "full")


def model(text: str = "llama", vision: str = "clip", layers: int = 4, seed: int = 0,
          attn: str = "sdpa") -> LlavaForConditionalGeneration:
    torch.manual_seed(seed)
    cfg = config(text, vision, layers)
    cfg._attn_implementation = attn
    return LlavaForConditionalGeneration(cfg).eval()


def prompt(before: list[int], after: list[int], image_tokens: int = PATCHES) -> list[int]:
    return before + [IMAGE_TOKEN] * image_tokens + after


def batch(prompts: list[list[int]], seed: int = 0) -> dict[str, torch.Tensor]:
    """Left-padded ids, their attention mask and one random image per prompt."""
    n = max(len(p) for p in prompts)
    ids = torch.tensor([[PAD] * (n - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (n - len(p)) + [1] * len(p) for p in prompts])
    gen = torch.Generator().manual_seed(seed)
    pixels = torch.randn(len(prompts), 3, 32, 32, generator=gen)
    return dict(input_ids=ids, attention_mask=mask, pixel_values=pixels)


#: prompts of different lengths (left padding in a batch), each with one image
PROMPTS = [prompt([1, 5, 6], [7, 8, 9]), prompt([1, 5], [7, 8]), prompt([1], [4, 7, 8, 9, 3])]
