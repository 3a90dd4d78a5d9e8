"""The public entry points: `apply`, `remove`, listings, statistics and FLOPs."""

from __future__ import annotations

import pickle
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode, flop_registry, sdpa_flop_count
from torch.utils.module_tracker import ModuleTracker

from .adapter import Adapter, Undo
from .describe import ModelDescription
from .heads import head_importance as _head_importance
from .heads import head_key_name, locate_heads, prunable_heads
from .headskip import install_head_skipping
from .hooks import Exit, Patches
from .registry import ADAPTERS, RECIPES, _load_builtins
from .sites import MODES, LayerStats, Site, TrimContext
from .state import TokenState

__all__ = [
    "Applied",
    "ForwardStats",
    "UnsupportedModelError",
    "apply",
    "count_flops",
    "flop_counter",
    "describe",
    "find_adapter",
    "forward_stats",
    "head_scores",
    "is_applied",
    "last_states",
    "last_stats",
    "list_adapters",
    "list_recipes",
    "recording_costs",
    "remove",
    "set_mode",
    "trimming_disabled",
]

SITES_ATTR = "trimkit"
STATE_ATTR = "_trimkit_applied"


class UnsupportedModelError(TypeError):
    """No registered adapter recognises the model."""


class UnsupportedConfigError(UnsupportedModelError):
    """An adapter recognises the model's family but not this configuration of it (raised
    before any change, so the model is left as it was)."""


@dataclass
class Applied:
    """What `apply` did to one model, kept on the instance so `remove` can undo it."""

    recipe: str
    options: dict[str, Any]
    adapter: str
    description: ModelDescription
    ctx: TrimContext
    undo: list[Undo] = field(default_factory=list)

    def __getstate__(self) -> dict:
        """Copies and pickles carry the undo entries, which must hold their targets as
        attributes (`trimkit.hooks`): a local function would undo the original model's
        patches from the copy, and does not pickle."""
        local = sorted({u.__qualname__ for u in self.undo
                        if "<locals>" in getattr(u, "__qualname__", "")
                        or getattr(u, "__name__", "") == "<lambda>"})
        if local:
            raise pickle.PicklingError(
                f"this model, trimmed by the {self.adapter!r} adapter, cannot be copied or "
                f"pickled: its adapter's undo entries are local functions ({', '.join(local)}). "
                f"Save it with trimkit.save(model, path) and rebuild it with trimkit.load; "
                f"adapters make them picklable with trimkit.hooks.Patches")
        return dict(self.__dict__)


def list_adapters() -> list[str]:
    """Names of the registered adapters."""
    _load_builtins()
    return sorted(ADAPTERS)


def list_recipes() -> list[str]:
    """Names of the registered recipes."""
    _load_builtins()
    return sorted(RECIPES)


def find_adapter(model: nn.Module, adapter: str | Adapter | None = None) -> Adapter:
    """The adapter for ``model``: ``adapter`` itself (an instance, or a registered name)
    when given, else the first registered adapter that recognises the model, trying
    `Adapter.fallback` ones (the generic fx adapter) last. `UnsupportedModelError` says
    which adapters exist and how to write one."""
    _load_builtins()
    if isinstance(adapter, Adapter):
        return adapter
    if adapter is not None:
        if adapter not in ADAPTERS:
            raise ValueError(f"unknown adapter {adapter!r}; adapters: "
                             f"{', '.join(sorted(ADAPTERS))}")
        return ADAPTERS[adapter]
    ordered = sorted(ADAPTERS.values(), key=lambda a: a.fallback)
    reasons = []
    for candidate in ordered:
        if candidate.detect(model):
            return candidate
        why = candidate.why_not(model) if candidate.fallback else None
        if why:
            reasons.append(f"The {candidate.name!r} adapter (for models no other adapter "
                           f"knows) could not adapt it: {why}")
    raise UnsupportedModelError(
        f"trimkit has no adapter for {type(model).__module__}.{type(model).__qualname__}. "
        f"Adapters: {', '.join(sorted(ADAPTERS))}. {' '.join(reasons)}{' ' if reasons else ''}"
        f"To add one, subclass trimkit.Adapter, implement detect() and describe(), and "
        f"decorate it with @trimkit.register_adapter or ship it under the "
        f"'trimkit.adapters' entry point group (see docs/adapters.md).")


