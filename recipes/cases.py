"""The conformance cases of the recipes that ship with trimkit (`trimkit.testing.Case`):
how `trimkit.testing.check_adapter` draws options that trim for real, and the options
under which the same recipe trims nothing."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from trimkit.describe import ModelDescription
from trimkit.heads import KINDS, head_key_name, prunable_heads
from trimkit.testing import (
    Case,
    Trial,
    head_count,
    layer_subsets,
    register_case,
    require_hypothesis,
)


def _attending(desc: ModelDescription) -> list[str]:
    return [n for n, s in desc.streams.items() if s.attention_layers()]


def _need_attention(recipe: str) -> Callable[[ModelDescription, Mapping[str, int]], str | None]:
    def fits(desc: ModelDescription, entry: Mapping[str, int]) -> str | None:
        if not _attending(desc):
            return f"{recipe} needs a stream with self-attention layers"
        return None
    return fits


def _tome_streams(desc: ModelDescription, entry: Mapping[str, int]) -> dict[str, int]:
    """Streams where one merge per self-attention layer is feasible: name -> those layers."""
    out = {}
    for name in _attending(desc):
        n = len(desc.streams[name].attention_layers())
        if entry.get(name, 0) >= 2 * n:
            out[name] = n
    return out


def _tome_fits(desc: ModelDescription, entry: Mapping[str, int]) -> str | None:
    if not _attending(desc):
        return "tome needs a stream with self-attention layers"
    if not _tome_streams(desc, entry):
        return ("tome: no stream brings 2 unprotected tokens per self-attention layer, which "
                "one merge per layer needs")
    return None


def _tome(desc: ModelDescription, entry: Mapping[str, int]) -> Any:
    """``r`` feasible in the chosen stream at every layer: at most E/(2L) merges per layer
    (constant schedule) or E/(4L) (the decreasing one starts at 2r), E the fewest
    unprotected entry tokens, L the stream's self-attention layers, so no layer clamps."""
    st = require_hypothesis().strategies
    streams = _tome_streams(desc, entry)

    @st.composite
    def trial(draw: Callable) -> Trial:
        name = draw(st.sampled_from(sorted(streams)))
        schedule = draw(st.sampled_from(["constant", "decreasing"]))
        most = entry[name] // ((2 if schedule == "constant" else 4) * streams[name])
        r = draw(st.integers(0, most))
        return dict(r=r, schedule=schedule, stream=name), dict(r=0, stream=name), True

    return trial()


def _attn_prune(desc: ModelDescription, entry: Mapping[str, int]) -> Any:
    st = require_hypothesis().strategies

    @st.composite
    def trial(draw: Callable) -> Trial:
        name = draw(st.sampled_from(_attending(desc)))
        options = dict(keep_ratio=draw(st.floats(0.05, 1.0)), fuse=draw(st.booleans()),
                       layers=draw(layer_subsets(desc, name)), stream=name)
        return options, dict(keep_ratio=1.0, stream=name), False

    return trial()


def _smarttrim(desc: ModelDescription, entry: Mapping[str, int]) -> Any:
    """Random (not stable) initialisation, so the learned trimmers drop for real; stable
    initialisation keeps everything, so it is the zero case. Token trimmers may sit at
    keys-only layers too (they trim the keys there)."""
    st = require_hypothesis().strategies
    names = [n for n, s in desc.streams.items() if s.layers]

    @st.composite
    def trial(draw: Callable) -> Trial:
        streams = draw(st.lists(st.sampled_from(names), min_size=1, unique=True).map(sorted))
        tokens, heads = draw(st.booleans()), draw(st.booleans())
        if not (tokens or heads):
            tokens = True
        layers = {s: draw(layer_subsets(desc, s, attention_only=False)) for s in streams}
        # no cost loss, so no target ratio that a random placement must be able to reach
        zero = dict(tokens=tokens, heads=heads, streams=streams, layers=layers, lambda_cost=0.0)
        budget = draw(st.sampled_from([None, 0.3, 0.75]))
        return dict(zero, stable_init=False, budget=budget), zero, False

    return trial()


def _text_reads_image(desc: ModelDescription) -> int:
    """How many layers of a ``"text"`` stream cross-attend to an ``"image"`` stream with an
    attention of their own: PuMer's fusion stack, where text guides image pruning."""
    text = desc.streams.get("text")
    if text is None or "image" not in desc.streams:
        return 0
    return sum(1 for layer in text.layers if layer.cross_stream == "image"
               and layer.cross_attention and not layer.keys_only)


def _shared_stream(desc: ModelDescription) -> bool:
    """Whether the model is a single-stream VLM: an ``"image"`` stream whose prefix is the
    text (ViLT), where text guides image pruning inside the shared self-attention."""
    image = desc.streams.get("image")
    return image is not None and image.prefix == "text"


