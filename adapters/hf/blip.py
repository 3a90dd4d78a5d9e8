"""transformers' BLIP: ``BlipForQuestionAnswering``, ``BlipForImageTextRetrieval``,
``BlipForConditionalGeneration`` (and ``BlipModel``, ``BlipVisionModel``, ``BlipTextModel``).

Streams:

- ``"image"``: the vision encoder's layers (``vision_model.encoder.layers.i``, pre-norm, CLS
  protected), then, where a text encoder cross-attends to the image, one *keys-only* layer
  per text layer (`LayerDesc.keys_only`): ops there trim the image tokens right before that
  text layer's cross-attention reads them, guided by the text (SmartTrim's cross-modal
  trimmer). The text layers hand the surviving image tokens on from one to the next, so
  each cross-attention computes its keys and values on fewer tokens.
- ``"text"``: the text encoder's layers (``text_encoder``; ``text_model`` in ``BlipModel``),
  post-norm BERT layers with a cross-attention to the image; CLS protected, padding read
  from the 2D ``attention_mask``. Tokens are trimmed at a layer's entry and after its
  cross-attention (before the FFN), or after its self-attention in a call without the image
  (``BlipForImageTextRetrieval(use_itm_head=False)``: the text is then encoded alone, and
  no trimmer reads the image).

BLIP's attention modules compute their product inline (no transformers ``AttentionInterface``
to register with), so each trimmed one gets an instance ``forward`` that projects with the
module's own layers and runs the site's core; layers get forward hooks (enter, leave).

Outputs stay compacted: a tower's ``last_hidden_state`` holds its surviving tokens, CLS
first (what ``pooler_output``, the ITM head and the ITC projections read), a batch packed
to its longest survivor. Every later cross-attention reads only those tokens: the text
encoder's, and the LM decoder's in ``generate`` (captioning: every decoding step
cross-attends to the image tokens that survived; VQA: to the question tokens). The decoder
is not trimmed; where a batch holds dead slots, its cross-attentions get a key mask for
them. transformers' BLIP drops ``encoder_attention_mask`` before its cross-attention, so the
untrimmed decoder also attends to a padded question's padding; the trimmed one never does,
and its answers match each question run alone.

Static head pruning: the text encoder's self- and cross-attention heads. The vision
attention's own forward derives its head width from the model width, so a vision layer with
fewer heads would not run: those heads are gated per instance (SmartTrim), and a head gated
off in a whole batch skips its projections too, but they are not pruned.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from trimkit import (
    Adapter,
    HeadLayout,
    LayerDesc,
    ModelDescription,
    StreamDesc,
    hooks,
    register_adapter,
)
from trimkit.api import UnsupportedConfigError
from trimkit.hooks import Patches, Undo
from trimkit.sites import Site, TrimContext

from ..layouts import bert_heads
from .adapter import checkpointing, patch_grid, prefix

__all__ = ["BlipAdapter"]

IMAGE, TEXT = "image", "text"

_VISION_HEADS = HeadLayout(
    qkv="self_attn.qkv", out="self_attn.projection", counts=("self_attn.num_heads",),
    unprunable="BLIP's vision attention derives its head width from the model width in its "
                "own forward, so a layer with fewer heads would not run")


def _classes() -> tuple[type, type, type] | None:
    if "transformers" not in sys.modules:
        return None
    from transformers.models.blip.modeling_blip import BlipVisionModel
    from transformers.models.blip.modeling_blip_text import BlipTextLMHeadModel, BlipTextModel

    return BlipVisionModel, BlipTextModel, BlipTextLMHeadModel


@dataclass
class _Parts:
    vision: tuple[str, nn.Module] | None = None
    text: tuple[str, nn.Module] | None = None
    decoders: list[nn.Module] = field(default_factory=list)


def _parts(model: nn.Module) -> _Parts:
    classes = _classes()
    parts = _Parts()
    if classes is None:
        return parts
    vision_cls, text_cls, lm_cls = classes
    in_decoder: set[int] = set()
    for path, module in model.named_modules():
        if isinstance(module, lm_cls):
            parts.decoders.append(module)
            in_decoder.update(id(m) for m in module.modules())
        elif isinstance(module, vision_cls):
            if parts.vision is not None:
                raise UnsupportedConfigError("trimkit's BLIP adapter found more than one "
                                             "BlipVisionModel; nothing was changed")
            parts.vision = (path, module)
        elif isinstance(module, text_cls) and id(module) not in in_decoder:
            if parts.text is not None:
                raise UnsupportedConfigError("trimkit's BLIP adapter found more than one BLIP "
                                             "text encoder; nothing was changed")
            parts.text = (path, module)
    return parts


def _check_layers(name: str, layers: nn.ModuleList) -> None:
    why = checkpointing(layers)
    if why:
        raise UnsupportedConfigError(f"trimkit's BLIP adapter cannot trim the {name}: {why}. "
                                     f"Nothing was changed.")


# ------------------------------------------------------------------------ attention forwards

class _VisionAttention:
    """BlipAttention's forward, its product through the site's core (same projections and
    scale)."""

    def __init__(self, module: nn.Module, site: Site):
        self.module, self.site = module, site

    def __call__(self, hidden_states: torch.Tensor, **kwargs: Any) -> tuple[torch.Tensor, None]:
        m = self.module
        qkv = m.qkv(hidden_states).unflatten(-1, (3, -1, m.head_dim))
        q, k, v = qkv.permute(2, 0, 3, 1, 4)
        out = self.site.core(q, k, v, dropout_p=m.dropout.p if m.training else 0.0,
                             scale=m.scale)
        return m.projection(out.transpose(1, 2).flatten(2)), None


class _TextAttention(_VisionAttention):
    """BlipTextSelfAttention's forward (self- or cross-attention) through the site's core.
    Like transformers' own, a cross-attention reads no mask (it is handed none)."""

    def __call__(self, hidden_states: torch.Tensor, attention_mask: Any = None,
                 encoder_hidden_states: torch.Tensor | None = None,
                 encoder_attention_mask: Any = None, past_key_values: Any = None,
                 **kwargs: Any) -> tuple[torch.Tensor, None]:
        if past_key_values is not None:
            raise RuntimeError("trimkit trims BLIP's text encoder, which runs without a KV "
                               "cache; a cache reached it")
        m, d = self.module, self.module.attention_head_size
        cross = encoder_hidden_states is not None
        src = encoder_hidden_states if cross else hidden_states
        q, k, v = (proj(x).unflatten(-1, (-1, d)).transpose(1, 2)
                   for proj, x in ((m.query, hidden_states), (m.key, src), (m.value, src)))
        core = self.site.cross_core if cross else self.site.core
        out = core(q, k, v, attn_mask=encoder_attention_mask if cross else attention_mask,
                   dropout_p=m.dropout.p if m.training else 0.0, scale=d ** -0.5)
        return out.transpose(1, 2).flatten(2), None