def describe(model: nn.Module, adapter: str | Adapter | None = None) -> ModelDescription:
    """The adapter's description of ``model`` (streams, layers, heads, protected tokens);
    for a trimmed model, the description its recipe was applied with."""
    if adapter is None and is_applied(model):
        return _applied(model).description
    return find_adapter(model, adapter).describe(model)


def head_scores(model: nn.Module, data: Any, *, loss_fn: Any = None, forward: Any = None,
                adapter: str | Adapter | None = None) -> dict[str, list[float]]:
    """Gradient × output importance of every head that ``"prune_heads"`` could remove,
    summed over the batches of ``data``: ``{"image.3": [H floats], "text.1.cross": ...}``
    (see `trimkit.heads.head_importance` for ``loss_fn`` and ``forward``). The result can be
    edited and passed back as ``apply(model, "prune_heads", ratio=..., scores=...)``."""
    desc = find_adapter(model, adapter).describe(model)
    heads = locate_heads(model, desc, prunable_heads(desc))
    scores = _head_importance(model, heads, data, loss_fn=loss_fn, forward=forward)
    return {head_key_name(k): v.tolist() for k, v in scores.items()}


def is_applied(model: nn.Module) -> bool:
    """Whether ``model`` currently carries trimkit's sites."""
    return STATE_ATTR in model.__dict__


def _applied(model: nn.Module) -> Applied:
    if not is_applied(model):
        raise ValueError("this model has no trimming applied; call trimkit.apply(model, ...) first")
    return model.__dict__[STATE_ATTR]


def apply(model: nn.Module, recipe: str, *, mode: str = "auto",
          track_source: bool = False, adapter: str | Adapter | None = None,
          **overrides: Any) -> nn.Module:
    """Insert ``recipe``'s trimmers into ``model`` (in place) and return it.

    ``recipe`` names a registered recipe (`list_recipes`); it has no default, the engine
    favours none.

    ``mode`` is ``"auto"`` (masked in training, compacted in eval), ``"masked"``,
    ``"compacted"`` or ``"packed"`` (ragged batches as one sequence; docs/architecture.md);
    ``track_source`` records which input tokens each token covers (for pictures);
    ``adapter`` (a registered name or an `Adapter` instance) overrides the
    detected one, e.g. ``adapter="generic"``. Every recipe default can be overridden by
    keyword. Nothing is changed unless everything checks out: errors leave the model as it
    was. A one-shot recipe (``"prune_heads"``) changes the model itself and installs
    nothing: afterwards
    `is_applied` is false and there is nothing to `remove`.
    """
    _load_builtins()
    if recipe not in RECIPES:
        raise ValueError(f"unknown recipe {recipe!r}; recipes: {', '.join(sorted(RECIPES))}")
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if is_applied(model):
        raise ValueError(f"this model already has recipe {_applied(model).recipe!r} applied; "
                         f"call trimkit.remove(model) first")
    adapter = find_adapter(model, adapter)
    rec = RECIPES[recipe]
    options = rec.resolve(overrides)
    desc = adapter.describe(model)
    if rec.transforms:  # a one-shot change of the model itself: no sites, nothing to remove
        if mode != "auto" or track_source:
            raise ValueError(f"recipe {recipe!r} changes the model once and installs nothing: "
                             f"mode and track_source do not apply")
        return rec.transform(model, adapter, desc, options)
    plan = rec.plan(desc, options)
    ctx = TrimContext(mode=mode, track_source=track_source, parallel=desc.parallel,
                      protected={s.name: s.num_protected for s in desc.streams.values()},
                      proportional=frozenset(s for (s, _), p in plan.items() if p.proportional),
                      positional=frozenset(s.name for s in desc.streams.values() if s.positional))
    sites: dict[tuple[str, int], Site] = {}
    for stream in desc.streams.values():
        for i, layer in enumerate(stream.layers):
            p = plan.get((stream.name, i))
            site = Site(stream.name, i, layer.num_heads, first=(i == 0),
                        last=_run_ends(stream.layers, i),
                        pre=p.pre if p else None, post=p.post if p else None,
                        cross_stream=layer.cross_stream,
                        masks_are_padding=layer.masks_are_padding, pair=layer.pair)
            site.ctx = ctx
            sites[(stream.name, i)] = site
    for stream in desc.streams.values():
        acted = False
        for i in range(len(stream.layers)):
            site = sites[(stream.name, i)]
            site.acted = acted = acted or bool(len(site.pre))
            acted = acted or bool(len(site.post))
    ctx.scored = frozenset(site.stream for site in sites.values()
                           if "cross_scores" in site.needs)
    ctx.packable = _packable(desc)
    ctx.follows = frozenset(s.name for s in desc.streams.values()
                            if any(layer.token_inputs for layer in s.layers))
    with Patches() as patches:
        patches.add(*adapter.install(model, desc, sites, ctx))
        # a positional stream packs only where its adapter tells the calls without a mask
        ctx.packable = frozenset(s for s in ctx.packable
                                 if s not in ctx.positional or s in ctx.unmaskable)
        _install_exits(patches, model, desc, sites, ctx.packable)
        # projections skip the heads a whole batch gated off (inference only)
        patches.add(*install_head_skipping(model, desc, sites))
    container = nn.ModuleDict({f"{s}_{i}": site for (s, i), site in sites.items()})
    container.train(model.training)
    floats = [p for p in model.parameters() if p.is_floating_point()]
    if floats:  # the trimmers take the model's dtype and device, as its submodules have
        same = all(p.device == floats[0].device for p in floats)
        container.to(dtype=floats[0].dtype, device=floats[0].device if same else None)
    model.add_module(SITES_ATTR, container)
    model.__dict__[STATE_ATTR] = Applied(recipe, options, adapter.name, desc, ctx,
                                           patches.undo)
    return model


