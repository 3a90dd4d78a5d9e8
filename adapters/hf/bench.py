"""``trimkit bench --model hf:<preset>``: transformers models at published sizes, with random
weights (nothing is downloaded), and inputs shaped like their processors' outputs."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from trimkit.tools.bench import Derived, Tasks, register_builder

__all__ = ["PRESETS", "bench_model"]

_CLIP_B16_TEXT = dict(hidden_size=512, intermediate_size=2048, num_hidden_layers=12,
                      num_attention_heads=8, max_position_embeddings=77)
_CLIP_L14_TEXT = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                      num_attention_heads=12, max_position_embeddings=77)

# google/siglip-base-patch16-224: a ViT-B/16 without CLS (an attention-pooling head) and a
# bidirectional text tower over 64 ids
_SIGLIP_B16_VISION = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                          num_attention_heads=12, image_size=224, patch_size=16)
_SIGLIP_B16_TEXT = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                        num_attention_heads=12, max_position_embeddings=64, vocab_size=32000,
                        projection_size=768, pad_token_id=1, eos_token_id=1, bos_token_id=None)

# Salesforce's BLIP base checkpoints: a ViT-B/16 at 384 px and a BERT-base text encoder/decoder
_BLIP_VISION = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                    num_attention_heads=12, image_size=384, patch_size=16)
_BLIP_TEXT = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                  num_attention_heads=12, vocab_size=30524, encoder_hidden_size=768)

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
    "siglip-base-patch16-224": ("siglip", _SIGLIP_B16_VISION, _SIGLIP_B16_TEXT),
    "bert-base-uncased": ("bert", dict(hidden_size=768, intermediate_size=3072,
                                       num_hidden_layers=12, num_attention_heads=12), {}),
    "all-minilm-l6-v2": ("bert", dict(hidden_size=384, intermediate_size=1536,
                                      num_hidden_layers=6, num_attention_heads=12), {}),
    "vit-base-patch16-224": ("vit", dict(hidden_size=768, intermediate_size=3072,
                                         num_hidden_layers=12, num_attention_heads=12,
                                         image_size=224, patch_size=16), {}),
    "blip-vqa-base": ("blip", _BLIP_VISION, _BLIP_TEXT),
    "blip-image-captioning-base": ("blip", _BLIP_VISION, _BLIP_TEXT),
    "blip-itm-base-coco": ("blip", _BLIP_VISION, _BLIP_TEXT),
    # dandelin/vilt-b32-finetuned-vqa: ViT-B/32 weights, one stream over 40 text tokens and
    # the patches of a 384×640 image (12×20, plus the image CLS); VQAv2's 3129 answers
    "vilt-b32-finetuned-vqa": ("vilt", dict(hidden_size=768, intermediate_size=3072,
                                            num_hidden_layers=12, num_attention_heads=12,
                                            image_size=384, patch_size=32, num_labels=3129,
                                            max_position_embeddings=40), {}),
}


def bench_model(name: str, tower: str = "vision", text_len: int | None = None, seq_len: int = 128,
                attn: str = "sdpa", new_tokens: int = 20, **fields: Any
                ) -> tuple[nn.Module, Callable[[int], tuple]] | tuple[nn.Module, Callable, Tasks]:
    """A model of preset ``name`` (eval mode, random weights, attention implementation
    ``attn``) and ``make_inputs(batch_size)``; ``fields`` override config fields (of the
    vision config for CLIP's vision tower and full model, of the text config for its text
    tower). ``image_size`` is the resize hook: images follow the vision config's side (the
    benchmark uses it only on models with an image stream).

    - CLIP: ``tower`` is ``vision`` (``CLIPVisionModel``, random images), ``text``
      (``CLIPTextModel``) or ``both`` (``CLIPModel``); text is 77 ids like the CLIP
      tokenizer's with ``padding="max_length"``: start, ``text_len`` random ids, end, padding
      (masked out by ``attention_mask``).
    - SigLIP: ``tower`` as for CLIP (``SiglipVisionModel``, ``SiglipTextModel``,
      ``SiglipModel``); text is 64 ids as SigLIP's processor gives them with
      ``padding="max_length"``: ``text_len`` random ids, then the end id as padding, and no
      ``attention_mask`` (the model reads every id).
    - BERT: ``BertModel`` on ``seq_len`` ids ([CLS], random ids, [SEP]), no padding.
    - ViT: ``ViTModel`` on random images.
    - BLIP (`blip_model`): VQA, captioning or retrieval, timed per task.
    - ViLT (`vilt_model`): VQA on 384×640 images and ``text_len`` ids (default 40).

    ``text_len`` defaults to 16 (CLIP, BLIP) or 40 (ViLT)."""
    from transformers import (
        BertConfig,
        BertModel,
        CLIPConfig,
        CLIPModel,
        CLIPTextConfig,
        CLIPTextModel,
        CLIPVisionConfig,
        CLIPVisionModel,
        SiglipConfig,
        SiglipModel,
        SiglipTextConfig,
        SiglipTextModel,
        SiglipVisionConfig,
        SiglipVisionModel,
        ViTConfig,
        ViTModel,
    )

    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; presets: {', '.join(PRESETS)}")
    family, main, text = PRESETS[name]
    torch.manual_seed(0)
    if family == "vilt":
        return vilt_model(name, text_len=40 if text_len is None else text_len, **fields)
    text_len = 16 if text_len is None else text_len
    if family == "blip":
        return blip_model(name, text_len=text_len, new_tokens=new_tokens, **fields)
    if family in ("clip", "siglip"):
        if tower not in ("vision", "text", "both"):
            raise ValueError(f"tower must be 'vision', 'text' or 'both', got {tower!r}")
        vision_cfg = dict(main, **fields) if tower != "text" else dict(main)
        text_cfg = dict(text, **fields) if tower == "text" else dict(text)
    if family == "siglip":
        if tower == "vision":
            model = SiglipVisionModel(SiglipVisionConfig(**vision_cfg, attn_implementation=attn))
        elif tower == "text":
            model = SiglipTextModel(SiglipTextConfig(**text_cfg, attn_implementation=attn))
        else:  # the text head projects to the image features' width
            text_cfg["projection_size"] = vision_cfg["hidden_size"]
            model = SiglipModel(SiglipConfig(text_config=text_cfg, vision_config=vision_cfg,
                                             attn_implementation=attn))
    elif family == "clip":
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

    def siglip_text(batch_size: int, g: torch.Generator) -> torch.Tensor:
        cfg = getattr(config, "text_config", config)
        n = cfg.max_position_embeddings
        if not 1 <= text_len <= n:
            raise ValueError(f"text_len must be in [1, {n}]")
        ids = torch.full((batch_size, n), cfg.pad_token_id, dtype=torch.long)
        ids[:, :text_len] = torch.randint(2, cfg.vocab_size, (batch_size, text_len), generator=g)
        return ids

    def make_inputs(batch_size: int) -> tuple:
        g = torch.Generator().manual_seed(0)
        if family == "bert":
            ids = torch.randint(1000, config.vocab_size, (batch_size, seq_len), generator=g)
            ids[:, 0], ids[:, -1] = 101, 102
            return ids, torch.ones_like(ids)
        if family == "vit" or tower == "vision":
            return (images(batch_size, g),)
        if family == "siglip":
            ids = siglip_text(batch_size, g)
            return (ids,) if tower == "text" else (ids, images(batch_size, g))
        ids, mask = clip_text(batch_size, g)
        if tower == "text":
            return ids, mask
        return ids, images(batch_size, g), mask

    return model, make_inputs


def blip_model(name: str, text_len: int = 16, new_tokens: int = 20,
               text_layers: int | None = None, **fields: Any
               ) -> tuple[nn.Module, Callable[[int], tuple], Tasks]:
    """A BLIP of preset ``name`` (random weights; ``fields`` override vision config fields,
    ``text_layers`` the text towers' depth), its inputs (random 384 px images; questions of
    ``text_len`` random ids between [CLS] and [SEP]) and its timed tasks:

    - VQA: ``encode`` (the vision encoder, then the text encoder over the question, which
      cross-attends to the image: what ``generate`` runs before decoding), ``generate`` of
      ``new_tokens`` answer tokens, and ``per token`` (generation minus encoding, per token:
      each step cross-attends to the encoded question);
    - captioning: ``encode`` (the vision encoder), ``generate`` of ``new_tokens`` caption
      tokens, ``per token`` (each step cross-attends to the image tokens that survived);
    - retrieval: ``itm`` (image-text matching head) and ``itc`` (contrastive features).
    """
    from transformers import (
        BlipConfig,
        BlipForConditionalGeneration,
        BlipForImageTextRetrieval,
        BlipForQuestionAnswering,
    )

    torch.manual_seed(0)
    cls = {"blip-vqa-base": BlipForQuestionAnswering,
           "blip-image-captioning-base": BlipForConditionalGeneration,
           "blip-itm-base-coco": BlipForImageTextRetrieval}[name]
    text = dict(_BLIP_TEXT) if text_layers is None else dict(_BLIP_TEXT,
                                                              num_hidden_layers=text_layers)
    config = BlipConfig(vision_config=dict(_BLIP_VISION, **fields), text_config=text)
    model = cls(config).eval()
    with torch.no_grad():  # BLIP starts its vision weights near zero: give them a real scale
        for p in model.vision_model.parameters():
            if p.dim() > 1:
                p.normal_(0.0, 0.02)
    size, text_cfg = config.vision_config.image_size, config.text_config
    if not 1 <= text_len <= 64:
        raise ValueError("text_len must be in [1, 64]")
    fixed = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens)

    def make_inputs(batch_size: int) -> tuple:
        g = torch.Generator().manual_seed(0)
        pixels = torch.randn(batch_size, 3, size, size, generator=g)
        if cls is BlipForConditionalGeneration:
            return (pixels,)
        ids = torch.randint(1000, text_cfg.vocab_size - 2, (batch_size, text_len + 2),
                            generator=g)
        ids[:, 0], ids[:, -1] = 101, text_cfg.sep_token_id
        return ids, pixels, torch.ones_like(ids)

    def encode_question(m: nn.Module, ids, pixels, mask) -> Any:
        image = m.vision_model(pixel_values=pixels)[0]
        return m.text_encoder(input_ids=ids, attention_mask=mask, encoder_hidden_states=image,
                              return_dict=False)

    gen = f"generate {new_tokens}"
    tasks: Tasks
    if cls is BlipForQuestionAnswering:
        tasks = {"encode": encode_question,
                 gen: lambda m, ids, px, mask: m.generate(input_ids=ids, pixel_values=px,
                                                          attention_mask=mask, **fixed),
                 "per token": Derived(gen, "encode", new_tokens)}
    elif cls is BlipForConditionalGeneration:
        tasks = {"encode": lambda m, px: m.vision_model(pixel_values=px),
                 gen: lambda m, px: m.generate(pixel_values=px, **fixed),
                 "per token": Derived(gen, "encode", new_tokens)}
    else:
        tasks = {"itm": lambda m, ids, px, mask: m(ids, px, True, mask),
                 "itc": lambda m, ids, px, mask: m(ids, px, False, mask)}
    return model, make_inputs, tasks


def vilt_model(name: str, height: int = 384, width: int = 640, text_len: int = 40,
               image_size: int | None = None, **fields: Any
               ) -> tuple[nn.Module, Callable[[int], tuple]]:
    """A ViLT of preset ``name`` for VQA (random weights; ``fields`` override config fields)
    and its inputs as ViLT's processor shapes them: ``text_len`` ids ([CLS], random ids,
    [SEP]; the published model reads 40), ``height × width`` images (384×640 at the
    published size) with a full ``pixel_mask``. ``image_size`` is the resize hook: the same
    model (ViLT interpolates its position embeddings to any input) on images that many
    pixels high, the width following ``height : width`` in whole patches. ViLT samples its
    patches on every forward, so the timed calls draw from torch's global RNG as the model
    does in use."""
    from transformers import ViltConfig, ViltForQuestionAnswering

    torch.manual_seed(0)
    config = ViltConfig(**dict(PRESETS[name][1], **fields))
    if image_size is not None:
        patch = config.patch_size
        height, width = image_size, max(1, round(image_size * width / height / patch)) * patch
    model = ViltForQuestionAnswering(config).eval()
    if not 2 <= text_len <= config.max_position_embeddings:
        raise ValueError(f"text_len must be in [2, {config.max_position_embeddings}]")
    if height % config.patch_size or width % config.patch_size:
        raise ValueError(f"height and width must be multiples of the patch size "
                         f"{config.patch_size}, got {height}×{width}")

    def make_inputs(batch_size: int) -> tuple:
        g = torch.Generator().manual_seed(0)
        ids = torch.randint(1000, config.vocab_size, (batch_size, text_len), generator=g)
        ids[:, 0], ids[:, -1] = 101, 102
        pixels = torch.randn(batch_size, 3, height, width, generator=g)
        pixel_mask = torch.ones(batch_size, height, width, dtype=torch.long)
        return ids, torch.ones_like(ids), None, pixels, pixel_mask

    return model, make_inputs


register_builder("hf", bench_model, resize="image_size", examples=[
    "--model hf:clip-vit-base-patch16 --recipe tome --r 8 --batch-size 1 16",
    '--model "hf:clip-vit-base-patch16?tower=text" --recipe attn_prune --stream text '
    "--keep-ratio 0.5 --layers 2,6",
    "--model hf:bert-base-uncased --recipe tome --stream text --r 8 --batch-size 8",
    "--model hf:blip-vqa-base --recipe attn_prune --keep-ratio 0.5 --batch-size 1 4",
    '--model "hf:blip-image-captioning-base?new_tokens=10" --recipe tome --r 16',
])
