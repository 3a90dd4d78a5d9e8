"""A cost model of trimmed layers, differentiable in the soft token and head counts.

The FLOPs of one described layer (multiply-adds counted twice, as
`torch.utils.flop_counter` does), with D its width, d its head width (D/H unless
``LayerDesc.head_dim`` says otherwise), F its FFN width, n tokens entering its attention,
n' leaving towards its FFN, h live heads of H, m keys of its cross-attention (with hc live
heads of Hc):

- self-attention: q, k, v and output projections ``8·n·D·d·h'`` + scores and weighted sum
  ``4·n²·d·h``;
- cross-attention: q and output ``4·n·D·d·hc'``, k and v on the other stream
  ``4·m·D·d·hc'``, scores and weighted sum ``4·n·m·d·hc``;
- FFN: ``4·n'·D·F``.

A `LayerDesc.keys_only` layer costs nothing itself: its tokens are the keys ``m`` of the
cross-attention that reads them, counted there.

A `LayerDesc.mixes_heads` layer (talking heads) adds its H × H mixes, ``2·n²·H²`` each, and
runs every head whatever the gates say: each head's weights read every head's scores, so a
gated-off head's q, k, scores and softmax are still needed, and execution computes it all
and zeroes the gated heads' outputs. Its live heads ``h`` are therefore ignored (``h = H``):
a head trimmer there saves nothing.

``h'`` (``hc'``) is the heads whose projections run: the live heads where the layer's
`HeadLayout` (``heads`` / ``cross_heads``) names the projections and lets the engine skip a
gated-off head's (`trimkit.headskip`), else all of them (``H·d`` is the attention's width,
smaller than D once heads were pruned). Execution computes them anyway, and the model then
counts less than is spent, for an ``nn.MultiheadAttention`` called with ``need_weights=True``,
a projection shared between attentions, and the q, k, v of a layer whose ops record keys or
query scores.

The counts are per instance: the cost of one instance run alone (batch 1), which is what
execution spends on it there, tokens and heads alike. A batch spends more where its
instances differ: it is packed to its longest survivor, and a head is skipped (product and
projections) only when every instance of the batch gated it off. In training nothing is
skipped (masked execution, soft gates): the counts are the straight-through masks' values,
so the ratio is the one this forward's decisions would achieve at inference, and its
gradient reaches the trimmers. The trimmers' own FLOPs (`TokenOp.flops`) count on the
trimmed side; embeddings and task heads, which no trimmer changes, are left out of both
sides.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch

from .describe import HeadLayout, LayerDesc, ModelDescription
from .sites import TrimContext

__all__ = ["LowestRatio", "Reach", "expected_ratio", "layer_flops", "lowest_ratio"]


def _skips_projections(layout: HeadLayout | None) -> bool:
    """Whether the engine skips a gated-off head's projections in an attention laid out so:
    the layout is supported and names the projections (an output projection, or an
    ``nn.MultiheadAttention``); one that only says why heads cannot be pruned names none."""
    return (layout is not None and not layout.unsupported
            and (layout.multihead is not None or layout.out is not None))


def layer_flops(layer: LayerDesc, n, n_out, heads=None, cross_keys=None, cross_heads=None):
    """FLOPs of ``layer`` for n tokens in, ``n_out`` out, ``heads`` live heads (``None``: all),
    and ``cross_keys`` keys in its cross-attention (ignored without one) with ``cross_heads``
    live heads. Gated-off heads save their attention products, and their projections where
    the layer's `HeadLayout` lets execution skip them; in a layer that mixes its heads
    (`LayerDesc.mixes_heads`) they save nothing, and the mixes count. Works on floats and on
    tensors alike (per-sample counts, with gradient)."""
    if layer.keys_only:
        return 0.0
    d_model, h_all = layer.dim, layer.num_heads
    d_head = layer.head_dim or d_model / h_all
    mlp = layer.mlp_dim or 4 * d_model
    h = h_all if heads is None or layer.mixes_heads else heads
    # the projections' width: H·d (smaller than D once heads are pruned), or the live heads'
    inner = (h if _skips_projections(layer.heads) else h_all) * d_head
    flops = 8 * n * d_model * inner + 4 * n * n * d_head * h + 4 * n_out * d_model * mlp
    if layer.mixes_heads:  # talking heads: H -> H mixes of the n×n maps
        flops = flops + 2 * layer.mixes_heads * n * n * h_all * h_all
    if layer.cross_attention is not None and cross_keys is not None:
        hc_all = layer.cross_num_heads or h_all
        hc = hc_all if cross_heads is None else cross_heads
        m = cross_keys
        inner_c = (hc if _skips_projections(layer.cross_heads) else hc_all) * d_head
        flops = (flops + 4 * n * d_model * inner_c + 4 * m * d_model * inner_c
                 + 4 * n * m * d_head * hc)
    return flops


def expected_ratio(desc: ModelDescription, ctx: TrimContext) -> torch.Tensor:
    """Per-sample ratio (B) of the last forward's cost of the described layers to their cost
    with nothing trimmed, from the soft counts recorded while ``ctx.record_costs`` was on.
    Each sample is costed as if run alone (see the module docstring). In training the counts
    are the straight-through masks' values, so the ratio is the one this forward's decisions
    achieve at inference and its gradient reaches the trimmers."""
    if not ctx.costs:
        raise RuntimeError("no layer costs were recorded: set the context's record_costs and "
                           "run a forward of the trimmed model first")
    spent, full = 0.0, 0.0
    for c in ctx.costs:
        layer = desc.streams[c.stream].layers[c.layer]
        n0 = ctx.entry_counts[c.stream]
        m0 = None
        if layer.cross_stream is not None:
            m0 = ctx.entry_counts.get(layer.cross_stream)
        m = c.cross_keys if c.cross_keys is not None else m0
        spent = spent + layer_flops(layer, c.tokens_in, c.tokens_out, c.heads, m, c.cross_heads)
        spent = spent + c.trimmers
        full = full + layer_flops(layer, n0, n0, None, m0, None)
    return spent / full



@dataclass(frozen=True)
class Reach:
    """The most the ops of one layer can save, for `lowest_ratio`: with ``tokens``, from the
    layer's attention on the stream keeps only its protected tokens and one more; with
    ``heads`` (``cross_heads``), one head of its self- (cross-) attention stays on;
    ``flops(n)``: the ops' own FLOPs on ``n`` tokens entering the layer."""

    tokens: bool = False
    heads: bool = False
    cross_heads: bool = False
    flops: Callable[[float], float] | None = None


