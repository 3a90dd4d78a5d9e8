"""Conformance checks for adapted models: DESIGN.md's invariants as code.

Two entry points:

- `check_invariants(make_model, inputs, recipe, options, zero_options)` checks one recipe
  with one set of options on one batch. It builds the model, applies the recipe and raises
  `InvariantError` naming the first invariant that fails. Tests of a recipe or of an
  adapter drive it with hypothesis (``tests/test_invariants_*.py``).
- `check_adapter(make_model, make_inputs)` is what an adapter author runs. It first checks
  the adapter's description against the model (paths, head counts, arguments, an untrimmed
  forward, `apply` and `remove` with nothing trimmed), then runs `check_invariants` as a
  hypothesis property for every registered recipe that fits the model, with options drawn
  from the description (a `Case` per recipe; one-shot recipes such as static head pruning
  get a property of their own). It returns a `ConformanceReport` (what was checked, what
  was skipped and why) and raises `ConformanceError` listing every failing recipe with its
  smallest failing options and batch size, the invariant broken, and what in an adapter
  usually causes it. A third-party recipe becomes checkable with `register_case`.

The invariants (DESIGN.md):

1. zero trimming is the identity;
2. protected tokens are never dropped or merged;
3. live counts never grow layer to layer;
4. padding never becomes live (and, with ``perturb_padding``, never changes the output);
5. masked and compacted execution agree;
6. a sample's output does not depend on its batch;
7. every live token's ``size`` equals the number of entry tokens it covers (and, for
   recipes that only merge, sizes sum to the entry's live count);
8. at least one unprotected token survives per stream and nothing is NaN;
9. eval is deterministic, and `remove` restores outputs and ``state_dict`` exactly.

Hypothesis is needed by `check_adapter` only (``pip install hypothesis``); it is imported
when called.
"""

from __future__ import annotations

import inspect
import re
import traceback
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from . import api
from .adapter import Adapter
from .describe import LayerDesc, ModelDescription, StreamDesc
from .heads import KINDS, head_key_name, prunable_heads, pruned_heads
from .recipe import Recipe
from .registry import RECIPES, _load_builtins
from .rewrite import RewriteError

__all__ = [
    "Case",
    "ConformanceError",
    "ConformanceReport",
    "Failure",
    "InvariantError",
    "RecipeResult",
    "check_adapter",
    "check_invariants",
    "check_transform",
    "first_tensor",
    "layer_subsets",
    "register_case",
    "slice_batch",
]
class InvariantError(AssertionError):
    """An invariant does not hold; the message says which and by how much."""


def first_tensor(out: Any) -> torch.Tensor:
    """The main tensor of a model output (a tensor, a tuple, or a dict-like output)."""
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, dict):
        out = list(out.values())
    if isinstance(out, (tuple, list)):
        for v in out:
            if isinstance(v, torch.Tensor):
                return v
    raise TypeError(f"cannot find a tensor in a model output of type {type(out).__name__}")


def slice_batch(inputs: tuple, i: int, batch: int) -> tuple:
    """Sample ``i`` of every batched tensor in ``inputs`` (others pass unchanged)."""
    return tuple(a[i:i + 1] if isinstance(a, torch.Tensor) and a.shape[:1] == (batch,) else a
                 for a in inputs)


def _close(name: str, a: torch.Tensor, b: torch.Tensor, atol: float) -> None:
    if a.shape != b.shape:
        raise InvariantError(f"{name}: output shapes differ, {tuple(a.shape)} vs {tuple(b.shape)}")
    err = (a.float() - b.float()).abs().max().item() if a.numel() else 0.0
    if not err <= atol:
        raise InvariantError(f"{name}: outputs differ by {err:.3g} (tolerance {atol:g})")


