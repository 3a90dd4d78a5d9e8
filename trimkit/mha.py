"""``nn.MultiheadAttention`` re-implemented around a replaceable attention core.

torch's own forward of ``nn.MultiheadAttention`` runs the projections and the attention
product inside one fused function, so neither a site (token trimming, head gates) nor a
head-pruned stand-in can reach in. `multihead_attention_forward` computes the same outputs
from the module's own weights with the attention product left to a ``core``;
`route_multihead_attention` installs it on one instance (`trimkit.adapter` routes a
layer's attention through its site this way, `trimkit.heads` scores and prunes heads with
it).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .ops import additive_mask, linear_rows
from .rewrite import Patch, RewriteError

__all__ = ["multihead_attention_forward", "route_multihead_attention"]


def packed_qkv(mha: nn.Module) -> bool:
    """Whether an ``nn.MultiheadAttention`` (or a head-pruned one) holds q, k and v in one
    ``in_proj_weight``."""
    if hasattr(mha, "packed_qkv"):
        return bool(mha.packed_qkv)
    return bool(mha._qkv_same_embed_dim)


def _mha_mask(mha: nn.Module, b: int, n: int, m: int, dtype: torch.dtype,
              attn_mask: torch.Tensor | None, key_padding_mask: torch.Tensor | None
              ) -> torch.Tensor | None:
    """`nn.MultiheadAttention`'s masks (bool True = blocked, or additive floats) as one
    additive SDPA mask of shape B×H×N×M (or broadcastable to it)."""
    mask = None
    if attn_mask is not None:
        mask = additive_mask(attn_mask, dtype, blocked=True)
        if mask.dim() == 3:  # its own sizes: a mask over a stream's entry tokens stays so
            mask = mask.view(b, mha.num_heads, *mask.shape[-2:])
    if key_padding_mask is not None:
        kpm = additive_mask(key_padding_mask, dtype, blocked=True)[:, None, None]
        mask = kpm if mask is None else mask + kpm
    return mask


def multihead_attention_forward(
    mha: nn.Module, core: Callable, query: torch.Tensor, key: torch.Tensor,
    value: torch.Tensor, key_padding_mask: torch.Tensor | None = None,
    need_weights: bool = True, attn_mask: torch.Tensor | None = None,
    average_attn_weights: bool = True, is_causal: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """`nn.MultiheadAttention`'s forward from the module's own weights, with
    ``core(q, k, v, attn_mask, dropout_p, is_causal)`` (B×H×N×d) for the attention product
    and ``mha.out_proj`` called as a module. ``mha`` is an `nn.MultiheadAttention` or a
    module with the same attributes whose inner width ``num_heads · head_dim`` may differ
    from its ``embed_dim`` (a head-pruned one). A core with ``live_rows`` (a site's) may
    name the heads it will read: the in-projection then computes only their rows, the
    others zero (not with ``need_weights``)."""
    if not mha.batch_first:
        query, key, value = (t.transpose(0, 1) for t in (query, key, value))
    b, n = query.shape[:2]
    m, h, d = key.shape[1], mha.num_heads, mha.head_dim
    bias = mha.in_proj_bias
    bq, bk, bv = bias.chunk(3) if bias is not None else (None, None, None)
    if packed_qkv(mha):
        wq, wk, wv = mha.in_proj_weight.chunk(3)
    else:
        wq, wk, wv = mha.q_proj_weight, mha.k_proj_weight, mha.v_proj_weight
    # a core that skips heads gated off in the whole batch names the rows to compute
    # (the returned weights would read every head's q and k)
    live = None if need_weights else getattr(core, "live_rows", None)
    if packed_qkv(mha) and query is key and key is value:
        rows = None if live is None else live(d, h, 3, qkv=True)
        if rows is None:
            qkv = F.linear(query, mha.in_proj_weight, bias)
        else:
            qkv = linear_rows(query, mha.in_proj_weight, bias, rows, 3 * h * d)
        q, k, v = qkv.chunk(3, dim=-1)
    else:
        rows = None if live is None else live(d, h, 1, qkv=True)
        projections = ((query, wq, bq), (key, wk, bk), (value, wv, bv))
        if rows is None:
            q, k, v = (F.linear(x, w, b_) for x, w, b_ in projections)
        else:
            q, k, v = (linear_rows(x, w, b_, rows, h * d) for x, w, b_ in projections)
    q, k, v = (t.unflatten(-1, (h, d)).transpose(1, 2) for t in (q, k, v))
    mask = _mha_mask(mha, b, n, m, q.dtype, attn_mask, key_padding_mask)
    if is_causal and mask is not None:
        is_causal = False  # the given mask already encodes causality (MHA's contract)
    dropout = mha.dropout if mha.training else 0.0
    out = core(q, k, v, attn_mask=mask, dropout_p=dropout, is_causal=is_causal)
    out = mha.out_proj(out.transpose(1, 2).reshape(b, n, h * d))
    if not mha.batch_first:
        out = out.transpose(0, 1)
    weights = None
    if need_weights:
        logits = (q @ k.transpose(-2, -1)) / d ** 0.5
        if mask is not None:
            logits = logits + mask
        weights = torch.softmax(logits, dim=-1)
        if average_attn_weights:
            weights = weights.mean(1)
    return out, weights


def route_multihead_attention(mha: nn.Module, core: nn.Module) -> Patch:
    """Give one `nn.MultiheadAttention` instance (or a head-pruned one) a forward that
    projects q, k, v from its own weights and calls ``core(q, k, v, attn_mask, dropout_p,
    is_causal)`` (B×H×N×d) for the attention product, then its own ``out_proj``: same
    signature and outputs (`multihead_attention_forward`).

    ``need_weights=True`` computes the (head-averaged) weights explicitly beside the core.
    ``add_bias_kv`` and ``add_zero_attn`` are not supported (a `RewriteError` names them).
    """
    if mha.bias_k is not None or mha.add_zero_attn:
        raise RewriteError("nn.MultiheadAttention with add_bias_kv or add_zero_attn is not "
                           "supported by trimkit's attention route")
    if "forward" in mha.__dict__:
        raise RewriteError("nn.MultiheadAttention already has a per-instance forward")

    forward = _Routed(mha, core)
    mha.__dict__["forward"] = forward
    return Patch(mha, forward)


class _Routed:
    """The forward `route_multihead_attention` installs (an object, so that a deep copy of
    the model routes the copy's module through the copy's core, and pickling works)."""

    def __init__(self, mha: nn.Module, core: nn.Module):
        self.mha, self.core = mha, core

    def __call__(self, query, key, value, key_padding_mask=None, need_weights=True,
                 attn_mask=None, average_attn_weights=True, is_causal=False):
        return multihead_attention_forward(self.mha, self.core, query, key, value,
                                           key_padding_mask, need_weights, attn_mask,
                                           average_attn_weights, is_causal)
