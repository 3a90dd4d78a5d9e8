"""Training-free token trimmers, as `TokenOp`s a recipe places at a site."""

from __future__ import annotations

from .ops import bipartite_soft_matching, drop_tokens, fuse_tokens, merge_tokens, topk_by_score
from .sites import Site, TokenOp
from .state import TokenState

__all__ = ["MergeTokens", "PruneByQueryScore"]


class MergeTokens(TokenOp):
    """ToMe: merge the ``r`` most similar A→B pairs by bipartite soft matching on the keys."""

    needs = frozenset({"keys"})

    def __init__(self, r: int):
        super().__init__()
        self.r = int(r)

    def extra_repr(self) -> str:
        return f"r={self.r}"

    def forward(self, state: TokenState, site: Site) -> TokenState:
        if self.r <= 0:
            return state
        eligible = state.live & ~state.protected
        src, dst, valid = bipartite_soft_matching(site.captured["keys"], self.r, eligible)
        return merge_tokens(state, src, dst, valid)


class PruneByQueryScore(TokenOp):
    """Keep the top ``ceil(keep_ratio · E)`` of E unprotected live tokens by the attention the
    query row (the first token, CLS) pays them; optionally fuse the rest into one (EViT)."""

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
        eligible = state.live & ~state.protected
        drop = eligible & ~topk_by_score(scores, self.keep_ratio, eligible)
        if self.fuse:
            return fuse_tokens(state, drop, scores)
        return drop_tokens(state, drop)