def check_invariants(
    make_model: Callable[[], nn.Module],
    inputs: tuple,
    recipe: str,
    options: dict[str, Any],
    zero_options: dict[str, Any],
    *,
    output: Callable[[Any], torch.Tensor] = first_tensor,
    merges_only: bool = False,
    perturb_padding: Callable[[tuple], tuple] | None = None,
    atol: float = 1e-5,
    adapter: str | Adapter | None = None,
) -> None:
    """Check DESIGN.md's invariants 1–9 for ``recipe`` on the model ``make_model()`` builds.

    ``inputs`` is a tuple of positional arguments with the batch first; ``options`` trims
    for real, ``zero_options`` makes the same recipe trim nothing; ``merges_only`` says the
    recipe never drops (so sizes must sum to the entry count); ``perturb_padding`` returns
    the inputs with padding content changed (for streams that have padding); ``adapter``
    forces one (a registered name or an instance) instead of the detected one.
    Raises `InvariantError` naming the first invariant that fails.
    """
    torch.manual_seed(0)
    model = make_model().eval()
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        ref = output(model(*inputs))

        # 1. zero trimming is the identity, in both executions
        api.apply(model, recipe, adapter=adapter, **zero_options)
        for mode in ("compacted", "masked"):
            api.set_mode(model, mode)
            _close(f"invariant 1 (zero trimming is the identity, {mode})",
                   output(model(*inputs)), ref, atol)
        api.remove(model)

        api.apply(model, recipe, track_source=True, adapter=adapter, **options)
        out = output(model(*inputs))
        desc = api.describe(model)
        states = api.last_states(model)
        stats = api.last_stats(model).layers

        # 9a. deterministic eval
        if not torch.equal(output(model(*inputs)), out):
            raise InvariantError("invariant 9: two eval forwards on the same input differ")
        # 8. no NaN
        if not torch.isfinite(out).all():
            raise InvariantError("invariant 8: the trimmed output has NaN or inf")
        for name, st in states.items():
            entry = st.source.shape[1]
            live = st.live
            # 8. an unprotected token survives
            if ((live & ~st.protected).sum(1) < 1).any():
                raise InvariantError(f"invariant 8: stream {name!r} lost every unprotected token")
            # 7 and 4. size == coverage; padding (covering nothing) is never live
            cover = torch.zeros(live.shape, dtype=torch.float64)
            src = st.source.clamp_min(0)
            cover.scatter_add_(1, src, (st.source >= 0).double())
            if not torch.allclose(cover[live], st.size[live].double()):
                raise InvariantError(f"invariant 7/4: in stream {name!r} a live token's size "
                                     f"differs from the number of input tokens it covers "
                                     f"(or a padding token became live)")
            if merges_only and not desc.streams[name].padded and (st.source < 0).any():
                raise InvariantError(f"invariant 7: a merge-only recipe lost tokens of stream "
                                     f"{name!r}: sizes sum to {(st.size * live).sum(1).tolist()}, "
                                     f"expected {entry} per sample")
            # 2. protected entry tokens are alone in live protected slots
            p = desc.streams[name].num_protected
            if p:
                slots = st.source[:, :p]
                if (slots < 0).any():
                    raise InvariantError(f"invariant 2: a protected token of {name!r} was dropped")
                ok = st.protected.gather(1, slots) & (cover.gather(1, slots) == 1)
                if not ok.all():
                    raise InvariantError(f"invariant 2: a protected token of {name!r} was merged")
            # a stated patch grid is the last entry tokens, after protected ones only
            grid = desc.streams[name].grid
            if grid is not None and not 0 <= entry - grid[0] * grid[1] <= p:
                raise InvariantError(f"stream {name!r} states a {grid[0]}×{grid[1]} patch grid, "
                                     f"which is not its {entry} entry tokens after at most "
                                     f"{p} protected leading ones (StreamDesc.grid)")
        # 3. live counts never grow
        prev: dict[str, torch.Tensor] = {}
        for s in stats:
            before = prev.get(s.stream)
            if (s.tokens_out > s.tokens_in).any() or (
                    before is not None and (s.tokens_in > before).any()):
                raise InvariantError(f"invariant 3: live tokens grew at {s.stream} layer {s.layer}")
            prev[s.stream] = s.tokens_out

        # 5. masked and compacted agree
        api.set_mode(model, "masked")
        _close("invariant 5 (masked vs compacted)", output(model(*inputs)), out, atol)
        api.set_mode(model, "compacted")

        # 6. batch independence
        batch = out.shape[0]
        for i in range(batch):
            _close(f"invariant 6 (sample {i} alone vs in its batch)",
                   output(model(*slice_batch(inputs, i, batch))), out[i:i + 1], atol)

        # 4. padding content never matters
        if perturb_padding is not None:
            _close("invariant 4 (padding content changed the output)",
                   output(model(*perturb_padding(inputs))), out, atol)

        # 9b. remove restores everything
        api.remove(model)
        if not torch.equal(output(model(*inputs)), ref):
            raise InvariantError("invariant 9: outputs after remove differ from the original")
        now = model.state_dict()
        if list(now) != list(sd) or not all(torch.equal(now[k], sd[k]) for k in sd):
            raise InvariantError("invariant 9: state_dict after remove differs from the original")


# ------------------------------------------------------------------------ conformance kit

#: what in an adapter usually breaks each invariant (`ConformanceError` quotes it)
HINTS: dict[int, str] = {
    1: "with nothing trimmed the install points still change the computation: the "
       "attention product is not routed with the model's own mask, scale and dropout "
       "(LayerDesc.attention), masks_are_padding is set where the masks mark more than "
       "padding, or a per-instance patch (pooling, outputs) does not give back the original "
       "result",
    2: "num_protected is wrong or the protected tokens are not the first ones (a token a "
       "pooler reads elsewhere must be protected through TrimContext.entry)",
    3: "the stream's layers are not listed in the order the forward runs them, or a block "
       "passes its untrimmed input around the enter point (stream_arg names the wrong "
       "argument)",
    4: "padding reaches the stream as live tokens: its mask is not given to the stream "
       "(mask_arg, or TrimContext.entry for masks the blocks never see), StreamDesc.padded "
       "is False on a stream that has padding, or the model reads padded positions that "
       "trimming moved (restore_positions)",
    5: "the install points do not cover every attention, or masks are applied twice "
       "(masks_are_padding); a pooling or output patch that reads the tokens must weigh "
       "live tokens by size, as masked execution keeps dead ones in place",
    6: "a padding mask is not given to the stream (mask_arg) or pooling reads trimmed "
       "tokens (a compacted batch is packed with dead slots: average over live tokens, "
       "weighted by size)",
    7: "the trimming state was restarted or bypassed mid-stream: a block described twice or "
       "out of order, a keys_only layer whose enter and leave do not run on the keys the "
       "reader receives, or padding not marked as padding",
    8: "a mask leaves a query with no live key (the model's own mask must be merged with the "
       "state's key bias: masks_are_padding, StreamDesc.positional), or every token of the "
       "stream is protected (num_protected)",
    9: "install's undo list misses a change (every per-instance patch, buffer or hook must "
       "append its undo), or the forward depends on state left by an earlier call",
}
_GRID_HINT = ("num_protected must count every token before the patches (CLS, registers, "
              "distillation token) and StreamDesc.grid must be the patch grid")
