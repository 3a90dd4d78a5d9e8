"""Packed token sequences: the live tokens of a whole batch as one sequence with segment
offsets, and attention that respects the segments.

Padding a ragged batch to its longest survivor spends the per-sample savings of a trimmer
on padding slots. Packed, every per-token computation (projections, MLPs, norms) runs on
exactly the live tokens; only the attention core needs to know where a sample ends. These
are pure tensor functions that know no model:

- `pack` / `unpack` move between a padded B×N×… batch with a live mask and a packed
  1×ΣN×… sequence with its `Segments`;
- `segment_attention` runs scaled-dot-product attention within segments (self- or
  cross-attention, each query segment reading its own key segment). On CPU, one fused call
  per sample loses to the call overhead and one block-diagonal call wastes the off-diagonal
  work, so samples of similar length are grouped (`length_groups`) and each group is one
  padded fused call.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from functools import cached_property

import torch
import torch.nn.functional as F

__all__ = ["BACKENDS", "Segments", "length_groups", "pack", "segment_attention", "unpack"]

#: the per-call overhead of one fused attention call, in units of one query·key pair of
#: work, used to decide how many length groups pay (measured on CPU with heads of width 64:
#: a call costs about as much as a 48×48 attention)
CALL_COST = 48 * 48


@dataclass(frozen=True)
class Segments:
    """Where each sample's tokens lie in a packed sequence: sample ``i`` holds positions
    ``offsets[i]:offsets[i + 1]``. Host integers, so shapes never wait on the device."""

    offsets: tuple[int, ...]

    @classmethod
    def from_lengths(cls, lengths: list[int] | tuple[int, ...]) -> Segments:
        offsets = [0]
        for n in lengths:
            if n < 0:
                raise ValueError(f"segment lengths must be >= 0, got {n}")
            offsets.append(offsets[-1] + int(n))
        return cls(tuple(offsets))

    @property
    def batch(self) -> int:
        return len(self.offsets) - 1

    @property
    def total(self) -> int:
        return self.offsets[-1]

    @cached_property
    def lengths(self) -> tuple[int, ...]:
        o = self.offsets
        return tuple(o[i + 1] - o[i] for i in range(self.batch))

    def ids(self, device: torch.device | str | None = None) -> torch.Tensor:
        """ΣN long: the sample each packed position belongs to."""
        return torch.repeat_interleave(torch.arange(self.batch, device=device),
                                       torch.tensor(self.lengths, device=device))


def pack(x: torch.Tensor, live: torch.Tensor) -> tuple[torch.Tensor, Segments]:
    """The live tokens of ``x`` (B×N×…, ``live`` B×N bool) as one 1×ΣN×… sequence, in
    batch then position order, with their `Segments` (one host sync: the counts)."""
    lengths = live.sum(1).tolist()
    return x[live].unsqueeze(0), Segments.from_lengths(lengths)


def unpack(packed: torch.Tensor, segments: Segments, width: int | None = None,
           fill: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """A 1×ΣN×… packed sequence back as a B×width×… batch (``width``: the longest segment
    when ``None``), padding slots set to ``fill``, and its B×width live mask."""
    index, real = _group_positions(segments, range(segments.batch), packed.device, width)
    out = packed[0][index]
    mask = real.view(*real.shape, *([1] * (out.dim() - 2)))
    return out.masked_fill(~mask, fill), real


def length_groups(lengths: list[int] | tuple[int, ...], call_cost: float = CALL_COST
                  ) -> list[list[int]]:
    """Samples grouped by similar length, so that padding each group to its longest and
    running one fused call per group costs least: minimises Σ (group size · longest² +
    ``call_cost``) over contiguous runs of the samples sorted by length (exact, O(B²))."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    n = len(order)
    sq = [float(lengths[i]) ** 2 for i in order]
    best = [0.0] + [float("inf")] * n
    cut = [0] * (n + 1)
    for j in range(1, n + 1):  # best[j]: the first j samples grouped; the last group ends at j
        for i in range(j):
            cost = best[i] + (j - i) * sq[j - 1] + call_cost
            if cost < best[j]:
                best[j], cut[j] = cost, i
    groups, j = [], n
    while j > 0:
        groups.append(order[cut[j]:j])
        j = cut[j]
    return groups[::-1]


#: `segment_attention`'s backends: ``"groups"`` (length groups of padded fused calls, any
#: device) and ``"flex"`` (one FlexAttention call with a block mask from the segment ids)
BACKENDS = ("auto", "groups", "flex")


