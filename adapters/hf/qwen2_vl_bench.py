"""``trimkit bench --model qwen2-vl:<preset>``: Qwen2-VL at stated shapes, with random weights
(nothing is downloaded), timed per task like the LLaVA presets
(`trimkit.adapters.hf.llava_bench`): ``prefill`` (one forward over the prompt and its image,
filling the KV cache), ``decode`` (``new_tokens`` greedy decoding steps continuing that
prefill's cache, on a copy of it), ``cache copy`` (the copy alone) and ``per token`` (decode
minus the copy, over the tokens). The KV cache the prefill leaves is reported as "cache MiB".

The smallest published Qwen2-VL (Qwen2-VL-2B-Instruct, about 2.2B parameters: a 32-block
vision tower of 0.67B and Qwen2-1.5B) is over 1B parameters, so the preset under 1B is
named by what it is built from: ``2b-vision-8-blocks+qwen2-0.5b`` keeps the 2B's vision
block shape (1280 wide, 16 heads, 14-pixel patches, 2×2 merger) for 8 of its 32 blocks and
puts the published Qwen2-0.5B language model behind it, with Qwen2-VL's M-RoPE sections
scaled to its 64-wide heads. FastV acts only in the language model, so the fewer vision
blocks make the prefill's untouched share smaller than the 2B's: read the FLOPs column
for what the language model saves.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from trimkit.tools.bench import Derived, Tasks, register_builder

from .llava_bench import cache_bytes

__all__ = ["PRESETS", "qwen2_vl_model"]

#: preset -> (vision config fields, text config fields)
PRESETS: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
    # Qwen/Qwen2-VL-2B-Instruct's vision blocks (8 of 32) + Qwen/Qwen2-0.5B; ~0.68B parameters
    "2b-vision-8-blocks+qwen2-0.5b": (
        dict(depth=8, embed_dim=1280, hidden_size=896, num_heads=16, mlp_ratio=4,
             patch_size=14, temporal_patch_size=2, spatial_merge_size=2, in_channels=3),
        dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
             num_attention_heads=14, num_key_value_heads=2, vocab_size=151936,
             max_position_embeddings=32768, tie_word_embeddings=True,
             rope_parameters={"rope_type": "default", "rope_theta": 1000000.0,
                              "mrope_section": [8, 12, 12]})),
    # the published Qwen/Qwen2-VL-2B-Instruct shapes (about 2.2B parameters)
    "qwen2-vl-2b": (
        dict(depth=32, embed_dim=1280, hidden_size=1536, num_heads=16, mlp_ratio=4,
             patch_size=14, temporal_patch_size=2, spatial_merge_size=2, in_channels=3),
        dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
             num_attention_heads=12, num_key_value_heads=2, vocab_size=151936,
             max_position_embeddings=32768, tie_word_embeddings=True,
             rope_parameters={"rope_type": "default", "rope_theta": 1000000.0,
                              "mrope_section": [16, 24, 24]})),
    # a tiny one for checking the command itself
    "tiny": (
        dict(depth=2, embed_dim=16, hidden_size=32, num_heads=2, mlp_ratio=2, patch_size=2,
             temporal_patch_size=2, spatial_merge_size=2, in_channels=3),
        dict(hidden_size=32, intermediate_size=64, num_hidden_layers=4,
             num_attention_heads=4, num_key_value_heads=2, vocab_size=100,
             max_position_embeddings=256,
             rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                              "mrope_section": [1, 1, 2]})),
}
#: Qwen2-VL's special tokens (the tiny preset's vocabulary of 100 takes the last ids)
_TOKENS = {"image_token_id": 151655, "video_token_id": 151656,
           "vision_start_token_id": 151652, "vision_end_token_id": 151653}


def qwen2_vl_model(name: str, text_len: int = 32, new_tokens: int = 8, attn: str = "sdpa",
                   image_size: int | None = None
                   ) -> tuple[nn.Module, Callable[[int], tuple], Tasks]:
    """A ``Qwen2VLForConditionalGeneration`` of preset ``name`` (eval, random weights,
    attention ``attn``) and ``make_inputs(batch_size)``: prompts of ``text_len`` random text
    ids around one square image of side ``image_size`` pixels (default 448: 1024 patches,
    256 image tokens; a multiple of 28, the patch times the merge) framed by the vision
    start and end tokens, with its M-RoPE token types; no padding. ``new_tokens``: the
    decoding steps timed."""
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    if name not in PRESETS:
        raise ValueError(f"unknown Qwen2-VL preset {name!r}; presets: {', '.join(PRESETS)}")
    vis, txt = PRESETS[name]
    unit = vis["patch_size"] * vis["spatial_merge_size"]
    side = image_size if image_size is not None else 16 * unit
    if side <= 0 or side % unit:
        raise ValueError(f"image_size must be a positive multiple of {unit} (the patch "
                         f"times the 2×2 merge), got {side}")
    vocab = txt["vocab_size"]
    tokens = ({k: vocab - 1 - i for i, k in enumerate(_TOKENS)} if vocab < 151936
              else dict(_TOKENS))
    text = dict(txt, pad_token_id=None, bos_token_id=None, eos_token_id=None)
    cfg = Qwen2VLConfig(vision_config=vis, text_config=text, **tokens)
    cfg._attn_implementation = attn
    torch.manual_seed(0)
    model = Qwen2VLForConditionalGeneration(cfg).eval()
    grid = (1, side // vis["patch_size"], side // vis["patch_size"])
    patches = grid[1] * grid[2]
    image_tokens = patches // vis["spatial_merge_size"] ** 2
    row = vis["in_channels"] * vis["temporal_patch_size"] * vis["patch_size"] ** 2
    image_token = tokens["image_token_id"]

    def make_inputs(batch_size: int) -> tuple:
        gen = torch.Generator().manual_seed(batch_size)
        half = text_len // 2
        text_ids = torch.randint(1, min(tokens.values()), (batch_size, text_len), generator=gen)
        b = batch_size
        ids = torch.cat([text_ids[:, :half],
                         torch.full((b, 1), tokens["vision_start_token_id"]),
                         torch.full((b, image_tokens), image_token),
                         torch.full((b, 1), tokens["vision_end_token_id"]),
                         text_ids[:, half:]], dim=1)
        mask = torch.ones_like(ids)
        pixels = torch.randn(b * patches, row, generator=gen)
        grids = torch.tensor([grid] * b)
        return ids, mask, pixels, grids, (ids == image_token).int()

    #: the last prefill's cache and logits per model and batch size, which the decoding
    #: task continues from (each time on a copy)
    prefilled: dict[tuple[int, int], tuple[Any, torch.Tensor, torch.Tensor]] = {}

    def prefill(m: nn.Module, ids: torch.Tensor, mask: torch.Tensor, pixels: torch.Tensor,
                grids: torch.Tensor, types: torch.Tensor) -> Any:
        out = m(input_ids=ids, attention_mask=mask, pixel_values=pixels, image_grid_thw=grids,
                mm_token_type_ids=types, use_cache=True, logits_to_keep=1)
        prefilled[(id(m), ids.shape[0])] = (out.cache, out.logits, m.model.rope_deltas)
        return out

    def start(m: nn.Module, ids: torch.Tensor) -> tuple[Any, torch.Tensor, torch.Tensor]:
        found = prefilled.get((id(m), ids.shape[0]))
        if found is None:
            raise RuntimeError("the decoding task continues the prefill task's cache: run "
                               "the prefill first")
        return copy.deepcopy(found[0]), found[1], found[2]

    def copy_cache(m: nn.Module, ids: torch.Tensor, *rest: torch.Tensor) -> Any:
        return start(m, ids)

    def decode(m: nn.Module, ids: torch.Tensor, mask: torch.Tensor, *rest: torch.Tensor
               ) -> Any:
        cache, logits, deltas = start(m, ids)
        token = logits[:, -1].argmax(-1, keepdim=True)
        b, n = ids.shape
        for step in range(new_tokens):
            mask = torch.cat([mask, torch.ones_like(token)], dim=1)
            # the new token's M-RoPE position, as generate gives it: after the prompt's
            # last position (its length plus the prefill's rope_deltas)
            pos = (deltas + n + step).view(1, b, 1).expand(3, b, 1)
            out = m(input_ids=token, attention_mask=mask, position_ids=pos, cache=cache,
                    use_cache=True, logits_to_keep=1)
            token = out.logits[:, -1].argmax(-1, keepdim=True)
        return token

    tasks: Tasks = {"prefill": prefill, "cache copy": copy_cache, "decode": decode,
                    "per token": Derived("decode", "cache copy", new_tokens)}
    return model, make_inputs, tasks


register_builder("qwen2-vl", qwen2_vl_model, aliases={}, examples=[
    '--model "qwen2-vl:2b-vision-8-blocks+qwen2-0.5b" --recipe fastv --layer 2 --keep 0.5 '
    '--batch-size 1 8',
], state_bytes=cache_bytes)
