"""Hugging Face transformers (v5) encoders: BERT, CLIP and SigLIP (text and vision towers)
and ViT.

These modules do not trace with plain `torch.fx`, so nothing is rewritten. Instead, per
instance and reversibly (`trimkit.hooks`):

- attention: trimkit's function in transformers' `AttentionInterface` registry, set with
  ``model.set_attn_implementation`` (`trimkit.adapters.hf.attention`), runs each layer's
  site core;
- each tower (``BertModel``, ``CLIPTextModel``, ``CLIPVisionModel``, ``SiglipTextModel``,
  ``SiglipVisionModel``, ``ViTModel``) is a `trimkit.hooks.Tower`: its 2D
  ``attention_mask`` is the padding, and for CLIP text the token its pooler reads (the EOS
  token: the argmax of the ids, or the first ``eos_token_id``) is protected wherever it
  sits, for SigLIP text the last position (its pooler reads it whatever the ids); the leave
  point is the layer's output (CLIP, SigLIP, ViT: pre-norm) or its attention block's (BERT:
  post-norm, so the FFN already runs on the kept tokens);
- the last layer's output goes back to the tower's entry positions, so
  ``last_hidden_state`` keeps the input's length and every pooler reads the right token (a
  merged token at every position it covers, dropped and padding positions zero). Hidden
  states of intermediate layers (``output_hidden_states``) have the length the layer had.
  SigLIP's vision tower goes back after its final norm instead, dropped positions holding
  the size-weighted mean of the live tokens (a mean over ``last_hidden_state``, as
  ``SiglipForImageClassification`` takes, is the size-weighted mean over live tokens), and
  its attention-pooling head reads the live tokens only, as trimmed, with log(size) added
  to its probe's logits where the stream's attention is proportional (`PoolingHead`).

Static head pruning (``prune_heads``): each layer's `HeadLayout` names its q, k, v and
output projections and the attention module's head count (and inner width, for BERT); head
counts and widths are read from the modules, so a pruned model describes itself, while the
config keeps the sizes the model was built with.

CLIP's text stream attends causally: it is ``positional`` (the causal mask is rebuilt from
each token's entry position, a merged token at its latest member's) and the token scores of
attention pruning come from the EOS query. SigLIP's towers have no CLS: their scores come
from the mean of the live queries (`trimkit.sites.Site`'s rule for streams that protect no
leading token). Streams: ``"image"`` (ViT, CLIP vision: CLS protected; SigLIP vision:
nothing protected) and ``"text"`` (BERT: CLS protected; CLIP text: EOS protected; SigLIP
text: its last position protected).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, replace
from functools import partial
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
    Patches,
    Restore,
    Tower,
    Undo,
    install_tower,
    padding_mask,
    per_call,
)
from trimkit.ops import attention_bias
from trimkit.sites import Site, TrimContext
from trimkit.state import static_shapes

from ..layouts import bert_heads
from .attention import Binding, route_attention

__all__ = ["HFAdapter", "PoolingHead", "UnsupportedConfigError", "describe_tower",
           "encoder_tower", "install_towers", "pooled_positions"]

IMAGE, TEXT = "image", "text"

#: tests for models that hold these towers but belong to another Hugging Face adapter (a
#: decoder VLM, `trimkit.adapters.hf.llava`): `HFAdapter.detect` leaves them to it
DEFERRED: list = []


@dataclass(frozen=True)
class _Kind:
    """How one tower class is laid out."""

    stream: str
    layers: str  # the ModuleList of encoder layers, relative to the tower
    attention: str  # the attention module inside a layer (it calls the attention function)
    leave_after: str  # the child of the layer whose output is trimmed, or where it ends
    residual: bool  # True: the leave point is the residual sum that ends the layer
    num_protected: int
    # where the heads are, relative to a layer (``counts[0]``: the head count; each forward
    # reshapes with ``-1`` heads, so only counts and widths change when heads go), and the
    # attention module's attribute holding the head width
    heads: HeadLayout
    head_dim: str
    positional: bool = False
    # the tower's child after which its output goes back to the entry positions (default:
    # the last layer), and what fills dropped positions there (default: the caller's fill)
    restore_after: str | None = None
    fill: str | None = None
    # the attention-pooling head (an nn.MultiheadAttention at ``.attention`` reads the
    # tokens with a learned probe) that reads the restored output
    pooling_head: str | None = None


def _proj_heads(attn: str, out: str, count: str) -> HeadLayout:
    return HeadLayout(q=f"{attn}.q_proj", k=f"{attn}.k_proj", v=f"{attn}.v_proj",
                      out=f"{attn}.{out}", counts=(f"{attn}.{count}",))


# CLIP's ``embed_dim`` is the model width (the output projection's output), not the heads'
_CLIP = _proj_heads("self_attn", "out_proj", "num_heads"), "head_dim"
_KINDS = {
    "BertModel": _Kind(TEXT, "encoder.layer", "attention.self", "attention", False, 1,
                       bert_heads("attention"), "attention_head_size"),
    # laid out as BERT; not detected on its own (`_classes`), METER's text encoder uses it
    "RobertaModel": _Kind(TEXT, "encoder.layer", "attention.self", "attention", False, 1,
                          bert_heads("attention"), "attention_head_size"),
    "CLIPTextModel": _Kind(TEXT, "encoder.layers", "self_attn", "mlp", True, 0, *_CLIP, True),
    "CLIPVisionModel": _Kind(IMAGE, "encoder.layers", "self_attn", "mlp", True, 1, *_CLIP),
    "ViTModel": _Kind(IMAGE, "layers", "attention", "mlp", True, 1,
                      _proj_heads("attention", "o_proj", "num_attention_heads"), "head_dim"),
    # no CLS; bidirectional text whose pooler reads the last position (`_entry_masks`)
    "SiglipTextModel": _Kind(TEXT, "encoder.layers", "self_attn", "mlp", True, 0, *_CLIP),
    "SiglipVisionModel": _Kind(IMAGE, "encoder.layers", "self_attn", "mlp", True, 0, *_CLIP,
                               restore_after="post_layernorm", fill="mean",
                               pooling_head="head"),
}


def _classes() -> dict[str, type] | None:
    """The tower classes, or ``None`` while transformers was never imported (then no model
    can be one of them, and importing it here would slow every trimkit import)."""
    if "transformers" not in sys.modules:
        return None
    from transformers import (
        BertModel,
        CLIPTextModel,
        CLIPVisionModel,
        SiglipTextModel,
        SiglipVisionModel,
        ViTModel,
    )

    return {"BertModel": BertModel, "CLIPTextModel": CLIPTextModel,
            "CLIPVisionModel": CLIPVisionModel, "SiglipTextModel": SiglipTextModel,
            "SiglipVisionModel": SiglipVisionModel, "ViTModel": ViTModel}


def prefix(path: str) -> str:
    """``path`` as the prefix of its submodules' paths."""
    return f"{path}." if path else ""


