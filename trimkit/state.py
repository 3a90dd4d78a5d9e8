"""`TokenState`: what a trimmed forward carries beside the hidden states of one stream."""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

__all__ = ["TokenState"]


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
    """

    x: torch.Tensor
    keep: torch.Tensor
    size: torch.Tensor
    protected: torch.Tensor
    source: torch.Tensor | None = None
    sized: bool = False
    has_dead: bool = False
    packed: bool = False

    @classmethod
    def start(
        cls,
        x: torch.Tensor,
        *,
        num_protected: int = 0,
        protected: torch.Tensor | None = None,
        padding_mask: torch.Tensor | None = None,
        track_source: bool = False,
    ) -> TokenState:
        """The state at a stream's entry: every real token live, sizes 1.

        ``num_protected`` protects the first tokens (CLS, registers, distillation token);
        ``protected`` adds any other B×N bool mask. ``padding_mask`` is B×N, True on padding.
        """
        b, n = x.shape[:2]
        dev = x.device
        keep = torch.ones(b, n, dtype=torch.bool, device=dev)
        has_dead = False
        if padding_mask is not None:
            keep = ~padding_mask.to(device=dev, dtype=torch.bool)
            has_dead = bool(padding_mask.any())
        prot = torch.zeros(b, n, dtype=torch.bool, device=dev)
        if num_protected:
            prot[:, :num_protected] = True
        if protected is not None:
            prot = prot | protected.to(device=dev, dtype=torch.bool)
        prot = prot & keep
        size = torch.ones(b, n, dtype=x.dtype, device=dev)
        source = None
        if track_source:
            source = torch.arange(n, device=dev).expand(b, n).clone()
            source = source.masked_fill(~keep, -1)
        return cls(x=x, keep=keep, size=size, protected=prot, source=source,
                   has_dead=has_dead)

    @property
    def live(self) -> torch.Tensor:
        """B×N bool: tokens that are live (a soft mask counts as live where it is > 0)."""
        return self.keep if self.keep.dtype == torch.bool else self.keep > 0

    def live_counts(self) -> torch.Tensor:
        """B long: live tokens per sample."""
        return self.live.sum(1)

    def with_x(self, x: torch.Tensor) -> TokenState:
        """The same decisions around new hidden states."""
        return replace(self, x=x)
