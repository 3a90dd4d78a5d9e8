"""``trimkit bench --model llava:<preset>``: LLaVA-style decoder VLMs at published sizes, with
random weights (nothing is downloaded), timed per task: ``prefill`` (one forward over the
prompt and its image, filling the KV cache), ``decode`` (``new_tokens`` greedy decoding
steps continuing that prefill's cache, on a copy of it), ``cache copy`` (the copy alone) and
``per token`` (decode minus the copy, over the tokens). Decoding is timed apart from the
prefill, whose run-to-run spread on a busy machine would swamp a few tokens. The KV cache
the prefill leaves is reported as "cache MiB"."""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from trimkit.tools.bench import Derived, Tasks, register_builder

__all__ = ["PRESETS", "cache_bytes", "llava_model"]

#: preset -> (vision family, vision config fields, text family, text config fields, LLaVA fields)
PRESETS: dict[str, tuple[str, dict[str, Any], str, dict[str, Any], dict[str, Any]]] = {
    # llava-hf/llava-interleave-qwen-0.5b-hf: SigLIP-so400m/14 at 384 px without its last
    # layer (729 image tokens, all read), Qwen2-0.5B; about 0.9B parameters
    "llava-interleave-qwen-0.5b": (
        "siglip", dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=26,
                       num_attention_heads=16, image_size=384, patch_size=14),
        "qwen2", dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                      num_attention_heads=14, num_key_value_heads=2, vocab_size=152000,
                      rope_theta=1000000.0, tie_word_embeddings=True,
                      max_position_embeddings=32768),
        dict(vision_feature_layer=-1, vision_feature_select_strategy="full",
             image_seq_length=729, image_token_id=151646)),
    # a tiny CLIP + Llama for checking the command itself
    "tiny": (
        "clip", dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                     num_attention_heads=4, image_size=32, patch_size=8),
        "llama", dict(hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=2, vocab_size=100,
                      max_position_embeddings=256),
        dict(vision_feature_layer=-2, vision_feature_select_strategy="default",
             image_seq_length=16, image_token_id=99)),
}


def cache_bytes(output: Any) -> int:
    """Bytes of the keys and values in the KV cache a forward returned."""
    cache = getattr(output, "cache", None)
    if cache is None:
        cache = getattr(output, "past_key_values", None)
    total = 0
    for layer in getattr(cache, "layers", ()):
        for t in (getattr(layer, "keys", None), getattr(layer, "values", None)):
            if isinstance(t, torch.Tensor):
                total += t.numel() * t.element_size()
    return total


def llava_model(name: str, text_len: int = 32, new_tokens: int = 8, attn: str = "sdpa",
                image_size: int | None = None
                ) -> tuple[nn.Module, Callable[[int], tuple], Tasks]:
    """A ``LlavaForConditionalGeneration`` of preset ``name`` (eval, random weights,
    attention ``attn``) and ``make_inputs(batch_size)``: prompts of ``text_len`` random text
    ids around one image's ``<image>`` tokens (half before, half after; no padding) with a
    random image each. ``image_size`` overrides the vision tower's side (fewer image
    tokens). ``new_tokens``: the decoding steps timed."""
    from transformers import (
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        Qwen2Config,
        SiglipVisionConfig,
    )

    if name not in PRESETS:
        raise ValueError(f"unknown LLaVA preset {name!r}; presets: {', '.join(PRESETS)}")
    vfam, vis, tfam, txt, llava = PRESETS[name]
    vis = dict(vis, **({} if image_size is None else {"image_size": image_size}))
    vcfg = (CLIPVisionConfig if vfam == "clip" else SiglipVisionConfig)(**vis)
    tcfg = (LlamaConfig if tfam == "llama" else Qwen2Config)(**txt)
    patches = (vis["image_size"] // vis["patch_size"]) ** 2
    llava = dict(llava, image_seq_length=patches)
    cfg = LlavaConfig(vision_config=vcfg, text_config=tcfg, **llava)
    cfg._attn_implementation = attn
    torch.manual_seed(0)
    model = LlavaForConditionalGeneration(cfg).eval()
    image_token, vocab = cfg.image_token_id, tcfg.vocab_size

    def make_inputs(batch_size: int) -> tuple:
        gen = torch.Generator().manual_seed(batch_size)
        half = text_len // 2
        text = torch.randint(1, min(image_token, vocab), (batch_size, text_len), generator=gen)
        ids = torch.cat([text[:, :half], torch.full((batch_size, patches), image_token),
                         text[:, half:]], dim=1)
        mask = torch.ones_like(ids)
        side = vis["image_size"]
        pixels = torch.randn(batch_size, 3, side, side, generator=gen)
        return ids, mask, pixels

    #: the last prefill's cache and logits per model and batch size, which the decoding
    #: task continues from (each time on a copy)
    prefilled: dict[tuple[int, int], tuple[Any, torch.Tensor]] = {}

    def prefill(m: nn.Module, ids: torch.Tensor, mask: torch.Tensor, pixels: torch.Tensor
                ) -> Any:
        out = m(input_ids=ids, attention_mask=mask, pixel_values=pixels, use_cache=True,
                logits_to_keep=1)
        prefilled[(id(m), ids.shape[0])] = (out.cache, out.logits)
        return out

    def start(m: nn.Module, ids: torch.Tensor) -> tuple[Any, torch.Tensor]:
        found = prefilled.get((id(m), ids.shape[0]))
        if found is None:
            raise RuntimeError("the decoding task continues the prefill task's cache: run "
                               "the prefill first")
        return copy.deepcopy(found[0]), found[1]

    def copy_cache(m: nn.Module, ids: torch.Tensor, mask: torch.Tensor, pixels: torch.Tensor
                   ) -> Any:
        return start(m, ids)

    def decode(m: nn.Module, ids: torch.Tensor, mask: torch.Tensor, pixels: torch.Tensor
               ) -> Any:
        cache, logits = start(m, ids)
        token = logits[:, -1].argmax(-1, keepdim=True)
        for _ in range(new_tokens):
            mask = torch.cat([mask, torch.ones_like(token)], dim=1)
            out = m(input_ids=token, attention_mask=mask, cache=cache, use_cache=True,
                    logits_to_keep=1)
            token = out.logits[:, -1].argmax(-1, keepdim=True)
        return token

    tasks: Tasks = {"prefill": prefill, "cache copy": copy_cache, "decode": decode,
                    "per token": Derived("decode", "cache copy", new_tokens)}
    return model, make_inputs, tasks


register_builder("llava", llava_model, aliases={}, examples=[
    '--model "llava:llava-interleave-qwen-0.5b" --recipe fastv --layer 2 --keep 0.5 '
    '--batch-size 1 8',
], state_bytes=cache_bytes)
