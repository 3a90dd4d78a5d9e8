"""The `Recipe` base: which trimmers go where, with which defaults, all checked up front."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from torch import nn

from .describe import ModelDescription
from .sites import TokenOp

if TYPE_CHECKING:
    from .adapter import Adapter

__all__ = ["Option", "Recipe", "SitePlan", "check_ratio"]


@dataclass(frozen=True)
class Option:
    """A recipe option: its default and what it means (shown by ``trimkit recipes``)."""

    default: Any
    help: str


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


class Recipe:
    """Base class of recipes. Subclass, set ``name`` and ``options``, implement `plan`.

    A recipe that changes the model once and installs nothing (static head pruning) sets
    ``transforms = True`` and implements `transform` instead.
    """

    name: str = ""
    summary: str = ""
    options: dict[str, Option] = {}
    transforms: bool = False

    def resolve(self, overrides: dict[str, Any]) -> dict[str, Any]:
        """Defaults updated by ``overrides``; an unknown keyword is a `ValueError` naming it."""
        unknown = sorted(set(overrides) - set(self.options))
        if unknown:
            raise ValueError(f"recipe {self.name!r} has no option {unknown[0]!r}; its options "
                             f"are: {', '.join(sorted(self.options)) or '(none)'}")
        return {k: overrides.get(k, o.default) for k, o in self.options.items()}

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
