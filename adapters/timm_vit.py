"""timm's `VisionTransformer` family (ViT, DeiT, ViTs with registers, LayerScale, qk_norm…,
and SigLIP's ViTs: no class token, an attention-pooling head, ``global_pool="map"``)."""

from __future__ import annotations

import inspect

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
from trimkit.hooks import MethodPatch, Patches, Undo
from trimkit.ops import attention_bias, size_weighted_mean
from trimkit.rewrite import ADDITIVE_MASK_FUNCTIONS
from trimkit.sites import Site, TrimContext
from trimkit.tools.bench import register_builder

STREAM = "image"


def _vit_class() -> type | None:
    try:
        from timm.layers import attention
        from timm.models.vision_transformer import VisionTransformer
    except ImportError:  # timm absent: this adapter recognises nothing
        return None
    # timm's explicit attention path adds its mask through a helper fx cannot see into
    if hasattr(attention, "maybe_add_mask"):
        ADDITIVE_MASK_FUNCTIONS.add(attention.maybe_add_mask)
    return VisionTransformer


def _head_layout(attn: nn.Module) -> HeadLayout:
    """Where timm's `Attention` keeps its heads: the fused ``qkv`` (or ``q_proj``/``k_proj``/
    ``v_proj``), ``proj``, the optional per-head output ``gate``, ``num_heads`` and
    ``attn_dim``."""
    why = None
    proj = {}
    if isinstance(getattr(attn, "qkv", None), nn.Linear):
        proj["qkv"] = "attn.qkv"
    elif all(isinstance(getattr(attn, p, None), nn.Linear) for p in ("q_proj", "k_proj",
                                                                      "v_proj")):
        proj.update(q="attn.q_proj", k="attn.k_proj", v="attn.v_proj")
    else:
        why = f"{type(attn).__name__} has no qkv (or q/k/v) projection"
    if getattr(attn, "num_kv_heads", attn.num_heads) != attn.num_heads:
        why = "grouped-query attention (fewer key/value heads) is not supported"
    if not isinstance(getattr(attn, "norm", nn.Identity()), nn.Identity):
        why = "its norm over all heads' outputs (scale_norm) mixes the heads"
    gate = ("attn.gate",) if isinstance(getattr(attn, "gate", None), nn.Linear) else ()
    widths = ("attn.attn_dim",) if hasattr(attn, "attn_dim") else ()
    return HeadLayout(out="attn.proj", per_head=gate, counts=("attn.num_heads",),
                      widths=widths, unsupported=why, **proj)


def _check_pool(model: nn.Module) -> None:
    """Refuse an attention-pooling head (``model.attn_pool``) that cannot be kept off dropped
    tokens: trimkit passes it an additive key mask (`AttentionPoolLatent`'s ``attn_mask``),
    which the parameter-free ``"prr"`` pool has no place for, and a pool with its own
    position table would read the wrong rows once tokens moved."""
    pool = model.attn_pool
    if pool is None:
        return
    why = None
    if "attn_mask" not in inspect.signature(pool.forward).parameters:
        why = f"its {type(pool).__name__} pooling head takes no attention mask"
    elif getattr(pool, "pos_embed", None) is not None:
        why = f"its {type(pool).__name__} pooling head adds a position table of its own"
    if why:
        raise UnsupportedConfigError(f"trimkit's timm adapter cannot trim this "
                                     f"{type(model).__name__} (global_pool="
                                     f"{model.global_pool!r}): {why}. Nothing was changed.")


