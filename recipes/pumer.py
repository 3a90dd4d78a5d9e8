"""PuMer (Cao et al., ACL 2023, arXiv 2305.17530): text-informed pruning and modality-aware
merging, in a few cross-modal layers.

In a two-stream model whose text layers cross-attend to the image (METER, BLIP), each
reducing fusion layer, after the text-to-image cross-attention and before the FFN:

1. prunes the image tokens the real text tokens attended least in that cross-attention
   (averaged over heads and text tokens): of N live unprotected image tokens it keeps
   ``N − round(prune_ratio · N)``, at least one;
2. merges ``round(image_merge_ratio · N)`` pairs of the surviving image tokens by bipartite
   soft matching on the keys that cross-attention read, and
   ``round(text_merge_ratio · T)`` pairs of the T live unprotected text tokens on the text
   layer's self-attention keys; both capped at half. ``round`` is Python's.

Padding is never live, so it never merges into real text; every stream's protected tokens
(CLS, the token a pooler reads) are never pruned or merged; merged tokens carry their size,
and ``proportional=True`` adds log(size) to the attention logits where they are keys (off by
default, as in the paper). The counts do not depend on the content, so a batch of same-shape
inputs stays dense.

Where the image reduction goes: at the image layer beside the reducing text layer (a
co-attention stack, where the text layer runs first), before its attention; or, when image
tokens have no layers there and only serve as the text's cross-attention keys
(`LayerDesc.keys_only`), just before the next text layer reads them (after the last text
layer nothing reads them, so the last layer reduces only the text).

Placement (``layers``, indices into the fusion stack: the text layers that cross-attend to the
image): by default 0, 1/6, 2/6 and 3/6 of its depth, rounded: METER's six co-attention blocks
0, 1, 2, 3 (the published placement, which the original code numbers 0, 2, 4, 6 because it
counts a block's text and image layers separately), and 0, 2, 4, 6 of BLIP's twelve text
layers.

A single-stream VLM (ViLT: one stack over the text, then the image; the stream's
``StreamDesc.prefix`` is the text) has no cross-attention: its text reads the image in the
shared self-attention, which is where PuMer's ViLT variant scores. A reducing layer, after its
attention and before its FFN, prunes the image tokens the real text tokens attended least
there (`ReduceByPrefixAttention`: their query rows only, the product stays fused), merges
within the image, then within the text (never the text CLS). Defaults from the reference code
for ViLT (csarron/PuMer, notes/cmd.md, VQAv2, SNLI-VE and NLVR2 alike): layers 2, 5 and 8 of
12 (2/12, 5/12, 8/12 of the depth), ``prune_ratio`` 0.1, ``image_merge_ratio`` 0.3,
``text_merge_ratio`` 0.2; ``layers`` indexes the stream's layers.

A model with neither (a ViT, a text encoder, CLIP's separate towers) gets the merging half:
every stream merges at the same relative depths of its own layers (the text stream at
``text_merge_ratio``, any other at ``image_merge_ratio``).

Training: none needed (fixed counts); ``trimkit.train`` fine-tunes with the reducers on,
plus ``lambda_kd`` · KL from the untrimmed model (``teacher="frozen"``: the weights as they
were when training began, as in the paper; ``"self"``: the model being trained, run with
trimming off, which saves the copy's memory).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

from trimkit import ModelDescription, Option, Recipe, SitePlan, register_recipe
from trimkit.describe import StreamDesc
from trimkit.recipe import LAYERS
from trimkit.trimmers import MergeTokens, ReduceByCrossAttention, ReduceByPrefixAttention

#: the default reducing depths, as fractions of the stack
DEPTHS = (0, 1 / 6, 2 / 6, 3 / 6)
#: prune_ratio and image_merge_ratio where text guides the image and the options are left at
#: None (METER's published VQAv2 settings), and elsewhere (merging only)
PRUNE_RATIO = 0.2
MERGE_RATIO = 0.2
#: a single-stream VLM (ViLT, the reference code's settings): reducing depths as fractions of
#: its layers (2, 5, 8 of 12), prune_ratio and image_merge_ratio
SINGLE_DEPTHS = (2 / 12, 5 / 12, 8 / 12)
SINGLE_PRUNE_RATIO = 0.1
SINGLE_MERGE_RATIO = 0.3
IMAGE, TEXT = "image", "text"


def default_layers(depth: int, depths: tuple[float, ...] = DEPTHS) -> list[int]:
    """Indices at ``depths`` (fractions) of a stack of ``depth`` layers (rounded, without
    repeats)."""
    return sorted({min(round(f * depth), depth - 1) for f in depths}) if depth else []


def single_stream(desc: ModelDescription) -> StreamDesc | None:
    """The stream of a single-stream VLM: the image, with the text as its prefix."""
    image = desc.streams.get(IMAGE)
    return image if image is not None and image.prefix == TEXT else None


def _chosen(spec: Any, depth: int, what: str) -> list[int]:
    layers = default_layers(depth) if spec is None else spec
    if isinstance(layers, int):
        layers = [layers]
    if isinstance(layers, dict):  # a dict per stream is for models without a fusion stack
        raise ValueError(f"layers must be indices in [0, {depth}) of {what} (a list, not a "
                         f"dict per stream), got {spec!r}")
    bad = [i for i in layers if not 0 <= i < depth]
    if bad:
        raise ValueError(f"layers must be indices in [0, {depth}) of {what}, got {spec!r}")
    return sorted(set(layers))


def fusion_stack(desc: ModelDescription) -> list[tuple[int, int]]:
    """``(text layer index, pair)`` of the text layers that cross-attend to the image, in
    order: where PuMer reduces both streams. Empty when the model has no such layers."""
    text = desc.streams.get(TEXT)
    if text is None or IMAGE not in desc.streams:
        return []
    return [(i, layer.pair if layer.pair is not None else i)
            for i, layer in enumerate(text.layers)
            if layer.cross_stream == IMAGE and layer.cross_attention and not layer.keys_only]


def _image_layer(image: StreamDesc, pair: int) -> tuple[int, bool] | None:
    """The image layer paired with a text layer (``(index, keys_only)``), if any."""
    for i, layer in enumerate(image.layers):
        if layer.cross_stream == TEXT and layer.pair == pair:
            return i, layer.keys_only
    return None


@register_recipe
class PuMer(Recipe):
    name = "pumer"
    summary = ("Text-informed image pruning and modality-aware merging in a few fusion layers "
               "(training-free, or fine-tuned with KL from the untrimmed model; PuMer).")
    options = {
        "prune_ratio": Option(None, f"fraction of the image tokens pruned at each reducing "
                                    f"layer, by the attention text pays them (default "
                                    f"{PRUNE_RATIO} where text cross-attends to the image, "
                                    f"{SINGLE_PRUNE_RATIO} where it reads it in a shared "
                                    f"stream (ViLT); a model without either has nothing to "
                                    f"guide pruning)", kind=float, low=0, high=1),
        "image_merge_ratio": Option(None, f"fraction of the image tokens merged away at each "
                                          f"reducing layer, capped at half (default "
                                          f"{MERGE_RATIO}; {SINGLE_MERGE_RATIO} in a shared "
                                          f"stream, ViLT)", kind=float, low=0, high=1),
        "text_merge_ratio": Option(0.2, "fraction of the real text tokens merged away at each "
                                        "reducing layer (capped at half)", kind=float, low=0,
                                   high=1),
        "layers": Option(None, "reducing layers, as indices into the fusion stack (default: "
                               "0, 1/6, 2/6, 3/6 of its depth; METER 0-3), into a shared "
                               "stream's layers (ViLT: 2, 5, 8 of 12), or, on a model "
                               "without either, into each stream's layers (a list, or a dict "
                               "stream -> list)", kind=LAYERS),
        "proportional": Option(False, "add log(size) to attention logits where merged tokens "
                                      "are keys", kind=bool),
        "lambda_kd": Option(1.0, "trimkit.train: weight of the KL from the untrimmed model",
                            kind=float, low=0),
        "temperature": Option(1.0, "trimkit.train: temperature of that KL", kind=float, low=0,
                              low_open=True),
        "teacher": Option("frozen", "trimkit.train: 'frozen' (the weights when training "
                                    "began) or 'self' (the model being trained, trimming "
                                    "off)", choices=("frozen", "self")),
    }

    def plan(self, desc: ModelDescription, options: dict) -> dict:
        m_img, m_txt = options["image_merge_ratio"], options["text_merge_ratio"]
        prop = bool(options["proportional"])
        stack = fusion_stack(desc)
        prune = options["prune_ratio"]
        shared = single_stream(desc) if not stack else None
        if shared is not None:
            return self._single_stream(shared, options["layers"], prune, m_img, m_txt, prop)
        m_img = MERGE_RATIO if m_img is None else m_img
        if not stack:
            if prune:
                raise ValueError(
                    f"prune_ratio needs text that cross-attends to the image, or reads it in "
                    f"a shared stream whose prefix is the text (ViLT), which this "
                    f"{desc.family} model has not (streams {sorted(desc.streams)}); PuMer "
                    f"merges only here: leave prune_ratio at None or 0")
            return self._merge_only(desc, options["layers"], m_img, m_txt, prop)
        p = PRUNE_RATIO if prune is None else prune
        image = desc.streams[IMAGE]
        plans: dict[tuple[str, int], SitePlan] = {}

        def add(key: tuple[str, int], pre: list, post: list) -> None:
            plan = plans.setdefault(key, SitePlan(proportional=prop))
            plan.pre += pre
            plan.post += post

        for k in _chosen(options["layers"], len(stack), "the fusion stack"):
            t_idx, pair = stack[k]
            if m_txt > 0:  # after the cross-attention, before the FFN
                add((TEXT, t_idx), [], [MergeTokens(ratio=m_txt, order="original")])
            found = _image_layer(image, pair)
            if found is None:
                raise ValueError(f"the text layer {t_idx} reads the image, but no image layer "
                                 f"is paired with it (pair {pair}): the adapter's description "
                                 f"does not say where the image tokens are there")
            target, keys_only = found
            if keys_only:  # reduce where the next text layer reads them, if one does
                nxt = _image_layer(image, stack[k + 1][1]) if k + 1 < len(stack) else None
                if nxt is None:
                    continue
                target = nxt[0]
            if p > 0 or m_img > 0:
                add((IMAGE, target), [ReduceByCrossAttention(p, m_img, pair)], [])
        return plans

    @staticmethod
    def _single_stream(stream: StreamDesc, spec: Any, prune: float | None,
                       m_img: float | None, m_txt: float, prop: bool) -> dict:
        """A reducer after the attention of each chosen layer of a shared stream."""
        if isinstance(spec, dict):  # {stream: layers}: the option checked the names
            spec = spec.get(stream.name, [])
        own = stream.attention_layers()
        layers = ([own[j] for j in default_layers(len(own), SINGLE_DEPTHS)] if spec is None
                  else _chosen(spec, len(stream.layers), f"stream {stream.name!r}'s layers"))
        p = SINGLE_PRUNE_RATIO if prune is None else prune
        m = SINGLE_MERGE_RATIO if m_img is None else m_img
        if not (p > 0 or m > 0 or m_txt > 0):
            return {}
        op = ReduceByPrefixAttention
        return {(stream.name, i): SitePlan(post=[op(p, m, m_txt)], proportional=prop)
                for i in layers}

    @staticmethod
    def _merge_only(desc: ModelDescription, spec: Any, m_img: float, m_txt: float,
                    prop: bool) -> dict:
        plans = {}
        for stream in desc.streams.values():
            ratio = m_txt if stream.name == TEXT else m_img
            own = stream.attention_layers()
            if isinstance(spec, dict) and stream.name not in spec:
                continue
            layers_spec = spec.get(stream.name) if isinstance(spec, dict) else spec
            if ratio <= 0 or not own:
                continue
            if layers_spec is None:
                layers = [own[j] for j in default_layers(len(own))]
            else:
                layers = _chosen(layers_spec, len(stream.layers),
                                 f"stream {stream.name!r}'s layers")
            for i in layers:
                if i not in own:  # merging matches on the layer's own self-attention keys
                    raise ValueError(f"layer {i} of stream {stream.name!r} has no attention "
                                     f"of its own to match tokens with; layers that attend: "
                                     f"{own}")
                # PuMer's own matching: over the mergeable tokens, tokens keep their slots
                merge = MergeTokens(ratio=ratio, order="original")
                plans[(stream.name, i)] = SitePlan(post=[merge], proportional=prop)
        return plans

    def objective(self, model: nn.Module, loss_fn: Callable, forward: Callable | None,
                  total_steps: int, options: dict) -> Any:
        """What `trimkit.train` runs: the task loss of the reduced model + ``lambda_kd`` ·
        KL from the untrimmed model (`trimkit.tools.objectives.SelfDistillationObjective` with
        no cost loss: the reducers' counts are fixed)."""
        from trimkit.tools.objectives import SelfDistillationObjective

        return SelfDistillationObjective(
            model, loss_fn, forward=forward, lambda_sd=options["lambda_kd"],
            temperature=options["temperature"], lambda_cost=0.0, teacher_loss=False,
            frozen_teacher=options["teacher"] == "frozen")