def _install_exits(patches: Patches, model: nn.Module, desc: ModelDescription,
                   sites: dict[tuple[str, int], Site], packable: frozenset[str]) -> None:
    """An exit point at the output of each packable stream's layers (after whatever the
    adapter hooked there), where per-layer packing hands the batch back one row per
    sample. Only from the stream's first layer with an op on: a stream packs only once
    some op has acted on it (`Site._run`), so before that (and in every layer of a recipe
    that trims nothing there) the hook would run at each layer of each forward for
    nothing."""
    for stream in desc.streams.values():
        if stream.name not in packable:
            continue
        for i, layer in enumerate(stream.layers):
            site = sites[(stream.name, i)]
            if site.acted or len(site.post):
                patches.hook(model.get_submodule(layer.block), Exit(site))


def _run_ends(layers: tuple, i: int) -> bool:
    """Whether layer ``i`` ends a run of the stream's layers inside one module (a tower):
    what the model does between towers (pooling, projections, its own heads) expects one
    row per sample, so a packed stream hands them back there."""
    if i == len(layers) - 1:
        return True
    return layers[i].block.rpartition(".")[0] != layers[i + 1].block.rpartition(".")[0]


def _packable(desc: ModelDescription) -> frozenset[str]:
    """Streams that may run packed (a packed stream's model code sees one 1×ΣN sequence
    between its layers; `trimkit.packed`): those whose token inputs cover every token or
    state the row that leaves a leading token as it is (`trimkit.describe.TokenInput.leading`,
    ``neutral``). A stream whose masks are positional packs only where its adapter tells
    the calls that give it none (`trimkit.sites.TrimContext.unmaskable`)."""
    return frozenset(name for name, s in desc.streams.items()
                     if all(t.leading == 0 or t.neutral is not None
                            for layer in s.layers for t in layer.token_inputs))


def remove(model: nn.Module) -> nn.Module:
    """Undo `apply`: the original forward, submodules and ``state_dict``, bit for bit."""
    applied = _applied(model)
    for u in reversed(applied.undo):
        u()
    del model._modules[SITES_ATTR]
    del model.__dict__[STATE_ATTR]
    return model


def set_mode(model: nn.Module, mode: str) -> None:
    """Switch execution: ``"masked"``, ``"compacted"``, ``"packed"`` or ``"auto"``. A
    setter: it holds for the model, in every thread (context managers such as
    `trimming_disabled` hold for the calling thread only)."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    _applied(model).ctx.mode = mode


class trimming_disabled:
    """Context manager: run ``model`` untrimmed (e.g. the self-distillation teacher), in the
    calling thread only: other threads' calls on the same model stay trimmed."""

    def __init__(self, model: nn.Module):
        self.ctx = _applied(model).ctx

    def __enter__(self) -> None:
        self.was, self.ctx.enabled = self.ctx.enabled, False

    def __exit__(self, *exc: object) -> None:
        self.ctx.enabled = self.was


