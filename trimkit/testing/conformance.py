"""`check_adapter`: the conformance kit an adapter author runs (structural checks of the
description, then every fitting recipe's `Case` as a hypothesis property), its report and
its error."""

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

from .. import api
from ..adapter import Adapter
from ..describe import ModelDescription, StreamDesc
from ..recipe import Recipe
from ..registry import RECIPES, _load_builtins
from ..rewrite import RewriteError
from .cases import CASES, Case, Trial, require_hypothesis
from .invariants import (
    InvariantError,
    _close,
    check_invariants,
    check_transform,
    first_tensor,
    seeded,
)

# ------------------------------------------------------------------------ conformance kit

#: what in an adapter usually breaks each invariant (`ConformanceError` quotes it)
HINTS: dict[int, str] = {
    1: "with nothing trimmed the install points still change the computation: the "
       "attention product is not routed with the model's own mask, scale and dropout "
       "(LayerDesc.attention), masks_are_padding is set where the masks mark more than "
       "padding, or a per-instance patch (pooling, outputs) does not give back the original "
       "result",
    2: "num_protected is wrong or the protected tokens are not the first ones (a token a "
       "pooler reads elsewhere must be protected through a trimkit.hooks.Entry)",
    3: "the stream's layers are not listed in the order the forward runs them, or a block "
       "passes its untrimmed input around the enter point (stream_arg names the wrong "
       "argument)",
    4: "padding reaches the stream as live tokens: its mask is not given to the stream "
       "(mask_arg, or a trimkit.hooks.Entry for masks the blocks never see), StreamDesc.padded "
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
       "append its undo), or the forward depends on state left by an earlier call, or the "
       "model's own forward is random (it samples, as ViLT samples its image patches): pass "
       "seed= to check_adapter",
}
_GRID_HINT = ("num_protected must count every token before the patches (CLS, registers, "
              "distillation token; with a StreamDesc.prefix, those after the prefix) and "
              "StreamDesc.grid must be the patch grid: the last rows·cols entry tokens, "
              "counted from the end")
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
    seed: int | None = None

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
        seed = "" if self.seed is None else f", seed={self.seed}"
        if self.transforms:
            return (f"trimkit.testing.check_transform(make_model, make_inputs({b}), "
                    f"{self.recipe!r}, {self.options!r}, {self.zero_options!r}{seed})")
        return (f"trimkit.testing.check_invariants(make_model, make_inputs({b}), "
                f"{self.recipe!r}, {self.options!r}, {self.zero_options!r}"
                f"{', merges_only=True' if self.merges_only else ''}{seed})")

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
    if s.prefix:
        parts.append(f"prefix {s.prefix}")
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
                f"{'fail' if many else 'fails'} trimkit's invariants (docs/architecture.md, "
                f"'Invariants') on this model "
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
          output: Callable[[Any], torch.Tensor], seed: int | None = None
          ) -> tuple[tuple, torch.Tensor]:
    inputs = make_inputs(b)
    if not isinstance(inputs, tuple):
        raise TypeError(f"make_inputs({b}) must return a tuple of positional arguments, got "
                        f"{type(inputs).__name__}")
    return inputs, output(seeded(model, inputs, seed))


def _random_forward(b: int, seed: int | None) -> str:
    """Why two untrimmed calls on the same inputs can differ, and what to do."""
    if seed is None:
        return (f"the untrimmed model's forward on make_inputs({b}) draws random numbers in "
                f"eval (it advanced torch's global RNG, as ViLT does when it samples its "
                f"image patches with torch.multinomial), so two calls on the same inputs may "
                f"differ. Pass seed= to check_adapter: torch's global RNG is then seeded "
                f"before every forward")
    return (f"the untrimmed model gives different outputs on two calls with the same inputs "
            f"(make_inputs({b})) even with torch's global RNG seeded (seed={seed}) before "
            f"each: its randomness comes from elsewhere (another generator, or state its "
            f"calls leave behind)")


