"""Small hand-written transformers no adapter knows, for the generic adapter's tests."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.models.beit import Beit
from timm.models.deit import VisionTransformerDistilled
from timm.models.eva import Eva
from timm.models.vision_transformer import VisionTransformer
from torch import nn
from trimkit.adapters.generic import GenericAdapter


class FusedAttention(nn.Module):
    """Fused qkv projection and ``scaled_dot_product_attention``."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        x = F.scaled_dot_product_attention(q, k, v)
        return self.proj(x.transpose(1, 2).reshape(b, n, c))


class ExplicitAttention(nn.Module):
    """Separate q, k, v projections and the explicit softmax(q·kᵀ)·v."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.n_heads = num_heads
        self.head_dim = dim // num_heads
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.out = nn.Linear(dim, dim)
        self.drop = nn.Dropout(0.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        q, k, v = (p(x).view(b, n, self.n_heads, self.head_dim).transpose(1, 2)
                   for p in (self.q, self.k, self.v))
        attn = (q @ k.transpose(-2, -1)) * self.head_dim ** -0.5
        x = self.drop(attn.softmax(dim=-1)) @ v
        return self.out(x.transpose(1, 2).flatten(2))


class MultiheadSelfAttention(nn.Module):
    """`nn.MultiheadAttention` used as self-attention."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.mha = nn.MultiheadAttention(dim, num_heads, batch_first=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mha(x, x, x, need_weights=False)[0]


ATTENTIONS = {"fused": FusedAttention, "explicit": ExplicitAttention,
              "multihead": MultiheadSelfAttention}


class Block(nn.Module):
    """A transformer layer, pre-norm (``x + f(norm(x))``) or post-norm (``norm(x + f(x))``)."""

    def __init__(self, dim: int, num_heads: int, attention: str, post_norm: bool):
        super().__init__()
        self.post_norm = post_norm
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = ATTENTIONS[attention](dim, num_heads)
        self.mlp = nn.Sequential(nn.Linear(dim, 3 * dim), nn.GELU(), nn.Linear(3 * dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.post_norm:
            x = self.norm1(x + self.attn(x))
            return self.norm2(x + self.mlp(x))
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class TinyViT(nn.Module):
    """Patch embedding, a CLS token (or none: mean pooling), blocks, a linear head."""

    def __init__(self, dim: int = 32, heads: int = 4, depth: int = 2, attention: str = "fused",
                 post_norm: bool = False, cls: bool = True, img: int = 32, patch: int = 8):
        super().__init__()
        self.patch = nn.Conv2d(3, dim, patch, patch)
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim) * 0.02) if cls else None
        n = (img // patch) ** 2 + int(cls)
        self.pos = nn.Parameter(torch.randn(1, n, dim) * 0.02)
        self.blocks = nn.ModuleList(Block(dim, heads, attention, post_norm)
                                    for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, 5)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.patch(images).flatten(2).transpose(1, 2)
        if self.cls_token is not None:
            x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], 1)
        x = x + self.pos
        for blk in self.blocks:
            x = blk(x)
        x = self.norm(x)
        return self.head(x[:, 0] if self.cls_token is not None else x.mean(1))


class TinyEncoder(nn.Module):
    """Token embedding, a stack of `nn.TransformerEncoderLayer`, first-token pooling."""

    def __init__(self, dim: int = 32, heads: int = 4, depth: int = 2, norm_first: bool = True,
                 vocab: int = 50):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        layer = nn.TransformerEncoderLayer(dim, heads, 2 * dim, dropout=0.0, batch_first=True,
                                           norm_first=norm_first)
        self.encoder = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
        self.head = nn.Linear(dim, 3)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(self.embed(ids))[:, 0])


VIT = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=4, num_classes=5)


def jitter(make):
    """``make`` wrapped: seeded, every parameter nudged so tokens differ."""

    def build() -> nn.Module:
        torch.manual_seed(0)
        model = make()
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p) * 0.02)
        return model
    return build


#: name -> (factory, input kind, adapter to force): families with no adapter of their own,
#: and timm ViTs (DeiT, registers) forced through the generic adapter
FAMILIES = {
    "prenorm-sdpa": (lambda: TinyViT(attention="fused"), "image", None),
    "postnorm-softmax": (lambda: TinyViT(attention="explicit", post_norm=True), "image", None),
    "prenorm-mha-meanpool": (lambda: TinyViT(attention="multihead", cls=False), "image", None),
    "torch-encoder-postnorm": (lambda: TinyEncoder(norm_first=False), "text",
                               GenericAdapter(num_protected=1)),
    "eva": (lambda: Eva(**VIT), "image", None),
    "beit-relpos": (lambda: Beit(**VIT, use_rel_pos_bias=True, init_values=0.1), "image", None),
    "deit": (lambda: VisionTransformerDistilled(**VIT), "image", "generic"),
    "vit-registers-avg": (lambda: VisionTransformer(**VIT, reg_tokens=2, global_pool="avg"),
                          "image", "generic"),
}


def inputs(kind: str, batch: int) -> tuple:
    g = torch.Generator().manual_seed(batch)
    if kind == "image":
        return (torch.randn(batch, 3, 32, 32, generator=g),)
    return (torch.randint(0, 50, (batch, 9), generator=g),)