def encoder_tower(module: nn.Module, path: str = "", *, restore: str | None = "zeros"
                  ) -> Tower:
    """The `Tower` of one transformers encoder whose class `_KINDS` names (``BertModel``,
    ``RobertaModel``, CLIP's and SigLIP's towers, ``ViTModel``), at ``path`` in the model:
    padding from its 2D ``attention_mask``, its output back at the entry positions with
    ``restore`` (``None``: it stays as trimmed, for a model that carries the stream on, such
    as METER's text; SigLIP's vision tower fills with the mean whatever the fill asked)."""
    name = next(cls.__name__ for cls in type(module).__mro__ if cls.__name__ in _KINDS)
    kind = _KINDS[name]
    if restore is not None and kind.fill is not None:
        restore = kind.fill
    return Tower(kind.stream, module, module.get_submodule(kind.layers),
                 leave_after=None if kind.residual else kind.leave_after,
                 read=ArgumentReader(module.forward, ("attention_mask", "input_ids")),
                 masks=partial(_entry_masks, name), restore=restore, exact=True,
                 guard=_no_checkpointing, name=name, path=path)


def _towers(model: nn.Module) -> list[Tower]:
    classes = _classes()
    if classes is None:
        return []
    towers: list[Tower] = []
    for path, module in model.named_modules():
        if any(not t.path or path.startswith(prefix(t.path)) for t in towers):
            continue  # inside a tower already found
        if isinstance(module, tuple(classes.values())):
            towers.append(encoder_tower(module, path))
    return towers


