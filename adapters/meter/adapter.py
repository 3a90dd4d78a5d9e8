"""The METER adapter: two streams, text and image, each through its encoder and then the
co-attention fusion stack.

The image stream runs through the CLIP tower's blocks (``vit_model.transformer.resblocks.i``,
pre-norm, on ``nn.MultiheadAttention``) and then the fusion stack; the text stream runs
through the text encoder's layers (``text_transformer.encoder.layer.i``: RoBERTa, or BERT
with ``text_encoder="bert"``) and then the fusion stack. Tokens trimmed in an encoder stay
trimmed through the fusion stack. Each fusion layer (official names
``cross_modal_text_layers.i`` / ``cross_modal_image_layers.i``) is a post-norm BERT layer:
self-attention, cross-attention to the other stream, FFN. The CLIP and fusion sites go in
through the engine's fx pass: tokens are trimmed at a layer's input (pre ops) and, in the
fusion stack, after its cross-attention and before the FFN (post ops, PuMer's placement).
Both layers of a fusion block read the previous block's outputs (``parallel``, paired by
``pair``). The text encoder's sites go in as the Hugging Face adapter's do (hooks on its
layers, its attention through trimkit's `AttentionInterface` entry; its output stays
trimmed for the fusion stack); they are installed only where some op acts in the text
encoder. Each stream's first token, which its pooler reads, is protected; the text padding
mask enters the trimming state at the text encoder (read from its ``attention_mask``) and
is carried, and compacted, from there. A call given ``text_embeds`` (the text encoder's
output, e.g. cached), or a recipe with nothing in the text encoder, starts the text stream
at the first fusion layer instead, with the padding of its ``attention_mask``
(`StreamDesc.entries`).
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
from trimkit.adapter import install_fx_sites
from trimkit.hooks import MethodPatch, Patches, Undo
from trimkit.sites import Site, TrimContext
from trimkit.tools.bench import register_builder

from ..hf.adapter import describe_tower, encoder_tower, install_towers, prefix
from ..layouts import bert_heads
from .model import METER, meter_base, meter_tiny

_BERT_HEADS = {a: bert_heads(a) for a in ("attention", "crossattention")}
_TEXT_ENCODER = "text_transformer"


def _text_tower(model: METER):
    """The text encoder as a tower whose output stays trimmed (the fusion stack reads it)."""
    return encoder_tower(model.text_transformer, _TEXT_ENCODER, restore=None)


class _Infer(MethodPatch):
    """``METER.infer``: each call's text stream starts afresh, at the text encoder or, when
    the call gives ``text_embeds``, at the first fusion layer (whose site would otherwise
    carry on from the state the previous call left)."""

    def __init__(self, owner: nn.Module, ctx: TrimContext):
        super().__init__(owner, "infer")
        self.ctx = ctx

    def __call__(self, *args, **kwargs):
        if self.ctx.enabled:
            self.ctx.states.pop("text", None)
        return self.original(*args, **kwargs)


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
        text_encoder = describe_tower(_text_tower(model))
        streams = {
            "text": StreamDesc("text", text_encoder + fusion["text"], num_tokens=None,
                               num_protected=1, padded=True,
                               entries=(0, len(text_encoder))),
            "image": StreamDesc("image", encoder + fusion["image"], num_tokens=n_image,
                                num_protected=1, grid=(side, side)),
        }
        return ModelDescription("meter", streams, parallel=True)

    def install(self, model: nn.Module, desc: ModelDescription, sites: dict[tuple[str, int], Site],
                ctx: TrimContext) -> list[Undo]:
        tower = _text_tower(model)
        encoder = [(s.name, i) for s in desc.streams.values() for i, layer in enumerate(s.layers)
                   if layer.block.startswith(prefix(_TEXT_ENCODER))]
        # the text encoder is touched only where some op acts in it: otherwise the text
        # stream starts at the fusion stack, as with text_embeds (so copies of a model that
        # share one frozen encoder can be trimmed in their fusion stacks independently)
        acts = any(len(sites[k].pre) or len(sites[k].post) or sites[k].needs for k in encoder)
        with Patches() as patches:
            patches.add(*install_fx_sites(model, desc, sites,
                                          only={k for k in sites if k not in set(encoder)}))
            if acts:
                install_towers(patches, ctx, model.text_transformer,
                               [(tower, [sites[k] for k in encoder])])
            patches.set(model, "infer", _Infer(model, ctx))
        return patches.undo

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
