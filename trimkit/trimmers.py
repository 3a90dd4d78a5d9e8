"""Training-free token trimmers, as `TokenOp`s a recipe places at a site."""

from __future__ import annotations

import torch

from .ops import (
    bipartite_soft_matching,
    drop_below_top,
    drop_tokens,
    entry_positions,
    fuse_tokens,
    keep_top,
    merge_count,
    merge_tokens,
    permute_tokens,
    prefix_tokens,
    prune_keep_count,
    tome_matching,
)
from .sites import CrossScores, Site, TokenOp
from .state import TokenState

__all__ = ["MergeTokens", "PruneByQueryScore", "ReduceByCrossAttention", "ReduceByPrefixAttention",
           "cross_scores"]


def cross_scores(site: Site, pair: int, state: TokenState) -> CrossScores:
    """What the cross-attention of layer pair ``pair`` saw of ``site``'s stream in this
    forward, checked against ``state``; a clear `RuntimeError` when that read has not
    happened (the layers ran in an order the recipe's plan did not expect, or the other
    stream is missing from this call)."""
    got = site.ctx.cross_scores.get((site.stream, pair))
    if got is None:
        raise RuntimeError(
            f"trimkit: {site.stream} layer {site.layer} trims its tokens by what the "
            f"cross-attention of layer pair {pair} saw of them, but no cross-attention of that "
            f"pair has read the {site.stream} tokens in this forward (the model ran without "
            f"the other stream, or in an order the recipe's placement does not expect)")
    if got.scores.shape != state.keep.shape:
        raise RuntimeError(
            f"trimkit: {site.stream} layer {site.layer} has {state.keep.shape[1]} tokens but "
            f"the cross-attention of layer pair {pair} read {got.scores.shape[1]}; the "
            f"tokens changed between that read and this layer")
    return got


class MergeTokens(TokenOp):
    """Bipartite soft matching on this layer's self-attention keys: merge the ``r`` most
    similar A→B pairs (ToMe), or, with ``ratio``, ``round(ratio · E)`` of each sample's E
    mergeable tokens, capped at ``E // 2`` (PuMer's text merging).

    ``order="reference"`` matches and orders as ToMe's reference code (`tome_matching`:
    A/B alternate over all live tokens, protected ones included; the merged sequence is
    the leading protected tokens, the unmerged A tokens, then the B tokens), ``r`` clamped
    per sample to ``(T − P) // 2``. ``order="original"`` alternates over the mergeable
    tokens only and leaves every token in its slot (`bipartite_soft_matching`), ``r``
    clamped to the A tokens."""

    needs = frozenset({"keys"})
    ORDERS = ("reference", "original")

    def __init__(self, r: int | None = None, *, ratio: float | None = None,
                 order: str = "reference"):
        super().__init__()
        if (r is None) == (ratio is None):
            raise ValueError("MergeTokens needs exactly one of r and ratio")
        if order not in self.ORDERS:
            raise ValueError(f"order must be 'reference' or 'original', got {order!r}")
        self.r = None if r is None else int(r)
        self.ratio = None if ratio is None else float(ratio)
        self.order = order

    def extra_repr(self) -> str:
        count = f"r={self.r}" if self.r is not None else f"ratio={self.ratio}"
        return f"{count}, order={self.order!r}"

    def forward(self, state: TokenState, site: Site) -> TokenState:
        if (self.r if self.r is not None else self.ratio) <= 0:
            return state
        eligible = state.live & ~state.protected
        keys = site.captured["keys"]
        prefix = state.dense_prefix()
        if prefix is not None:  # counts known on the host: no device sync, static shapes
            e = int(eligible.shape[1]) - prefix
            r = self.r if self.r is not None else merge_count(e, self.ratio)
            if self.order == "original":
                src, dst, valid = bipartite_soft_matching(keys, r, eligible, prefix)
                return merge_tokens(state, src, dst, valid, all_valid=True)
            src, dst, valid, order = tome_matching(keys, r, state.live, state.protected,
                                                   prefix)
            state = merge_tokens(state, src, dst, valid, all_valid=True)
        else:
            r_: int | torch.Tensor = self.r if self.r is not None else merge_count(
                eligible, self.ratio)
            if self.order == "original":
                src, dst, valid = bipartite_soft_matching(keys, r_, eligible)
                return merge_tokens(state, src, dst, valid)
            src, dst, valid, order = tome_matching(keys, r_, state.live, state.protected)
            state = merge_tokens(state, src, dst, valid)
        return state if order is None else permute_tokens(state, order, prefix_kept=True)


