"""The `Recipe` base: which trimmers go where, with which defaults, all checked up front."""

from __future__ import annotations

import functools
import math
import numbers
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from torch import nn

from .describe import ModelDescription
from .sites import TokenOp

if TYPE_CHECKING:
    from .adapter import Adapter

__all__ = ["INTS", "LAYERS", "STREAM", "STREAMS", "Combined", "Option", "Recipe", "SitePlan",
           "check_ratio"]


#: `Option.kind` values beside Python types (``bool``, ``int``, ``float``, ``str``, ``dict``,
#: ``list``) and ``callable``: shapes of values that name the model's streams and layers
STREAM = "stream"  # one stream name
STREAMS = "streams"  # a stream name or a list of them
INTS = "ints"  # an int or a list of ints (the range applies to each)
LAYERS = "layers"  # a layer index, a list of them, or a dict stream name -> index or list

_KIND_WORDS: dict[Any, str] = {
    bool: "True or False", int: "an int", float: "a number", str: "a string",
    dict: "a dict", list: "a list", callable: "a callable", STREAM: "a stream name",
    STREAMS: "a stream name or a list of them", INTS: "an int or a list of ints",
    LAYERS: "a layer index, a list of them or a dict {stream: indices}",
    Iterable: "an iterable (of batches)"}


@dataclass(frozen=True)
class Option:
    """A recipe option: its default, what it means (shown by ``trimkit recipes``), and the
    values it takes, which `check` enforces for every recipe before anything is touched.

    ``kind`` is a type (``bool``, ``int``, ``float``: any real number, ``str``, ``dict``,
    ``list``: a list or tuple), ``callable``, a shape that names the model's streams
    (`STREAM`, `STREAMS`, `INTS`, `LAYERS`), or a tuple of these alternatives; ``None``
    takes anything. Numbers lie within ``low`` / ``high`` (excluded with ``low_open`` /
    ``high_open``) and are finite unless ``finite=False``; ``choices`` lists the only values
    allowed. ``None`` is allowed where the default is ``None`` (or ``none=True``)."""

    default: Any
    help: str
    kind: Any = None
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    finite: bool = True
    choices: tuple = ()
    none: bool | None = None

    def describe(self) -> str:
        """The values taken, in words: "a number in (0, 1]", "'constant' or 'decreasing'"."""
        if self.choices:
            words = [repr(c) for c in self.choices]
            text = " or ".join(words) if len(words) <= 2 else (
                f"one of {', '.join(words[:-1])} or {words[-1]}")
        elif self.kind is None:
            text = "a finite value" if self.finite else "any value"
        else:
            kinds = self.kind if isinstance(self.kind, tuple) else (self.kind,)
            words = [_KIND_WORDS.get(k, getattr(k, "__name__", str(k))) for k in kinds]
            if bool in kinds and len(kinds) > 1:
                words[kinds.index(bool)] = "True, False"
            bounds = self._bounds()
            for i, k in enumerate(kinds):
                if k is float and self.finite and (self.low is None or self.high is None):
                    words[i] = "a finite number"  # a bound on one side only, or none
                if k in (int, float, INTS) and bounds:
                    words[i] = (f"{words[i]} {bounds}" if k != INTS
                                else f"an int {bounds} or a list of them")
            text = ", ".join(words[:-1]) + (" or " if len(words) > 1 else "") + words[-1]
        return text + (" or None" if self._takes_none() else "")

    def check(self, name: str, value: Any, desc: ModelDescription | None = None) -> Any:
        """``value`` as the option holds it (``int`` / ``float`` for numbers), or a
        `ValueError` naming ``name`` and what it takes. With the model's ``desc``, stream
        names (`STREAM`, `STREAMS`, the keys of a `LAYERS` dict) must be streams it has."""
        if value is None and self._takes_none():
            return None
        if self.choices:
            if not any(value == c and type(value) is type(c) for c in self.choices):
                raise ValueError(f"{name} must be {self.describe()}, got {value!r}")
            return value
        kinds = (() if self.kind is None
                 else self.kind if isinstance(self.kind, tuple) else (self.kind,))
        kind, got = None, value
        for k in kinds:
            got = _as_kind(k, value)
            if got is not _NO:
                kind = k
                break
        if kinds and kind is None or not self._in_range(kind, got):
            raise ValueError(f"{name} must be {self.describe()}, got {value!r}")
        if desc is not None and kind in (STREAM, STREAMS, LAYERS):
            names = ([got] if isinstance(got, str) else list(got)) if kind != LAYERS else (
                list(got) if isinstance(got, Mapping) else [])
            unknown = sorted({n for n in names if n not in desc.streams}, key=str)
            if unknown:
                raise ValueError(f"{name} names stream{'s' if len(unknown) > 1 else ''} "
                                 f"{', '.join(map(repr, unknown))}, which this "
                                 f"{desc.family!r} model does not have; its streams are "
                                 f"{sorted(desc.streams)}")
        return got

    def _takes_none(self) -> bool:
        return self.default is None if self.none is None else self.none

    def _bounds(self) -> str:
        lo, hi = self.low, self.high
        if lo is not None and hi is not None:
            return (f"in {'(' if self.low_open else '['}{lo:g}, {hi:g}"
                    f"{')' if self.high_open else ']'}")
        if lo is not None:
            return f"{'>' if self.low_open else '>='} {lo:g}"
        if hi is not None:
            return f"{'<' if self.high_open else '<='} {hi:g}"
        return ""

    def _in_range(self, kind: Any, value: Any) -> bool:
        if kind is None:  # undeclared: only non-finite floats are refused (unless allowed)
            return not (self.finite and isinstance(value, float) and not math.isfinite(value))
        if kind not in (int, float, INTS):
            return True
        values = value if isinstance(value, (list, tuple)) else [value]
        for v in values:
            if isinstance(v, float) and self.finite and not math.isfinite(v):
                return False
            if self.low is not None and (v <= self.low if self.low_open else v < self.low):
                return False
            if self.high is not None and (v >= self.high if self.high_open else v > self.high):
                return False
        return True