_HEADS_HINT = ("describe() must read head counts (and head_dim) from the modules, not from a "
               "config, and HeadLayout.counts / widths must name the attributes the "
               "attention's forward reads")
_REWRITE_HINT = ("the fx pass could not place a call point: LayerDesc.attention must compute "
                 "one attention product, and leave_after / residual must say where the block "
                 "adds the attention's output back (or the adapter overrides install)")
_MISMATCH_HINT = ("the description does not match the forward: blocks listed out of order, a "
                  "layer missing, or stream_arg / mask_arg naming an argument that is not the "
                  "stream's tokens / padding mask")
_VALUE_HINT = ("the recipe refused these options on this description: check num_tokens, "
               "num_protected and the layers the description lists (or, for a registered "
               "case, the options it draws)")
_OTHER_HINT = ("the trimmed forward raised: apply the recipe with these options to see the "
               "traceback; usually a call point receives a tensor of another shape than the "
               "description implies (stream_arg, mask_arg, leave_after, residual)")
NO_CASE = "no conformance case; register one with `register_case(name, case)`"

#: ``(options, zero_options, merges_only)``: what a `Case` strategy draws
Trial = tuple[dict[str, Any], dict[str, Any], bool]


def _hypothesis() -> Any:
    try:
        import hypothesis
    except ImportError:
        raise ImportError("trimkit.testing.check_adapter runs hypothesis properties: "
                          "pip install hypothesis") from None
    return hypothesis


def _fits_always(desc: ModelDescription, entry: Mapping[str, int]) -> str | None:
    return None


@dataclass(frozen=True)
class Case:
    """How `check_adapter` exercises one recipe on a described model.

    ``strategy(desc, entry)`` returns a hypothesis strategy of ``(options, zero_options,
    merges_only)``: options that trim for real, options under which the same recipe trims
    nothing, and whether those options only merge (sizes must then sum to the entry count).
    ``entry[stream]`` is the fewest live unprotected tokens a sample of ``make_inputs``
    brings to that stream. ``fits(desc, entry)`` says why the recipe does not apply to this
    model (the report shows it), or returns ``None``. For a one-shot recipe
    (``Recipe.transforms``) ``zero_options`` must change nothing; ``merges_only`` is unused.
    """

    strategy: Callable[[ModelDescription, Mapping[str, int]], Any]
    fits: Callable[[ModelDescription, Mapping[str, int]], str | None] = _fits_always


#: conformance cases by recipe name (`register_case`)
CASES: dict[str, Case] = {}


def register_case(name: str, case: Case) -> Case:
    """Make `check_adapter` check the recipe ``name`` with ``case`` (replacing any earlier
    one); returns ``case``."""
    if not isinstance(case, Case):
        raise TypeError(f"register_case needs a trimkit.testing.Case, got {type(case).__name__}")
    CASES[name] = case
    return case


def layer_subsets(desc: ModelDescription, stream: str, *, attention_only: bool = True,
                  max_size: int = 3) -> Any:
    """Hypothesis strategy: a sorted non-empty list of distinct layer indices of ``stream``,
    among the layers with a self-attention of their own (`StreamDesc.attention_layers`),
    or among all its layers without ``attention_only`` (`LayerDesc.keys_only` ones too)."""
    st = _hypothesis().strategies
    s = desc.streams[stream]
    layers = s.attention_layers() if attention_only else list(range(len(s.layers)))
    if not layers:
        raise ValueError(f"stream {stream!r} has no {'self-attention ' if attention_only else ''}"
                         f"layers to choose from")
    return st.lists(st.sampled_from(layers), min_size=1, max_size=min(max_size, len(layers)),
                    unique=True).map(sorted)


# ---------------------------------------------------------------- the built-in cases


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
    (constant schedule) or E/(3L) (the decreasing one starts at 1.5·r), E the fewest
    unprotected entry tokens, L the stream's self-attention layers."""
    st = _hypothesis().strategies
    streams = _tome_streams(desc, entry)

    @st.composite
    def trial(draw: Callable) -> Trial:
        name = draw(st.sampled_from(sorted(streams)))
        schedule = draw(st.sampled_from(["constant", "decreasing"]))
        most = entry[name] // ((2 if schedule == "constant" else 3) * streams[name])
        r = draw(st.integers(0, most))
        return dict(r=r, schedule=schedule, stream=name), dict(r=0, stream=name), True

    return trial()


def _attn_prune(desc: ModelDescription, entry: Mapping[str, int]) -> Any:
    st = _hypothesis().strategies

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
    st = _hypothesis().strategies
    names = [n for n, s in desc.streams.items() if s.layers]

    @st.composite
    def trial(draw: Callable) -> Trial:
        streams = draw(st.lists(st.sampled_from(names), min_size=1, unique=True).map(sorted))
        tokens, heads = draw(st.booleans()), draw(st.booleans())
        if not (tokens or heads):
            tokens = True
        layers = {s: draw(layer_subsets(desc, s, attention_only=False)) for s in streams}
        zero = dict(tokens=tokens, heads=heads, streams=streams, layers=layers)
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