class ReduceByCrossAttention(TokenOp):
    """PuMer's image reducer, guided by the stream that reads these tokens through the
    cross-attention of layer pair ``pair`` (its text).

    Of each sample's N live unprotected tokens: drop the ``round(prune_ratio · N)`` (keeping
    at least one) that the reader's live tokens attended least (averaged over heads and
    those tokens), then merge ``round(merge_ratio · N)`` pairs of the survivors, capped at
    half of them, by bipartite soft matching on the keys that cross-attention read. With
    a dense batch every sample keeps the same count."""

    needs = frozenset({"cross_scores"})

    def __init__(self, prune_ratio: float, merge_ratio: float, pair: int):
        super().__init__()
        self.prune_ratio, self.merge_ratio = float(prune_ratio), float(merge_ratio)
        self.pair = int(pair)

    def extra_repr(self) -> str:
        return (f"prune_ratio={self.prune_ratio}, merge_ratio={self.merge_ratio}, "
                f"pair={self.pair}")

    def forward(self, state: TokenState, site: Site) -> TokenState:
        seen = cross_scores(site, self.pair, state)
        eligible = state.live & ~state.protected
        prefix = state.dense_prefix()
        if prefix is not None:  # counts known on the host: no device sync, static shapes
            e = int(eligible.shape[1]) - prefix
            k = prune_keep_count(e, self.prune_ratio) if self.prune_ratio > 0 else e
            if k < e:
                keep = keep_top(seen.scores, eligible.new_full((eligible.shape[0],), k,
                                                               dtype=torch.long), eligible)
                state = drop_tokens(state, eligible & ~keep, e - k)
                eligible = keep
            if self.merge_ratio > 0:  # capped at half of the survivors: every pair is valid
                r = min(merge_count(e, self.merge_ratio), k // 2)
                src, dst, valid = bipartite_soft_matching(seen.keys, r, eligible)
                state = merge_tokens(state, src, dst, valid, all_valid=True)
            return state
        r = merge_count(eligible, self.merge_ratio) if self.merge_ratio > 0 else None
        if self.prune_ratio > 0:
            keep = keep_top(seen.scores, prune_keep_count(eligible, self.prune_ratio), eligible)
            state = drop_tokens(state, eligible & ~keep)
            eligible = keep
        if r is not None:
            r = torch.minimum(r, eligible.sum(1) // 2)
            src, dst, valid = bipartite_soft_matching(seen.keys, r, eligible)
            state = merge_tokens(state, src, dst, valid)
        return state


class ReduceByPrefixAttention(TokenOp):
    """PuMer's reducer in a single-stream VLM, whose stream carries the text as its prefix
    (`trimkit.describe.StreamDesc.prefix`, ViLT): the text reads the image through the shared
    self-attention, so the scores come from there.

    Of each sample's N live unprotected image tokens (those after the prefix): drop the
    ``round(prune_ratio · N)`` (keeping at least one) that the live text tokens attended
    least in this layer's self-attention (averaged over heads and over those tokens,
    weighted by their size: `trimkit.ops.prefix_attention`, one set of query rows, the
    product stays fused), then merge ``round(merge_ratio · N)`` pairs of the survivors,
    capped at half of them; then merge ``round(text_merge_ratio · T)`` pairs of the T live
    text tokens other than the text's first (its CLS), capped at half. Both merges are
    bipartite soft matching on the layer's keys, within one modality, never across."""

    needs = frozenset({"keys", "prefix_scores"})

    def __init__(self, prune_ratio: float, merge_ratio: float, text_merge_ratio: float):
        super().__init__()
        self.prune_ratio, self.merge_ratio = float(prune_ratio), float(merge_ratio)
        self.text_merge_ratio = float(text_merge_ratio)

    def extra_repr(self) -> str:
        return (f"prune_ratio={self.prune_ratio}, merge_ratio={self.merge_ratio}, "
                f"text_merge_ratio={self.text_merge_ratio}")

    def forward(self, state: TokenState, site: Site) -> TokenState:
        if state.prefix and state.source is None:
            raise RuntimeError(f"trimkit: {site.stream} layer {site.layer} reduces a stream "
                               f"with a prefix, which needs its source tracked")
        keys = site.captured["keys"]
        image = state.live & ~state.protected & ~prefix_tokens(state)
        r = merge_count(image, self.merge_ratio) if self.merge_ratio > 0 else None
        if self.prune_ratio > 0:
            keep = keep_top(site.captured["prefix_scores"],
                            prune_keep_count(image, self.prune_ratio), image)
            state = drop_tokens(state, image & ~keep)
            image = keep
        if r is not None:
            r = torch.minimum(r, image.sum(1) // 2)
            state = merge_tokens(state, *bipartite_soft_matching(keys, r, image))
        if self.text_merge_ratio > 0 and state.prefix:
            text = prefix_tokens(state) & (entry_positions(state) > 0)  # never the text CLS
            r = merge_count(text, self.text_merge_ratio)
            state = merge_tokens(state, *bipartite_soft_matching(keys, r, text))
        return state


class PruneByQueryScore(TokenOp):
    """Keep the top ``ceil(keep_ratio · E)`` of E unprotected live tokens by the attention the
    scoring query row pays them (`Site._query_row`: the first token where the stream
    protects its leading tokens, its CLS or its prefix's first token; the mean live query
    where it protects none; in a positional stream its first protected token, else its last
    live one); optionally fuse the rest into one (EViT)."""

    needs = frozenset({"query_scores"})

    def __init__(self, keep_ratio: float, fuse: bool = False):
        super().__init__()
        self.keep_ratio, self.fuse = float(keep_ratio), bool(fuse)

    def extra_repr(self) -> str:
        return f"keep_ratio={self.keep_ratio}, fuse={self.fuse}"

    def forward(self, state: TokenState, site: Site) -> TokenState:
        if self.keep_ratio >= 1.0:
            return state
        scores = site.captured["query_scores"]
        drop, count = drop_below_top(state, scores, self.keep_ratio)
        if self.fuse:
            return fuse_tokens(state, drop, scores, count)
        return drop_tokens(state, drop, count)