def _structure(make_model: Callable[[], nn.Module], make_inputs: Callable[[int], tuple],
               batch_sizes: Sequence[int], output: Callable[[Any], torch.Tensor],
               adapter: str | Adapter | None, atol: float, seed: int | None = None
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
            rng = torch.get_rng_state()
            try:
                _, out = _call(model, make_inputs, b, output, seed)
            except Exception as e:
                raise _structural(name, [f"the untrimmed model failed on make_inputs({b}): "
                                         f"{type(e).__name__}: {e}"]) from e
            if seed is None and not torch.equal(torch.get_rng_state(), rng):
                raise _structural(name, [_random_forward(b, seed)])
            if not isinstance(out, torch.Tensor) or out.dim() < 1 or out.shape[0] != b:
                got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
                raise _structural(name, [f"output(model(*make_inputs({b}))) must be a tensor "
                                         f"with the batch first, got {got}; pass output="])
            if not torch.isfinite(out).all():
                raise _structural(name, [f"the untrimmed output on make_inputs({b}) is not "
                                         f"finite"])
            if not torch.equal(_call(model, make_inputs, b, output, seed)[1], out):
                raise _structural(name, [_random_forward(b, seed)])
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
                    _, out = _call(model, make_inputs, b, output, seed)
                    _close(f"invariant 1 (zero trimming is the identity, {mode}, batch size "
                           f"{b})", out, refs[b], atol)
                    if mode == "compacted":
                        _entry_counts(desc, api.last_states(model), b, entry)
            step = "remove"
            api.remove(model)
            for b in batch_sizes:
                if not torch.equal(_call(model, make_inputs, b, output, seed)[1], refs[b]):
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
              shrink: bool, seed: int | None = None) -> RecipeResult:
    """One recipe's property, run by hypothesis; the last example it ran before raising is
    the one it shrank to (hypothesis replays the minimal failing example last)."""
    hyp = require_hypothesis()
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
                            adapter=impl, seed=seed)
        else:
            check_invariants(make_model, inputs, name, options, zero, output=output,
                             merges_only=merges_only, perturb_padding=perturb_padding,
                             atol=atol, adapter=impl, seed=seed)

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
        failure = Failure(name, options, zero, b, merges_only, e, transforms, seed)
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
    seed: int | None = None,
) -> ConformanceReport:
    """Check an adapter on the model ``make_model()`` builds: structure first, then
    the invariants (docs/architecture.md) for every recipe that fits, as hypothesis properties.

    ``make_model`` returns a fresh model (random weights are fine; it is put in eval mode);
    ``make_inputs(b)`` returns the positional arguments of a batch of ``b``, batch first;
    ``output`` picks the tensor compared (batch first); ``perturb_padding`` returns the
    inputs with padding content changed, for models with padding. ``recipes`` restricts the
    recipes checked (default: every registered one; those without a `Case` are skipped);
    each gets ``max_examples`` examples with batch sizes drawn from ``batch_sizes``;
    ``shrink=False`` reports the first failing example instead of the smallest. ``adapter``
    forces one (a registered name or an instance) instead of the detected one. ``seed``:
    for a model whose own forward draws random numbers in eval (ViLT samples its image
    patches), torch's global RNG is seeded with it before every forward the kit runs;
    without it, such a model fails the structural check with a message that says so.

    Returns a `ConformanceReport`. Raises `ConformanceError` at once when a structural check
    fails (a path that does not exist, a forward that does not run, ``apply`` + ``remove``
    with nothing trimmed that does not give the model back), else after every recipe ran,
    listing each failing recipe with its smallest failing example and a hint.
    """
    require_hypothesis()
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

    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise ValueError(f"seed must be an int or None, got {seed!r}")
    impl, desc, entry = _structure(make_model, make_inputs, batch_sizes, output, adapter, atol,
                                   seed)
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
            shrink=shrink, seed=seed))
    if report.failures:
        raise ConformanceError.from_report(report)
    return report
