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
from collections.abc import Callable
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
    TokenState,
    register_adapter,
)
from trimkit.adapter import Undo
from trimkit.api import UnsupportedConfigError
from trimkit.ops import additive_mask, static_shapes
from trimkit.rewrite import ArgumentReader, Patch
from trimkit.sites import Site, TrimContext

from ..layouts import bert_heads
from .adapter import first_output, padding_mask, patch_grid, replace_first_output

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

def _vision_forward(module: nn.Module, site: Site) -> Callable:
    """BlipAttention's product through the site's core (same projections and scale)."""

    def forward(hidden_states: torch.Tensor, **kwargs: Any) -> tuple[torch.Tensor, None]:
        qkv = module.qkv(hidden_states).unflatten(-1, (3, -1, module.head_dim))
        q, k, v = qkv.permute(2, 0, 3, 1, 4)
        p = module.dropout.p if module.training else 0.0
        out = site.core(q, k, v, dropout_p=p, scale=module.scale)
        return module.projection(out.transpose(1, 2).flatten(2)), None

    return forward


def _text_forward(module: nn.Module, site: Site) -> Callable:
    """BlipTextSelfAttention (self- or cross-attention) through the site's core. Like
    transformers' own, a cross-attention reads no mask (it is handed none)."""

    def forward(hidden_states: torch.Tensor, attention_mask: Any = None,
                encoder_hidden_states: torch.Tensor | None = None,
                encoder_attention_mask: Any = None, past_key_values: Any = None,
                **kwargs: Any) -> tuple[torch.Tensor, None]:
        if past_key_values is not None:
            raise RuntimeError("trimkit trims BLIP's text encoder, which runs without a KV "
                               "cache; a cache reached it")
        d = module.attention_head_size
        cross = encoder_hidden_states is not None
        src = encoder_hidden_states if cross else hidden_states
        q = module.query(hidden_states).unflatten(-1, (-1, d)).transpose(1, 2)
        k = module.key(src).unflatten(-1, (-1, d)).transpose(1, 2)
        v = module.value(src).unflatten(-1, (-1, d)).transpose(1, 2)
        core = site.cross_core if cross else site.core
        p = module.dropout.p if module.training else 0.0
        out = core(q, k, v, attn_mask=encoder_attention_mask if cross else attention_mask,
                   dropout_p=p, scale=d ** -0.5)
        return out.transpose(1, 2).flatten(2), None

    return forward


def _set_forward(module: nn.Module, forward: Callable) -> Undo:
    if "forward" in module.__dict__:
        raise UnsupportedConfigError(f"a {type(module).__name__} of this BLIP model already has "
                                     f"a per-instance forward; nothing was changed")
    module.__dict__["forward"] = forward
    return Patch(module, forward).undo


# --------------------------------------------------------------------- outputs and key masks

class _Outputs:
    """The towers' latest outputs, one per stream, with their dead slots, so a decoder that
    cross-attends to one masks them. Outputs are found by identity (``is``, which
    ``torch.compile`` traces, unlike ``id`` keys and weak references); the latest output of each
    stream is held until the next one. Whether an output has dead slots is known from its
    state or read once, when it is recorded; the key bias a decoder adds is built once per
    tensor it reads (``generate`` passes the same one at every step)."""

    def __init__(self) -> None:
        #: stream -> (its latest output, its live tokens B×N bool, or None when all are live)
        self._latest: dict[str, tuple[torch.Tensor, torch.Tensor | None]] = {}
        self.pending: torch.Tensor | None = None  # set while a decoder's generate runs
        self._bias: tuple[torch.Tensor, torch.Tensor | None] | None = None

    def record(self, stream: str, x: torch.Tensor, state: TokenState) -> None:
        """``x``, the output of ``stream``'s tower, laid out like ``state``."""
        live = state.keep.detach() > 0
        if state.dead_count == 0:  # known without a read
            all_live = True
        else:  # exporting or under `fixed_shapes`: decided in the graph
            all_live = not static_shapes() and bool(live.all())
        self._latest[stream] = (x, None if all_live else live)

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


