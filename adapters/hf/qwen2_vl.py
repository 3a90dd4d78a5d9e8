"""Qwen2-VL and Qwen2.5-VL of Hugging Face transformers (v5): ``Qwen2VLForConditionalGeneration``
/ ``Qwen2VLModel`` and their Qwen2.5-VL twins. A vision tower that runs every image of a
call as one packed sequence (2-D rotary positions per patch, a 2×2 patch merger at the end)
and a Qwen2-style language model with multimodal rotary positions (M-RoPE): each token has
a (temporal, height, width) position, ``position_ids`` of shape 3×B×N that the model
computes from ``input_ids`` and ``image_grid_thw`` (`get_rope_index`), with per-sample
``rope_deltas`` kept for decoding.

Two streams:

- ``"language"``: the decoder layers of the language model (`trimkit.adapters.hf.decoder`):
  FastV (``trimkit.apply(model, "fastv")``, or ``attn_prune`` with ``stream="language"``)
  drops visual tokens after a layer, from the later layers and their KV cache. The tokens
  it may drop are the image and video placeholders of ``input_ids`` (or, with
  ``inputs_embeds``, the positions holding their embeddings); the text is protected.
  Positions follow the tokens: the language model turns its 3×B×N position ids into one
  B×N×d cos/sin table per call (the three sections interleaved per frequency), and the
  decoder stream gathers the rows of that table, so each kept token keeps its own 3-D
  position. Decoding positions are the model's own: they come from the length of layer 0's
  cache, which keeps every prompt token, and the ``rope_deltas`` the prefill stored, which
  trimming does not touch.
- ``"image"``: the vision tower's blocks, described so that `trimkit.describe` shows them
  and recipes aimed at them get a clear refusal: trimkit does not trim this tower. Its
  blocks run all images of a call as one sequence cut by ``cu_seqlens`` (Qwen2.5-VL: also
  in windows of a permuted order), and its merger concatenates each run of 4 consecutive
  patches (a 2×2 square) into one language-model token, whose count must equal the
  prompt's placeholders and whose grid gives the M-RoPE positions; a dropped or merged
  patch leaves no 2×2 square to merge. `apply` refuses any op there before changing
  anything.

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
from trimkit.hooks import ArgumentReader, Patches, Undo
from trimkit.sites import Site, TrimContext

from . import adapter as hf
from .attention import route_attention
from .decoder import DecoderStream, install_decoder
from .llava import _check_language, _path

__all__ = ["IMAGE", "LANGUAGE", "Qwen2VLAdapter", "language_model", "vision_tower"]

IMAGE, LANGUAGE = "image", "language"
#: the model classes (one per family) whose instances this adapter takes
_CLASSES = (("transformers.models.qwen2_vl.modeling_qwen2_vl", "Qwen2VLModel"),
            ("transformers.models.qwen2_5_vl.modeling_qwen2_5_vl", "Qwen2_5_VLModel"))
#: what works on these models, for the refusals
_WORKS = ("fastv, or attn_prune with stream='language' (both drop visual tokens inside the "
          "language model, from its later layers and KV cache)")


def _inner(model: nn.Module) -> nn.Module | None:
    """The ``Qwen2VLModel`` (or ``Qwen2_5_VLModel``) of ``model`` (itself, or its
    ``.model``), if it is one. Only families transformers has already imported are looked
    at: a model of a family not imported cannot exist."""
    classes = tuple(getattr(sys.modules[mod], name) for mod, name in _CLASSES
                    if mod in sys.modules)
    if not classes:
        return None
    if isinstance(model, classes):
        return model
    inner = getattr(model, "model", None)
    return inner if isinstance(inner, classes) else None


def _is_qwen2_vl(model: nn.Module) -> bool:
    if "transformers" not in sys.modules:
        return False
    from transformers import PreTrainedModel

    return isinstance(model, PreTrainedModel) and _inner(model) is not None


def vision_tower(model: nn.Module) -> nn.Module:
    """The vision tower (``.visual``) of a Qwen2-VL model."""
    return _inner(model).visual


def language_model(model: nn.Module) -> nn.Module:
    """The language model (the decoder stack, without its head) of a Qwen2-VL model."""
    return _inner(model).language_model


def _refusal(what: str) -> str:
    return (f"trimkit does not trim Qwen2-VL's vision tower ({what}): its blocks run every "
            f"image of a call as one packed sequence, and its merger turns each run of 4 "
            f"consecutive patches (a 2×2 square) into one language-model token, whose count "
            f"must match the prompt's image placeholders and whose grid gives their "
            f"multimodal rotary positions, so a dropped or merged patch would break both. "
            f"On Qwen2-VL use {_WORKS}. Nothing was changed.")


class Placeholders:
    """Pre-hook (with kwargs) on the ``Qwen2VLModel``: the language model's next call may drop
    the image and video placeholders of this call's ids (or embeddings)."""

    def __init__(self, stream: DecoderStream, forward: Any, token_ids: tuple[int, ...]):
        self.stream, self.token_ids = stream, token_ids
        self.read = ArgumentReader(forward, ("input_ids", "inputs_embeds"))

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        found = self.read(args, kwargs)
        ids, embeds = found.get("input_ids"), found.get("inputs_embeds")
        mask = None
        if ids is not None:
            mask = torch.isin(ids, torch.tensor(self.token_ids, device=ids.device))
        elif embeds is not None:
            tokens = torch.tensor(self.token_ids, device=embeds.device)
            table = module.get_input_embeddings()(tokens)  # V×D
            mask = (embeds[..., None, :] == table).all(-1).any(-1)
        self.stream.set_candidates(mask)


