"""The `Adapter` base: how one model family is laid out, and how sites get into its forward.

A family whose blocks trace with `torch.fx` needs only `detect` and `describe`: the default
`install` rewrites each layer's attention module and block through the engine's fx pass.
"""

from __future__ import annotations

from collections.abc import Container, Mapping, Sequence

import torch.fx as fx
from torch import nn

from .describe import LayerDesc, ModelDescription
from .heads import MULTIHEAD_TYPES, HeadKey, prune_heads
from .hooks import Patches, Undo
from .mha import route_multihead_attention
from .rewrite import (
    RouteAttention,
    insert_after_output,
    insert_after_residual,
    insert_at_input,
    patch_forward,
)
from .sites import Site, TrimContext

__all__ = ["Adapter", "Undo", "follow_token_inputs", "install_fx_sites"]


class Adapter:
    """Base class of adapters. Subclass, set ``name``, implement `detect` and `describe`."""

    name: str = ""
    #: tried only after every other adapter declined (a generic adapter)
    fallback: bool = False

    def detect(self, model: nn.Module) -> bool:
        """Whether ``model`` belongs to this family."""
        raise NotImplementedError

    def describe(self, model: nn.Module) -> ModelDescription:
        """The model's streams, layers, heads and protected tokens."""
        raise NotImplementedError

    def why_not(self, model: nn.Module) -> str | None:
        """Why `detect` declined ``model``, in words, when the adapter can say (shown in the
        error `trimkit.apply` raises for a model no adapter recognises)."""
        return None

    def install(self, model: nn.Module, desc: ModelDescription, sites: dict[tuple[str, int], Site],
                ctx: TrimContext) -> list[Undo]:
        """Put ``sites`` into the model's forward; return what undoes it, in order."""
        return install_fx_sites(model, desc, sites)

    def prune_heads(self, model: nn.Module, desc: ModelDescription,
                    keep: Mapping[HeadKey, Sequence[int]]) -> None:
        """Keep only the heads ``keep[(stream, layer, kind)]`` of those attentions, for real.

        The default works from the description's `HeadLayout`s (`trimkit.heads`); a family
        with an unusual layout overrides it. It must check everything before changing
        anything, and leave a model whose `describe` gives the new head counts.
        """
        prune_heads(model, desc, keep)


class _RouteBlock:
    """Graph edit: the block's stream input goes through the site's enter, the residual sum
    after its attention (or a child's output) through its leave."""

    def __init__(self, site: Site, layer: LayerDesc):
        self.site, self.layer = site, layer

    def __call__(self, gm: fx.GraphModule) -> None:
        layer = self.layer
        gm.add_submodule("trimkit_enter", self.site.enter)
        gm.add_submodule("trimkit_leave", self.site.leave)
        extra = () if layer.mask_arg is None else (layer.mask_arg,)
        insert_at_input(gm, "trimkit_enter", layer.stream_arg, extra)
        follow_token_inputs(gm, self.site, layer)
        after = layer.leave_after or layer.attention.split(".")[0]
        if layer.residual:
            insert_after_residual(gm, after, "trimkit_leave")
        else:
            insert_after_output(gm, after, "trimkit_leave")


def follow_token_inputs(gm: fx.GraphModule, site: Site, layer: LayerDesc) -> None:
    """Route each of the block's token inputs (`LayerDesc.token_inputs`) through a call
    point of ``site`` that gathers it at the tokens the block's enter (``trimkit_enter``)
    left, before anything reads it."""
    enter = next(n for n in gm.graph.nodes if n.op == "call_module" and n.target == "trimkit_enter")
    placeholders = {n.target: n for n in gm.graph.nodes if n.op == "placeholder"}
    for i, spec in enumerate(layer.token_inputs):
        node = placeholders.get(spec.arg)  # fx renames an argument it specialised on
        if node is None or not node.users:
            continue  # not a tensor in this call (``None``): nothing to follow
        name = f"trimkit_follow_{i}"
        gm.add_submodule(name, site.follow(spec))
        with gm.graph.inserting_after(enter):
            new = gm.graph.call_module(name, (enter, node))
        node.replace_all_uses_with(new, delete_user_cb=lambda u, new=new: u is not new)


def install_fx_sites(model: nn.Module, desc: ModelDescription,
                     sites: dict[tuple[str, int], Site],
                     only: Container[tuple[str, int]] | None = None) -> list[Undo]:
    """Rewrite every described layer's block and attention modules with its site (``only``:
    those of the layers it holds, as ``(stream, index)``, for an adapter that installs the
    others another way).

    Blocks must trace with `torch.fx` (their children are kept as leaves); an attention
    module is either a `torch.nn.MultiheadAttention` or a head-pruned
    `trimkit.heads.PrunedMultiheadAttention` (routed through the site's core by
    `trimkit.mha.route_multihead_attention`), or computes one attention product (SDPA or
    the explicit softmax chain) that the fx pass replaces.
    """
    with Patches() as patches:
        for stream in desc.streams.values():
            for i, layer in enumerate(stream.layers):
                if only is not None and (stream.name, i) not in only:
                    continue
                site = sites[(stream.name, i)]
                block = model.get_submodule(layer.block)
                attns = [(layer.attention, site.core)]
                if layer.cross_attention:
                    attns.append((layer.cross_attention, site.cross_core))
                for path, core in attns:
                    module = block.get_submodule(path)
                    if isinstance(module, MULTIHEAD_TYPES):
                        patches.add(route_multihead_attention(module, core).undo)
                    else:
                        patches.add(patch_forward(module, RouteAttention(core)).undo)
                patches.add(patch_forward(block, _RouteBlock(site, layer)).undo)
    return patches.undo