# ------------------------------------------------------------------------------- the adapter

@register_adapter
class BlipAdapter(Adapter):
    """transformers' BLIP models (VQA, retrieval, captioning) and their towers."""

    name = "blip"

    def detect(self, model: nn.Module) -> bool:
        if _classes() is None:
            return False
        from transformers import PreTrainedModel

        if not isinstance(model, PreTrainedModel):
            return False
        try:
            parts = _parts(model)
        except UnsupportedConfigError:
            return True  # ours, but describe says why it cannot be trimmed
        return parts.vision is not None or parts.text is not None

    def describe(self, model: nn.Module) -> ModelDescription:
        parts = _parts(model)
        if parts.vision is None and parts.text is None:
            raise UnsupportedConfigError(f"trimkit's BLIP adapter found no BLIP vision or text "
                                         f"encoder in this {type(model).__name__}")
        streams: dict[str, StreamDesc] = {}
        image_layers: list[LayerDesc] = []
        n_image = grid = None
        if parts.vision is not None:
            path, vision = parts.vision
            cfg = vision.config
            _check_layers("vision encoder", vision.encoder.layers)
            for i, layer in enumerate(vision.encoder.layers):
                attn = layer.self_attn
                image_layers.append(LayerDesc(
                    block=f"{prefix(path)}encoder.layers.{i}", attention="self_attn",
                    num_heads=attn.num_heads, dim=cfg.hidden_size, leave_after="mlp",
                    mlp_dim=cfg.intermediate_size, head_dim=attn.head_dim,
                    heads=_VISION_HEADS))
            n_image, grid = vision.embeddings.num_patches + 1, patch_grid(vision.embeddings)
        if parts.text is not None:
            path, text = parts.text
            cfg = text.config
            _check_layers("text encoder", text.encoder.layer)
            vision_dim = parts.vision[1].config.hidden_size if parts.vision else None
            layers = []
            for j, layer in enumerate(text.encoder.layer):
                block = f"{prefix(path)}encoder.layer.{j}"
                attn = layer.attention.self
                cross = hasattr(layer, "crossattention") and parts.vision is not None
                cattn = layer.crossattention.self if cross else None
                more = dict(cross_attention="crossattention.self", cross_stream=IMAGE,
                            cross_num_heads=cattn.num_attention_heads,
                            cross_heads=bert_heads("crossattention")) if cross else {}
                layers.append(LayerDesc(
                    block=block, attention="attention.self",
                    num_heads=attn.num_attention_heads, dim=cfg.hidden_size,
                    leave_after="crossattention" if cross else "attention", residual=False,
                    masks_are_padding=True, pair=j, mlp_dim=cfg.intermediate_size,
                    head_dim=attn.attention_head_size, heads=bert_heads("attention"), **more))
                if cross:
                    image_layers.append(LayerDesc(
                        block=block, attention="crossattention.self",
                        num_heads=cattn.num_attention_heads, dim=vision_dim,
                        cross_stream=TEXT, pair=j, keys_only=True))
            streams[TEXT] = StreamDesc(TEXT, tuple(layers), num_protected=1, padded=True)
        if image_layers:
            streams = {IMAGE: StreamDesc(IMAGE, tuple(image_layers), num_tokens=n_image,
                                         num_protected=1, grid=grid), **streams}
        return ModelDescription("blip", streams)

    def install(self, model: nn.Module, desc: ModelDescription, sites: dict[tuple[str, int], Site],
                ctx: TrimContext) -> list[Undo]:
        parts = _parts(model)
        keys = {layer.pair: sites[(IMAGE, i)] for i, layer in
                enumerate(desc.streams[IMAGE].layers if IMAGE in desc.streams else ())
                if layer.keys_only}
        ehs, eam = "encoder_hidden_states", "encoder_attention_mask"
        with Patches() as patches:
            if parts.vision is not None:
                vision = parts.vision[1]
                layers = vision.encoder.layers
                own = [sites[(IMAGE, i)] for i in range(len(layers))]
                for layer, site in zip(layers, own, strict=True):
                    patches.set(layer.self_attn, "forward", _VisionAttention(layer.self_attn, site))
                # its output is recorded: where a decoder reads it, its dead slots are masked
                hooks.install_tower(patches, ctx, hooks.Tower(IMAGE, vision, layers), own,
                                    hooks.Entry(ctx, IMAGE, record=True))
            if parts.text is not None:
                text = parts.text[1]
                read = hooks.ArgumentReader(text.forward, ("is_decoder", "attention_mask", ehs,
                                                           eam))
                image = hooks.Keys(IMAGE, ehs, eam) if parts.vision is not None else None
                hooks.Entry(ctx, TEXT, read, _text_masks, keys=image, record=True).install(
                    patches, text)
                for j, layer in enumerate(text.encoder.layer):
                    _install_text_layer(patches, layer, sites[(TEXT, j)], keys.get(j))
            for decoder in parts.decoders:  # not trimmed: masks the dead slots it reads
                bert = decoder.bert
                hooks.KeyBias(ctx, bert, ehs, eam).install(patches, bert, [
                    layer.crossattention.self for layer in bert.encoder.layer
                    if hasattr(layer, "crossattention")])
                patches.set(decoder, "generate", hooks.Expanding(decoder, "generate", ctx, ehs))
        return patches.undo


