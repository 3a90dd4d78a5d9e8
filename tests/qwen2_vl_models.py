"""Tiny random Qwen2-VL (and Qwen2.5-VL) models for the tests: a 2-block vision tower of
2×2-pixel patches whose 2×2 patch merger gives 8 tokens per 8×16-pixel image (a 2×4 grid),
and a 4-layer language model with grouped-query attention and M-RoPE, and prompts around
them (left padding, one image per prompt, batch-first pixel rows)."""

from __future__ import annotations

import torch
from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

VOCAB = 100
IMAGE_TOKEN, VIDEO_TOKEN, VISION_START, VISION_END = 99, 98, 97, 96
PAD = 0
GRID = (1, 4, 8)  # patches per image: t, h, w
PATCH_ROWS = GRID[0] * GRID[1] * GRID[2]  # 32 patches of 3·2·2·2 = 24 values
TOKENS = PATCH_ROWS // 4  # image tokens per image after the 2×2 merger


def config(layers: int = 4, family: str = "qwen2_vl") -> Qwen2VLConfig:
    """A ``layers``-deep language model of width 32 (4 query heads sharing 2 key/value
    heads, head width 8, M-RoPE sections 1+1+2) and a vision tower of width 16."""
    vision = dict(depth=2, embed_dim=16, hidden_size=32, num_heads=2, patch_size=2,
                  temporal_patch_size=2, spatial_merge_size=2, in_channels=3, mlp_ratio=2)
    text = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                num_attention_heads=4, num_key_value_heads=2, vocab_size=VOCAB,
                max_position_embeddings=256, pad_token_id=PAD, bos_token_id=None,
                eos_token_id=None,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                 "mrope_section": [1, 1, 2]})
    ids = dict(image_token_id=IMAGE_TOKEN, video_token_id=VIDEO_TOKEN,
               vision_start_token_id=VISION_START, vision_end_token_id=VISION_END)
    if family == "qwen2_5_vl":
        from transformers import Qwen2_5_VLConfig

        vision.update(out_hidden_size=vision.pop("hidden_size"), hidden_size=16,
                      intermediate_size=32, window_size=8, fullatt_block_indexes=[1])
        del vision["embed_dim"], vision["mlp_ratio"]
        return Qwen2_5_VLConfig(vision_config=vision, text_config=text, **ids)
    return Qwen2VLConfig(vision_config=vision, text_config=text, **ids)


def model(layers: int = 4, seed: int = 0, attn: str = "sdpa", family: str = "qwen2_vl"
          ) -> torch.nn.Module:
    """A tiny random ``Qwen2VLForConditionalGeneration`` (or the Qwen2.5-VL one), in eval."""
    torch.manual_seed(seed)
    cfg = config(layers, family)
    cfg._attn_implementation = attn
    if family == "qwen2_5_vl":
        from transformers import Qwen2_5_VLForConditionalGeneration

        return Qwen2_5_VLForConditionalGeneration(cfg).eval()
    return Qwen2VLForConditionalGeneration(cfg).eval()


def prompt(before: list[int], after: list[int], image_tokens: int = TOKENS) -> list[int]:
    return before + [VISION_START] + [IMAGE_TOKEN] * image_tokens + [VISION_END] + after


def batch(prompts: list[list[int]], seed: int = 0) -> dict[str, torch.Tensor]:
    """Left-padded ids, their attention mask and token types, one random image per prompt
    (``pixel_values`` B×32×24: batch first, which Qwen2-VL's patch embedding flattens)."""
    n = max(len(p) for p in prompts)
    ids = torch.tensor([[PAD] * (n - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (n - len(p)) + [1] * len(p) for p in prompts])
    gen = torch.Generator().manual_seed(seed)
    pixels = torch.randn(len(prompts), PATCH_ROWS, 24, generator=gen)
    return dict(input_ids=ids, attention_mask=mask, pixel_values=pixels,
                image_grid_thw=torch.tensor([GRID] * len(prompts)),
                mm_token_type_ids=(ids == IMAGE_TOKEN).int())


#: prompts of different lengths (left padding in a batch), each with one image
PROMPTS = [prompt([1, 5, 6], [7, 8, 9]), prompt([1, 5], [7, 8]), prompt([1], [4, 7, 8, 9, 3])]