def _pumer(desc: ModelDescription, entry: Mapping[str, int]) -> Any:
    """With a fusion stack (or a shared stream whose prefix is the text): prune and merge
    ratios at a subset of its layers; without one, the merging half in every stream at a
    subset of its self-attention layers."""
    st = require_hypothesis().strategies
    stack = _text_reads_image(desc)
    shared = not stack and _shared_stream(desc)

    @st.composite
    def trial(draw: Callable) -> Trial:
        options: dict[str, Any] = dict(image_merge_ratio=draw(st.floats(0.0, 0.5)),
                                       text_merge_ratio=draw(st.floats(0.0, 0.5)),
                                       proportional=draw(st.booleans()))
        zero: dict[str, Any] = dict(image_merge_ratio=0.0, text_merge_ratio=0.0)
        prune = 0.0
        if stack:
            prune = draw(st.floats(0.0, 0.9))
            layers = st.lists(st.integers(0, stack - 1), min_size=1, max_size=min(3, stack),
                              unique=True).map(sorted)
            options.update(prune_ratio=prune, layers=draw(layers))
            zero["prune_ratio"] = 0.0
        elif shared:
            prune = draw(st.floats(0.0, 0.9))
            options.update(prune_ratio=prune, layers=draw(layer_subsets(desc, "image")))
            zero["prune_ratio"] = 0.0
        else:
            options["layers"] = {s: draw(layer_subsets(desc, s)) for s in _attending(desc)}
        return options, zero, prune == 0

    return trial()


def _prune_heads_fits(desc: ModelDescription, entry: Mapping[str, int]) -> str | None:
    if prunable_heads(desc):
        return None
    why = [f"{head_key_name((s.name, i, kind))}: {layout.unsupported or layout.unprunable}"
           for s in desc.streams.values() for i, layer in enumerate(s.layers)
           for kind, layout in zip(KINDS, (layer.heads, layer.cross_heads), strict=True)
           if layout is not None]
    if not why:
        return "prune_heads: no layer states a HeadLayout"
    return f"prune_heads: no layer states a prunable HeadLayout ({why[0]})"


def _prune_heads(desc: ModelDescription, entry: Mapping[str, int]) -> Any:
    """A kept fraction of every prunable attention's heads, ranked by drawn scores (a
    permutation per attention, so there are no ties); ratio 1 keeps every head."""
    st = require_hypothesis().strategies
    counts = {head_key_name(k): head_count(desc.streams[k[0]].layers[k[1]], k[2])
              for k in prunable_heads(desc)}
    scores = st.fixed_dictionaries({
        name: st.permutations(range(h)).map(lambda p: [float(v) for v in p])
        for name, h in counts.items()})

    @st.composite
    def trial(draw: Callable) -> Trial:
        s = draw(scores)
        options = dict(ratio=draw(st.floats(0.05, 0.95)),
                       scope=draw(st.sampled_from(["layer", "global"])), scores=s)
        return options, dict(ratio=1.0, scores=s), False

    return trial()


def _fastv_fits(desc: ModelDescription, entry: Mapping[str, int]) -> str | None:
    stream = desc.streams.get("language")
    if stream is None or len(stream.layers) < 2:
        return ("fastv needs a 'language' stream (a decoder VLM's language model) of at least "
                "2 layers")
    return None


def _fastv(desc: ModelDescription, entry: Mapping[str, int]) -> Any:
    st = require_hypothesis().strategies
    depth = len(desc.streams["language"].layers)

    @st.composite
    def trial(draw: Callable) -> Trial:
        options = dict(layer=draw(st.integers(1, depth - 1)), keep=draw(st.floats(0.05, 1.0)))
        return options, dict(keep=1.0), False

    return trial()


def _visionzip_fits(desc: ModelDescription, entry: Mapping[str, int]) -> str | None:
    image = desc.streams.get("image")
    if image is None or not image.attention_layers():
        return "visionzip needs an 'image' stream with self-attention layers"
    if image.prefix or any(layer.cross_stream for layer in image.layers):
        return ("visionzip reduces what a vision tower hands on; this image stream carries a "
                "text prefix or meets another stream in its layers")
    return None


def _visionzip(desc: ModelDescription, entry: Mapping[str, int]) -> Any:
    """Counts up to the fewest unprotected entry tokens (more are clamped); the zero case
    keeps every token as dominant."""
    st = require_hypothesis().strategies
    layers = desc.streams["image"].attention_layers()
    e = max(entry.get("image", 1), 1)

    @st.composite
    def trial(draw: Callable) -> Trial:
        dominant = draw(st.integers(0, e))
        contextual = draw(st.integers(0 if dominant else 1, e))
        options = dict(dominant=dominant, contextual=contextual,
                       layer=draw(st.sampled_from(layers)))
        return options, dict(dominant=10**6, layer=layers[-1]), False

    return trial()


def _visionzip_fastv_fits(desc: ModelDescription, entry: Mapping[str, int]) -> str | None:
    why = _visionzip_fits(desc, entry) or _fastv_fits(desc, entry)
    if why:
        return f"visionzip+fastv: {why}"
    return ("visionzip+fastv changes how many image tokens a prompt must carry, which fixed "
            "inputs cannot follow; visionzip and fastv are checked on their own")


register_case("tome", Case(_tome, _tome_fits))
register_case("attn_prune", Case(_attn_prune, _need_attention("attn_prune")))
register_case("smarttrim", Case(_smarttrim))
register_case("pumer", Case(_pumer, _need_attention("pumer")))
register_case("prune_heads", Case(_prune_heads, _prune_heads_fits))
register_case("fastv", Case(_fastv, _fastv_fits))
register_case("visionzip", Case(_visionzip, _visionzip_fits))
register_case("visionzip+fastv", Case(_visionzip, _visionzip_fastv_fits))