def _check(tower: Tower) -> None:
    config = tower.module.config
    if tower.name in ("BertModel", "RobertaModel") and (config.is_decoder
                                                        or config.add_cross_attention):
        raise UnsupportedConfigError(tower.refusal(
            "Hugging Face", "BERT as a decoder (is_decoder, cross-attention, KV cache) is not "
                            "supported, only the bidirectional encoder"))
    why = checkpointing(tower.layers)
    if why:
        raise UnsupportedConfigError(tower.refusal("Hugging Face", why))


def checkpointing(layers: nn.ModuleList) -> str | None:
    """Why ``layers`` cannot be trimmed for gradient checkpointing (``None``: they can)."""
    for i, layer in enumerate(layers):
        if getattr(layer, "gradient_checkpointing", False):
            return (f"layer {i} uses gradient checkpointing, which re-runs attention in the "
                    f"backward pass; turn it off first")
    return None


def _layer_desc(tower: Tower, i: int, layer: nn.Module) -> LayerDesc:
    """Layer ``i`` of ``tower``, its head count and width read from its attention module (a
    pruned model describes itself; the config keeps the sizes it was built with)."""
    kind, config = _KINDS[tower.name], tower.module.config
    attn = layer.get_submodule(kind.attention)
    count = kind.heads.counts[0].rsplit(".", 1)
    return LayerDesc(block=f"{prefix(tower.path)}{kind.layers}.{i}", attention=kind.attention,
                     num_heads=getattr(layer.get_submodule(count[0]), count[1]),
                     dim=config.hidden_size, leave_after=kind.leave_after,
                     residual=kind.residual, masks_are_padding=True,
                     mlp_dim=config.intermediate_size, head_dim=getattr(attn, kind.head_dim),
                     heads=kind.heads)


def describe_tower(tower: Tower) -> tuple[LayerDesc, ...]:
    """The layers of an `encoder_tower`, after checking that it can be trimmed (an
    `UnsupportedConfigError` says why not)."""
    _check(tower)
    return tuple(_layer_desc(tower, i, layer) for i, layer in enumerate(tower.layers))


def install_towers(patches: Patches, ctx: TrimContext, model: nn.Module,
                   towers: list[tuple[Tower, list[Site]]]) -> None:
    """Install each `encoder_tower` with its layers' sites (`trimkit.hooks.install_tower`) and
    route their attention through trimkit's `AttentionInterface` entry
    (`trimkit.adapters.hf.attention.route_attention` on ``model``, a transformers model that
    holds them all)."""
    bindings: dict[nn.Module, Binding] = {}
    for tower, own in towers:
        kind = _KINDS[tower.name]
        if kind.restore_after is None or tower.restore is None:
            install_tower(patches, ctx, tower, own)
        else:  # the stream goes back to its entry positions after a later child
            install_tower(patches, ctx, replace(tower, restore=None), own)
            head = (tower.module.get_submodule(kind.pooling_head)
                    if kind.pooling_head and hasattr(tower.module, kind.pooling_head) else None)
            PoolingHead(ctx, tower.stream, tower.restore, head).install(
                patches, tower.module.get_submodule(kind.restore_after))
        acted = False  # some op of this stream acts at or before this layer's attention
        for site, layer in zip(own, tower.layers, strict=True):
            acted = acted or bool(len(site.pre)) or bool(site.needs)
            attention = layer.get_submodule(_KINDS[tower.name].attention)
            bindings[attention] = Binding(site, not acted)
            acted = acted or bool(len(site.post))
    patches.add(route_attention(model, bindings))