class recording_costs:
    """Context manager: the calling thread's forwards inside record each layer's soft token
    and head counts;
    `ratio` gives the last forward's achieved cost ratio per sample (`trimkit.cost`), with
    the trimmers' gradient in training. For cost losses in your own training loop::

        with trimkit.recording_costs(model) as costs:
            out = model(*batch)
        loss = task_loss(out) + lam * trimkit.tools.objectives.cost_loss(costs.ratio(), target)
    """

    def __init__(self, model: nn.Module):
        self.applied = _applied(model)

    def __enter__(self) -> recording_costs:
        ctx = self.applied.ctx
        self.was, ctx.record_costs, ctx.costs = ctx.record_costs, True, []
        return self

    def __exit__(self, *exc: object) -> None:
        self.applied.ctx.record_costs = self.was

    def ratio(self) -> torch.Tensor:
        """B: the last forward's cost over its untrimmed cost, for the described layers."""
        from .cost import expected_ratio

        return expected_ratio(self.applied.description, self.applied.ctx)


@dataclass
class ForwardStats:
    """Per-layer live tokens and heads of one forward, and its FLOPs if they were counted."""

    layers: list[LayerStats]
    flops: int | None = None

    def table(self) -> list[dict]:
        return [s.as_dict() for s in self.layers]


def last_stats(model: nn.Module) -> ForwardStats:
    """Statistics of the calling thread's last forward of a trimmed model (no FLOPs: see
    `forward_stats`)."""
    return ForwardStats(list(_applied(model).ctx.stats))


def last_states(model: nn.Module) -> dict[str, TokenState]:
    """Each stream's `TokenState` at the end of the calling thread's last forward (``source`` needs
    ``apply(..., track_source=True)``)."""
    return dict(_applied(model).ctx.states)


def _sdpa_flops(query_shape: torch.Size, key_shape: torch.Size, value_shape: torch.Size,
                *args: Any, **kwargs: Any) -> int:
    return sdpa_flop_count(query_shape, key_shape, value_shape)


def _missing_formulas() -> dict[Any, Any]:
    """Flop formulas the installed torch's counter lacks: the CPU fused attention kernel
    (without it, every attention product on CPU would count as free)."""
    op = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    if op is None or op in flop_registry or op.default in flop_registry:
        return {}
    return {op: _sdpa_flops}


class _ForwardModuleTracker(ModuleTracker):
    """torch's `ModuleTracker`, which the flop counter attributes FLOPs with, without its
    backward hooks while gradients are off: it registers them on a module's inputs that
    require grad, which fails for a view of a parameter made under ``no_grad`` (it requires
    grad but has no grad_fn: a class token expanded and handed to a block that enters late)."""

    def _fw_pre_hook(self, mod: nn.Module, input: Any) -> None:
        if torch.is_grad_enabled():
            return super()._fw_pre_hook(mod, input)
        self._get_append_fn(self._get_mod_name(mod), False)()
        return None


def flop_counter() -> FlopCounterMode:
    """torch's `FlopCounterMode` (no display) that also counts the attention kernels the
    installed torch has no formula for: what `count_flops` uses, for counting any code."""
    counter = FlopCounterMode(display=False, custom_mapping=_missing_formulas())
    if type(getattr(counter, "mod_tracker", None)) is ModuleTracker and all(
            hasattr(ModuleTracker, f) for f in ("_fw_pre_hook", "_get_append_fn",
                                                "_get_mod_name")):
        counter.mod_tracker = _ForwardModuleTracker()
    return counter


def count_flops(model: nn.Module, *args: Any, **kwargs: Any) -> int:
    """FLOPs of one forward of ``model`` (trimmed or not), trimmers' own work included."""
    # nn.MultiheadAttention's fused inference path is one op the counter has no formula
    # for; the unfused path counts its projections and attention like everyone else's
    fastpath = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with torch.no_grad(), flop_counter() as counter:
            model(*args, **kwargs)
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)
    return int(counter.get_total_flops())


def forward_stats(model: nn.Module, *args: Any, **kwargs: Any) -> ForwardStats:
    """Run one forward and return its per-layer statistics with its FLOPs."""
    flops = count_flops(model, *args, **kwargs)
    stats = last_stats(model) if is_applied(model) else ForwardStats([])
    stats.flops = flops
    return stats
