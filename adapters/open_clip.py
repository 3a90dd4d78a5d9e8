"""open_clip's CLIP family: `CLIP`, `CustomTextCLIP`, and their `VisionTransformer` and
`TextTransformer` towers on their own.

Streams: ``"image"`` (the ViT tower's blocks; CLS first and protected) and ``"text"`` (open_clip's
own text transformer, causal or not; absent where the text tower is a Hugging Face model).
Blocks go in through the engine's fx pass, their ``nn.MultiheadAttention`` (or open_clip's
own `Attention`, image tower only) through the site's core.

The text pooler reads one token at a position computed from the token ids (the EOT token:
``argmax`` of the ids, or the first ``eos`` id; or the first / last token), which no block
sees. So the text stream enters where the ids come in (``CLIP.encode_text``,
``TextTransformer.forward``; a `trimkit.hooks.Entry`): that token is protected and, under a
causal mask, the tokens after it count as padding (they cannot reach it, so they are
dropped at once). The stream is ``positional``: the causal mask is read at each token's
entry position, a merged token at its latest member's. The text transformer's output goes
back to the entry positions (`trimkit.hooks.Restore`), so the model's own pooling reads the
protected token where the ids say it is, and token outputs keep their length. Average
pooling of the image tower becomes size-weighted over live tokens; ``forward_intermediates``
runs untrimmed.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from functools import partial
from typing import Any

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
from trimkit.api import UnsupportedConfigError, trimming_disabled
from trimkit.hooks import ArgumentReader, Entry, MethodPatch, Patches, Restore, Tower, Undo
from trimkit.ops import size_weighted_mean
from trimkit.sites import Site, TrimContext
from trimkit.tools.bench import register_builder

IMAGE, TEXT = "image", "text"


def _types() -> dict[str, type] | None:
    """open_clip's classes, or ``None`` while open_clip was never imported (then no model
    can be one of them, and importing it here would only slow every trimkit import)."""
    if "open_clip" not in sys.modules:
        return None
    from open_clip.model import CLIP, CustomTextCLIP
    from open_clip.transformer import (
        CustomResidualAttentionBlock,
        ResidualAttentionBlock,
        TextTransformer,
        VisionTransformer,
    )
    return dict(CLIP=CLIP, CustomTextCLIP=CustomTextCLIP, VisionTransformer=VisionTransformer,
                TextTransformer=TextTransformer, ResidualAttentionBlock=ResidualAttentionBlock,
                CustomResidualAttentionBlock=CustomResidualAttentionBlock)


def _towers(model: nn.Module, t: dict[str, type]) -> list[Tower]:
    """The model's open_clip ViT and text towers (others are not this adapter's): the
    module that owns each one's `Transformer`, and for text the method receiving the ids."""
    towers = []
    visual = model if isinstance(model, t["VisionTransformer"]) else getattr(model, "visual", None)
    if isinstance(visual, t["VisionTransformer"]):
        towers.append(_tower(IMAGE, visual, "" if visual is model else "visual"))
    if isinstance(model, t["CLIP"]):  # its text tower's parts live on the model itself
        towers.append(_tower(TEXT, model, "", "encode_text"))
    else:
        text = model if isinstance(model, t["TextTransformer"]) else getattr(model, "text", None)
        if isinstance(text, t["TextTransformer"]):
            towers.append(_tower(TEXT, text, "" if text is model else "text"))
    return towers


def _tower(stream: str, owner: nn.Module, path: str, method: str = "forward") -> Tower:
    return Tower(stream, owner, owner.transformer.resblocks, method=method, path=path,
                 name=f"{stream} tower ({type(owner).__name__})")


def _unsupported(tower: Tower, why: str) -> UnsupportedConfigError:
    return UnsupportedConfigError(tower.refusal("open_clip", why))


