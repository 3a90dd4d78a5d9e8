"""`TokenState`: what a trimmed forward carries beside the hidden states of one stream."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace

import torch

from .packed import Segments

__all__ = ["Known", "LiveCounts", "TokenState", "fixed_shapes", "resolve_counts",
           "static_shapes"]


#: set by `fixed_shapes` (a count, so that nested uses restore it)
_FIXED_SHAPES = 0


def static_shapes() -> bool:
    """Whether the forward under way must keep every tensor's shape a function of the input
    shapes and read no tensor value on the host: while exporting to ONNX, whose graph holds
    no data-dependent shapes and bakes in whatever Python reads, and inside `fixed_shapes`.
    Trimming then decides in masked form wherever counts differ per sample (padding), and
    compacts only where they are known (`TokenState.dead_count`); the outputs are the same."""
    return _FIXED_SHAPES > 0 or torch.onnx.is_in_onnx_export()


@contextmanager
def fixed_shapes() -> Iterator[None]:
    """Run trimmed forwards under `static_shapes` (e.g. around a ``torch.compile``d call with
    ``fullgraph=True``): a padded stream then keeps its slots and is trimmed in masked form,
    so no shape depends on the data and nothing breaks the graph. That costs the padded
    stream's savings; without it, compiled calls compact per batch, with a graph break where
    the batch's longest survivor decides a shape."""
    global _FIXED_SHAPES
    _FIXED_SHAPES += 1
    try:
        yield
    finally:
        _FIXED_SHAPES -= 1


@dataclass(frozen=True, eq=False)
class Known:
    """Facts about a state's masks that hold without reading them, valid only for the very
    tensors they were stated about (an op that replaces ``keep`` or ``protected`` without
    stating new facts drops them): every sample has ``dead`` dead tokens (hard ``keep``),
    and the protected tokens are the first ``prefix`` (``None``: not known)."""

    keep: torch.Tensor
    protected: torch.Tensor
    dead: int
    prefix: int | None


