"""`torch.nn.MultiheadAttention` routed through a site's core: the same outputs, and a
small model built on it passes the invariants through an adapter written right here."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import trimkit
from trimkit.mha import route_multihead_attention
from trimkit.registry import ADAPTERS
from trimkit.rewrite import RewriteError
from trimkit.testing import check_invariants


class _PlainCore(nn.Module):
    def forward(self, q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None):
        return nn.functional.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale)


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("kdim", [None, 6])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("masks", ["none", "bool", "float", "padding", "both"])
def test_routed_mha_matches_torch(batch_first, kdim, bias, masks):
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(8, 2, bias=bias, batch_first=batch_first, kdim=kdim,
                                vdim=kdim).eval()
    b, n, m = 3, 5, 4 if kdim else 5
    q = torch.randn(b, n, 8)
    kv = torch.randn(b, m, kdim or 8) if kdim else q
    if not batch_first:
        q, kv = q.transpose(0, 1), kv.transpose(0, 1)
    kw = {}
    if masks in ("bool", "both"):
        kw["attn_mask"] = torch.rand(n, m) > 0.7
        kw["attn_mask"][:, 0] = False
    if masks == "float":
        kw["attn_mask"] = torch.randn(b * 2, n, m)
    if masks in ("padding", "both"):
        kw["key_padding_mask"] = torch.zeros(b, m, dtype=torch.bool)
        kw["key_padding_mask"][1, -2:] = True
    ref, ref_w = mha(q, kv, kv, **kw)
    patch = route_multihead_attention(mha, _PlainCore())
    out, w = mha(q, kv, kv, **kw)
    assert torch.allclose(out, ref, atol=1e-5)
    assert torch.allclose(w, ref_w, atol=1e-5)
    out, w = mha(q, kv, kv, need_weights=False, **kw)
    assert w is None and torch.allclose(out, ref, atol=1e-5)
    patch.undo()
    assert "forward" not in mha.__dict__
    assert torch.equal(mha(q, kv, kv, **kw)[0], ref)


def test_unsupported_mha_is_named():
    with pytest.raises(RewriteError, match="add_bias_kv"):
        route_multihead_attention(nn.MultiheadAttention(8, 2, add_bias_kv=True), _PlainCore())


class Block(nn.Module):
    """A pre-norm block on `nn.MultiheadAttention`, batch second, as in many codebases."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.ln_1, self.ln_2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, x):
        y = self.ln_1(x).transpose(0, 1)
        x = x + self.attn(y, y, y, need_weights=False)[0].transpose(0, 1)
        return x + self.mlp(self.ln_2(x))


class TinyEncoder(nn.Module):
    def __init__(self, dim: int = 16, heads: int = 2, depth: int = 3, n: int = 12):
        super().__init__()
        self.embed = nn.Linear(4, dim)
        self.cls = nn.Parameter(torch.randn(1, 1, dim))
        self.blocks = nn.ModuleList(Block(dim, heads) for _ in range(depth))
        self.head = nn.Linear(dim, 3)
        self.n, self.dim, self.heads = n, dim, heads

    def forward(self, x):
        x = torch.cat([self.cls.expand(x.shape[0], -1, -1), self.embed(x)], dim=1)
        for blk in self.blocks:
            x = blk(x)
        return self.head(x[:, 0])


class TinyEncoderAdapter(trimkit.Adapter):
    name = "_tiny_mha"

    def detect(self, model):
        return isinstance(model, TinyEncoder)

    def describe(self, model):
        layers = tuple(trimkit.LayerDesc(block=f"blocks.{i}", attention="attn",
                                         num_heads=model.heads, dim=model.dim)
                       for i in range(len(model.blocks)))
        stream = trimkit.StreamDesc("tokens", layers, num_tokens=model.n + 1, num_protected=1)
        return trimkit.ModelDescription("tiny-mha", {"tokens": stream})


@pytest.mark.parametrize("recipe, options, zero", [
    ("tome", dict(r=2, stream="tokens"), dict(r=0, stream="tokens")),
    ("attn_prune", dict(keep_ratio=0.5, fuse=True, stream="tokens"),
     dict(keep_ratio=1.0, stream="tokens")),
])
def test_mha_model_passes_invariants(recipe, options, zero):
    ADAPTERS["_tiny_mha"] = TinyEncoderAdapter()
    try:
        def make():
            torch.manual_seed(0)
            return TinyEncoder()
        x = torch.randn(3, 12, 4)
        check_invariants(make, (x,), recipe, options, zero, merges_only=recipe == "tome")
    finally:
        del ADAPTERS["_tiny_mha"]


def test_flops_count_multihead_attention_fully():
    """nn.MultiheadAttention's fused inference path (batch first, no grad) must not hide its
    FLOPs from `count_flops`."""

    class SelfAttention(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = nn.MultiheadAttention(16, 2, batch_first=True)

        def forward(self, x):
            return self.attn(x, x, x, need_weights=False)[0]

    model = SelfAttention().eval()
    b, n, d = 2, 13, 16
    flops = trimkit.count_flops(model, torch.randn(b, n, d))
    assert flops == b * 2 * (4 * n * d * d + 2 * n * n * d)  # projections + attention
