"""Adapters and recipes register here by name; the engine looks them up, never imports them."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, TypeVar

if TYPE_CHECKING:
    from .adapter import Adapter
    from .recipe import Recipe

__all__ = ["ADAPTERS", "COMMANDS", "RECIPES", "Command", "register_adapter", "register_command",
           "register_recipe"]

ADAPTERS: dict[str, Adapter] = {}
RECIPES: dict[str, Recipe] = {}


@dataclass(frozen=True)
class Command:
    """A ``trimkit`` sub-command shipped beside the engine (e.g. an end-to-end benchmark):
    ``configure`` adds its arguments to an ``argparse`` parser, ``run`` gets the parsed
    namespace and returns the exit status; ``epilog`` ends its ``--help`` (examples)."""

    name: str
    help: str
    description: str
    configure: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]
    epilog: str | None = None


COMMANDS: dict[str, Command] = {}


def register_command(command: Command) -> Command:
    """Make ``command`` a ``trimkit`` sub-command."""
    COMMANDS[command.name] = command
    return command

T = TypeVar("T")


def register_adapter(cls: type[T]) -> type[T]:
    """Class decorator: make an `Adapter` subclass known to `trimkit.apply` by its ``name``."""
    ADAPTERS[cls.name] = cls()
    return cls


def register_recipe(cls: type[T]) -> type[T]:
    """Class decorator: make a `Recipe` subclass known to `trimkit.apply` by its ``name``."""
    RECIPES[cls.name] = cls()
    return cls


def _load_builtins() -> None:
    """Import the adapters, recipes and commands that ship with trimkit (they register
    themselves)."""
    import trimkit.adapters  # noqa: F401
    import trimkit.benchmarks  # noqa: F401
    import trimkit.recipes  # noqa: F401


Loader = Callable[[], None]
