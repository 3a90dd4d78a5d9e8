"""LLaVA-style decoder VLMs of Hugging Face transformers (v5): ``LlavaForConditionalGeneration``
and ``LlavaModel``, a CLIP or SigLIP vision tower, a projector, and a Llama- or Qwen2-style
language model that reads the projected image features in place of its ``<image>`` tokens.

Two streams:

- ``"image"``: the vision tower, as the Hugging Face adapter trims it alone
  (`trimkit.adapters.hf.adapter.encoder_tower`). LLaVA reads the hidden states of its
  ``vision_feature_layer`` (-2 by default: the input of the last layer), which have the
  length that layer had; dropping the CLS is LLaVA's own ``"default"`` select strategy. So
  a recipe that reduces the tower's tokens changes how many image features each image
  gives, and the prompt must carry that many ``<image>`` tokens: `image_token_count` says
  how many (the count must be the same for every image: fixed-count recipes, not learned
  per-instance ones). A mismatch is a `ValueError` that says so.
- ``"language"``: the decoder layers of the language model (`trimkit.adapters.hf.decoder`):
  a token op after one of its layers drops image tokens in the prefill, from the later
  layers and their KV cache (FastV: ``trimkit.apply(model, "fastv")``). The tokens it may
  drop are the ``<image>`` positions of ``input_ids`` (or, with ``inputs_embeds``, the
  positions holding the image token's embedding); the text is protected.

Only ``"sdpa"`` and ``"eager"`` attention are supported where the language model drops
tokens, with transformers' ``DynamicCache`` (the default of ``generate``).
"""

from __future__ import annotations

import sys
from typing import Any

import torch
from torch import nn

from trimkit import LayerDesc, ModelDescription, StreamDesc, register_adapter
from trimkit.adapter import Adapter
from trimkit.api import UnsupportedConfigError
from trimkit.hooks import ArgumentReader, MethodPatch, Patches, Undo
from trimkit.sites import Site, TrimContext

from . import adapter as hf
from .attention import route_attention
from .decoder import DecoderStream, install_decoder

__all__ = ["LANGUAGE", "LlavaAdapter", "image_token_count", "language_model", "vision_tower"]

IMAGE, LANGUAGE = "image", "language"


def _llava(model: nn.Module) -> nn.Module | None:
    """The ``LlavaModel`` of ``model`` (itself, or its ``.model``), if it is one."""
    if "transformers" not in sys.modules:
        return None
    from transformers import LlavaModel

    if isinstance(model, LlavaModel):
        return model
    inner = getattr(model, "model", None)
    return inner if isinstance(inner, LlavaModel) else None


def _path(model: nn.Module, module: nn.Module) -> str:
    return next(name for name, m in model.named_modules() if m is module)


def vision_tower(model: nn.Module) -> nn.Module:
    """The vision tower of a LLaVA model."""
    return _llava(model).vision_tower


def language_model(model: nn.Module) -> nn.Module:
    """The language model (the decoder stack, without its head) of a LLaVA model."""
    return _llava(model).language_model


def image_token_count(model: nn.Module) -> int:
    """How many ``<image>`` tokens one image takes in the prompt of ``model`` as it runs now
    (trimmed or not): the features its vision tower and projector give for one image, found
    by running them once on a blank image. Build prompts with this many."""
    inner = _llava(model)
    if inner is None:
        raise TypeError(f"image_token_count takes a LLaVA model, got {type(model).__name__}")
    vision = inner.vision_tower
    cfg = vision.config
    size = cfg.image_size if isinstance(cfg.image_size, int) else cfg.image_size[0]
    param = next(vision.parameters())
    pixels = torch.zeros(1, cfg.num_channels, size, size, dtype=param.dtype, device=param.device)
    with torch.no_grad():
        out = inner.get_image_features(pixel_values=pixels, return_dict=True)
    return int(out.pooler_output[0].shape[0])


class Placeholders:
    """Pre-hook (with kwargs) on the ``LlavaModel``: the language model's next call may drop
    the ``<image>`` positions of this call's ids (or embeddings)."""

    def __init__(self, stream: DecoderStream, forward: Any, image_token_id: int):
        self.stream, self.image_token_id = stream, image_token_id
        self.read = ArgumentReader(forward, ("input_ids", "inputs_embeds"))

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        found = self.read(args, kwargs)
        ids, embeds = found.get("input_ids"), found.get("inputs_embeds")
        if ids is not None:
            mask = ids == self.image_token_id
        elif embeds is not None:
            token = torch.full((), self.image_token_id, dtype=torch.long, device=embeds.device)
            mask = (embeds == module.get_input_embeddings()(token)).all(-1)
        else:
            mask = None
        self.stream.set_candidates(mask)


class CheckedPlaceholders(MethodPatch):
    """``LlavaModel.get_placeholder_mask``, with a clear error where the prompt's
    ``<image>`` tokens do not match the image features (a trimmed vision tower gives fewer)."""

    def __call__(self, input_ids: Any, inputs_embeds: torch.Tensor,
                 image_features: torch.Tensor) -> Any:
        if input_ids is not None:
            tokens = int((input_ids == self.owner.config.image_token_id).sum())
            features = image_features.numel() // inputs_embeds.shape[-1]
            if tokens != features:
                raise ValueError(
                    f"the prompt has {tokens} <image> tokens but the (trimmed) vision tower "
                    f"gave {features} image features; a recipe that reduces the vision "
                    f"tower's tokens changes how many each image takes: build the prompt "
                    f"with trimkit.adapters.hf.llava.image_token_count(model) per image")
        return self.original(input_ids, inputs_embeds=inputs_embeds,
                             image_features=image_features)