def _text_masks(arguments: dict, module: nn.Module) -> tuple[torch.Tensor | None, None]:
    if arguments.get("is_decoder"):
        raise RuntimeError("trimkit trims BLIP's text encoder bidirectionally; it cannot run "
                           "as a causal decoder (is_decoder=True) while trimmed")
    return hooks.padding_mask(arguments.get("attention_mask"), "BLIP's text encoder"), None


def _install_text_layer(patches: Patches, layer: nn.Module, site: Site,
                        keys: Site | None) -> None:
    """A text layer: its attentions through the site's core, enter, and leave after its
    cross-attention when the call reads the image (the image tokens first go through the
    layer's keys-only site), else after its self-attention."""
    patches.set(layer.attention.self, "forward", _TextAttention(layer.attention.self, site))
    if hasattr(layer, "crossattention"):
        patches.set(layer.crossattention.self, "forward",
                    _TextAttention(layer.crossattention.self, site))
    if keys is not None:  # the layer's cross-attention is described
        patches.hook(layer, hooks.KeysThrough(keys, "encoder_hidden_states", 1), pre=True,
                     kwargs=True, prepend=True)
        patches.hook(layer.crossattention, hooks.Leave(site), prepend=True)
    patches.hook(layer, hooks.Enter(site), pre=True, kwargs=True, prepend=True)
    patches.hook(layer.attention, hooks.Leave(site, unless_reading=IMAGE if keys else None),
                 prepend=True)
