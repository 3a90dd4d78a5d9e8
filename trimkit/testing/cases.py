"""How `check_adapter` exercises a recipe: a `Case` per recipe name (`register_case`);
the built-in recipes register theirs in ``trimkit.recipes.cases``."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from ..describe import ModelDescription

__all__ = ["CASES", "Case", "Trial", "layer_subsets", "register_case", "require_hypothesis"]

#: ``(options, zero_options, merges_only)``: what a `Case` strategy draws
Trial = tuple[dict[str, Any], dict[str, Any], bool]


def require_hypothesis() -> Any:
    """The ``hypothesis`` module, imported now; an `ImportError` that says how to install it
    if it is missing. `Case` strategies draw with it (``require_hypothesis().strategies``),
    so trimkit needs hypothesis only when an adapter is checked."""
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
    st = require_hypothesis().strategies
    s = desc.streams[stream]
    layers = s.attention_layers() if attention_only else list(range(len(s.layers)))
    if not layers:
        raise ValueError(f"stream {stream!r} has no {'self-attention ' if attention_only else ''}"
                         f"layers to choose from")
    return st.lists(st.sampled_from(layers), min_size=1, max_size=min(max_size, len(layers)),
                    unique=True).map(sorted)