class PoolingHead:
    """A tower whose output goes back to its entry positions after a child (``after``, its
    final norm: `Restore` with ``fill``) and whose attention-pooling ``head`` reads that output
    (SigLIP's: a learned probe attends to the tokens through an ``nn.MultiheadAttention`` at
    ``head.attention``). The head reads the live tokens as trimmed instead, each weighed by
    its size where the stream's attention is proportional (log(size) on the probe's logits:
    ToMe's proportional attention, in the head's cross-attention); dead tokens are masked.
    With nothing dropped or merged, the head runs as the model's own."""

    def __init__(self, ctx: TrimContext, stream: str, fill: str, head: nn.Module | None):
        self.ctx, self.stream, self.head = ctx, stream, head
        self.restore = Restore(ctx, stream, fill, exact=True)

    def install(self, patches: Patches, after: nn.Module) -> None:
        patches.hook(after, self.after, prepend=True)
        if self.head is not None:
            patches.hook(self.head, self.before_head, pre=True, kwargs=True, prepend=True)
            patches.hook(self.head, self.after_head, kwargs=True, always=True)
            patches.hook(self.head.attention, self.before_attention, pre=True, kwargs=True,
                         prepend=True)

    def _scratch(self) -> dict[str, Any]:
        return per_call(self.ctx, ("pooling head", self.stream), dict)

    def after(self, module: nn.Module, args: tuple, output: object) -> object:
        """The child's output back at the entry positions; remembers which trimmed tokens
        (and key bias) it came from, for the head."""
        restored = self.restore(module, args, output)
        if self.head is None:
            return restored
        scratch = self._scratch()
        scratch["restored"] = None  # nothing of an earlier call stays held
        if restored is None or restored is output:
            return restored  # tokens in place: the head reads the output as it is
        state = self.ctx.states[self.stream]
        bias = attention_bias(state, output.dtype, self.stream in self.ctx.proportional)
        scratch["restored"] = (restored, output, bias)
        return restored

    def before_head(self, module: nn.Module, args: tuple, kwargs: dict
                    ) -> tuple[tuple, dict] | None:
        scratch = self._scratch()
        restored = scratch.get("restored")
        x = args[0] if args else kwargs.get("hidden_state")
        if not self.ctx.enabled or restored is None or restored[0] is not x:
            return None
        _, tokens, bias = restored
        scratch["bias"] = None if bias is None else bias[:, 0, 0, :]
        if args:
            return (tokens, *args[1:]), kwargs
        return args, dict(kwargs, hidden_state=tokens)

    def before_attention(self, module: nn.Module, args: tuple, kwargs: dict
                         ) -> tuple[tuple, dict] | None:
        bias = self._scratch().get("bias")
        if bias is None or not self.ctx.enabled:
            return None
        return args, dict(kwargs, key_padding_mask=bias)

    def after_head(self, module: nn.Module, args: tuple, kwargs: dict, output: object) -> None:
        self._scratch().pop("bias", None)


def pooled_positions(input_ids: torch.Tensor, eos_token_id: int | None) -> torch.Tensor:
    """B long: the position CLIP's text pooler reads (transformers' rule): the argmax of the
    ids for the legacy ``eos_token_id == 2``, else the first ``eos_token_id``."""
    ids = input_ids.to(torch.int)
    if eos_token_id == 2:
        return ids.argmax(dim=-1)
    return (ids == eos_token_id).int().argmax(dim=-1)


def patch_grid(embeddings: nn.Module) -> tuple[int, int]:
    """``(rows, cols)`` of the patches of a Hugging Face patch embedding (CLIP, ViT, BLIP
    keep ``image_size`` and ``patch_size``, each an int or a pair)."""
    size, patch = embeddings.image_size, embeddings.patch_size
    h, w = (size, size) if isinstance(size, int) else tuple(size)
    ph, pw = (patch, patch) if isinstance(patch, int) else tuple(patch)
    return h // ph, w // pw