class VisionEntry:
    """Pre-hook (with kwargs) on the vision tower: publishes the ``"image"`` stream's entry
    state (one row per image or video, its patches, padded to the longest) for
    `trimkit.last_states`; the tower itself runs untouched."""

    def __init__(self, ctx: TrimContext, forward: Any):
        self.ctx = ctx
        self.read = ArgumentReader(forward, ("hidden_states", "grid_thw"))

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        found = self.read(args, kwargs)
        pixels, grid = found.get("hidden_states"), found.get("grid_thw")
        if not self.ctx.enabled or pixels is None or grid is None:
            return
        counts = grid.prod(-1).tolist()
        rows = pixels.reshape(sum(counts), -1).split(counts)
        x = nn.utils.rnn.pad_sequence(list(rows), batch_first=True)
        real = torch.arange(x.shape[1], device=x.device) < grid.prod(-1)[:, None].to(x.device)
        self.ctx.start(IMAGE, x, real)


def _image_stream(model: nn.Module, visual: nn.Module) -> StreamDesc:
    path = _path(model, visual)
    descs = tuple(LayerDesc(block=f"{path}.blocks.{i}", attention="attn",
                            num_heads=blk.attn.num_heads, dim=blk.attn.dim,
                            head_dim=blk.attn.head_dim)
                  for i, blk in enumerate(visual.blocks))
    return StreamDesc(IMAGE, descs, num_protected=0, padded=True)


def _language_stream(model: nn.Module, lm: nn.Module) -> StreamDesc:
    config, path = lm.config, _path(model, lm)
    why = hf.checkpointing(lm.layers)
    if why:
        raise UnsupportedConfigError(f"trimkit's Qwen2-VL adapter cannot trim the language "
                                     f"model: {why}. Nothing was changed.")
    descs = tuple(LayerDesc(block=f"{path}.layers.{i}", attention="self_attn",
                            num_heads=config.num_attention_heads, dim=config.hidden_size,
                            mlp_dim=config.intermediate_size,
                            head_dim=layer.self_attn.head_dim)
                  for i, layer in enumerate(lm.layers))
    return StreamDesc(LANGUAGE, descs, num_protected=0, padded=True, positional=True)


@register_adapter
class Qwen2VLAdapter(Adapter):
    """Qwen2-VL and Qwen2.5-VL (``Qwen2VLForConditionalGeneration``, ``Qwen2VLModel``, and
    the ``Qwen2_5_VL`` ones): streams ``"language"`` (FastV) and ``"image"`` (described,
    refused)."""

    name = "qwen2-vl"

    def detect(self, model: nn.Module) -> bool:
        return _is_qwen2_vl(model)

    def describe(self, model: nn.Module) -> ModelDescription:
        inner = _inner(model)
        if inner is None:
            raise UnsupportedConfigError(f"trimkit's Qwen2-VL adapter takes a Qwen2VLModel, a "
                                         f"Qwen2_5_VLModel or their ForConditionalGeneration "
                                         f"models, got {type(model).__name__}")
        return ModelDescription("qwen2-vl", {
            IMAGE: _image_stream(model, inner.visual),
            LANGUAGE: _language_stream(model, inner.language_model)})

    def install(self, model: nn.Module, desc: ModelDescription,
                sites: dict[tuple[str, int], Site], ctx: TrimContext) -> list[Undo]:
        inner = _inner(model)
        visual, lm = inner.visual, inner.language_model
        for i in range(len(desc.streams[IMAGE].layers)):
            site = sites[(IMAGE, i)]
            ops = [type(op).__name__ for op in (*site.pre, *site.post)]
            if ops:
                raise UnsupportedConfigError(_refusal(f"the recipe puts {', '.join(ops)} on "
                                                      f"its block {i}"))
        text_sites = [sites[(LANGUAGE, i)] for i in range(len(desc.streams[LANGUAGE].layers))]
        if any(len(s.pre) or len(s.post) for s in text_sites):
            _check_language(lm)
        with Patches() as patches:
            try:
                stream, intercepts = install_decoder(patches, ctx, LANGUAGE, lm, lm.layers,
                                                     text_sites)
            except ValueError as e:
                raise ValueError(f"{e}. Nothing was changed.") from None
            if intercepts:  # only the language model runs through trimkit's attention
                patches.add(route_attention(lm, intercepts))
            config = inner.config
            patches.hook(inner, Placeholders(stream, inner.forward,
                                             (config.image_token_id, config.video_token_id)),
                         pre=True, kwargs=True)
            patches.hook(visual, VisionEntry(ctx, visual.forward), pre=True, kwargs=True)
        return patches.undo


hf.DEFERRED.append(_is_qwen2_vl)
