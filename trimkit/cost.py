"""A cost model of trimmed layers, differentiable in the soft token and head counts.

The FLOPs of one described layer (multiply-adds counted twice, as
`torch.utils.flop_counter` does), with D its width, d its head width (D/H unless
``LayerDesc.head_dim`` says otherwise), F its FFN width, n tokens entering its attention,
n' leaving towards its FFN, h live heads, m keys of its cross-attention:

- self-attention: q, k, v and output projections ``8·n·D·I`` + scores and weighted sum
  ``4·n²·d·h``, with ``I = H·d`` the attention's width (``D`` unless heads were pruned);
- cross-attention: q and output ``4·n·D·I``, k and v on the other stream ``4·m·D·I``,
  scores and weighted sum ``4·n·m·d·h``;
- FFN: ``4·n'·D·F``.

Head gates save the attention products only: a gated-off head's projections are still
computed (they are one matmul per batch), so the model counts what execution skips. The
trimmers' own FLOPs (`TokenOp.flops`) count on the trimmed side; embeddings and task heads,
which no trimmer changes, are left out of both sides.
"""

from __future__ import annotations

import torch

from .describe import LayerDesc, ModelDescription
from .sites import TrimContext

__all__ = ["expected_ratio", "layer_flops"]


def layer_flops(layer: LayerDesc, n, n_out, heads=None, cross_keys=None, cross_heads=None):
    """FLOPs of ``layer`` for n tokens in, ``n_out`` out, ``heads`` live heads (``None``: all),
    and ``cross_keys`` keys in its cross-attention (ignored without one). Works on floats and
    on tensors alike (per-sample counts, with gradient)."""
    d_model, h_all = layer.dim, layer.num_heads
    d_head = layer.head_dim or d_model / h_all
    inner = h_all * d_head  # the attention's width: smaller than D once heads are pruned
    mlp = layer.mlp_dim or 4 * d_model
    h = h_all if heads is None else heads
    flops = 8 * n * d_model * inner + 4 * n * n * d_head * h + 4 * n_out * d_model * mlp
    if layer.cross_attention is not None and cross_keys is not None:
        hc_all = layer.cross_num_heads or h_all
        hc = hc_all if cross_heads is None else cross_heads
        m, inner_c = cross_keys, hc_all * d_head
        flops = (flops + 4 * n * d_model * inner_c + 4 * m * d_model * inner_c
                 + 4 * n * m * d_head * hc)
    return flops


def expected_ratio(desc: ModelDescription, ctx: TrimContext) -> torch.Tensor:
    """Per-sample ratio (B) of the last forward's cost of the described layers to their cost
    with nothing trimmed, from the soft counts recorded while ``ctx.record_costs`` was on.
    In training the counts are the straight-through masks' values, so the ratio is the one
    achieved by this forward and its gradient reaches the trimmers."""
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