def segment_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                      q_segments: Segments, k_segments: Segments | None = None,
                      key_bias: torch.Tensor | None = None, scale: float | None = None,
                      groups: list[list[int]] | None = None, backend: str = "auto"
                      ) -> torch.Tensor:
    """Attention of packed queries (1×H×ΣNq×d) to packed keys and values (1×H×ΣNk×d) in
    which query segment ``i`` reads key segment ``i`` only (``k_segments``: the queries'
    own for self-attention). ``key_bias`` (ΣNk float) is added to every logit of a key
    (e.g. log size, or a large negative value on dead keys). Returns 1×H×ΣNq×d.

    ``backend``: ``"groups"`` runs samples of similar length as one padded fused call per
    group (`length_groups`; the CPU default); ``"flex"`` runs one FlexAttention call whose
    block mask pairs each query segment with its key segment, skipping the blocks outside
    them (the default on CUDA, compiled there; eager elsewhere, for checking). Queries of a
    sample with no keys get zeros."""
    k_segments = q_segments if k_segments is None else k_segments
    if q_segments.batch != k_segments.batch:
        raise ValueError(f"{q_segments.batch} query segments but {k_segments.batch} key ones")
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "flex" or (backend == "auto" and q.is_cuda and groups is None):
        out = _flex_segments(q, k, v, q_segments, k_segments, key_bias, scale)
        return _zero_keyless(out, q_segments, k_segments)
    if groups is None:
        longest = [max(a, b) for a, b in zip(q_segments.lengths, k_segments.lengths,
                                              strict=True)]
        groups = length_groups(longest)
    out = q.new_empty(q.shape)
    qh, kh, vh = q[0], k[0], v[0]  # H×Σ×d
    for group in groups:
        if not any(q_segments.lengths[i] for i in group):
            continue
        q_idx, q_real = _group_positions(q_segments, group, q.device)
        k_idx, k_real = _group_positions(k_segments, group, q.device)
        # G×H×m×d, one padded fused call for the group
        gq = qh[:, q_idx].transpose(0, 1)
        gk, gv = kh[:, k_idx].transpose(0, 1), vh[:, k_idx].transpose(0, 1)
        bias = torch.zeros(k_real.shape, dtype=q.dtype, device=q.device)
        bias = bias.masked_fill(~k_real, torch.finfo(q.dtype).min)
        if key_bias is not None:
            bias = bias + key_bias.to(q.dtype)[k_idx].masked_fill(~k_real, 0)
        full = all(k_segments.lengths[i] == k_real.shape[1] for i in group)
        mask = None if key_bias is None and full else bias[:, None, None, :]
        o = F.scaled_dot_product_attention(gq, gk, gv, attn_mask=mask, scale=scale)
        out[0][:, q_idx[q_real]] = o.transpose(0, 1)[:, q_real]
    return _zero_keyless(out, q_segments, k_segments)


def _flex_segments(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_segments: Segments,
                   k_segments: Segments, key_bias: torch.Tensor | None,
                   scale: float | None) -> torch.Tensor:
    """`segment_attention` as one FlexAttention call: the block mask keeps query·key pairs
    of the same sample, the score modifier adds ``key_bias``. Query segments whose key
    segment is empty give zeros."""
    from torch.nn.attention.flex_attention import create_block_mask

    q_ids, k_ids = q_segments.ids(q.device), k_segments.ids(q.device)

    def same_sample(b, h, qi, ki):
        return q_ids[qi] == k_ids[ki]

    score_mod = None
    if key_bias is not None:
        bias = key_bias.to(q.dtype)

        def score_mod(score, b, h, qi, ki):
            return score + bias[ki]

    mask = create_block_mask(same_sample, None, None, q.shape[-2], k.shape[-2],
                             device=q.device)
    return _flex()(q, k, v, score_mod=score_mod, block_mask=mask, scale=scale)


def _zero_keyless(out: torch.Tensor, q_segments: Segments, k_segments: Segments
                  ) -> torch.Tensor:
    """Zeros for the queries of samples that have no key to read."""
    for i in range(q_segments.batch):
        if q_segments.lengths[i] and not k_segments.lengths[i]:
            out[..., q_segments.offsets[i]:q_segments.offsets[i + 1], :] = 0
    return out


def _flex():
    """FlexAttention, compiled where that makes it fast (CUDA), eager elsewhere."""
    import warnings

    from torch.nn.attention.flex_attention import flex_attention

    global _FLEX
    if _FLEX is None:
        _FLEX = torch.compile(flex_attention, dynamic=True) if torch.cuda.is_available() \
            else flex_attention
    if _FLEX is flex_attention:
        warnings.filterwarnings("ignore", message=".*flex_attention called without "
                                "torch.compile.*")
    return _FLEX


_FLEX = None


def _group_positions(segments: Segments, group: Iterable[int], device: torch.device,
                     width: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """G×width packed positions of the samples ``group`` (``width``: their longest), padding
    slots at position 0, and the G×width mask of real slots."""
    group = list(group)
    lengths = [segments.lengths[i] for i in group]
    width = max(lengths, default=0) if width is None else width
    starts = torch.tensor([segments.offsets[i] for i in group], device=device)
    slots = torch.arange(width, device=device)
    real = slots[None] < torch.tensor(lengths, device=device)[:, None]
    return (starts[:, None] + slots[None]).masked_fill(~real, 0), real
