"""Projections that skip the heads a whole batch gated off, at inference.

A head trimmer gates a layer's heads per instance at the layer's entry (`Site.head_gates`,
`Site.cross_head_gates`); the site's core then runs the attention product over the heads
that some instance of the batch keeps (`Site.live_heads`). The functions here make the
layer's projections follow, from the description's `HeadLayout`s:

- a q, k, v (or fused qkv) projection, and a further per-head one, computes only the live
  heads' rows and places them in a zero tensor of its full width, so the model's own code
  still sees the shapes it expects (``(B, N, 3, H, d)`` reshapes and the like). A skipped
  head's q, k and v are zeros that no attention product reads: the core runs over the
  live heads only, and a head live in no instance has none;
- the output projection reads only the live heads' columns. The others hold the skipped
  heads' attention outputs, which the core set to zero, so leaving them out is exact.

An ``nn.MultiheadAttention`` routed through a site's core (`trimkit.mha`) slices its
in-projection inside the routed forward, asking the core for the rows
(`trimkit.ops.linear_rows`); its ``out_proj`` is handled here like any output projection.
"""

from __future__ import annotations

from collections import Counter

import torch
import torch.nn.functional as F
from torch import nn

from .describe import ModelDescription
from .heads import KINDS, locate_heads
from .hooks import Patches, Undo
from .ops import place_rows
from .sites import Site

__all__ = ["CACHED_HEAD_SETS", "install_head_skipping"]

#: how many sets of live heads a gated projection keeps sliced weights for
CACHED_HEAD_SETS = 4


class _LiveProjection:
    """The forward installed on one projection (``nn.Linear``) of a gated attention: every
    output as usual, or the live heads' rows (``side="out"``, q/k/v-like) or columns
    (``side="in"``, the output projection) while the site skips heads.

    Outside autograd the sliced weights are kept per set of live heads (the last
    `CACHED_HEAD_SETS`), so batches that keep the same heads copy no weights; a change of
    the weights (an optimizer step, ``load_state_dict``) empties the cache. Under
    `torch.compile` the cache is not used: its check compares data pointers, which breaks
    the graph, and the slicing is then part of the compiled graph."""

    def __init__(self, linear: nn.Linear, site: Site, cross: bool, side: str, sections: int,
                 head_dim: int, num_heads: int):
        self.linear, self.site, self.cross, self.side = linear, site, cross, side
        self.sections, self.head_dim, self.num_heads = sections, head_dim, num_heads
        self._cache: dict[tuple[int, ...], tuple[torch.Tensor, torch.Tensor | None]] = {}
        self._version: tuple | None = None

    def _sliced(self, rows: torch.Tensor, heads: tuple[int, ...] | None
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
        lin = self.linear
        out = self.side == "out"
        cacheable = heads is not None and not torch.compiler.is_compiling() and not (
            torch.is_grad_enabled() and (lin.weight.requires_grad
                                         or (lin.bias is not None and lin.bias.requires_grad)))
        if cacheable:
            version = tuple((t.data_ptr(), t._version) for t in (lin.weight, lin.bias)
                            if t is not None)
            if version != self._version:
                self._cache, self._version = {}, version
            got = self._cache.get(heads)
            if got is not None:
                return got
        w = lin.weight.index_select(0 if out else 1, rows)
        b = lin.bias if lin.bias is None or not out else lin.bias.index_select(0, rows)
        if cacheable:
            if len(self._cache) >= CACHED_HEAD_SETS:
                self._cache.pop(next(iter(self._cache)))
            self._cache[heads] = (w, b)
        return w, b

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        lin = self.linear
        qkv = self.side == "out"
        rows = self.site.live_rows(self.head_dim, self.num_heads, self.sections,
                                   cross=self.cross, qkv=qkv)
        if rows is None:
            return F.linear(x, lin.weight, lin.bias)
        w, b = self._sliced(rows, self.site.live_head_set(self.cross, qkv=qkv))
        if qkv:
            return place_rows(F.linear(x, w, b), rows, lin.out_features)
        return F.linear(x.index_select(x.dim() - 1, rows), w, b)


def _gates_heads(site: Site) -> bool:
    return any(getattr(op, "gates_heads", False) for op in (*site.pre, *site.post))


def install_head_skipping(model: nn.Module, desc: ModelDescription,
                          sites: dict[tuple[str, int], Site]) -> list[Undo]:
    """Give the projections of every attention whose site has an op that gates heads
    (`TokenOp.gates_heads`) a forward that skips the heads gated off in the whole batch
    (this instance's modules only); return what undoes it.

    Attentions keep computing every head where their `HeadLayout` is missing, marked
    ``unsupported`` or does not match the modules, for projections that another attention
    uses too (weights shared across layers), and for ``nn.Linear`` subclasses with a forward
    of their own or modules that already carry a per-instance forward.
    """
    found = {}
    for stream in desc.streams.values():
        for i, layer in enumerate(stream.layers):
            for kind in KINDS:
                layout = layer.heads if kind == "self" else layer.cross_heads
                if kind == "cross" and layer.cross_attention is None:
                    continue
                if layout is None or layout.unsupported:
                    continue
                key = (stream.name, i, kind)
                try:
                    found[key] = locate_heads(model, desc, [key])[key]
                except ValueError:
                    continue
    projections = {}
    for key, heads in found.items():
        if heads.multihead is not None:
            # its in-projection is sliced by the routed forward; the module itself counts
            # as a use so that sharing it is seen
            projections[key] = [(heads.multihead, None, 1), (heads.out, "in", 1)]
        else:
            projections[key] = [(lin, side, sections)
                                for lin, side, sections in heads.linears.values()]
    uses = Counter(id(m) for projs in projections.values() for m, _, _ in projs)
    with Patches() as patches:
        for key, projs in projections.items():
            stream, i, kind = key
            site = sites[(stream, i)]
            if not _gates_heads(site):
                continue
            heads = found[key]
            for module, side, sections in projs:
                if (side is None or uses[id(module)] > 1 or "forward" in module.__dict__
                        or not isinstance(module, nn.Linear)
                        or type(module).forward is not nn.Linear.forward):
                    continue
                patches.set(module, "forward", _LiveProjection(
                    module, site, kind == "cross", side, sections, heads.head_dim,
                    heads.num_heads))
    return patches.undo
