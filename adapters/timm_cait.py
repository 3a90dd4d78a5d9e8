"""timm's CaiT (Touvron et al., ICCV 2021): self-attention blocks over the patches only, then
class-attention blocks in which a class token, entering late, reads the patches.

The patch stream is trimmed in the self-attention blocks (``model.blocks``: LayerScale and
talking-heads attention, which the engine's fx pass recognises and writes out). No token
there is a CLS, so none is protected, and `attn_prune` scores the patches with the mean
query of the live ones (the rule for streams that protect nothing). The class-attention
blocks (``model.blocks_token_only``) are not trimmed: they read the class token and the
surviving patches as keys, a dead patch not at all, a merged one by its size where the
recipe uses proportional attention (as every cross-attention reads a trimmed stream).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from trimkit import (
    Adapter,
    HeadLayout,
    LayerDesc,
    ModelDescription,
    StreamDesc,
    register_adapter,
)
from trimkit.hooks import MethodPatch, Patches, Undo
from trimkit.ops import attention_bias, size_weighted_mean
from trimkit.rewrite import RouteAttention, patch_forward
from trimkit.sites import Site, TrimContext

STREAM = "image"
TALKING_HEADS = ("its talking heads (proj_l, proj_w) mix every head's attention, so no head "
                 "can be removed or skipped alone")


def _cait_class() -> type | None:
    try:
        from timm.models.cait import Cait
    except ImportError:  # timm absent: this adapter recognises nothing
        return None
    return Cait


@register_adapter
class TimmCaitAdapter(Adapter):
    """The patches are trimmed in the self-attention blocks; the class-attention blocks read
    the survivors as keys; average pooling becomes size-weighted over live patches."""

    name = "timm-cait"

    def detect(self, model: nn.Module) -> bool:
        cls = _cait_class()
        return cls is not None and isinstance(model, cls)

    def describe(self, model: nn.Module) -> ModelDescription:
        layers = []
        for i, blk in enumerate(model.blocks):
            attn = getattr(blk, "attn", None)
            if not isinstance(getattr(attn, "qkv", None), nn.Linear) or not hasattr(
                    attn, "num_heads"):
                raise TypeError(f"blocks.{i} ({type(blk).__name__}) has no `attn` with a fused "
                                f"`qkv` and `num_heads`; trimkit's CaiT adapter supports "
                                f"timm's LayerScaleBlock")
            fc1 = getattr(getattr(blk, "mlp", None), "fc1", None)
            layers.append(LayerDesc(
                block=f"blocks.{i}", attention="attn", num_heads=attn.num_heads,
                dim=model.embed_dim, head_dim=attn.qkv.out_features // (3 * attn.num_heads),
                mlp_dim=fc1.out_features if isinstance(fc1, nn.Linear) else None,
                heads=HeadLayout(qkv="attn.qkv", out="attn.proj", counts=("attn.num_heads",),
                                 unsupported=TALKING_HEADS),
                mixes_heads=2))
        for i, blk in enumerate(model.blocks_token_only or ()):
            attn = getattr(blk, "attn", None)
            if not all(isinstance(getattr(attn, p, None), nn.Linear) for p in "qkv"):
                raise TypeError(f"blocks_token_only.{i} ({type(blk).__name__}) has no `attn` "
                                f"with q, k and v projections; trimkit's CaiT adapter supports "
                                f"timm's LayerScaleBlockClassAttn")
        grid = tuple(model.patch_embed.grid_size)
        stream = StreamDesc(STREAM, tuple(layers), num_tokens=grid[0] * grid[1],
                            num_protected=0, grid=grid)
        return ModelDescription("timm-cait", {STREAM: stream})

    def install(self, model: nn.Module, desc: ModelDescription,
                sites: dict[tuple[str, int], Site], ctx: TrimContext) -> list[Undo]:
        with Patches() as patches:
            patches.add(*super().install(model, desc, sites, ctx))
            for blk in model.blocks_token_only or ():
                route = RouteAttention(ClassKeys(ctx), "trimkit_keys", mixes=False)
                patches.add(patch_forward(blk.attn, route).undo)
            if model.global_pool == "avg":
                patches.set(model, "forward_head", _SizeWeightedHead(model, ctx))
        return patches.undo


class ClassKeys(nn.Module):
    """The attention product of a class-attention block, whose keys are the class token and
    then the patch stream as the last self-attention block left it: the stream's key bias
    (dead patches out; log-size under proportional attention) on the patches, none on the
    class token."""

    def __init__(self, ctx: TrimContext):
        super().__init__()
        object.__setattr__(self, "ctx", ctx)  # the model's, not a child of this module

    def forward(self, q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None):
        ctx = self.ctx
        state = ctx.call.states.get(STREAM) if ctx.enabled else None
        if state is not None and state.segments is not None:
            raise RuntimeError("trimkit: a class-attention block read the patches while they "
                               "were packed; call the model (or forward_features), which "
                               "unpacks them after the last self-attention block")
        # patches that did not come from this call's blocks (a state of another length) are
        # read as they are, like the model's own
        if state is not None and state.keep.shape[1] + 1 == k.shape[-2]:
            bias = attention_bias(state, q.dtype, STREAM in ctx.proportional)
            if bias is not None:
                bias = F.pad(bias, (1, 0))  # the class token: no bias
                attn_mask = bias if attn_mask is None else attn_mask + bias
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask,
                                              dropout_p=dropout_p, is_causal=is_causal,
                                              scale=scale)


class _SizeWeightedHead(MethodPatch):
    """``model.forward_head`` whose average pool over the patches is weighted by size over
    the live ones (the class token, first, is left out as the model does)."""

    def __init__(self, model: nn.Module, ctx: TrimContext):
        super().__init__(model, "forward_head")
        self.ctx = ctx

    def __call__(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        m = self.owner
        if m.global_pool == "avg" and self.ctx.enabled:
            mean = size_weighted_mean(self.ctx.states.get(STREAM), x[:, 1:])
            if mean is not None:
                mean = m.head_drop(mean)
                return mean if pre_logits else m.head(mean)
        return self.original(x, pre_logits)