def _check(tower: Tower, t: dict[str, type]) -> None:
    """Raise `UnsupportedConfigError` for configurations the adapter does not handle."""
    owner, tr = tower.module, tower.module.transformer
    if not getattr(tr, "batch_first", True):
        raise _unsupported(tower, "its transformer is not batch_first")
    if getattr(tr, "grad_checkpointing", False):
        raise _unsupported(tower, "gradient checkpointing re-runs blocks in the backward pass, "
                                  "which would trim twice; turn it off before apply")
    for i, blk in enumerate(tr.resblocks):
        if isinstance(blk, t["CustomResidualAttentionBlock"]):
            if tower.stream == TEXT:
                raise _unsupported(tower, "custom attention blocks (block_type='custom', qk_norm, "
                                          "scaled cosine attention…) branch on the attention "
                                          "mask's shape, which torch.fx cannot trace")
            if getattr(blk.attn, "logit_scale", None) is not None:
                raise _unsupported(tower, "scaled cosine attention is not one attention product "
                                          "that the engine can route")
        elif not isinstance(blk, t["ResidualAttentionBlock"]):
            raise _unsupported(tower, f"block {i} is a {type(blk).__name__}")
        elif hasattr(blk, "ln_1_kv"):
            raise _unsupported(tower, f"block {i} is a cross-attention block")
    if tower.stream == IMAGE:
        if owner.attn_pool is not None:
            raise _unsupported(tower, "attentional pooling (attentional_pool) is not supported")
        if owner.pool_type not in ("tok", "avg"):
            raise _unsupported(tower, f"pool_type={owner.pool_type!r} returns every token, "
                                      f"whose count trimming changes; use 'tok' or 'avg'")
    else:
        if getattr(owner, "cls_emb", None) is not None:
            raise _unsupported(tower, "an appended CLS token (embed_cls, CoCa-style) is not "
                                      "supported")
        if _text_settings(owner)["pool"] not in ("argmax", "eos", "first", "last"):
            raise _unsupported(tower, "text pool_type='none' returns every token; use "
                                      "'argmax', 'eos', 'first' or 'last'")
        try:
            ArgumentReader(getattr(owner, tower.method), ("text",), True)
        except TypeError:
            raise _unsupported(tower, f"its {tower.method} method takes no `text` "
                                      f"argument to read the token ids from") from None


def _head_layout(block: nn.Module, t: dict[str, type]) -> HeadLayout:
    """Where a block's attention keeps its heads, for static head pruning."""
    if isinstance(block, t["CustomResidualAttentionBlock"]):
        return HeadLayout(unsupported="open_clip's Attention module keeps q, k and v in one "
                                      "fused parameter, not a projection module")
    return HeadLayout(multihead="attn")


def _text_settings(owner: nn.Module) -> dict:
    """How ``owner`` (a CLIP or a TextTransformer) pools and masks its text, read per call."""
    if hasattr(owner, "text_pool_type"):  # CLIP
        return dict(pool=owner.text_pool_type, eos=getattr(owner, "text_eos_id", None),
                    causal=owner.attn_mask is not None, pad=None)
    pad = owner.pad_id if getattr(owner, "use_pad_mask", False) else None
    return dict(pool=owner.pool_type, eos=getattr(owner, "eos_id", None),
                causal=owner.attn_mask is not None, pad=pad)


def pooled_index(text: torch.Tensor, pool: str, eos_id: int | None = None) -> torch.Tensor:
    """B long: the position open_clip's text pooling reads (``text_global_pool``'s rule)."""
    b, n = text.shape
    if pool == "first":
        return torch.zeros(b, dtype=torch.long, device=text.device)
    if pool == "last":
        return torch.full((b,), n - 1, dtype=torch.long, device=text.device)
    if pool == "argmax":
        return text.argmax(dim=-1)
    if pool == "eos":
        return (text == eos_id).int().argmax(dim=-1)
    raise ValueError(f"no single pooled token for text pool_type={pool!r}")