@dataclass
class LowestRatio:
    """What `lowest_ratio` found: the ``ratio``, the ``entries`` it assumed (the layer each
    stream enters at, cheapest first), and per described layer that runs ``(stream,
    index) -> (FLOPs at the floor, FLOPs untrimmed)``, trimmers' own in the first."""

    ratio: float
    entries: dict[str, int]
    layers: dict[tuple[str, int], tuple[float, float]]

    def untrimmed(self, reach: Mapping[tuple[str, int], Reach]) -> dict[str, list[int]]:
        """Per stream, the layers that run with no token trimmer at or before them: the
        cost that no trimmer of this placement can reduce."""
        out: dict[str, list[int]] = {}
        seen: set[str] = set()
        for (stream, i) in sorted(self.layers, key=lambda k: (k[0], k[1])):
            r = reach.get((stream, i))
            if r is not None and r.tokens:
                seen.add(stream)
            if stream not in seen:
                out.setdefault(stream, []).append(i)
        return out


def lowest_ratio(desc: ModelDescription, reach: Mapping[tuple[str, int], Reach],
                 tokens: Mapping[str, float]) -> LowestRatio:
    """The lowest cost ratio (`expected_ratio`, trimmers' own FLOPs included) that ops able
    to save at most what ``reach`` says can reach on one instance with ``tokens[stream]``
    tokens entering each stream (the stream's ``num_tokens`` where it is static): every
    token trimmer keeps only the protected tokens and one more from its layer on, every
    head trimmer one head. A stream with several `StreamDesc.entries` (a model that also
    takes its encoder's output from outside) is costed from each: the lowest over them is
    what some forward can reach."""
    choices = [[(name, e) for e in s.entries] for name, s in desc.streams.items()]
    best: LowestRatio | None = None
    for combo in itertools.product(*choices):
        found = _floor(desc, reach, tokens, dict(combo))
        if best is None or found.ratio < best.ratio:
            best = found
    assert best is not None
    return best


def _floor(desc: ModelDescription, reach: Mapping[tuple[str, int], Reach],
           tokens: Mapping[str, float], entries: dict[str, int]) -> LowestRatio:
    """`lowest_ratio` with each stream entering at ``entries[stream]``."""
    counts: dict[str, dict[int, tuple[float, float]]] = {}  # layer -> (entering, after ops)
    n0: dict[str, float] = {}
    for name, s in desc.streams.items():
        n = float(s.num_tokens if s.num_tokens is not None else tokens[name])
        n0[name] = n
        floor = min(n, float(s.num_protected + 1))
        per, now = {}, n
        for i in range(entries[name], len(s.layers)):
            r = reach.get((name, i))
            before = now
            if r is not None and r.tokens:
                now = min(now, floor)
            per[i] = (before, now)
        counts[name] = per
    spent, full, layers = 0.0, 0.0, {}
    for name, s in desc.streams.items():
        for i, (before, after) in counts[name].items():
            layer = s.layers[i]
            r = reach.get((name, i)) or Reach()
            m = m0 = None
            if layer.cross_attention is not None and layer.cross_stream in counts:
                m0 = n0[layer.cross_stream]
                m = _keys(desc, layer, counts[layer.cross_stream])
            lo = layer_flops(layer, after, after, 1 if r.heads else None, m,
                             1 if r.cross_heads else None)
            lo += r.flops(before) if r.flops is not None else 0.0
            hi = layer_flops(layer, n0[name], n0[name], None, m0, None)
            layers[(name, i)] = (float(lo), float(hi))
            spent, full = spent + lo, full + hi
    return LowestRatio(spent / full if full else 1.0, dict(entries), layers)


def _keys(desc: ModelDescription, layer: LayerDesc,
          other: dict[int, tuple[float, float]]) -> float:
    """The keys ``layer``'s cross-attention reads of the other stream: as the paired layer
    entered (side-by-side streams), as the paired keys-only layer left them, else as the
    other stream ends."""
    stream = desc.streams[layer.cross_stream]
    for j, o in enumerate(stream.layers):
        if j in other and o.pair is not None and o.pair == layer.pair:
            if desc.parallel and not o.keys_only:
                return other[j][0]
            if o.keys_only:
                return other[j][1]
    last = max(other)
    return other[last][1]
