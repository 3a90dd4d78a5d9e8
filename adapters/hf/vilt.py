"""transformers' ViLT: ``ViltModel`` and the models built on it (``ViltForQuestionAnswering``,
``ViltForImagesAndTextClassification``, ``ViltForImageAndTextRetrieval``, ``ViltForMaskedLM``,
``ViltForTokenClassification``).

ViLT is a single-stream VLM: its embeddings put the text tokens first, then the image CLS and
the image patches, and one stack of layers runs over the whole sequence. trimkit describes
it as one stream, ``"image"``, whose ``prefix`` is the text (`StreamDesc.prefix`):

- the text's length, its padding (``attention_mask``) and the image's padding (the patches
  ``pixel_mask`` leaves empty, which ViLT samples as padding) are only known once the
  embeddings ran, so they are read from the embeddings' output (`trimkit.hooks.EntryOutput`);
- the real text tokens and the image CLS are protected: recipes trim the image patches; the
  text CLS (token 0, what the pooler reads) is the first protected token, so scores that
  come from one query row (``attn_prune``) come from it. PuMer's text merging merges text
  tokens with each other only, never the text CLS (`trimkit.recipes.pumer`);
- the leave point is the residual sum after each layer's attention (hooks on
  ``layernorm_after`` and on the FFN's residual), so the FFN already runs on the kept
  tokens, where PuMer's reference reduces;
- the last layer's output goes back to the entry positions (`trimkit.hooks.Restore`), so
  ``last_hidden_state`` keeps the input's length, the pooler reads token 0 and the MLM
  head reads the text where the input put it.

``ViltSelfAttention`` computes its product inline (no ``AttentionInterface``), so each
trimmed one gets an instance ``forward`` that projects with its own layers and runs the
site's core. It does not trace with ``torch.fx``: this adapter does not need it to.

ViLT samples its image patches with ``torch.multinomial`` on every forward (in eval too), so
two calls on the same images see the patches in different orders; seed the global RNG
(``check_adapter(..., seed=0)``) to compare calls, or pass ``image_embeds``.
"""

from __future__ import annotations

import sys
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

from .adapter import checkpointing, prefix

__all__ = ["ViltAdapter"]

IMAGE, TEXT = "image", "text"

_HEADS = HeadLayout(q="attention.attention.query", k="attention.attention.key",
                    v="attention.attention.value", out="attention.output.dense",
                    counts=("attention.attention.num_attention_heads",),
                    widths=("attention.attention.all_head_size",))


def _vilt_class() -> type | None:
    if "transformers" not in sys.modules:
        return None
    from transformers.models.vilt.modeling_vilt import ViltModel

    return ViltModel


def _towers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    cls = _vilt_class()
    if cls is None:
        return []
    return [(path, m) for path, m in model.named_modules() if isinstance(m, cls)]


class _Attention:
    """``ViltSelfAttention.forward`` with its product through the site's core (same
    projections, scale and dropout); no attention map is computed."""

    def __init__(self, module: nn.Module, site: Site):
        self.module, self.site = module, site

    def __call__(self, hidden_states: torch.Tensor, attention_mask: Any = None,
                 output_attentions: bool = False) -> tuple:
        m = self.module
        d = m.attention_head_size
        q, k, v = (proj(hidden_states).unflatten(-1, (-1, d)).transpose(1, 2)
                   for proj in (m.query, m.key, m.value))
        out = self.site.core(q, k, v, attn_mask=attention_mask,
                             dropout_p=m.dropout.p if m.training else 0.0, scale=d ** -0.5)
        out = out.transpose(1, 2).flatten(2)
        return (out, None) if output_attentions else (out,)


class _Leave:
    """Forward pre-hook of a layer's ``layernorm_after``: its input is the residual sum after
    the attention, which goes through the site's leave; what it leaves is kept for the
    FFN's residual (`_Residual`)."""

    def __init__(self, site: Site):
        self.site = site

    def __call__(self, module: nn.Module, args: tuple) -> tuple | None:
        site = self.site
        if not site.ctx.enabled and not site.ctx.observe:
            return None
        x = site.leave(args[0])
        site.ctx.call.scratch[("residual", site.key)] = (args[0], x)
        return (x, *args[1:])


