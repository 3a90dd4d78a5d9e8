"""Tiny random BLIP models for the tests, and subclasses whose ``forward`` returns one tensor
per sample from each task's real code path (``generate`` included)."""

from __future__ import annotations

import torch
from transformers import (
    BlipConfig,
    BlipForConditionalGeneration,
    BlipForImageTextRetrieval,
    BlipForQuestionAnswering,
)

VOCAB = 60
BOS, SEP = 50, 2
NEW_TOKENS = 3


def config(heads: int = 2, layers: int = 2, image_size: int = 32) -> BlipConfig:
    """Heads of width 8; text and vision of the same width (BLIP's VQA decoder needs it)."""
    width = 8 * heads
    text = dict(hidden_size=width, intermediate_size=2 * width, num_hidden_layers=layers,
                num_attention_heads=heads, vocab_size=VOCAB, bos_token_id=BOS,
                sep_token_id=SEP, pad_token_id=0, eos_token_id=SEP, max_position_embeddings=32)
    vision = dict(hidden_size=width, intermediate_size=2 * width, num_hidden_layers=layers,
                  num_attention_heads=heads, image_size=image_size, patch_size=8)
    return BlipConfig(text_config=text, vision_config=vision, image_text_hidden_size=8)


def noise(model: torch.nn.Module) -> torch.nn.Module:
    """Random weights of a useful scale (BLIP initialises its vision weights near zero)."""
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model


class VQAAnswers(BlipForQuestionAnswering):
    """``generate`` (greedy), returning the logits of every generated token (B×T×V)."""

    def forward(self, input_ids, pixel_values, attention_mask=None):  # noqa: D102
        out = self.generate(input_ids=input_ids, pixel_values=pixel_values,
                            attention_mask=attention_mask, max_new_tokens=NEW_TOKENS,
                            min_new_tokens=NEW_TOKENS, output_logits=True,
                            return_dict_in_generate=True)
        return torch.stack(out.logits, 1)


class Captions(BlipForConditionalGeneration):
    """``generate`` (greedy or beam search), returning the scores of each step (B×T×V)."""

    num_beams = 1

    def forward(self, pixel_values):  # noqa: D102
        out = self.generate(pixel_values=pixel_values, max_new_tokens=NEW_TOKENS,
                            min_new_tokens=NEW_TOKENS, num_beams=self.num_beams,
                            output_logits=True, return_dict_in_generate=True)
        logits = torch.stack(out.logits, 1)
        if self.num_beams > 1:  # the best beam's, as B×T×V
            logits = logits.view(pixel_values.shape[0], self.num_beams, *logits.shape[1:])[:, 0]
        return logits


class ITC(BlipForImageTextRetrieval):
    """The contrastive path (``use_itm_head=False``): each pair's similarity (B×1)."""

    def forward(self, input_ids, pixel_values, attention_mask=None):  # noqa: D102
        score = super().forward(input_ids=input_ids, pixel_values=pixel_values,
                                attention_mask=attention_mask, use_itm_head=False).itm_score
        return score.diagonal()[:, None]


def make(kind: str, **cfg) -> torch.nn.Module:
    """A tiny random BLIP of ``kind``: vqa, itm, itc, caption, caption_beams, vqa_model,
    caption_model (the last two: the plain transformers classes)."""
    torch.manual_seed(0)
    classes = {"vqa": VQAAnswers, "itm": BlipForImageTextRetrieval, "itc": ITC,
               "caption": Captions, "caption_beams": Captions,
               "vqa_model": BlipForQuestionAnswering,
               "caption_model": BlipForConditionalGeneration}
    model = noise(classes[kind](config(**cfg))).eval()
    if kind == "caption_beams":
        model.num_beams = 2
    return model


def inputs(kind: str, batch: int, seq: int, padded: bool, image_size: int = 32,
           seed: int = 0) -> tuple:
    """Positional inputs of ``make(kind)``'s forward: ids ([CLS]-like first token, random
    lengths when ``padded``), images, attention mask."""
    g = torch.Generator().manual_seed(seed)
    pixels = torch.randn(batch, 3, image_size, image_size, generator=g)
    if kind.startswith("caption"):
        return (pixels,)
    ids = torch.randint(3, VOCAB - 12, (batch, seq), generator=g)
    ids[:, 0] = 1
    lengths = (torch.randint(2, seq + 1, (batch,), generator=g) if padded
               else torch.full((batch,), seq))
    lengths[0] = seq  # one full-length sample
    mask = (torch.arange(seq)[None] < lengths[:, None]).long()
    ids = ids.masked_fill(mask == 0, 0)
    if kind == "itm":
        return ids, pixels, True, mask
    return ids, pixels, mask


def output(kind: str):
    if kind == "itm":
        return lambda out: out.itm_score
    return lambda out: out