def entry_masks(text: torch.Tensor, settings: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """``(real, protected)`` B×N masks of a text batch: the pooled token is protected; under a
    causal mask only tokens up to it can reach it, so the rest count as padding; with a
    padding mask, padding tokens (the pooled one excepted) do."""
    idx = pooled_index(text, settings["pool"], settings["eos"])[:, None]
    pos = torch.arange(text.shape[1], device=text.device)[None]
    protected = pos == idx
    if settings["causal"]:
        real = pos <= idx
    elif settings["pad"] is not None:
        real = (text != settings["pad"]) | protected
    else:
        real = torch.ones_like(protected)
    return real, protected


class _Untrimmed(MethodPatch):
    """A method run with trimming off (its per-layer outputs need every token in place)."""

    def __init__(self, owner: nn.Module, name: str, model: nn.Module):
        super().__init__(owner, name)
        self.model = model

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        with trimming_disabled(self.model):
            return self.original(*args, **kwargs)


class _SizeWeightedPool(MethodPatch):
    """``vit._global_pool`` whose average is weighted by size over live patch tokens."""

    def __init__(self, vit: nn.Module, ctx: TrimContext):
        super().__init__(vit, "_global_pool")
        self.ctx = ctx

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.owner.pool_type == "avg" and self.ctx.enabled:
            mean = size_weighted_mean(self.ctx.states.get(IMAGE), x, 1)
            if mean is not None:
                return mean, x[:, 1:]
        return self.original(x)


def _text_masks(owner: nn.Module, arguments: dict, module: nn.Module
                ) -> tuple[torch.Tensor, torch.Tensor]:
    return entry_masks(arguments["text"], _text_settings(owner))


def text_entry(ctx: TrimContext, owner: nn.Module, fn: Callable) -> Entry:
    """The text stream's entry at calls of ``fn`` (a bound method receiving the token ids as
    ``text``), for ``owner`` (a CLIP or a TextTransformer). The ids are read at the position
    of ``text`` found once here (`ArgumentReader`), which `torch.compile` traces."""
    return Entry(ctx, TEXT, ArgumentReader(fn, ("text",), required=True),
                 partial(_text_masks, owner))


@register_adapter
class OpenClipAdapter(Adapter):
    """open_clip ViT and text towers, alone or in `CLIP` / `CustomTextCLIP` (see the module
    docstring for how the text pooler's token is kept and found)."""

    name = "open_clip"

    def detect(self, model: nn.Module) -> bool:
        t = _types()
        return t is not None and isinstance(model, (t["CLIP"], t["CustomTextCLIP"],
                                                    t["VisionTransformer"], t["TextTransformer"]))

    def describe(self, model: nn.Module) -> ModelDescription:
        t = _types()
        towers = _towers(model, t)
        if not towers:
            raise UnsupportedConfigError(
                f"trimkit's open_clip adapter found no open_clip VisionTransformer or "
                f"TextTransformer tower in this {type(model).__name__} (timm, ResNet and "
                f"Hugging Face towers are not trimmed by it). Nothing was changed.")
        streams = {}
        for tower in towers:
            _check(tower, t)
            owner = tower.module
            prefix = f"{tower.path}." if tower.path else ""
            # head counts are read from the modules: static head pruning changes them
            layers = tuple(
                LayerDesc(block=f"{prefix}transformer.resblocks.{i}", attention="attn",
                          num_heads=blk.attn.num_heads, dim=owner.transformer.width,
                          mlp_dim=blk.mlp.c_fc.out_features, head_dim=blk.attn.head_dim,
                          heads=_head_layout(blk, t))
                for i, blk in enumerate(tower.layers))
            if tower.stream == IMAGE:
                n = owner.grid_size[0] * owner.grid_size[1] + 1
                streams[IMAGE] = StreamDesc(IMAGE, layers, num_tokens=n, num_protected=1,
                                            grid=tuple(owner.grid_size))
            else:
                s = _text_settings(owner)
                streams[TEXT] = StreamDesc(TEXT, layers, num_tokens=None, num_protected=0,
                                           padded=s["causal"] or s["pad"] is not None,
                                           positional=True)
        return ModelDescription("open_clip", streams)

    def install(self, model: nn.Module, desc: ModelDescription, sites: dict[tuple[str, int], Site],
                ctx: TrimContext) -> list[Undo]:
        """The fx sites, then the per-instance patches: text entry masks and restored
        positions, size-weighted average pooling, untrimmed ``forward_intermediates``."""
        with Patches() as patches:
            patches.add(*super().install(model, desc, sites, ctx))
            towers = _towers(model, _types())
            # per-layer outputs need every token in place: these run untrimmed
            for module in [model] + [t.module for t in towers if t.module is not model]:
                if hasattr(module, "forward_intermediates"):
                    patches.set(module, "forward_intermediates",
                                _Untrimmed(module, "forward_intermediates", model))
            for tower in towers:
                owner = tower.module
                if tower.stream == IMAGE:
                    patches.set(owner, "_global_pool", _SizeWeightedPool(owner, ctx))
                    continue
                entry = text_entry(ctx, owner, getattr(owner, tower.method))
                entry.install(patches, owner, tower.method)
                patches.hook(owner.transformer, Restore(ctx, TEXT))
        return patches.undo


def bench_model(name: str, tower: str = "both", text_len: int = 16,
                **kwargs) -> tuple[nn.Module, Callable[[int], tuple]]:
    """``trimkit bench --model open_clip:<name>[?kwargs]``: ``open_clip.create_model(name)``
    with random weights (nothing is downloaded) in eval mode; other keywords go to
    ``create_model`` (``force_image_size``, the resize hook, sets the square input side).
    ``tower`` picks what the forward runs: ``both`` (random images and
    token ids), ``vision`` or ``text``. Token ids are shaped like the CLIP tokenizer's: a
    start token, ``text_len`` random tokens, the end token, zero padding to the context
    length."""
    import open_clip

    if tower not in ("both", "vision", "text"):
        raise ValueError(f"tower must be 'both', 'vision' or 'text', got {tower!r}")
    size = kwargs.get("force_image_size")
    if size is not None and isinstance(kwargs.get("vision_cfg"), dict):  # it would win
        kwargs["vision_cfg"] = {**kwargs["vision_cfg"], "image_size": size}
    torch.manual_seed(0)
    model = open_clip.create_model(name, pretrained=None, **kwargs).eval()
    size = getattr(model.visual, "image_size", 224)
    h, w = (size, size) if isinstance(size, int) else tuple(size)
    n, vocab = model.context_length, model.vocab_size
    if not 1 <= text_len <= n - 2:
        raise ValueError(f"text_len must be in [1, {n - 2}] for context length {n}")
    text = getattr(model, "text", model)
    pool = getattr(text, "pool_type", getattr(text, "text_pool_type", "argmax"))
    eot = getattr(text, "eos_id", getattr(text, "text_eos_id", None))
    eot = eot if pool == "eos" and eot is not None else vocab - 1

    def make_inputs(batch_size: int) -> tuple:
        g = torch.Generator().manual_seed(0)
        images = torch.randn(batch_size, 3, h, w, generator=g)
        ids = torch.zeros(batch_size, n, dtype=torch.long)
        ids[:, 0] = vocab - 2
        ids[:, 1:text_len + 1] = torch.randint(1, vocab - 2, (batch_size, text_len), generator=g)
        ids[:, text_len + 1] = eot
        return {"both": (images, ids), "vision": (images,), "text": (None, ids)}[tower]

    return model, make_inputs


register_builder("open_clip", bench_model, resize="force_image_size", examples=[
    "--model open_clip:ViT-B-16 --recipe tome --r 8 --batch-size 1 16",
    '--model "open_clip:ViT-B-16?tower=text" --recipe attn_prune --stream text '
    "--keep-ratio 0.5 --layers 2,6",
])
