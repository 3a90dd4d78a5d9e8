"""Adapters and recipes register here by name; the engine looks them up, never imports them."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, TypeVar

if TYPE_CHECKING:
    from .adapter import Adapter
    from .recipe import Recipe

__all__ = ["ADAPTERS", "RECIPES", "register_adapter", "register_recipe"]

ADAPTERS: dict[str, Adapter] = {}
RECIPES: dict[str, Recipe] = {}

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
    """Import the adapters and recipes that ship with trimkit (they register themselves)."""
    import trimkit.adapters  # noqa: F401
    import trimkit.recipes  # noqa: F401


Loader = Callable[[], None]