_NO = object()


def _is_int(v: Any) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _as_kind(kind: Any, v: Any) -> Any:
    """``v`` converted to ``kind`` (`Option.kind`), or ``_NO`` where it is not one."""
    if kind is bool:
        return v if isinstance(v, bool) else _NO
    if kind is int:
        return int(v) if _is_int(v) else _NO
    if kind is float:
        return float(v) if isinstance(v, numbers.Real) and not isinstance(v, bool) else _NO
    if kind is callable:
        return v if callable(v) else _NO
    if kind is dict:
        return v if isinstance(v, Mapping) else _NO
    if kind is list:
        return v if isinstance(v, (list, tuple)) else _NO
    if kind in (str, STREAM):
        return v if isinstance(v, str) else _NO
    if kind == STREAMS:
        many = isinstance(v, (list, tuple, set, frozenset)) and all(isinstance(n, str) for n in v)
        return v if isinstance(v, str) or many else _NO
    if kind == INTS:
        if _is_int(v):
            return int(v)
        many = isinstance(v, (list, tuple)) and all(_is_int(i) for i in v)
        return type(v)(int(i) for i in v) if many else _NO
    if kind == LAYERS:
        if isinstance(v, Mapping):
            ok = all(isinstance(k, str) and _as_kind(INTS, i) is not _NO for k, i in v.items())
            return v if ok else _NO
        return _as_kind(INTS, v)
    if isinstance(kind, type):
        return v if isinstance(v, kind) else _NO
    raise TypeError(f"unknown Option kind {kind!r}")


@dataclass
class SitePlan:
    """What one layer's site does. ``proportional`` on any layer of a stream makes that
    stream's merged tokens weigh attention by log(size) wherever they are keys."""

    pre: list[TokenOp] = field(default_factory=list)
    post: list[TokenOp] = field(default_factory=list)
    proportional: bool = False


def check_ratio(name: str, value: Any, *, zero: bool = False) -> float:
    """``value`` as a float in (0, 1] (``[0, 1]`` with ``zero``), else a `ValueError` naming
    ``name``."""
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not number or not (value >= 0 if zero else value > 0) or value > 1:
        raise ValueError(f"{name} must be a number in {'[' if zero else '('}0, 1], "
                         f"got {value!r}")
    return float(value)


def _checking(fn: Callable, where: int) -> Callable:
    """``fn`` (a recipe's `Recipe.plan` or `Recipe.transform`, its description at positional
    argument ``where``) run after `Recipe.check`."""
    @functools.wraps(fn)
    def checked(self: Recipe, *args: Any, **kwargs: Any) -> Any:
        names = ("desc", "options")
        given = dict(zip(names, args[where:where + 2], strict=False))
        given.update({k: kwargs[k] for k in names if k in kwargs})
        self.check(given["desc"], given["options"])
        return fn(self, *args, **kwargs)

    checked._checks_options = True  # type: ignore[attr-defined]
    return checked