def _pumer(desc: ModelDescription, entry: Mapping[str, int]) -> Any:
    """With a fusion stack: prune and merge ratios at a subset of its layers; without one,
    the merging half in every stream at a subset of its self-attention layers."""
    st = _hypothesis().strategies
    stack = _text_reads_image(desc)

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
        else:
            options["layers"] = {s: draw(layer_subsets(desc, s)) for s in _attending(desc)}
        return options, zero, prune == 0

    return trial()


def _head_count(layer: LayerDesc, kind: str) -> int:
    return layer.num_heads if kind == "self" else (layer.cross_num_heads or layer.num_heads)


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
    st = _hypothesis().strategies
    counts = {head_key_name(k): _head_count(desc.streams[k[0]].layers[k[1]], k[2])
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


register_case("tome", Case(_tome, _tome_fits))
register_case("attn_prune", Case(_attn_prune, _need_attention("attn_prune")))
register_case("smarttrim", Case(_smarttrim))
register_case("pumer", Case(_pumer, _need_attention("pumer")))
register_case("prune_heads", Case(_prune_heads, _prune_heads_fits))


# ---------------------------------------------------------------- one-shot recipes


def check_transform(
    make_model: Callable[[], nn.Module],
    inputs: tuple,
    recipe: str,
    options: dict[str, Any],
    zero_options: dict[str, Any],
    *,
    output: Callable[[Any], torch.Tensor] = first_tensor,
    atol: float = 1e-5,
    adapter: str | Adapter | None = None,
) -> None:
    """The invariants that apply to a one-shot recipe (``Recipe.transforms``, static head
    pruning): ``zero_options`` leave the outputs as they were (1); with ``options`` the
    output keeps its shape and is finite (8), eval is deterministic (9), each sample's
    output does not depend on its batch (6), and `describe` gives each attention as many
    heads as it had minus those `trimkit.pruned_heads` says were removed.
    Raises `InvariantError` naming the first that fails."""
    torch.manual_seed(0)
    model = make_model().eval()
    impl = api.find_adapter(model, adapter)
    with torch.no_grad():
        ref = output(model(*inputs))
        before = impl.describe(model)
        api.apply(model, recipe, adapter=impl, **zero_options)
        _close("invariant 1 (zero trimming is the identity)", output(model(*inputs)), ref, atol)
        api.apply(model, recipe, adapter=impl, **options)
        out = output(model(*inputs))
        if out.shape != ref.shape:
            raise InvariantError(f"{recipe}: the output's shape changed from "
                                 f"{tuple(ref.shape)} to {tuple(out.shape)}")
        if not torch.isfinite(out).all():
            raise InvariantError("invariant 8: the trimmed output has NaN or inf")
        if not torch.equal(output(model(*inputs)), out):
            raise InvariantError("invariant 9: two eval forwards on the same input differ")
        after, gone = impl.describe(model), pruned_heads(model)
        for s in before.streams.values():
            for i, layer in enumerate(s.layers):
                for kind in KINDS:
                    # a keys-only layer states its reader's heads, checked at the reader
                    if layer.keys_only or kind == "cross" and layer.cross_attention is None:
                        continue
                    name = head_key_name((s.name, i, kind))
                    want = _head_count(layer, kind) - len(gone.get(name, ()))
                    got = _head_count(after.streams[s.name].layers[i], kind)
                    if got != want:
                        raise InvariantError(
                            f"{recipe}: after pruning, describe() says {name} has {got} "
                            f"heads; it had {_head_count(layer, kind)} and "
                            f"{len(gone.get(name, ()))} were removed (trimkit.pruned_heads), "
                            f"so {want} are expected")
        batch = out.shape[0]
        for i in range(batch):
            _close(f"invariant 6 (sample {i} alone vs in its batch)",
                   output(model(*slice_batch(inputs, i, batch))), out[i:i + 1], atol)


# ---------------------------------------------------------------- report and errors


@dataclass
class Failure:
    """One recipe's failure: the smallest failing example hypothesis found and what broke."""

    recipe: str
    options: dict[str, Any] | None
    zero_options: dict[str, Any] | None
    batch_size: int | None
    merges_only: bool
    error: BaseException
    transforms: bool = False

    @property
    def message(self) -> str:
        """The invariant's message, or the exception's type and message."""
        if isinstance(self.error, InvariantError):
            return str(self.error)
        return f"{type(self.error).__name__}: {self.error}"

    @property
    def invariants(self) -> tuple[int, ...]:
        """The invariants the message names (``invariant 7/4`` names 7 and 4)."""
        if not isinstance(self.error, InvariantError):
            return ()
        found = re.search(r"invariant (\d+(?:/\d+)*)", str(self.error))
        return tuple(int(n) for n in found.group(1).split("/")) if found else ()

    @property
    def hints(self) -> list[str]:
        """What in an adapter usually causes this failure, one sentence per invariant."""
        if self.invariants:
            return [f"invariant {n}: {HINTS[n]}" for n in self.invariants if n in HINTS]
        text = str(self.error)
        if "StreamDesc.grid" in text:
            return [_GRID_HINT]
        if "describe() says" in text:
            return [_HEADS_HINT]
        if isinstance(self.error, RewriteError):
            return [_REWRITE_HINT]
        if "does not match" in text or "entered with" in text:
            return [_MISMATCH_HINT]
        if isinstance(self.error, ValueError):
            return [_VALUE_HINT]
        return [_OTHER_HINT]

    def where(self) -> str | None:
        """``file:line in function`` where a non-invariant error was raised."""
        if isinstance(self.error, InvariantError) or self.error.__traceback__ is None:
            return None
        frames = traceback.extract_tb(self.error.__traceback__)
        # the innermost frame outside torch and hypothesis: the adapter's or the model's
        own = [f for f in frames if not re.search(r"[/\\](torch|hypothesis)[/\\]", f.filename)]
        frame = (own or frames)[-1]
        return f"{frame.filename}:{frame.lineno} in {frame.name}"

    def reproduce(self) -> str:
        """The call that replays this example."""
        if self.options is None:
            return "(the options could not be drawn)"
        b = self.batch_size
        if self.transforms:
            return (f"trimkit.testing.check_transform(make_model, make_inputs({b}), "
                    f"{self.recipe!r}, {self.options!r}, {self.zero_options!r})")
        return (f"trimkit.testing.check_invariants(make_model, make_inputs({b}), "
                f"{self.recipe!r}, {self.options!r}, {self.zero_options!r}"
                f"{', merges_only=True' if self.merges_only else ''})")

    def __str__(self) -> str:
        lines = [f"{self.recipe}: batch size {self.batch_size}, options {self.options!r}",
                 f"  {self.message}"]
        where = self.where()
        if where:
            lines.append(f"  raised at {where}")
        lines += [f"  hint: {h}" for h in self.hints]
        lines.append(f"  reproduce: {self.reproduce()}")
        return "\n".join(lines)


@dataclass
class RecipeResult:
    """What `check_adapter` did with one recipe: ``status`` is ``"checked"`` (with the
    number of hypothesis ``examples`` run), ``"skipped"`` (with the ``reason``) or
    ``"failed"`` (with the ``failure``)."""

    recipe: str
    status: str
    examples: int = 0
    reason: str = ""
    failure: Failure | None = None

    def __str__(self) -> str:
        if self.status == "checked":
            return f"{self.recipe}: checked ({self.examples} examples)"
        if self.status == "skipped":
            return f"{self.recipe}: skipped, {self.reason}"
        assert self.failure is not None
        return f"{self.recipe}: FAILED ({self.examples} runs): {self.failure.message}"


def _stream_line(s: StreamDesc, entry: int | None) -> str:
    own = len(s.attention_layers())
    parts = [f"{len(s.layers)} layers" + (f" ({own} with self-attention)"
                                          if own != len(s.layers) else "")]
    parts.append(f"{s.num_tokens} entry tokens" if s.num_tokens is not None
                 else "dynamic length")
    if entry is not None:
        parts.append(f"at least {entry} unprotected")
    parts.append(f"{s.num_protected} protected")
    if s.grid:
        parts.append(f"grid {s.grid[0]}×{s.grid[1]}")
    parts += [flag for flag in ("padded", "positional") if getattr(s, flag)]
    return f"{s.name}: " + ", ".join(parts)


@dataclass
class ConformanceReport:
    """What `check_adapter` found: the adapter, the description's streams (with the fewest
    live unprotected tokens a sample brought to each) and one `RecipeResult` per recipe."""

    adapter: str
    description: ModelDescription
    entry: dict[str, int] = field(default_factory=dict)
    results: list[RecipeResult] = field(default_factory=list)

    @property
    def streams(self) -> dict[str, StreamDesc]:
        """The description's streams by name."""
        return dict(self.description.streams)

    @property
    def checked(self) -> dict[str, int]:
        """Recipes checked without failure -> the number of examples run."""
        return {r.recipe: r.examples for r in self.results if r.status == "checked"}

    @property
    def skipped(self) -> dict[str, str]:
        """Recipes not checked -> why."""
        return {r.recipe: r.reason for r in self.results if r.status == "skipped"}

    @property
    def failures(self) -> list[Failure]:
        """The failing recipes' smallest failing examples."""
        return [r.failure for r in self.results if r.failure is not None]

    def summary(self) -> str:
        """A few readable lines: adapter, streams, one line per recipe."""
        lines = [f"adapter {self.adapter!r} (family {self.description.family!r}"
                 f"{', parallel streams' if self.description.parallel else ''})"]
        lines += [f"  stream {_stream_line(s, self.entry.get(s.name))}"
                  for s in self.description.streams.values()]
        lines += [f"  {r}" for r in self.results]
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.summary()


class ConformanceError(AssertionError):
    """The adapter fails the conformance kit: a structural check (``report`` is then
    ``None`` or partial, ``failures`` empty), or recipes' invariants (every failing recipe
    listed, with its smallest failing example and a hint)."""

    def __init__(self, message: str, report: ConformanceReport | None = None,
                 failures: Sequence[Failure] = ()):
        super().__init__(message)
        self.report = report
        self.failures = list(failures)

    @classmethod
    def from_report(cls, report: ConformanceReport) -> ConformanceError:
        failures = report.failures
        names = ", ".join(f.recipe for f in failures)
        many = len(failures) != 1
        head = (f"adapter {report.adapter!r}: {len(failures)} recipe{'s' if many else ''} "
                f"{'fail' if many else 'fails'} DESIGN.md's invariants on this model "
                f"({names}). Each with the smallest failing example hypothesis found:")
        body = "\n\n".join(str(f) for f in failures)
        return cls(f"{head}\n\n{body}\n\n{report.summary()}", report, failures)


def _structural(adapter: str | None, problems: Sequence[str]) -> ConformanceError:
    who = f"adapter {adapter!r}" if adapter else "check_adapter"
    lines = "\n".join(f"- {p}" for p in problems)
    return ConformanceError(f"{who} fails a structural check, so no recipe can be checked "
                            f"yet:\n{lines}")


# ---------------------------------------------------------------- structural checks


class _NothingTrimmed(Recipe):
    """`check_adapter`'s probe: every site installed, no op anywhere."""

    name = "check_adapter: nothing trimmed"
    summary = "sites at every layer and nothing trimmed (trimkit.testing's probe)"

    def plan(self, desc: ModelDescription, options: dict) -> dict:
        return {}


@contextmanager
def _probe_recipe() -> Iterator[str]:
    """The probe recipe, registered only while the structural checks run."""
    _load_builtins()
    RECIPES[_NothingTrimmed.name] = _NothingTrimmed()
    try:
        yield _NothingTrimmed.name
    finally:
        RECIPES.pop(_NothingTrimmed.name, None)


def _positional_count(fn: Callable) -> tuple[int | None, list[str]]:
    """How many positional arguments ``fn`` takes (``None``: any number) and their names."""
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return None, []
    names = []
    for p in params:
        if p.kind is inspect.Parameter.VAR_POSITIONAL:
            return None, names
        if p.kind in (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD):
            names.append(p.name)
    return len(names), names


def _submodule(root: nn.Module, path: str) -> tuple[nn.Module | None, str]:
    try:
        return root.get_submodule(path), ""
    except AttributeError as e:
        return None, str(e)


def _description_problems(model: nn.Module, desc: ModelDescription) -> list[str]:
    """Everything in ``desc`` that does not fit ``model``, as actionable sentences."""
    problems = []
    if not any(s.layers for s in desc.streams.values()):
        return [f"describe() gives no stream with layers (streams: {sorted(desc.streams)}): "
                f"each StreamDesc lists the LayerDesc of every block its tokens run through"]
    blocks: dict[str, str] = {}
    for key, s in desc.streams.items():
        if key != s.name:
            problems.append(f"ModelDescription.streams[{key!r}] is a StreamDesc named "
                            f"{s.name!r}: the key must be the stream's name")
        if s.num_protected < 0 or (s.num_tokens is not None and s.num_protected > s.num_tokens):
            problems.append(f"stream {key!r}: num_protected={s.num_protected} does not fit "
                            f"its {s.num_tokens} entry tokens")
        if s.grid is not None and s.num_tokens is not None and s.grid[0] * s.grid[1] > s.num_tokens:
            problems.append(f"stream {key!r}: a {s.grid[0]}×{s.grid[1]} grid has more patches "
                            f"than its {s.num_tokens} entry tokens (StreamDesc.grid)")
        for i, layer in enumerate(s.layers):
            where = f"stream {key!r} layer {i}"
            block, why = _submodule(model, layer.block)
            if block is None:
                problems.append(f"{where}: LayerDesc.block {layer.block!r} is not a module of the "
                                f"model ({why})")
                continue
            paths = [("attention", layer.attention), ("cross_attention", layer.cross_attention),
                     ("leave_after", layer.leave_after)]
            for what, path in paths:
                if path is not None and _submodule(block, path)[0] is None:
                    problems.append(f"{where}: LayerDesc.{what} {path!r} is not a module under "
                                    f"its block {layer.block!r} ({_submodule(block, path)[1]})")
            if layer.num_heads < 1 or (layer.cross_num_heads is not None
                                       and layer.cross_num_heads < 1):
                problems.append(f"{where}: num_heads={layer.num_heads}, cross_num_heads="
                                f"{layer.cross_num_heads}; an attention has at least one head")
            elif layer.head_dim is None and layer.dim % layer.num_heads:
                problems.append(f"{where}: dim={layer.dim} is not a multiple of num_heads="
                                f"{layer.num_heads}; give LayerDesc.head_dim")
            if layer.cross_stream is not None and layer.cross_stream not in desc.streams:
                problems.append(f"{where}: cross_stream {layer.cross_stream!r} names no stream "
                                f"(streams: {sorted(desc.streams)})")
            if (layer.cross_attention is not None or layer.keys_only) and \
                    layer.cross_stream is None:
                problems.append(f"{where}: a cross-attention (or keys_only layer) needs "
                                f"cross_stream, the stream its keys come from / that reads them")
            if layer.keys_only:
                continue
            if layer.block in blocks:
                problems.append(f"{where}: block {layer.block!r} is already {blocks[layer.block]}; "
                                f"each block belongs to one layer of one stream")
            blocks[layer.block] = where
            count, names = _positional_count(block.forward)
            for what, pos in (("stream_arg", layer.stream_arg), ("mask_arg", layer.mask_arg)):
                if pos is not None and (pos < 0 or (count is not None and pos >= count)):
                    problems.append(f"{where}: {what}={pos}, but {type(block).__name__}.forward "
                                    f"takes {count} positional arguments {names}")
            if layer.mask_arg is not None and layer.mask_arg == layer.stream_arg:
                problems.append(f"{where}: mask_arg and stream_arg are both {layer.stream_arg}")
    return problems


def _call(model: nn.Module, make_inputs: Callable[[int], tuple], b: int,
          output: Callable[[Any], torch.Tensor]) -> tuple[tuple, torch.Tensor]:
    inputs = make_inputs(b)
    if not isinstance(inputs, tuple):
        raise TypeError(f"make_inputs({b}) must return a tuple of positional arguments, got "
                        f"{type(inputs).__name__}")
    return inputs, output(model(*inputs))


def _structure(make_model: Callable[[], nn.Module], make_inputs: Callable[[int], tuple],
               batch_sizes: Sequence[int], output: Callable[[Any], torch.Tensor],
               adapter: str | Adapter | None, atol: float
               ) -> tuple[Adapter, ModelDescription, dict[str, int]]:
    """The structural checks; raises `ConformanceError` at the first step that fails.
    Returns the adapter, the description and each stream's fewest live unprotected entry
    tokens over ``batch_sizes``."""
    torch.manual_seed(0)
    try:
        model = make_model().eval()
    except Exception as e:
        raise _structural(None, [f"make_model() raised {type(e).__name__}: {e}"]) from e
    try:
        impl = api.find_adapter(model, adapter)
    except Exception as e:
        raise _structural(None, [f"the model is not recognised: {type(e).__name__}: {e}"]) \
            from e
    name = impl.name
    try:
        desc = impl.describe(model)
    except Exception as e:
        raise _structural(name, [f"describe(model) raised {type(e).__name__}: {e}"]) from e
    if not isinstance(desc, ModelDescription):
        raise _structural(name, [f"describe(model) must return a trimkit.ModelDescription, "
                                 f"got {type(desc).__name__}"])
    problems = _description_problems(model, desc)
    if problems:
        raise _structural(name, problems)

    refs: dict[int, torch.Tensor] = {}
    with torch.no_grad():
        for b in batch_sizes:
            try:
                _, out = _call(model, make_inputs, b, output)
            except Exception as e:
                raise _structural(name, [f"the untrimmed model failed on make_inputs({b}): "
                                         f"{type(e).__name__}: {e}"]) from e
            if not isinstance(out, torch.Tensor) or out.dim() < 1 or out.shape[0] != b:
                got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
                raise _structural(name, [f"output(model(*make_inputs({b}))) must be a tensor "
                                         f"with the batch first, got {got}; pass output="])
            if not torch.isfinite(out).all():
                raise _structural(name, [f"the untrimmed output on make_inputs({b}) is not "
                                         f"finite"])
            refs[b] = out
        sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
        entry: dict[str, int] = {}
        step = "apply with nothing trimmed"
        try:
            with _probe_recipe() as probe:
                api.apply(model, probe, adapter=impl, track_source=True)
            for b in batch_sizes:
                step = f"the forward with nothing trimmed on make_inputs({b})"
                for mode in ("compacted", "masked"):
                    api.set_mode(model, mode)
                    _, out = _call(model, make_inputs, b, output)
                    _close(f"invariant 1 (zero trimming is the identity, {mode}, batch size "
                           f"{b})", out, refs[b], atol)
                    if mode == "compacted":
                        _entry_counts(desc, api.last_states(model), b, entry)
            step = "remove"
            api.remove(model)
            for b in batch_sizes:
                if not torch.equal(_call(model, make_inputs, b, output)[1], refs[b]):
                    raise InvariantError("invariant 9: outputs after remove differ from the "
                                         "original")
            now = model.state_dict()
            if list(now) != list(sd) or not all(torch.equal(now[k], sd[k]) for k in sd):
                raise InvariantError("invariant 9: state_dict after remove differs from the "
                                     "original")
        except _Mismatch as e:
            raise _structural(name, [str(e)]) from e
        except Exception as e:
            fail = Failure("(nothing trimmed)", None, None, None, False, e)
            where = fail.where()
            lines = [f"{step}: {fail.message}"] + ([f"raised at {where}"] if where else [])
            lines += [f"hint: {h}" for h in fail.hints]
            raise _structural(name, ["\n  ".join(lines)]) from e
    return impl, desc, entry


class _Mismatch(Exception):
    """A structural finding of the probe, already in words (no hint needed)."""


def _entry_counts(desc: ModelDescription, states: Mapping[str, Any], b: int,
                  entry: dict[str, int]) -> None:
    """Record each stream's fewest live unprotected tokens; a described stream that never
    started, or started with another length than it states, is a `_Mismatch`."""
    for s in desc.streams.values():
        if not s.layers:
            continue
        state = states.get(s.name)
        if state is None:
            raise _Mismatch(f"stream {s.name!r} never started: its first layer's enter point "
                             f"did not run on make_inputs({b}) (check its first "
                             f"LayerDesc.block and stream_arg, or give inputs that reach it)")
        n0 = state.source.shape[1] if state.source is not None else state.keep.shape[1]
        if s.num_tokens is not None and n0 != s.num_tokens:
            raise _Mismatch(f"stream {s.name!r} states num_tokens={s.num_tokens} but entered "
                             f"with {n0} tokens on make_inputs({b})")
        fewest = int((state.live & ~state.protected).sum(1).min())
        entry[s.name] = min(entry.get(s.name, fewest), fewest)


# ---------------------------------------------------------------- check_adapter


def _run_case(name: str, case: Case, desc: ModelDescription, entry: Mapping[str, int],
              make_model: Callable[[], nn.Module], make_inputs: Callable[[int], tuple],
              impl: Adapter, *, max_examples: int, batch_sizes: Sequence[int],
              output: Callable[[Any], torch.Tensor],
              perturb_padding: Callable[[tuple], tuple] | None, atol: float,
              shrink: bool) -> RecipeResult:
    """One recipe's property, run by hypothesis; the last example it ran before raising is
    the one it shrank to (hypothesis replays the minimal failing example last)."""
    hyp = _hypothesis()
    st, Phase = hyp.strategies, hyp.Phase
    transforms = RECIPES[name].transforms
    seen: dict[str, Any] = {"examples": 0, "last": None}

    def prop(trial: Trial, b: int) -> None:
        options, zero, merges_only = trial
        seen["last"] = (options, zero, merges_only, b)
        seen["examples"] += 1
        inputs = make_inputs(b)
        if transforms:
            check_transform(make_model, inputs, name, options, zero, output=output, atol=atol,
                            adapter=impl)
        else:
            check_invariants(make_model, inputs, name, options, zero, output=output,
                             merges_only=merges_only, perturb_padding=perturb_padding,
                             atol=atol, adapter=impl)

    phases = [Phase.explicit, Phase.generate] + ([Phase.shrink] if shrink else [])
    config = hyp.settings(max_examples=max_examples, deadline=None, derandomize=True,
                          database=None, suppress_health_check=list(hyp.HealthCheck),
                          report_multiple_bugs=False, phases=phases,
                          verbosity=hyp.Verbosity.quiet)
    try:
        strategy = case.strategy(desc, entry)
        config(hyp.given(strategy, st.sampled_from(list(batch_sizes)))(prop))()
    except Exception as e:
        options, zero, merges_only, b = seen["last"] or (None, None, False, None)
        failure = Failure(name, options, zero, b, merges_only, e, transforms)
        return RecipeResult(name, "failed", seen["examples"], failure=failure)
    return RecipeResult(name, "checked", seen["examples"])


def check_adapter(
    make_model: Callable[[], nn.Module],
    make_inputs: Callable[[int], tuple],
    *,
    recipes: Sequence[str] | None = None,
    max_examples: int = 10,
    batch_sizes: Sequence[int] = (1, 3),
    output: Callable[[Any], torch.Tensor] = first_tensor,
    perturb_padding: Callable[[tuple], tuple] | None = None,
    adapter: str | Adapter | None = None,
    atol: float = 1e-5,
    shrink: bool = True,
) -> ConformanceReport:
    """Check an adapter on the model ``make_model()`` builds: structure first, then
    DESIGN.md's invariants for every recipe that fits, as hypothesis properties.

    ``make_model`` returns a fresh model (random weights are fine; it is put in eval mode);
    ``make_inputs(b)`` returns the positional arguments of a batch of ``b``, batch first;
    ``output`` picks the tensor compared (batch first); ``perturb_padding`` returns the
    inputs with padding content changed, for models with padding. ``recipes`` restricts the
    recipes checked (default: every registered one; those without a `Case` are skipped);
    each gets ``max_examples`` examples with batch sizes drawn from ``batch_sizes``;
    ``shrink=False`` reports the first failing example instead of the smallest. ``adapter``
    forces one (a registered name or an instance) instead of the detected one.

    Returns a `ConformanceReport`. Raises `ConformanceError` at once when a structural check
    fails (a path that does not exist, a forward that does not run, ``apply`` + ``remove``
    with nothing trimmed that does not give the model back), else after every recipe ran,
    listing each failing recipe with its smallest failing example and a hint.
    """
    _hypothesis()
    batch_sizes = tuple(batch_sizes)
    if not batch_sizes or any(isinstance(b, bool) or not isinstance(b, int) or b < 1
                              for b in batch_sizes):
        raise ValueError(f"batch_sizes must be positive ints, got {batch_sizes!r}")
    if isinstance(max_examples, bool) or not isinstance(max_examples, int) or max_examples < 1:
        raise ValueError(f"max_examples must be a positive int, got {max_examples!r}")
    _load_builtins()
    names = sorted(n for n in RECIPES if n != _NothingTrimmed.name) if recipes is None \
        else list(recipes)
    unknown = [n for n in names if n not in RECIPES]
    if unknown:
        raise ValueError(f"unknown recipes {unknown}; recipes: {', '.join(sorted(RECIPES))}")

    impl, desc, entry = _structure(make_model, make_inputs, batch_sizes, output, adapter, atol)
    report = ConformanceReport(impl.name, desc, entry)
    for name in names:
        case = CASES.get(name)
        why = NO_CASE if case is None else case.fits(desc, entry)
        if why:
            report.results.append(RecipeResult(name, "skipped", reason=why))
            continue
        report.results.append(_run_case(
            name, case, desc, entry, make_model, make_inputs, impl, max_examples=max_examples,
            batch_sizes=batch_sizes, output=output, perturb_padding=perturb_padding, atol=atol,
            shrink=shrink))
    if report.failures:
        raise ConformanceError.from_report(report)
    return report
