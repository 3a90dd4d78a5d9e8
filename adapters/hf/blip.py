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
    register_adapter,
)
from trimkit.api import UnsupportedConfigError
from trimkit.hooks import (
    ArgumentReader,
    Enter,
    Entry,
    Leave,
    MethodPatch,
    Patches,
    Tower,
    Undo,
    install_tower,
    keys_arrive,
    keys_leave,
    live_slots,
    per_call,
)
from trimkit.ops import additive_mask
from trimkit.sites import Site, TrimContext

from ..layouts import bert_heads
from .adapter import padding_mask, patch_grid

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


def _prefix(path: str) -> str:
    return f"{path}." if path else ""


def _check_layers(name: str, layers: nn.ModuleList) -> None:
    for i, layer in enumerate(layers):
        if getattr(layer, "gradient_checkpointing", False):
            raise UnsupportedConfigError(
                f"trimkit's BLIP adapter cannot trim the {name}: layer {i} uses gradient "
                f"checkpointing, which re-runs attention in the backward pass; turn it off "
                f"first. Nothing was changed.")


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


# --------------------------------------------------------------------- outputs and key masks

class _Outputs:
    """The calling thread's latest tower outputs, one per stream, with their dead slots, so
    a decoder that cross-attends to one masks them. Outputs are found by identity (``is``,
    which ``torch.compile`` traces, unlike ``id`` keys and weak references); the latest
    output of each stream is held until the next one. The key bias a decoder adds is built
    once per tensor it reads (``generate`` passes the same one at every step)."""

    def __init__(self) -> None:
        #: stream -> (its latest output, its live tokens B×N bool, or None when all are live)
        self._latest: dict[str, tuple[torch.Tensor, torch.Tensor | None]] = {}
        self.pending: torch.Tensor | None = None  # set while a decoder's generate runs
        self.mask: torch.Tensor | None = None  # the key bias of the decoder call under way
        self._bias: tuple[torch.Tensor, torch.Tensor | None] | None = None

    def record(self, ctx: TrimContext, stream: str, output: Any) -> None:
        """``output`` of ``stream``'s tower, when its state lays it out."""
        x = getattr(output, "last_hidden_state", None)
        if x is None and isinstance(output, tuple):
            x = output[0]
        state = ctx.states.get(stream) if ctx.enabled else None
        if x is not None and state is not None and state.keep.shape == x.shape[:2]:
            self._latest[stream] = (x, live_slots(state))

    def find(self, x: torch.Tensor | None) -> tuple[bool, torch.Tensor | None]:
        """Whether ``x`` is a recorded output, and its live mask (``None``: all live)."""
        if x is not None:
            for out, live in self._latest.values():
                if out is x:
                    return True, live
        return False, None

    def key_bias(self, x: torch.Tensor | None) -> torch.Tensor | None:
        """B×1×1×N additive bias on the dead slots of ``x``: a recorded output, or one that
        ``generate`` expanded from it (repeated per beam or sample); ``None`` if there are
        none."""
        if x is None:
            return None
        if self._bias is not None and self._bias[0] is x:
            return self._bias[1]
        found, live = self.find(x)
        p = self.pending
        if (not found and p is not None and x.dim() == 3 and x.shape[1] == p.shape[1]
                and x.shape[0] % p.shape[0] == 0):
            live = p.repeat_interleave(x.shape[0] // p.shape[0], dim=0)
        bias = None
        if live is not None:
            bias = additive_mask(live.to(x.device), x.dtype)[:, None, None, :]
        self._bias = (x, bias)
        return bias


def _outputs(ctx: TrimContext) -> _Outputs:
    return per_call(ctx, ("blip", "outputs"), _Outputs)


class _VisionEntry(Entry):
    """The vision tower: its output is recorded for the decoders."""

    def end(self, module: nn.Module, output: object) -> None:
        _outputs(self.ctx).record(self.ctx, IMAGE, output)


class _DecoderMask:
    """A decoder (not trimmed) masks the dead slots of the trimmed outputs it cross-attends
    to: hooks on its BERT and on its cross-attentions."""

    def __init__(self, ctx: TrimContext, bert: nn.Module):
        self.ctx, self.read = ctx, ArgumentReader(bert.forward, ("encoder_hidden_states",))

    def before(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        outputs = _outputs(self.ctx)
        outputs.mask = outputs.key_bias(self.read(args, kwargs).get("encoder_hidden_states"))

    def after(self, module: nn.Module, args: tuple, kwargs: dict, out: Any) -> None:
        _outputs(self.ctx).mask = None

    def cross(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        mask = _outputs(self.ctx).mask
        if mask is None or kwargs.get("encoder_hidden_states") is None:
            return None
        return args, dict(kwargs, encoder_attention_mask=mask)


class _Generate(MethodPatch):
    """A decoder's ``generate``, knowing the dead slots of the output it was handed (which
    it expands per beam or sample before its cross-attentions read it)."""

    def __init__(self, decoder: nn.Module, ctx: TrimContext):
        super().__init__(decoder, "generate")
        self.ctx = ctx

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        outputs = _outputs(self.ctx)
        outputs.pending = outputs.find(kwargs.get("encoder_hidden_states"))[1]
        try:
            return self.original(*args, **kwargs)
        finally:
            outputs.pending = None


def _install_decoder(patches: Patches, decoder: nn.Module, ctx: TrimContext) -> None:
    mask = _DecoderMask(ctx, decoder.bert)
    patches.hook(decoder.bert, mask.before, pre=True, kwargs=True)
    patches.hook(decoder.bert, mask.after, kwargs=True, always=True)
    for layer in decoder.bert.encoder.layer:
        if hasattr(layer, "crossattention"):
            patches.hook(layer.crossattention.self, mask.cross, pre=True, kwargs=True)
    patches.set(decoder, "generate", _Generate(decoder, ctx))


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
                    block=f"{_prefix(path)}encoder.layers.{i}", attention="self_attn",
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
                block = f"{_prefix(path)}encoder.layer.{j}"
                attn = layer.attention.self
                cross = hasattr(layer, "crossattention") and parts.vision is not None
                cattn = layer.crossattention.self if cross else None
                layers.append(LayerDesc(
                    block=block, attention="attention.self",
                    num_heads=attn.num_attention_heads, dim=cfg.hidden_size,
                    cross_attention="crossattention.self" if cross else None,
                    cross_stream=IMAGE if cross else None,
                    leave_after="crossattention" if cross else "attention", residual=False,
                    masks_are_padding=True, pair=j, mlp_dim=cfg.intermediate_size,
                    head_dim=attn.attention_head_size,
                    cross_num_heads=cattn.num_attention_heads if cross else None,
                    heads=bert_heads("attention"),
                    cross_heads=bert_heads("crossattention") if cross else None))
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
        with Patches() as patches:
            if parts.vision is not None:
                vision = parts.vision[1]
                layers = vision.encoder.layers
                for i, layer in enumerate(layers):
                    patches.set(layer.self_attn, "forward",
                                _VisionAttention(layer.self_attn, sites[(IMAGE, i)]))
                install_tower(patches, ctx, Tower(IMAGE, vision, layers),
                              [sites[(IMAGE, i)] for i in range(len(layers))],
                              _VisionEntry(ctx, IMAGE))
            if parts.text is not None:
                keys = {layer.pair: sites[(IMAGE, i)]
                        for i, layer in enumerate(desc.streams[IMAGE].layers)
                        if layer.keys_only} if IMAGE in desc.streams else {}
                _install_text(patches, parts.text[1], sites, keys, ctx, parts.vision is not None)
            for decoder in parts.decoders:
                _install_decoder(patches, decoder, ctx)
        return patches.undo


@dataclass
class _TextCall:
    """The text encoder's call under way: does it read the image, and the image tokens the
    previous layer's cross-attention left."""

    cross: bool = False
    keys: torch.Tensor | None = None


def _text_call(ctx: TrimContext) -> _TextCall:
    return per_call(ctx, ("blip", "text"), _TextCall)


def _text_masks(arguments: dict, module: nn.Module) -> tuple[torch.Tensor | None, None]:
    if arguments.get("is_decoder"):
        raise RuntimeError("trimkit trims BLIP's text encoder bidirectionally; it cannot run "
                           "as a causal decoder (is_decoder=True) while trimmed")
    return padding_mask(arguments.get("attention_mask"), "BLIP's text encoder"), None


class _TextEntry(Entry):
    """The text encoder: its padding, and the image tokens it reads as keys (the vision
    tower's trimmed output, or image tokens from elsewhere, which enter here)."""

    def __init__(self, ctx: TrimContext, text: nn.Module, has_image: bool):
        super().__init__(ctx, TEXT, ArgumentReader(text.forward, (
            "is_decoder", "attention_mask", "encoder_hidden_states", "encoder_attention_mask")),
            _text_masks)
        self.has_image = has_image

    def before(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        call = _text_call(self.ctx)
        call.cross, call.keys = False, None
        super().before(module, args, kwargs)

    def begin(self, module: nn.Module, arguments: dict[str, Any]) -> None:
        super().begin(module, arguments)
        ehs = arguments.get("encoder_hidden_states") if self.has_image else None
        _text_call(self.ctx).cross = ehs is not None
        real = arguments.get("encoder_attention_mask")
        keys_arrive(self.ctx, IMAGE, ehs, None if real is None or real.dim() != 2 else real.bool(),
                    continues=_outputs(self.ctx).find(ehs)[0])

    def end(self, module: nn.Module, output: object) -> None:
        keys_leave(self.ctx, IMAGE)
        _text_call(self.ctx).keys = None
        _outputs(self.ctx).record(self.ctx, TEXT, output)


class _TextEnter(Enter):
    """A text layer's enter; where it cross-attends to the image, the image tokens also go
    through the keys-only site of this layer, and on to the next layer."""

    def __init__(self, site: Site, key_site: Site | None):
        super().__init__(site)
        self.key_site = key_site

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        got = super().__call__(module, args, kwargs)
        call = _text_call(self.site.ctx)
        if got is None or self.key_site is None or not call.cross:
            return got
        args, kwargs = list(got[0]), dict(got[1])
        given = args[1] if len(args) > 1 else kwargs.get("encoder_hidden_states")
        call.keys = self.key_site.leave(self.key_site.enter(given if call.keys is None
                                                            else call.keys))
        if len(args) > 1:
            args[1] = call.keys
        else:
            kwargs["encoder_hidden_states"] = call.keys
        return tuple(args), kwargs


class _LeaveSelf(Leave):
    """The leave point after a text layer's self-attention, in calls that do not trim after
    its cross-attention instead."""

    def __init__(self, site: Site, after_cross: bool):
        super().__init__(site)
        self.after_cross = after_cross

    def __call__(self, module: nn.Module, args: tuple, output: object) -> object:
        if self.after_cross and _text_call(self.site.ctx).cross:
            return None
        return super().__call__(module, args, output)


def _install_text(patches: Patches, text: nn.Module, sites: dict[tuple[str, int], Site],
                  keys: dict[int, Site], ctx: TrimContext, has_image: bool) -> None:
    _TextEntry(ctx, text, has_image).install(patches, text)
    for j, layer in enumerate(text.encoder.layer):
        site, key_site = sites[(TEXT, j)], keys.get(j)
        patches.set(layer.attention.self, "forward", _TextAttention(layer.attention.self, site))
        if hasattr(layer, "crossattention"):
            patches.set(layer.crossattention.self, "forward",
                        _TextAttention(layer.crossattention.self, site))
        patches.hook(layer, _TextEnter(site, key_site), pre=True, kwargs=True, prepend=True)
        if key_site is not None:  # the layer's cross-attention is described
            patches.hook(layer.crossattention, Leave(site), prepend=True)
        patches.hook(layer.attention, _LeaveSelf(site, key_site is not None), prepend=True)