class Recipe:
    """Base class of recipes. Subclass, set ``name`` and ``options``, implement `plan`.

    A recipe that changes the model once and installs nothing (static head pruning) sets
    ``transforms = True`` and implements `transform` instead.
    """

    name: str = ""
    summary: str = ""
    options: dict[str, Option] = {}
    transforms: bool = False

    def __init_subclass__(cls, **kwargs: Any) -> None:
        # a subclass's own plan / transform first checks the options against the model
        # (`check`): stream names need its description, which `resolve` has not
        super().__init_subclass__(**kwargs)
        for name, where in (("plan", 0), ("transform", 2)):
            fn = cls.__dict__.get(name)
            if fn is not None and not getattr(fn, "_checks_options", False):
                setattr(cls, name, _checking(fn, where))

    def resolve(self, overrides: dict[str, Any]) -> dict[str, Any]:
        """Defaults updated by ``overrides``, each checked against its `Option` (`Option.check`
        converts numbers to int / float); an unknown keyword or a bad value is a `ValueError`
        naming it."""
        unknown = sorted(set(overrides) - set(self.options))
        if unknown:
            raise ValueError(f"recipe {self.name!r} has no option {unknown[0]!r}; its options "
                             f"are: {', '.join(sorted(self.options)) or '(none)'}")
        return {k: o.check(k, overrides.get(k, o.default)) for k, o in self.options.items()}

    def check(self, desc: ModelDescription, options: dict[str, Any]) -> None:
        """Check every resolved option against its `Option` and the model described by
        ``desc`` (stream names): a `ValueError` naming the first bad one. Runs before every
        subclass's `plan` and `transform`."""
        for k, o in self.options.items():
            if k in options:
                o.check(k, options[k], desc)

    def plan(
        self, desc: ModelDescription, options: dict[str, Any]
    ) -> dict[tuple[str, int], SitePlan]:
        """A `SitePlan` per (stream, layer index) that does something; raises `ValueError`
        for options that do not fit this model."""
        raise NotImplementedError

    def transform(self, model: nn.Module, adapter: Adapter, desc: ModelDescription,
                  options: dict[str, Any]) -> nn.Module:
        """For ``transforms`` recipes: change ``model`` in place, once, and return it. It
        must raise `ValueError` for bad options before changing anything."""
        raise NotImplementedError

    def objective(self, model: nn.Module, loss_fn: Callable | None, forward: Callable | None,
                  total_steps: int, options: dict[str, Any]) -> Any:
        """The training objective `trimkit.train` runs on a model this recipe trimmed when
        the caller gives none: a `trimkit.Objective`, or ``None`` (this default) for the
        task loss alone (`trimkit.TaskObjective`). Learned recipes override it (e.g.
        self-distillation, a cost loss and a curriculum over ``total_steps`` optimizer
        steps). ``model`` is the trimmed model, ``loss_fn(outputs, batch)`` and
        ``forward(model, batch)`` what the caller passed to `trimkit.train`, ``options``
        the resolved options the recipe was applied with."""
        return None


class Combined(Recipe):
    """A recipe made of other recipes that trim different layers (e.g. one in a VLM's
    vision tower, one in its language model), applied together by one `trimkit.apply`.

    Subclass, set ``name`` and ``parts``: a tuple of ``(Recipe subclass, renames)``, where
    ``renames`` maps this recipe's option names to the part's (``{"vision_layer":
    "layer"}``) for options two parts share; every other option of a part keeps its name.
    The options are the parts' (a name two parts would share without a rename is refused
    when the class is defined), each part plans with its own, and the plans are joined; a
    layer that two parts would both trim is refused by `plan` (`ValueError`, nothing
    changed). Recipes that change the model once (``transforms``) do not combine."""

    parts: tuple[tuple[type[Recipe], dict[str, str]], ...] = ()

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if not cls.parts:
            return
        options: dict[str, Option] = {}
        for part, renames in cls.parts:
            if part.transforms:
                raise TypeError(f"{cls.__name__}: recipe {part.name!r} changes the model once "
                                f"and installs nothing; it does not combine")
            own = {theirs: mine for mine, theirs in renames.items()}
            missing = sorted(set(own) - set(part.options))
            if missing:
                raise TypeError(f"{cls.__name__}: recipe {part.name!r} has no option "
                                f"{missing[0]!r} to rename")
            for theirs, option in part.options.items():
                mine = own.get(theirs, theirs)
                if mine in options:
                    raise TypeError(f"{cls.__name__}: option {mine!r} of recipe {part.name!r} "
                                    f"is also another part's; rename one in parts")
                options[mine] = option
        cls.options = options

    def plan(self, desc: ModelDescription, options: dict[str, Any]
             ) -> dict[tuple[str, int], SitePlan]:
        """Each part's plan with its own options, joined."""
        joined: dict[tuple[str, int], SitePlan] = {}
        owner: dict[tuple[str, int], str] = {}
        for part, renames in self.parts:
            own = {theirs: mine for mine, theirs in renames.items()}
            sub = {theirs: options[own.get(theirs, theirs)] for theirs in part.options}
            for key, site in part().plan(desc, sub).items():
                if key in joined:
                    raise ValueError(f"recipe {self.name!r}: {part.name!r} and "
                                     f"{owner[key]!r} would both trim layer {key[1]} of "
                                     f"stream {key[0]!r}; they combine only on different "
                                     f"layers")
                joined[key], owner[key] = site, part.name
        return joined