@register_adapter
class TimmViTAdapter(Adapter):
    """Every block's `attn` is rewritten through fx; the prefix tokens (CLS, registers,
    distillation token) are protected; average pooling becomes size-weighted over live tokens,
    and an attention-pooling head (``global_pool="map"``, SigLIP) reads only live tokens,
    with log(size) on their logits where the stream's attention is proportional."""

    name = "timm-vit"

    def detect(self, model: nn.Module) -> bool:
        cls = _vit_class()
        return cls is not None and isinstance(model, cls)

    def describe(self, model: nn.Module) -> ModelDescription:
        _vit_class()  # teaches the rewrite timm's mask helper, also when detect was skipped
        _check_pool(model)
        layers = []
        for i, blk in enumerate(model.blocks):
            attn = getattr(blk, "attn", None)
            if attn is None or not hasattr(attn, "num_heads"):
                raise TypeError(f"block {i} ({type(blk).__name__}) has no `attn` with `num_heads`;"
                                f" trimkit's timm adapter supports blocks of the Block shape")
            layers.append(LayerDesc(block=f"blocks.{i}", attention="attn",
                                    num_heads=attn.num_heads, dim=model.embed_dim,
                                    head_dim=getattr(attn, "head_dim", None),
                                    heads=_head_layout(attn)))
        n = grid = None
        if not getattr(model, "dynamic_img_size", False):
            n = model.patch_embed.num_patches + model.num_prefix_tokens
            grid = tuple(model.patch_embed.grid_size)
        stream = StreamDesc(STREAM, tuple(layers), num_tokens=n,
                            num_protected=model.num_prefix_tokens, grid=grid)
        return ModelDescription("timm-vit", {STREAM: stream})

    def install(self, model: nn.Module, desc: ModelDescription,
                sites: dict[tuple[str, int], Site], ctx: TrimContext) -> list[Undo]:
        with Patches() as patches:
            patches.add(*super().install(model, desc, sites, ctx))
            if model.attn_pool is not None:
                patches.set(model, "pool", _KeyMaskedPool(model, ctx))
            elif model.global_pool == "avg":
                patches.set(model, "pool", _SizeWeightedPool(model, ctx))
        return patches.undo


class _SizeWeightedPool(MethodPatch):
    """``model.pool`` whose average is weighted by size over live tokens."""

    def __init__(self, model: nn.Module, ctx: TrimContext):
        super().__init__(model, "pool")
        self.ctx = ctx

    def __call__(self, x: torch.Tensor, pool_type: str | None = None) -> torch.Tensor:
        m = self.owner
        if (pool_type or m.global_pool) == "avg" and self.ctx.enabled:
            skip = 0 if getattr(m, "pool_include_prefix", False) else m.num_prefix_tokens
            mean = size_weighted_mean(self.ctx.states.get(STREAM), x, skip)
            if mean is not None:
                return mean
        return self.original(x, pool_type)


class _KeyMaskedPool(MethodPatch):
    """``model.pool`` whose attention-pooling head gets the stream's key bias: dead tokens
    masked, and log(size) where the stream's attention is proportional (ToMe's proportional
    attention, in the head's cross-attention from its latent query to the tokens)."""

    def __init__(self, model: nn.Module, ctx: TrimContext):
        super().__init__(model, "pool")
        self.ctx = ctx

    def __call__(self, x: torch.Tensor, pool_type: str | None = None) -> torch.Tensor:
        m, ctx = self.owner, self.ctx
        state = ctx.states.get(STREAM) if ctx.enabled else None
        if state is None or state.keep.shape != x.shape[:2]:
            return self.original(x, pool_type)
        bias = attention_bias(state, x.dtype, STREAM in ctx.proportional)
        if bias is None:  # no dead token, no size to weigh: the model's own pooling
            return self.original(x, pool_type)
        if not m.pool_include_prefix:
            x, bias = x[:, m.num_prefix_tokens:], bias[..., m.num_prefix_tokens:]
        return m.attn_pool(x, attn_mask=bias)


def bench_model(name: str, **kwargs) -> tuple[nn.Module, object]:
    """``trimkit bench --model timm:<name>[?kwargs]``: a timm model with random weights in
    eval mode, and random images at its input size (its ``img_size`` when one is given:
    the resize hook, which rebuilds the model at another square side)."""
    import timm

    model = timm.create_model(name, pretrained=False, **kwargs).eval()
    c, h, w = model.default_cfg["input_size"]
    img_size = getattr(getattr(model, "patch_embed", None), "img_size", None)
    if img_size is not None:
        h, w = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
    c = kwargs.get("in_chans", c)

    def make_inputs(batch_size: int) -> tuple:
        g = torch.Generator().manual_seed(0)
        return (torch.randn(batch_size, c, h, w, generator=g),)

    return model, make_inputs


register_builder("timm", bench_model, resize="img_size", examples=[
    "--model timm:vit_base_patch16_224 --recipe tome --r 13   # resize baseline, batch 1 16",
    "--model timm:deit_small_patch16_224 --recipe attn_prune --keep-ratio 0.5 "
    "--layers 3,6,9 --fuse true --batch-size 1 8 32",
    '--model "timm:vit_tiny_patch16_224?img_size=64&depth=2" --recipe tome --r 2 --json',
    "--model timm:vit_small_patch16_224 --recipe tome --r 8 --batch-size 64 --no-resize",
])
