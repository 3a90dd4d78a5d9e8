"""Adapters and recipes register here by name; the engine looks them up, never imports them.

Three ways in, all ending in `register_adapter` / `register_recipe`:

- the adapters and recipes that ship with trimkit (``trimkit.adapters``, ``trimkit.recipes``),
  imported by `_load_builtins`;
- third-party packages, through the entry point groups ``trimkit.adapters`` and
  ``trimkit.recipes`` (`ADAPTER_GROUP`, `RECIPE_GROUP`), loaded once per process right
  after the built-ins;
- any module that decorates a class and is imported before ``trimkit.apply`` is called.

An entry point names either a **module** (``my_pkg.trimkit_adapter``), whose import
registers what it decorates, or an `Adapter` / `Recipe` **subclass**
(``my_pkg.adapter:MyAdapter``), which is registered if it is not already. A broken entry
point (it does not import, or names something else) never breaks trimkit: it is skipped
with a `RegistrationWarning` naming it, its distribution and the error.

A name is registered once: registering it again from another class warns and keeps the
first, except that a built-in always wins over a third-party class (whichever came first).
Registering the same class again is silent, and so is a class redefined under the same
module and qualified name (a notebook cell run again, a reloaded module): it replaces its
earlier definition.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import types
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from .adapter import Adapter
from .recipe import Recipe

__all__ = ["ADAPTERS", "ADAPTER_GROUP", "COMMANDS", "RECIPES", "RECIPE_GROUP", "Command",
           "RegistrationWarning", "origin", "register_adapter", "register_command",
           "register_recipe"]

ADAPTERS: dict[str, Adapter] = {}
RECIPES: dict[str, Recipe] = {}

#: entry point groups that third-party packages register adapters and recipes under
ADAPTER_GROUP = "trimkit.adapters"
RECIPE_GROUP = "trimkit.recipes"

#: where a registered name came from when that is not its class's module:
#: ``("adapter" | "recipe", name) -> "<distribution> <version>"``
_ORIGINS: dict[tuple[str, str], str] = {}
#: ``(kind, name)`` refused by a clash, as they happen (to tell an entry point whose module
#: registered nothing from one whose names were all taken)
_CLASHES: list[tuple[str, str]] = []
#: whether the entry points were loaded in this process (tests reset it)
_plugins_loaded = False


class RegistrationWarning(UserWarning):
    """An adapter or recipe could not be registered as asked (a broken entry point, a name
    already taken); trimkit carries on without it."""


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

_BUILTIN_PACKAGES = {"adapter": "trimkit.adapters", "recipe": "trimkit.recipes"}


def _is_builtin(kind: str, cls: type) -> bool:
    package = _BUILTIN_PACKAGES[kind]
    module = getattr(cls, "__module__", "") or ""
    return module == package or module.startswith(package + ".")


def _where(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def _register(kind: str, table: dict[str, Any], cls: type, base: type) -> None:
    if not (isinstance(cls, type) and issubclass(cls, base)):
        raise TypeError(f"register_{kind} decorates a subclass of trimkit.{base.__name__}, "
                        f"got {cls!r}")
    name = getattr(cls, "name", "")
    if not isinstance(name, str) or not name:
        raise ValueError(f"{_where(cls)} needs a non-empty string `name` to be registered "
                         f"as a trimkit {kind}")
    old = table.get(name)
    if old is not None:
        old_cls = type(old)
        if old_cls is cls:
            return
        redefined = (old_cls.__module__, old_cls.__qualname__) == (cls.__module__,
                                                                    cls.__qualname__)
        if not redefined:
            builtin_wins = _is_builtin(kind, cls) and not _is_builtin(kind, old_cls)
            kept, other = (cls, old_cls) if builtin_wins else (old_cls, cls)
            came = _ORIGINS.get((kind, name))
            came = f" (from {came})" if came and not builtin_wins else ""
            warnings.warn(f"trimkit {kind} name {name!r} is taken by {_where(kept)}"
                          f"{came}; {_where(other)} is not registered under it",
                          RegistrationWarning, stacklevel=3)  # the decorated class
            _CLASHES.append((kind, name))
            if not builtin_wins:
                return
            _ORIGINS.pop((kind, name), None)
    table[name] = cls()


def register_adapter(cls: type[T]) -> type[T]:
    """Class decorator: make an `Adapter` subclass known to `trimkit.apply` by its ``name``
    (a name already taken by another class warns and keeps that one)."""
    _register("adapter", ADAPTERS, cls, Adapter)
    return cls


def register_recipe(cls: type[T]) -> type[T]:
    """Class decorator: make a `Recipe` subclass known to `trimkit.apply` by its ``name``
    (a name already taken by another class warns and keeps that one)."""
    _register("recipe", RECIPES, cls, Recipe)
    return cls


def origin(kind: str, name: str) -> str:
    """Where the registered ``kind`` (``"adapter"`` or ``"recipe"``) ``name`` comes from:
    ``"built-in"``, ``"<distribution> <version>"`` for one loaded through an entry point,
    else the module its class is defined in."""
    table = ADAPTERS if kind == "adapter" else RECIPES
    cls = type(table[name])
    if _is_builtin(kind, cls):
        return "built-in"
    return _ORIGINS.get((kind, name)) or cls.__module__


def _describe_entry_point(ep: importlib.metadata.EntryPoint) -> tuple[str, str]:
    """``("name = value" (group), "distribution version")`` for messages."""
    dist = getattr(ep, "dist", None)
    where = "an unknown distribution"
    if dist is not None:
        try:
            where = f"{dist.metadata['Name'] or dist.name} {dist.version}"
        except Exception:  # noqa: BLE001 - unreadable metadata: say what we can
            where = str(getattr(dist, "name", where))
    return f"{ep.name} = {ep.value} (group {ep.group})", where


def _load_entry_point(kind: str, ep: importlib.metadata.EntryPoint) -> None:
    """Load one entry point of the ``kind`` group; warn and return on any failure."""
    table, base = (ADAPTERS, Adapter) if kind == "adapter" else (RECIPES, Recipe)
    what, dist = _describe_entry_point(ep)
    before = {name: type(obj) for name, obj in table.items()}
    clashes = len(_CLASHES)
    try:
        obj = ep.load()
        if isinstance(obj, type) and issubclass(obj, base):
            _register(kind, table, obj, base)
            mine = [obj.name] if type(table.get(obj.name)) is obj else []
        elif isinstance(obj, types.ModuleType):
            module = obj.__name__
            # what its import registered, and what it had registered when imported earlier
            mine = [n for n, o in table.items() if before.get(n) is not type(o)
                    or type(o).__module__ == module
                    or type(o).__module__.startswith(module + ".")]
            if not mine and len(_CLASHES) == clashes:
                raise TypeError(f"module {module!r} registered no {kind} (decorate the class "
                                f"with @trimkit.register_{kind}, or name the class itself: "
                                f"'{module}:MyClass')")
        else:
            raise TypeError(f"it names {obj!r}, not a module nor a subclass of "
                            f"trimkit.{base.__name__}")
    except Exception as e:  # noqa: BLE001 - a third-party package must not break trimkit
        warnings.warn(f"trimkit skipped the entry point {what} of {dist}: "
                      f"{type(e).__name__}: {e}", RegistrationWarning, stacklevel=4)
        return
    for name in mine:
        if not _is_builtin(kind, type(table[name])):
            _ORIGINS[(kind, name)] = dist


def _load_entry_points() -> None:
    """Load every entry point of `ADAPTER_GROUP` and `RECIPE_GROUP`, in discovery order."""
    for kind, group in (("adapter", ADAPTER_GROUP), ("recipe", RECIPE_GROUP)):
        try:
            found = list(importlib.metadata.entry_points(group=group))
        except Exception as e:  # noqa: BLE001 - unreadable metadata somewhere on sys.path
            warnings.warn(f"trimkit could not list the {group!r} entry points: "
                          f"{type(e).__name__}: {e}", RegistrationWarning, stacklevel=3)
            continue
        for ep in found:
            _load_entry_point(kind, ep)


def _load_builtins() -> None:
    """Import the adapters, recipes and commands that ship with trimkit (they register
    themselves), then, once per process, the third-party ones registered under the
    ``trimkit.adapters`` and ``trimkit.recipes`` entry point groups."""
    global _plugins_loaded
    import trimkit.adapters  # noqa: F401
    import trimkit.benchmarks  # noqa: F401
    import trimkit.recipes  # noqa: F401

    if not _plugins_loaded:
        _plugins_loaded = True  # first: a plugin that calls back into trimkit sees it done
        _load_entry_points()


Loader = Callable[[], None]
