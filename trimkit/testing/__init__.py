"""Conformance checks for adapted models: the invariants of docs/architecture.md as code.

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
  usually causes it. A third-party recipe becomes checkable with `register_case`: its
  `Case` draws options with hypothesis (`require_hypothesis`), e.g. over `layer_subsets`
  of a stream or `head_count` heads of a layer, and returns a `Trial`.

The invariants (docs/architecture.md, "Invariants"):

1. zero trimming is the identity;
2. protected tokens are never dropped or merged;
3. live counts never grow layer to layer;
4. padding never becomes live (and, with ``perturb_padding``, never changes the output);
5. masked, compacted and packed execution agree;
6. a sample's output does not depend on its batch;
7. every live token's ``size`` equals the number of entry tokens it covers (and, for
   recipes that only merge, sizes sum to the entry's live count);
8. at least one unprotected token survives per stream and nothing is NaN;
9. eval is deterministic, and `remove` restores outputs and ``state_dict`` exactly.

Hypothesis is needed by `check_adapter` only (``pip install hypothesis``); it is imported
when called.
"""

from .cases import CASES, Case, Trial, layer_subsets, register_case, require_hypothesis
from .conformance import (
    HINTS,
    ConformanceError,
    ConformanceReport,
    Failure,
    RecipeResult,
    check_adapter,
)
from .invariants import (
    InvariantError,
    check_invariants,
    check_transform,
    first_tensor,
    head_count,
    slice_batch,
)

__all__ = [
    "CASES",
    "HINTS",
    "Case",
    "ConformanceError",
    "ConformanceReport",
    "Failure",
    "InvariantError",
    "RecipeResult",
    "Trial",
    "check_adapter",
    "check_invariants",
    "check_transform",
    "first_tensor",
    "head_count",
    "layer_subsets",
    "register_case",
    "require_hypothesis",
    "slice_batch",
]
