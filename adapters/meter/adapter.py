"""The METER adapter: two streams, text and image, through the co-attention fusion stack.

The image stream runs through the CLIP tower's blocks (``vit_model.transformer.resblocks.i``,
pre-norm, on ``nn.MultiheadAttention``) and then the fusion stack; the text stream runs
through the fusion stack (the RoBERTa encoder is not trimmed). Each fusion layer (official
names ``cross_modal_text_layers.i`` / ``cross_modal_image_layers.i``) is a post-norm BERT
layer: self-attention, cross-attention to the other stream, FFN. Sites go in through the
engine's fx pass: tokens are trimmed at a layer's input (pre ops) and, in the fusion stack,
after its cross-attention and before the FFN (post ops, PuMer's placement). Both layers of
a fusion block read the previous block's outputs (``parallel``, paired by ``pair``). Each
stream's first token, which its pooler reads, is protected; the text padding mask enters
the trimming state at the first fusion layer and is carried (and compacted) from there.
"""

from __future__ import annotations

import torch
from torch import nn

from trimkit import (
    Adapter,
    HeadLayout,
    LayerDesc,
    ModelDescription,
    StreamDesc,
    register_adapter,
)
from trimkit.tools.bench import register_builder

from ..layouts import bert_heads
from .model import METER, meter_base, meter_tiny

_BERT_HEADS = {a: bert_heads(a) for a in ("attention", "crossattention")}


@register_adapter
class MeterAdapter(Adapter):
    name = "meter"

    def detect(self, model: nn.Module) -> bool:
        return isinstance(model, METER)

    def describe(self, model: nn.Module) -> ModelDescription:
        cfg = model.config
        fusion = {}
        for name, other, attr in (("text", "image", "cross_modal_text_layers"),
                                  ("image", "text", "cross_modal_image_layers")):
            # head counts are read from the modules: static head pruning changes them
            fusion[name] = tuple(
                LayerDesc(block=f"{attr}.{i}", attention="attention.self",
                          num_heads=blk.attention.self.num_attention_heads,
                          dim=cfg.hidden_size, stream_arg=0, mask_arg=2,
                          cross_attention="crossattention.self", cross_stream=other,
                          leave_after="crossattention", residual=False, masks_are_padding=True,
                          pair=i, head_dim=blk.attention.self.attention_head_size,
                          cross_num_heads=blk.crossattention.self.num_attention_heads,
                          heads=_BERT_HEADS["attention"],
                          cross_heads=_BERT_HEADS["crossattention"])
                for i, blk in enumerate(getattr(model, attr)))
        # the CLIP tower's blocks (open_clip, on nn.MultiheadAttention) come first in the
        # image stream: tokens trimmed there stay trimmed through the fusion stack
        encoder = tuple(
            LayerDesc(block=f"vit_model.transformer.resblocks.{i}", attention="attn",
                      num_heads=blk.attn.num_heads, dim=cfg.vision_width,
                      head_dim=blk.attn.head_dim, heads=HeadLayout(multihead="attn"))
            for i, blk in enumerate(model.vit_model.transformer.resblocks))
        side = cfg.image_size // cfg.patch_size
        n_image = side * side + 1
        streams = {
            "text": StreamDesc("text", fusion["text"], num_tokens=None, num_protected=1,
                               padded=True),
            "image": StreamDesc("image", encoder + fusion["image"], num_tokens=n_image,
                                num_protected=1, grid=(side, side)),
        }
        return ModelDescription("meter", streams, parallel=True)

def bench_model(name: str, text_len: int = 40, **kwargs) -> tuple[nn.Module, object]:
    """``trimkit bench --model meter-base`` (or ``meter:tiny?...``): METER at a preset's
    sizes (fields overridable) with random weights; inputs are random images (of side
    ``image_size``, the resize hook) and ``text_len`` random real text tokens."""
    presets = {"base": meter_base, "tiny": meter_tiny}
    if name not in presets:
        raise ValueError(f"unknown METER preset {name!r}; presets: {', '.join(presets)}")
    torch.manual_seed(0)
    model = METER(presets[name](**kwargs)).eval()
    cfg = model.config

    def make_inputs(batch_size: int) -> tuple:
        g = torch.Generator().manual_seed(0)
        images = torch.randn(batch_size, 3, cfg.image_size, cfg.image_size, generator=g)
        ids = torch.randint(3, cfg.vocab_size, (batch_size, text_len), generator=g)
        return images, ids, torch.ones(batch_size, text_len, dtype=torch.long)

    return model, make_inputs


register_builder("meter", bench_model, {"meter-base": "meter:base", "meter-tiny": "meter:tiny"},
                 resize="image_size",
                 examples=["--model meter-base --recipe attn_prune --keep-ratio 0.5 "
                           "--batch-size 1 4"])