def _record_output(outputs: _Outputs, stream: str, ctx: TrimContext, output: Any) -> None:
    if not ctx.enabled:
        return
    x = getattr(output, "last_hidden_state", None)
    if x is None and isinstance(output, tuple):
        x = output[0]
    state = ctx.states.get(stream)
    if x is None or state is None or state.keep.shape != x.shape[:2]:
        return
    outputs.record(stream, x, state)


def _decoder_hooks(decoder: nn.Module, outputs: _Outputs) -> list[Undo]:
    """A decoder (not trimmed) masks the dead slots of the trimmed outputs it cross-attends to."""
    bert = decoder.bert
    read = ArgumentReader(bert.forward, ("encoder_hidden_states",))
    current: dict[str, torch.Tensor | None] = {"mask": None}

    def before(module: nn.Module, args: tuple, kwargs: dict) -> None:
        bound = read(args, kwargs)
        current["mask"] = outputs.key_bias(bound.get("encoder_hidden_states"))

    def after(module: nn.Module, args: tuple, kwargs: dict, out: Any) -> None:
        current["mask"] = None

    def cross(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        mask = current["mask"]
        if mask is None or kwargs.get("encoder_hidden_states") is None:
            return None
        return args, dict(kwargs, encoder_attention_mask=mask)

    handles = [bert.register_forward_pre_hook(before, with_kwargs=True),
               bert.register_forward_hook(after, with_kwargs=True, always_call=True)]
    for layer in bert.encoder.layer:
        if hasattr(layer, "crossattention"):
            handles.append(layer.crossattention.self.register_forward_pre_hook(
                cross, with_kwargs=True))
    undo = [h.remove for h in handles]

    generate = decoder.generate

    def generate_masked(*args: Any, **kwargs: Any) -> Any:
        outputs.pending = outputs.find(kwargs.get("encoder_hidden_states"))[1]
        try:
            return generate(*args, **kwargs)
        finally:
            outputs.pending = None

    decoder.__dict__["generate"] = generate_masked

    def undo_generate() -> None:
        if decoder.__dict__.get("generate") is generate_masked:
            del decoder.__dict__["generate"]
    return [*undo, undo_generate]


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
        outputs = _Outputs()
        undo: list[Undo] = []
        try:
            n_vision = 0
            if parts.vision is not None:
                n_vision = len(parts.vision[1].encoder.layers)
                undo += _install_vision(parts.vision[1], sites, ctx, outputs)
            if parts.text is not None:
                keys = {layer.pair: sites[(IMAGE, i)]
                        for i, layer in enumerate(desc.streams[IMAGE].layers)
                        if layer.keys_only} if IMAGE in desc.streams else {}
                undo += _install_text(parts.text[1], sites, keys, ctx, outputs,
                                      n_vision > 0)
            for decoder in parts.decoders:
                undo += _decoder_hooks(decoder, outputs)
        except Exception:
            for u in reversed(undo):
                u()
            raise
        return undo


def _install_vision(vision: nn.Module, sites: dict[tuple[str, int], Site], ctx: TrimContext,
                    outputs: _Outputs) -> list[Undo]:
    undo: list[Undo] = []
    handles = []
    for i, layer in enumerate(vision.encoder.layers):
        site = sites[(IMAGE, i)]
        undo.append(_set_forward(layer.self_attn, _vision_forward(layer.self_attn, site)))

        def enter(module: nn.Module, args: tuple, kwargs: dict, site: Site = site) -> Any:
            if not ctx.enabled:
                return None
            if args:
                return (site.enter(args[0]), *args[1:]), kwargs
            return args, dict(kwargs, hidden_states=site.enter(kwargs["hidden_states"]))

        def leave(module: nn.Module, args: tuple, output: Any, site: Site = site) -> Any:
            return replace_first_output(output, site.leave(first_output(output)))

        handles.append(layer.register_forward_pre_hook(enter, with_kwargs=True, prepend=True))
        handles.append(layer.register_forward_hook(leave, prepend=True))

    def after(module: nn.Module, args: tuple, output: Any) -> None:
        _record_output(outputs, IMAGE, ctx, output)

    handles.append(vision.register_forward_hook(after))
    return undo + [h.remove for h in handles]


@dataclass
class _TextCall:
    """The text encoder's call under way: does it read the image, and the image tokens the
    previous layer's cross-attention left."""

    cross: bool = False
    keys: torch.Tensor | None = None


def _install_text(text: nn.Module, sites: dict[tuple[str, int], Site], keys: dict[int, Site],
                  ctx: TrimContext, outputs: _Outputs, has_image: bool) -> list[Undo]:
    undo: list[Undo] = []
    handles = []
    call = _TextCall()
    read = ArgumentReader(text.forward, ("is_decoder", "attention_mask",
                                         "encoder_hidden_states", "encoder_attention_mask"))

    def before(module: nn.Module, args: tuple, kwargs: dict) -> None:
        call.keys, call.cross = None, False
        if not ctx.enabled:
            return
        bound = read(args, kwargs)
        if bound.get("is_decoder"):
            raise RuntimeError("trimkit trims BLIP's text encoder bidirectionally; it cannot "
                               "run as a causal decoder (is_decoder=True) while trimmed")
        real = padding_mask(bound.get("attention_mask"), "BLIP's text encoder")
        if real is not None:
            ctx.entry[TEXT] = (real, None)
        ehs = bound.get("encoder_hidden_states")
        call.cross = ehs is not None and has_image
        if not call.cross:
            ctx.absent.add(IMAGE)  # encoded alone: no trimmer may read the image
            return
        state = ctx.states.get(IMAGE)
        if outputs.find(ehs)[0] and state is not None and state.keep.shape == ehs.shape[:2]:
            ctx.states[IMAGE] = state.with_x(ehs)  # the vision tower's output, trimmed
        else:  # image tokens from elsewhere: they enter here
            real = bound.get("encoder_attention_mask")
            ctx.start(IMAGE, ehs, None if real is None or real.dim() != 2 else real.bool())

    def after(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        ctx.absent.discard(IMAGE)
        call.keys = None
        _record_output(outputs, TEXT, ctx, output)

    handles.append(text.register_forward_pre_hook(before, with_kwargs=True))
    handles.append(text.register_forward_hook(after, with_kwargs=True, always_call=True))

    for j, layer in enumerate(text.encoder.layer):
        site = sites[(TEXT, j)]
        key_site = keys.get(j)
        undo.append(_set_forward(layer.attention.self, _text_forward(layer.attention.self, site)))
        if hasattr(layer, "crossattention"):
            undo.append(_set_forward(layer.crossattention.self,
                                     _text_forward(layer.crossattention.self, site)))

        def enter(module: nn.Module, args: tuple, kwargs: dict, site: Site = site,
                  key_site: Site | None = key_site) -> Any:
            if not ctx.enabled:
                return None
            args, kwargs = list(args), dict(kwargs)
            if args:
                args[0] = site.enter(args[0])
            else:
                kwargs["hidden_states"] = site.enter(kwargs["hidden_states"])
            if call.cross and key_site is not None:
                given = args[1] if len(args) > 1 else kwargs.get("encoder_hidden_states")
                tokens = key_site.leave(key_site.enter(given if call.keys is None
                                                       else call.keys))
                call.keys = tokens
                if len(args) > 1:
                    args[1] = tokens
                else:
                    kwargs["encoder_hidden_states"] = tokens
            return tuple(args), kwargs

        described_cross = key_site is not None  # the layer's cross-attention is described

        def leave_self(module: nn.Module, args: tuple, output: Any, site: Site = site,
                       described_cross: bool = described_cross) -> Any:
            if call.cross and described_cross:
                return None  # this call trims after the cross-attention
            return replace_first_output(output, site.leave(first_output(output)))

        def leave_cross(module: nn.Module, args: tuple, output: Any, site: Site = site) -> Any:
            return replace_first_output(output, site.leave(first_output(output)))

        handles.append(layer.register_forward_pre_hook(enter, with_kwargs=True, prepend=True))
        if described_cross:
            handles.append(layer.crossattention.register_forward_hook(leave_cross, prepend=True))
        handles.append(layer.attention.register_forward_hook(leave_self, prepend=True))
    return undo + [h.remove for h in handles]