def _entry_masks(tower: str, arguments: dict, module: nn.Module
                 ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """The padding from the tower's 2D ``attention_mask``; for CLIP text, the token its
    pooler reads, protected wherever the ids put it; for SigLIP text, the last position (a
    mask that marks it padding is refused: no trimmer may keep a padding token live)."""
    protected, ids = None, arguments.get("input_ids")
    real = padding_mask(arguments.get("attention_mask"), tower)
    if tower == "CLIPTextModel" and ids is not None:
        ids = ids.view(-1, ids.shape[-1])
        pos = pooled_positions(ids, module.eos_token_id)
        protected = torch.arange(ids.shape[1], device=ids.device)[None] == pos[:, None]
    elif tower == "SiglipTextModel" and ids is not None:
        ids = ids.view(-1, ids.shape[-1])
        protected = torch.zeros(ids.shape, dtype=torch.bool, device=ids.device)
        protected[:, -1] = True
        if real is not None:
            _last_is_real(real)
    return real, protected


_PADDED_LAST = ("trimkit: SiglipTextModel pools the last position, which this attention_mask "
                "marks as padding; a trimmed model cannot keep a padding token live. Pad on "
                "the left, or pass no attention_mask (SigLIP is trained on "
                "padding='max_length' without one)")


def _last_is_real(real: torch.Tensor) -> None:
    """Refuse a padding mask whose last position is padding: a `ValueError`, or, where the
    graph decides (``torch.compile``, `trimkit.fixed_shapes`), an assertion in the graph."""
    last = real[:, -1].all()
    if torch.compiler.is_compiling() or static_shapes():
        torch._assert_async(last, _PADDED_LAST)
    elif not bool(last):
        raise ValueError(_PADDED_LAST)


def _no_checkpointing(layer: nn.Module) -> None:
    if layer.training and getattr(layer, "gradient_checkpointing", False):
        raise RuntimeError("trimkit cannot trim a layer under gradient checkpointing (its "
                           "backward pass re-runs attention); turn it off while trimmed")


@register_adapter
class HFAdapter(Adapter):
    """transformers' BERT, CLIP, SigLIP and ViT encoders, alone or inside a model built on
    them (``BertForSequenceClassification``, ``CLIPModel``, ``SiglipModel``,
    ``ViTForImageClassification``…)."""

    name = "hf"

    def detect(self, model: nn.Module) -> bool:
        if "transformers" not in sys.modules:
            return False
        from transformers import PreTrainedModel

        return (isinstance(model, PreTrainedModel) and bool(_towers(model))
                and not any(test(model) for test in DEFERRED))

    def describe(self, model: nn.Module) -> ModelDescription:
        towers = _towers(model)
        if not towers:
            raise UnsupportedConfigError(f"trimkit's Hugging Face adapter found no BertModel, "
                                         f"CLIPTextModel, CLIPVisionModel, SiglipTextModel, "
                                         f"SiglipVisionModel or ViTModel in this "
                                         f"{type(model).__name__}")
        streams: dict[str, StreamDesc] = {}
        for tower in towers:
            layers = describe_tower(tower)
            kind = _KINDS[tower.name]
            if kind.stream in streams:
                raise UnsupportedConfigError(tower.refusal(
                    "Hugging Face", f"the model has more than one {kind.stream} tower"))
            n = grid = None
            if kind.stream == IMAGE:
                emb = tower.module.embeddings
                emb = getattr(emb, "patch_embeddings", emb)  # ViT keeps its count one deeper
                n, grid = emb.num_patches + kind.num_protected, patch_grid(emb)
            streams[kind.stream] = StreamDesc(
                kind.stream, layers, num_tokens=n, num_protected=kind.num_protected,
                padded=kind.stream == TEXT, positional=kind.positional, grid=grid)
        return ModelDescription("hf", streams)

    def install(self, model: nn.Module, desc: ModelDescription, sites: dict[tuple[str, int], Site],
                ctx: TrimContext) -> list[Undo]:
        # outputs go back to their entry positions, which needs every token's source
        ctx.track_source = True
        with Patches() as patches:
            install_towers(patches, ctx, model, [
                (tower, [sites[(tower.stream, i)] for i in range(len(tower.layers))])
                for tower in _towers(model)])
        return patches.undo