class _Residual:
    """Forward pre-hook of a layer's FFN output (``ViltOutput(hidden_states, input_tensor)``):
    its residual is the sum the site left, not the layer's untrimmed one (the very tensor
    `_Leave` received)."""

    def __init__(self, site: Site):
        self.site = site

    def __call__(self, module: nn.Module, args: tuple) -> tuple | None:
        left = self.site.ctx.call.scratch.pop(("residual", self.site.key), None)
        if left is None or len(args) < 2 or args[1] is not left[0]:
            return None
        return (args[0], left[1], *args[2:])


def _entry_masks(output: Any, arguments: dict, module: nn.Module
                 ) -> tuple[torch.Tensor, torch.Tensor, int]:
    """From ``ViltEmbeddings``' output ``(tokens, masks)``: the real tokens (text padding and
    the patches ``pixel_mask`` left out are not), the protected ones (the real text tokens;
    the image CLS after them is ``num_protected``) and the text's length, the prefix."""
    tokens, masks = output
    ids, embeds = arguments.get("input_ids"), arguments.get("inputs_embeds")
    text = ids if ids is not None else embeds
    t = int(text.shape[1])
    real = masks.to(torch.bool)
    is_text = torch.arange(real.shape[1], device=real.device) < t
    return real, real & is_text, t


def _no_checkpointing(layer: nn.Module) -> None:
    if layer.training and getattr(layer, "gradient_checkpointing", False):
        raise RuntimeError("trimkit cannot trim a layer under gradient checkpointing (its "
                           "backward pass re-runs attention); turn it off while trimmed")


@register_adapter
class ViltAdapter(Adapter):
    """transformers' ViLT (VQA, NLVR2, retrieval, MLM): one stream, the image, whose prefix
    is the text."""

    name = "vilt"

    def detect(self, model: nn.Module) -> bool:
        if _vilt_class() is None:
            return False
        from transformers import PreTrainedModel

        return isinstance(model, PreTrainedModel) and bool(_towers(model))

    def describe(self, model: nn.Module) -> ModelDescription:
        towers = _towers(model)
        if len(towers) != 1:
            raise UnsupportedConfigError(
                f"trimkit's ViLT adapter needs exactly one ViltModel in this "
                f"{type(model).__name__}, found {len(towers)}; nothing was changed")
        path, vilt = towers[0]
        why = checkpointing(vilt.encoder.layer)
        if why:
            raise UnsupportedConfigError(f"trimkit's ViLT adapter cannot trim the ViltModel: "
                                         f"{why}. Nothing was changed.")
        cfg = vilt.config
        layers = tuple(
            LayerDesc(block=f"{prefix(path)}encoder.layer.{i}", attention="attention.attention",
                      num_heads=layer.attention.attention.num_attention_heads,
                      dim=cfg.hidden_size, leave_after="attention", masks_are_padding=True,
                      mlp_dim=cfg.intermediate_size,
                      head_dim=layer.attention.attention.attention_head_size, heads=_HEADS)
            for i, layer in enumerate(vilt.encoder.layer))
        # the patch count and order change per call (sampled, and following the image's
        # size and pixel_mask): no static grid
        return ModelDescription("vilt", {IMAGE: StreamDesc(
            IMAGE, layers, num_tokens=None, num_protected=1, padded=True, prefix=TEXT)})

    def install(self, model: nn.Module, desc: ModelDescription, sites: dict[tuple[str, int], Site],
                ctx: TrimContext) -> list[Undo]:
        ctx.track_source = True  # outputs go back to their entry positions
        path, vilt = _towers(model)[0]
        layers = list(vilt.encoder.layer)
        own = [sites[(IMAGE, i)] for i in range(len(layers))]
        with Patches() as patches:
            entry = hooks.Entry(ctx, IMAGE)
            entry.install(patches, vilt)
            read = hooks.ArgumentReader(vilt.embeddings.forward, ("input_ids", "inputs_embeds"))
            hooks.EntryOutput(entry, _entry_masks, read).install(patches, vilt.embeddings)
            for i, (layer, site) in enumerate(zip(layers, own, strict=True)):
                attention = layer.attention.attention
                patches.set(attention, "forward", _Attention(attention, site))
                if i == len(layers) - 1:
                    patches.hook(layer, hooks.Restore(ctx, IMAGE, "zeros", exact=True),
                                 prepend=True)
                patches.hook(layer.layernorm_after, _Leave(site), pre=True, prepend=True)
                patches.hook(layer.output, _Residual(site), pre=True, prepend=True)
                patches.hook(layer, hooks.Enter(site, guard=_no_checkpointing,
                                                tower="ViltModel"),
                             pre=True, kwargs=True, prepend=True)
        return patches.undo
