"""``trimkit bench --model hf:<preset>``: transformers models at published sizes, with random
weights (nothing is downloaded), and inputs shaped like their processors' outputs."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from trimkit.bench import register_builder

__all__ = ["PRESETS", "bench_model"]

_CLIP_B16_TEXT = dict(hidden_size=512, intermediate_size=2048, num_hidden_layers=12,
                      num_attention_heads=8, max_position_embeddings=77)
_CLIP_L14_TEXT = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                      num_attention_heads=12, max_position_embeddings=77)

#: preset -> (family, vision or encoder config fields, text config fields for CLIP)
PRESETS: dict[str, tuple[str, dict[str, Any], dict[str, Any]]] = {
    "clip-vit-base-patch16": ("clip", dict(hidden_size=768, intermediate_size=3072,
                                           num_hidden_layers=12, num_attention_heads=12,
                                           image_size=224, patch_size=16), _CLIP_B16_TEXT),
    "clip-vit-base-patch32": ("clip", dict(hidden_size=768, intermediate_size=3072,
                                           num_hidden_layers=12, num_attention_heads=12,
                                           image_size=224, patch_size=32), _CLIP_B16_TEXT),
    "clip-vit-large-patch14": ("clip", dict(hidden_size=1024, intermediate_size=4096,
                                            num_hidden_layers=24, num_attention_heads=16,
                                            image_size=224, patch_size=14), _CLIP_L14_TEXT),
    "bert-base-uncased": ("bert", dict(hidden_size=768, intermediate_size=3072,
                                       num_hidden_layers=12, num_attention_heads=12), {}),
    "all-minilm-l6-v2": ("bert", dict(hidden_size=384, intermediate_size=1536,
                                      num_hidden_layers=6, num_attention_heads=12), {}),
    "vit-base-patch16-224": ("vit", dict(hidden_size=768, intermediate_size=3072,
                                         num_hidden_layers=12, num_attention_heads=12,
                                         image_size=224, patch_size=16), {}),
}


def bench_model(name: str, tower: str = "vision", text_len: int = 16, seq_len: int = 128,
                attn: str = "sdpa", **fields: Any) -> tuple[nn.Module, Callable[[int], tuple]]:
    """A model of preset ``name`` (eval mode, random weights, attention implementation
    ``attn``) and ``make_inputs(batch_size)``; ``fields`` override config fields (of the
    vision config for CLIP's vision tower and full model, of the text config for its text
    tower).

    - CLIP: ``tower`` is ``vision`` (``CLIPVisionModel``, random images), ``text``
      (``CLIPTextModel``) or ``both`` (``CLIPModel``); text is 77 ids like the CLIP
      tokenizer's with ``padding="max_length"``: start, ``text_len`` random ids, end, padding
      (masked out by ``attention_mask``).
    - BERT: ``BertModel`` on ``seq_len`` ids ([CLS], random ids, [SEP]), no padding.
    - ViT: ``ViTModel`` on random images.
    """
    from transformers import (
        BertConfig,
        BertModel,
        CLIPConfig,
        CLIPModel,
        CLIPTextConfig,
        CLIPTextModel,
        CLIPVisionConfig,
        CLIPVisionModel,
        ViTConfig,
        ViTModel,
    )

    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; presets: {', '.join(PRESETS)}")
    family, main, text = PRESETS[name]
    torch.manual_seed(0)
    if family == "clip":
        if tower not in ("vision", "text", "both"):
            raise ValueError(f"tower must be 'vision', 'text' or 'both', got {tower!r}")
        vision_cfg = dict(main, **fields) if tower != "text" else dict(main)
        text_cfg = dict(text, **fields) if tower == "text" else dict(text)
        if tower == "vision":
            model = CLIPVisionModel(CLIPVisionConfig(**vision_cfg, attn_implementation=attn))
        elif tower == "text":
            model = CLIPTextModel(CLIPTextConfig(**text_cfg, attn_implementation=attn))
        else:
            model = CLIPModel(CLIPConfig(text_config=text_cfg, vision_config=vision_cfg,
                                         projection_dim=512, attn_implementation=attn))
    elif family == "bert":
        model = BertModel(BertConfig(**dict(main, **fields), attn_implementation=attn))
    else:
        model = ViTModel(ViTConfig(**dict(main, **fields), attn_implementation=attn))
    model = model.eval()
    config = model.config

    def images(batch_size: int, g: torch.Generator) -> torch.Tensor:
        vision = getattr(config, "vision_config", config)
        size = vision.image_size
        return torch.randn(batch_size, 3, size, size, generator=g)

    def clip_text(batch_size: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        cfg = getattr(config, "text_config", config)
        n, vocab = cfg.max_position_embeddings, cfg.vocab_size
        if not 1 <= text_len <= n - 2:
            raise ValueError(f"text_len must be in [1, {n - 2}]")
        ids = torch.full((batch_size, n), cfg.eos_token_id, dtype=torch.long)
        ids[:, 0] = cfg.bos_token_id
        ids[:, 1:text_len + 1] = torch.randint(0, vocab - 2, (batch_size, text_len), generator=g)
        mask = torch.zeros(batch_size, n, dtype=torch.long)
        mask[:, :text_len + 2] = 1
        return ids, mask

    def make_inputs(batch_size: int) -> tuple:
        g = torch.Generator().manual_seed(0)
        if family == "bert":
            ids = torch.randint(1000, config.vocab_size, (batch_size, seq_len), generator=g)
            ids[:, 0], ids[:, -1] = 101, 102
            return ids, torch.ones_like(ids)
        if family == "vit" or tower == "vision":
            return (images(batch_size, g),)
        ids, mask = clip_text(batch_size, g)
        if tower == "text":
            return ids, mask
        return ids, images(batch_size, g), mask

    return model, make_inputs


register_builder("hf", bench_model, examples=[
    "--model hf:clip-vit-base-patch16 --recipe tome --r 8 --batch-size 1 16",
    '--model "hf:clip-vit-base-patch16?tower=text" --recipe attn_prune --stream text '
    "--keep-ratio 0.5 --layers 2,6",
    "--model hf:bert-base-uncased --recipe tome --stream text --r 8 --batch-size 8",
])