def _image_stream(tower: Any) -> StreamDesc:
    kind = hf._KINDS[tower.name]
    layers = hf.describe_tower(tower)
    emb = tower.module.embeddings
    emb = getattr(emb, "patch_embeddings", emb)
    return StreamDesc(IMAGE, layers, num_tokens=emb.num_patches + kind.num_protected,
                      num_protected=kind.num_protected, grid=hf.patch_grid(emb))


def _language_stream(model: nn.Module, lm: nn.Module) -> StreamDesc:
    config, path = lm.config, _path(model, lm)
    layers = getattr(lm, "layers", None)
    if not isinstance(layers, nn.ModuleList) or not all(
            hasattr(layer, "self_attn") for layer in layers):
        raise UnsupportedConfigError(f"trimkit's LLaVA adapter expects a language model with "
                                     f"decoder layers at .layers, each with a .self_attn "
                                     f"(Llama, Qwen2); this {type(lm).__name__} has not. "
                                     f"Nothing was changed.")
    why = hf.checkpointing(layers)
    if why:
        raise UnsupportedConfigError(f"trimkit's LLaVA adapter cannot trim the language "
                                     f"model: {why}. Nothing was changed.")
    descs = tuple(LayerDesc(block=f"{path}.layers.{i}", attention="self_attn",
                            num_heads=config.num_attention_heads, dim=config.hidden_size,
                            mlp_dim=config.intermediate_size,
                            head_dim=layer.self_attn.head_dim)
                  for i, layer in enumerate(layers))
    return StreamDesc(LANGUAGE, descs, num_protected=0, padded=True, positional=True)


def _check_language(lm: nn.Module) -> None:
    """Refuse what the decoder stream cannot drop tokens from (before any change)."""
    config = lm.config
    types = set(getattr(config, "layer_types", None) or ())
    if getattr(config, "use_sliding_window", False) or types - {"full_attention"}:
        raise UnsupportedConfigError("trimkit drops tokens from the language model's layers "
                                     "and KV cache only where every layer attends fully; "
                                     "this one has sliding-window layers. Nothing was "
                                     "changed.")
    from .attention import original_implementation

    name = original_implementation(config)
    if name not in ("sdpa", "eager"):
        raise UnsupportedConfigError(f"trimkit drops the language model's tokens with "
                                     f"'sdpa' or 'eager' attention, not {name!r}: call "
                                     f"model.set_attn_implementation('sdpa') first. Nothing "
                                     f"was changed.")


def _is_llava(model: nn.Module) -> bool:
    if "transformers" not in sys.modules:
        return False
    from transformers import PreTrainedModel

    return isinstance(model, PreTrainedModel) and _llava(model) is not None


@register_adapter
class LlavaAdapter(Adapter):
    """LLaVA (``LlavaForConditionalGeneration``, ``LlavaModel``) with a CLIP or SigLIP vision
    tower and a Llama- or Qwen2-style language model: streams ``"image"`` and
    ``"language"``."""

    name = "llava"

    def detect(self, model: nn.Module) -> bool:
        return _is_llava(model)

    def describe(self, model: nn.Module) -> ModelDescription:
        inner = _llava(model)
        if inner is None:
            raise UnsupportedConfigError(f"trimkit's LLaVA adapter takes a LlavaModel or a "
                                         f"LlavaForConditionalGeneration, got "
                                         f"{type(model).__name__}")
        vision = inner.vision_tower
        if not any(c.__name__ in hf._KINDS for c in type(vision).__mro__):
            raise UnsupportedConfigError(f"trimkit's LLaVA adapter knows CLIP and SigLIP "
                                         f"vision towers, not {type(vision).__name__}. "
                                         f"Nothing was changed.")
        tower = hf.encoder_tower(vision, _path(model, vision))
        return ModelDescription("llava", {IMAGE: _image_stream(tower),
                                          LANGUAGE: _language_stream(model, inner.language_model)})

    def install(self, model: nn.Module, desc: ModelDescription,
                sites: dict[tuple[str, int], Site], ctx: TrimContext) -> list[Undo]:
        inner = _llava(model)
        vision, lm = inner.vision_tower, inner.language_model
        text_sites = [sites[(LANGUAGE, i)] for i in range(len(desc.streams[LANGUAGE].layers))]
        if any(len(s.pre) or len(s.post) for s in text_sites):
            _check_language(lm)
        ctx.track_source = True  # the tower's output goes back to its entry positions
        tower = hf.encoder_tower(vision, _path(model, vision))
        with Patches() as patches:
            hf.install_towers(patches, ctx, model, [
                (tower, [sites[(IMAGE, i)] for i in range(len(tower.layers))])])
            try:
                stream, intercepts = install_decoder(patches, ctx, LANGUAGE, lm, lm.layers,
                                                     text_sites)
            except ValueError as e:
                raise ValueError(f"{e}. Nothing was changed.") from None
            if intercepts:
                patches.add(route_attention(model, intercepts))
            patches.hook(inner, Placeholders(stream, inner.forward,
                                             inner.config.image_token_id),
                         pre=True, kwargs=True)
            patches.set(inner, "get_placeholder_mask",
                        CheckedPlaceholders(inner, "get_placeholder_mask"))
        return patches.undo


hf.DEFERRED.append(_is_llava)