@dataclass
class TokenState:
    """The tokens of one stream (``"image"``, ``"text"``, …) at one point of a trimmed forward.

    Shapes: B batch, N current tokens, N0 tokens at the stream's entry.

    - ``x``: B×N×D hidden states.
    - ``keep``: B×N, bool (hard) or float in [0, 1] (soft, training). Padding is never live.
    - ``size``: B×N float, how many entry tokens each token stands for (merging).
    - ``source``: B×N0 long, the slot each entry token now belongs to (-1 once dropped),
      or ``None`` when source tracking is off. A token's coverage is ``source == slot``.
    - ``protected``: B×N bool, tokens no trimmer may drop or merge.
    - ``sized``: ``False`` while every ``size`` is 1, so attention can skip the log-size bias.
    - ``has_dead``: ``False`` while every key has full weight (all live; a soft ``keep`` all
      1), so attention can skip the key mask.
    - ``packed``: `trimkit.ops.compact` gathered the live tokens to the front and no op has
      decided anything since, so compacting again has nothing to do (a batch whose samples
      keep different counts stays padded, and is not gathered again at every layer).
    - ``known``: what is known about ``keep`` and ``protected`` without reading them
      (`Known`), so that fixed-count decisions need no device sync and keep static shapes
      under ``torch.compile``; read it through `dead_count` and `protected_prefix`.
    - ``segments``: set in packed execution, where ``x``, ``keep``, ``size`` and
      ``protected`` hold the live tokens of the whole batch as one 1×ΣN sequence and
      `trimkit.packed.Segments` says where each sample's lie (``source`` stays B×N0, its
      slots counted within each sample's segment). ``None``: one row per sample.
    - ``prefix``: how many entry tokens of this call belong to the stream's leading
      modality (`trimkit.describe.StreamDesc.prefix`: a single-stream VLM's text), padding
      included; the same for the whole batch. A token is in the prefix when its entry
      position is below it (`trimkit.ops.prefix_tokens`, which needs ``source``). 0: none.
    - ``entry``: B×N long (1×ΣN packed), the entry position each token carries: its own,
      kept through drops and reorders; a merged token keeps its destination's (the token it
      was merged into), a fused token the slot's. What per-token inputs (rotary tables,
      position ids) are gathered at (`trimkit.ops.gather_token_input`). Padding slots hold
      N0 − 1. Tracked with ``source``; ``None`` when not tracked.
    """

    x: torch.Tensor
    keep: torch.Tensor
    size: torch.Tensor
    protected: torch.Tensor
    source: torch.Tensor | None = None
    sized: bool = False
    has_dead: bool = False
    packed: bool = False
    known: Known | None = None
    segments: Segments | None = None
    prefix: int = 0
    entry: torch.Tensor | None = None

    @classmethod
    def start(
        cls,
        x: torch.Tensor,
        *,
        num_protected: int = 0,
        protected: torch.Tensor | None = None,
        padding_mask: torch.Tensor | None = None,
        track_source: bool = False,
        prefix: int = 0,
    ) -> TokenState:
        """The state at a stream's entry: every real token live, sizes 1.

        ``num_protected`` protects the first tokens (CLS, registers, distillation token), or
        with a ``prefix`` (the leading modality's entry tokens, `TokenState.prefix`), the
        first ones after it; ``protected`` adds any other B×N bool mask. ``padding_mask``
        is B×N, True on padding.
        """
        b, n = x.shape[:2]
        dev = x.device
        keep = torch.ones(b, n, dtype=torch.bool, device=dev)
        has_dead = False
        if padding_mask is not None:
            keep = ~padding_mask.to(device=dev, dtype=torch.bool)
            # while exporting, a padded batch's graph must hold for any padding pattern
            has_dead = True if static_shapes() else bool(padding_mask.any())
        prot = torch.zeros(b, n, dtype=torch.bool, device=dev)
        if num_protected:
            prot[:, prefix:prefix + num_protected] = True
        if protected is not None:
            prot = prot | protected.to(device=dev, dtype=torch.bool)
        prot = prot & keep
        size = torch.ones(b, n, dtype=x.dtype, device=dev)
        source = entry = None
        if track_source:
            entry = torch.arange(n, device=dev).expand(b, n)
            source = entry.masked_fill(~keep, -1)
        known = None
        if padding_mask is None:
            first = num_protected if protected is None and not prefix else None
            known = Known(keep, prot, 0, first)
        return cls(x=x, keep=keep, size=size, protected=prot, source=source,
                   has_dead=has_dead, known=known, prefix=prefix, entry=entry)

    @property
    def live(self) -> torch.Tensor:
        """B×N bool: tokens that are live (a soft mask counts as live where it is > 0)."""
        return self.keep if self.keep.dtype == torch.bool else self.keep > 0

    def live_counts(self) -> torch.Tensor:
        """B long: live tokens per sample."""
        if self.segments is not None:
            return torch.tensor(self.segments.lengths, device=self.keep.device)
        return self.live.sum(1)

    @property
    def dead_count(self) -> int | None:
        """Dead tokens per sample when every sample has the same number and that number is
        known without reading ``keep`` (fixed-count decisions on a batch without padding),
        else ``None``."""
        k = self.known
        return k.dead if k is not None and k.keep is self.keep else None

    @property
    def protected_prefix(self) -> int | None:
        """``p`` when the protected tokens are known to be exactly the first ``p`` of every
        sample, else ``None``."""
        k = self.known
        return k.prefix if k is not None and k.protected is self.protected else None

    def dense_prefix(self) -> int | None:
        """``p`` when every token is known to be live and the protected ones to be the first
        ``p``: the tokens that ops may drop or merge are then ``[p, N)`` in every sample."""
        return self.protected_prefix if self.dead_count == 0 else None

    def knowing(self, dead: int | None, prefix: int | None = None) -> TokenState:
        """This state with the facts stated about its current ``keep`` (``dead`` tokens per
        sample; ``None``: not known) and ``protected`` (``prefix``)."""
        if dead is None or self.keep.dtype != torch.bool:
            return self if self.known is None else replace(self, known=None)
        return replace(self, known=Known(self.keep, self.protected, dead, prefix))

    def with_x(self, x: torch.Tensor) -> TokenState:
        """The same decisions around new hidden states. A shallow copy of the fields, not
        `dataclasses.replace`, which re-runs ``__init__`` through the fields' introspection:
        this runs twice per layer and stream in every trimmed forward."""
        new = object.__new__(TokenState)
        new.__dict__.update(self.__dict__)
        new.x = x
        return new

    def deferred_counts(self) -> torch.Tensor | LiveCounts:
        """`live_counts`, or where that would run ops on every layer of a forward only to be
        read by `trimkit.last_stats`, a `LiveCounts` that counts when first read: from the
        known dead count, or from this ``keep`` (hard, so holding it holds no graph)."""
        if self.segments is not None or (self.keep.dtype != torch.bool
                                         and self.dead_count is None):
            return self.live_counts()
        return LiveCounts(self.keep, self.dead_count)


class LiveCounts:
    """Live tokens per sample of a state (B long), counted when first read (`resolve`): the
    per-layer statistics of a forward are mostly never read, and counting them is a few
    tensor ops per layer. ``dead``: dead tokens per sample where known, so the count needs
    no read of ``keep`` at all."""

    __slots__ = ("keep", "dead", "_value")

    def __init__(self, keep: torch.Tensor, dead: int | None = None):
        self.keep, self.dead = keep, dead
        self._value: torch.Tensor | None = None

    def resolve(self) -> torch.Tensor:
        """The counts (B long), computed once."""
        if self._value is None:
            b, n = self.keep.shape
            self._value = (torch.full((b,), n - self.dead, dtype=torch.long,
                                      device=self.keep.device)
                           if self.dead is not None else self.keep.sum(1))
        return self._value


def resolve_counts(counts: torch.Tensor | LiveCounts) -> torch.Tensor:
    """``counts`` as a tensor (B long)."""
    return counts.resolve() if isinstance(counts, LiveCounts) else counts
