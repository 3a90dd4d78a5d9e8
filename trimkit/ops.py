"""Pure tensor functions for trimming tokens and heads. They know no model and no module.

Every decision is applied in *masked* form first: tokens stay in place, dropped ones get
``keep = 0`` and merged ones hand their value and size to their destination. `compact`
then gathers the live tokens away for real. Compacted execution is therefore "masked, then
gathered", and the two agree by construction.

Heads are index arithmetic on a projection's weights: `live_head_rows` names a set of
heads' rows, `linear_rows` / `linear_columns` compute a projection at those rows or from
those columns only.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import replace

import torch
import torch.nn.functional as F

from .state import TokenState, static_shapes

__all__ = [
    "NEG",
    "additive_mask",
    "attention_bias",
    "bipartite_soft_matching",
    "compact",
    "drop_below_top",
    "drop_tokens",
    "entry_positions",
    "fuse_tokens",
    "gather_entry_mask",
    "gather_token_input",
    "token_entries",
    "gumbel_sigmoid_st",
    "keep_top",
    "keep_count",
    "key_attention",
    "linear_columns",
    "linear_rows",
    "live_head_rows",
    "masked_softmax",
    "merge_tokens",
    "merge_count",
    "permute_tokens",
    "place_rows",
    "prefix_attention",
    "prefix_tokens",
    "prune_keep_count",
    "query_attention",
    "restore_positions",
    "size_weighted_mean",
    "static_shapes",
    "tome_matching",
    "topk_by_score",
]


def NEG(dtype: torch.dtype) -> float:
    """A large negative logit that stays finite when up to four of them are added."""
    return torch.finfo(dtype).min / 4


def additive_mask(mask: torch.Tensor, dtype: torch.dtype, *, blocked: bool = False
                  ) -> torch.Tensor:
    """An attention mask as additive logits: a bool mask (True = attend, or True = blocked
    with ``blocked=True``) becomes 0 / `NEG`; a float mask is already additive."""
    if mask.dtype != torch.bool:
        return mask.to(dtype)
    off = mask if blocked else ~mask
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(off, NEG(dtype))


def masked_softmax(scores: torch.Tensor, mask: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Softmax over ``mask``-ed entries; a row with every entry masked gives zeros, never NaN."""
    filled = scores.masked_fill(~mask, NEG(scores.dtype))
    return torch.softmax(filled, dim=dim) * mask


def gumbel_sigmoid_st(
    logits: torch.Tensor, tau: float = 1.0, generator: torch.Generator | None = None,
    noise: float = 1.0,
) -> torch.Tensor:
    """Two-way Gumbel-softmax with the straight-through estimator.

    The forward value is a hard 0/1 keep mask; the gradient is that of the soft sample
    ``sigmoid((logits + noise · (g1 - g2)) / tau)``. The difference of two Gumbels is a
    logistic variable; ``noise < 1`` scales it down (``0``: the deterministic decision
    ``logits > 0`` that inference takes, with the same soft gradient).
    """
    u = torch.rand(logits.shape, generator=generator, device=logits.device, dtype=logits.dtype)
    u = u.clamp(1e-6, 1 - 1e-6)
    soft = torch.sigmoid((logits + noise * (torch.log(u) - torch.log1p(-u))) / tau)
    hard = (soft > 0.5).to(soft.dtype)
    return hard - soft.detach() + soft


class _LogKeep(torch.autograd.Function):
    """``log(keep)`` as an attention bias whose gradient is bounded at dropped keys.

    The exact derivative at ``keep = 0`` is the weight the key would get back, which is
    ``exp(score gap)`` for a dropped key that would dominate its query (we measured 1e13);
    one such step derails training. The backward treats a keep below `LOG_KEEP_FLOOR` as
    the floor, so the straight-through gradient of a dropped key stays finite; a kept key's
    gradient is exact."""

    @staticmethod
    def forward(ctx, keep: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(keep)
        return torch.log(keep + 1e-20)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        (keep,) = ctx.saved_tensors
        return grad / keep.clamp_min(LOG_KEEP_FLOOR)


#: the smallest keep value `attention_bias`'s backward divides by (see `_LogKeep`)
LOG_KEEP_FLOOR = 1e-2


def attention_bias(
    state: TokenState, dtype: torch.dtype, proportional: bool
) -> torch.Tensor | None:
    """Additive key bias B×1×1×N from ``keep`` (dead keys) and, if ``proportional``, log(size).

    Returns ``None`` when it would be all zeros, so attention runs unmasked. A soft ``keep``
    that carries gradient enters as ``log(keep)`` so the gradient reaches the trimmer.
    """
    parts = []
    keep = state.keep
    if keep.dtype == torch.bool:
        if state.has_dead:
            parts.append(additive_mask(keep, dtype))
    elif keep.requires_grad:
        parts.append(_LogKeep.apply(keep.float()).to(dtype))
    elif state.has_dead:
        parts.append(torch.where(keep > 0, torch.log(keep.float().clamp_min(1e-20)),
                                 NEG(dtype)).to(dtype))
    if proportional and state.sized:
        parts.append(torch.log(state.size.float()).to(dtype))
    if not parts:
        return None
    bias = parts[0] if len(parts) == 1 else parts[0] + parts[1]
    return bias[:, None, None, :]


def key_attention(probs: torch.Tensor, row_weights: torch.Tensor | None = None) -> torch.Tensor:
    """The attention each key receives, B×N, from attention probabilities B×H×R×N: averaged
    over heads, then over the R query rows weighted by ``row_weights`` (B×R, e.g. zero for
    padding queries; by default rows count equally)."""
    probs = probs.float().mean(1)  # B×R×N
    if row_weights is None:
        return probs.mean(1)
    w = row_weights.float()
    return (probs * w[..., None]).sum(1) / w.sum(1, keepdim=True).clamp_min(1e-6)


def query_attention(
    q_rows: torch.Tensor,
    k: torch.Tensor,
    bias: torch.Tensor | None,
    scale: float,
    row_weights: torch.Tensor | None = None,
    transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """Attention that a few query rows pay every key, averaged over heads and rows: B×N.

    Computes only ``q_rows · kᵀ`` (B×H×R×N), never the full attention map, so the main
    attention can stay on a fused kernel. ``row_weights`` as in `key_attention`;
    ``transform`` acts on the logits before the bias (talking heads mix them there).
    """
    logits = torch.matmul(q_rows, k.transpose(-2, -1)) * scale
    if transform is not None:
        logits = transform(logits)
    if bias is not None:
        logits = logits + bias
    return key_attention(torch.softmax(logits.float(), dim=-1), row_weights)


def _stable_order(values: torch.Tensor, k: int | None = None, descending: bool = False
                  ) -> torch.Tensor:
    """The first ``k`` (default all) indices of a stable sort along the last dimension (ties
    keep their order). While exporting to ONNX, which has no stable sort, it is ``topk``:
    ONNX's ``TopK`` breaks ties by the lower index, which is the same order."""
    if torch.onnx.is_in_onnx_export():
        v = values.float()
        return torch.topk(v if descending else -v, values.shape[-1] if k is None else k,
                          dim=-1).indices
    order = torch.argsort(values, dim=-1, descending=descending, stable=True)
    return order if k is None else order[..., :k]


def _slot_map(state: TokenState) -> torch.Tensor:
    b, n = state.keep.shape
    return torch.arange(n, device=state.keep.device).expand(b, n).clone()


def _remap_source(source: torch.Tensor | None, slot_map: torch.Tensor) -> torch.Tensor | None:
    """Follow each entry token to its new slot; -1 stays -1."""
    if source is None:
        return None
    new = slot_map.gather(1, source.clamp_min(0))
    return new.masked_fill(source < 0, -1)


def _dead(keep: torch.Tensor, where: torch.Tensor) -> torch.Tensor:
    if keep.dtype == torch.bool:  # not a masked_fill: ONNX Runtime has no bool `Where`
        return keep & ~where
    return keep.masked_fill(where, 0.0)


def _add_dead(state: TokenState, new: TokenState, count: int | None) -> TokenState:
    """``new`` with ``state``'s static facts (`TokenState.known`) carried over, ``count``
    more dead tokens per sample (``None``: not known, the facts are dropped)."""
    dead = state.dead_count
    return new.knowing(None if dead is None or count is None else dead + count,
                       state.protected_prefix)


def drop_tokens(state: TokenState, drop: torch.Tensor, count: int | None = None
                ) -> TokenState:
    """Mark ``drop`` (B×N bool) dead. Protected tokens are never dropped.

    ``count``: how many live unprotected tokens ``drop`` marks in every sample, where the
    caller knows it without reading the tensors (a fixed count on a batch without padding);
    the state then keeps knowing its dead count, so `compact` needs no device sync."""
    drop = drop & ~state.protected
    source = None
    if state.source is not None:
        source = _remap_source(state.source, _slot_map(state).masked_fill(drop, -1))
    new = replace(state, keep=_dead(state.keep, drop), source=source, has_dead=True,
                  packed=False)
    return _add_dead(state, new, count)


def bipartite_soft_matching(
    metric: torch.Tensor, r: int | torch.Tensor, eligible: torch.Tensor,
    prefix: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """ToMe's matching among ``eligible`` tokens (B×N bool): returns ``(src, dst, valid)``, B×r'.

    Eligible tokens are split alternately by their rank among eligible ones into sets A and
    B; each A token is linked to its most similar B token (cosine of ``metric``); the ``r``
    strongest links are merged, A into B. ``r`` is one count for the batch or a B long
    tensor, one per sample. A sample with E eligible tokens merges at most ``ceil(E / 2)``
    (none if E < 2); ``valid`` marks which of the r' returned pairs are real.

    ``prefix``: the eligible tokens are known to be exactly ``[prefix, N)`` in every sample
    (`TokenState.dense_prefix`); with an int ``r`` the matching then reads no tensor value
    on the host (no device sync; static shapes under ``torch.compile``) and every returned
    pair is valid.
    """
    per_sample = isinstance(r, torch.Tensor)
    bsz, n, _ = metric.shape
    if prefix is not None and not per_sample:
        return _suffix_matching(metric, r, prefix)
    if static_shapes():  # no host read: the pairs are bounded by the shapes alone
        src, dst, valid = _general_matching(metric, (n + 1) // 2 if per_sample else r,
                                            eligible, static=True)
        return src, dst, _within(valid, r) if per_sample else valid
    r_max = (int(r.max()) if r.numel() else 0) if per_sample else r
    counts = eligible.sum(1)
    e = int(counts[0]) if bsz else 0
    if bsz and bool((counts == e).all()) and bool(eligible[:, n - e:].all()):
        src, dst, valid = _suffix_matching(metric, r_max, n - e)
    else:
        src, dst, valid = _general_matching(metric, r_max, eligible)
    return src, dst, _within(valid, r) if per_sample else valid


def _within(valid: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """``valid`` (B×r') limited to each sample's first ``r[b]`` pairs."""
    if not valid.shape[1]:
        return valid
    return valid & (torch.arange(valid.shape[1], device=valid.device)[None, :]
                    < r.to(valid.device)[:, None])


def merge_count(eligible: torch.Tensor | int, ratio: float) -> torch.Tensor | int:
    """B long: PuMer's merges per sample, ``round(ratio · E)`` of its E eligible tokens
    (``round`` as Python's: half to even), capped at ``E // 2``. ``eligible`` is the B×N
    mask, or E itself (an int, the same for every sample and known on the host: an int
    comes back, with no device sync)."""
    if isinstance(eligible, int):
        return min(round(eligible * ratio), eligible // 2)
    counts = eligible.sum(1)
    r = torch.round(counts.to(torch.float64) * ratio).long()
    return torch.minimum(r, counts // 2)


def prune_keep_count(eligible: torch.Tensor | int, prune_ratio: float) -> torch.Tensor | int:
    """B long: how many of the E eligible tokens of each sample PuMer keeps,
    ``E − round(prune_ratio · E)``, at least 1 (0 when E is 0). ``eligible`` is the B×N
    mask, or E itself (an int known on the host: an int comes back)."""
    if isinstance(eligible, int):
        return min(max(eligible - round(eligible * prune_ratio), 1), eligible)
    counts = eligible.sum(1)
    drop = torch.round(counts.to(torch.float64) * prune_ratio).long()
    return torch.minimum((counts - drop).clamp(min=1), counts)


def _suffix_matching(
    metric: torch.Tensor, r: int, p: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`bipartite_soft_matching` when exactly the tokens from ``p`` on are eligible in every
    sample (no dead tokens, protected ones first): the sets are strided views, no gathers."""
    bsz, n, _ = metric.shape
    n_a, n_b = (n - p + 1) // 2, (n - p) // 2
    r_top = min(r, n_a) if n_b > 0 else 0
    dev = metric.device
    if r_top <= 0:
        empty = torch.zeros(bsz, 0, dtype=torch.long, device=dev)
        return empty, empty, empty.bool()
    m = metric / metric.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    scores = m[:, p::2] @ m[:, p + 1::2].transpose(-1, -2)
    node_max, node_j = scores.max(dim=-1)
    order = _stable_order(node_max, r_top, descending=True)
    src = p + 2 * order
    dst = p + 1 + 2 * node_j.gather(1, order)
    return src, dst, torch.ones(bsz, r_top, dtype=torch.bool, device=dev)


def _general_matching(
    metric: torch.Tensor, r: int, eligible: torch.Tensor, static: bool = False
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`bipartite_soft_matching` for any eligibility pattern (padding, dead tokens).

    ``static``: size the sets by what N allows (⌈N/2⌉ A and ⌊N/2⌋ B tokens, ``min(r, ⌈N/2⌉)``
    pairs) instead of reading the largest sample's counts on the host; the extra pairs are
    invalid, so the merge is the same."""
    bsz, n, _ = metric.shape
    rank = eligible.long().cumsum(1) - 1  # ONNX's CumSum takes no bool
    is_a = eligible & (rank % 2 == 0)
    is_b = eligible & (rank % 2 == 1)
    n_b = is_b.sum(1)
    r_each = torch.where(n_b > 0, is_a.sum(1), 0).clamp(max=r)
    if static:
        r_top = min(r, (n + 1) // 2) if n > 1 else 0
        n_a_max, n_b_max = (n + 1) // 2, n // 2
    else:
        r_top = int(r_each.max()) if r > 0 and bsz > 0 else 0
    if r_top <= 0:
        empty = torch.zeros(bsz, 0, dtype=torch.long, device=metric.device)
        return empty, empty, empty.bool()
    if not static:
        n_a_max, n_b_max = int(is_a.sum(1).max()), int(n_b.max())
    a_idx = _stable_order((~is_a).to(torch.uint8), n_a_max)
    b_idx = _stable_order((~is_b).to(torch.uint8), n_b_max)
    m = metric / metric.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    d = m.shape[-1]
    a = m.gather(1, a_idx[..., None].expand(-1, -1, d))
    bm = m.gather(1, b_idx[..., None].expand(-1, -1, d))
    scores = a @ bm.transpose(-1, -2)
    ok = is_a.gather(1, a_idx)[:, :, None] & is_b.gather(1, b_idx)[:, None, :]
    scores = scores.masked_fill(~ok, -math.inf)
    node_max, node_j = scores.max(dim=-1)
    order = _stable_order(node_max, r_top, descending=True)
    src = a_idx.gather(1, order)
    dst = b_idx.gather(1, node_j.gather(1, order))
    valid = torch.arange(r_top, device=metric.device)[None, :] < r_each[:, None]
    return src, dst, valid


def tome_matching(
    metric: torch.Tensor, r: int | torch.Tensor, live: torch.Tensor, protected: torch.Tensor,
    prefix: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """ToMe's bipartite soft matching as its reference code computes it: returns ``(src,
    dst, valid, order)``, the first three B×r' as in `bipartite_soft_matching`.

    The ``live`` tokens (B×N bool), protected ones included, alternate into sets A and B by
    their rank among live tokens (the CLS is A's first). Each A token is linked to its most
    similar B token (cosine of ``metric``); protected tokens take no link (their score is
    −∞). The ``r`` strongest links merge, A into B, ``r`` clamped per sample to
    ``(T − P) // 2`` of its T live and P protected tokens (and to the A tokens that can
    link). ``r`` is one count or a B long tensor.

    ``order`` (B×N long, or ``None`` where no sample merges) is the slot order of the merged
    sequence, which decides the next layer's A/B split: the leading protected tokens (those
    before the first unprotected live token), then the unmerged A tokens in their order
    (in descending link score when the sample protects no token, as the reference leaves
    them), then all B tokens, then the dead ones (merged sources, padding). A sample that
    merges nothing keeps its order. Apply it with `permute_tokens` after `merge_tokens`.

    ``prefix``: every token is known to be live and the protected ones to be the first
    ``prefix`` (`TokenState.dense_prefix`); with an int ``r`` nothing is read on the host
    and every returned pair is valid.
    """
    per_sample = isinstance(r, torch.Tensor)
    bsz, n, _ = metric.shape
    dev = metric.device
    m = metric / metric.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    if prefix is not None and not per_sample:
        p = prefix
        pa, pb = (p + 1) // 2, p // 2  # protected tokens in A (even slots) and B (odd slots)
        free_a, free_b = (n + 1) // 2 - pa, n // 2 - pb
        r_top = max(min(r, (n - p) // 2, free_a if free_b > 0 else 0), 0)
        if r_top == 0:
            empty = torch.zeros(bsz, 0, dtype=torch.long, device=dev)
            return empty, empty, empty.bool(), None
        scores = m[:, 0::2] @ m[:, 1::2].transpose(-1, -2)
        na, nb = scores.shape[1:]
        blocked = ((torch.arange(na, device=dev) < pa)[:, None]
                   | (torch.arange(nb, device=dev) < pb)[None, :])
        scores = scores.masked_fill(blocked, -math.inf)
        a_idx = (2 * torch.arange(na, device=dev)).expand(bsz, na)
        b_idx = (2 * torch.arange(nb, device=dev) + 1).expand(bsz, nb)
        r_each: torch.Tensor | int = r_top
        is_a = (torch.arange(n, device=dev) % 2 == 0).expand(bsz, n)
        is_b = ~is_a
        lead = (torch.arange(n, device=dev) < p).expand(bsz, n)
        sorted_a = p > 0
    else:
        prot = protected & live
        rank = live.long().cumsum(1) - 1  # ONNX's CumSum takes no bool
        is_a = live & (rank % 2 == 0)
        is_b = live & (rank % 2 == 1)
        ok_a, ok_b = is_a & ~prot, is_b & ~prot
        tokens, n_prot = live.sum(1), prot.sum(1)
        cap = torch.minimum((tokens - n_prot) // 2,
                            torch.where(ok_b.any(1), ok_a.sum(1), 0))
        r_each = torch.minimum(cap, r.to(cap.device)) if per_sample else cap.clamp(max=r)
        if static_shapes():  # bounded by the shapes alone: no host read
            r_top = min(r, n // 2) if not per_sample else n // 2
            na, nb = (n + 1) // 2, n // 2
        else:  # one device sync for the three counts
            r_top, na, nb = torch.stack([r_each.max(), is_a.sum(1).max(),
                                         is_b.sum(1).max()]).tolist() if bsz else (0, 0, 0)
        if r_top <= 0 or na == 0 or nb == 0:
            empty = torch.zeros(bsz, 0, dtype=torch.long, device=dev)
            return empty, empty, empty.bool(), None
        a_idx = _stable_order((~is_a).to(torch.uint8), na)
        b_idx = _stable_order((~is_b).to(torch.uint8), nb)
        d = m.shape[-1]
        scores = (m.gather(1, a_idx[..., None].expand(-1, -1, d))
                  @ m.gather(1, b_idx[..., None].expand(-1, -1, d)).transpose(-1, -2))
        ok = ok_a.gather(1, a_idx)[:, :, None] & ok_b.gather(1, b_idx)[:, None, :]
        scores = scores.masked_fill(~ok, -math.inf)
        idx = torch.arange(n, device=dev)
        first_free = torch.where(live & ~prot, idx, n).amin(1, keepdim=True)
        lead = prot & (idx < first_free)
        sorted_a = prot.any(1, keepdim=True)
    node_max, node_j = scores.max(dim=-1)
    rows = _stable_order(node_max, descending=True)  # A rows by their best link, strongest first
    src = a_idx.gather(1, rows[:, :r_top])
    dst = b_idx.gather(1, node_j.gather(1, rows[:, :r_top]))
    if isinstance(r_each, int):
        valid = torch.ones(bsz, r_top, dtype=torch.bool, device=dev)
        merging = None
    else:
        valid = torch.arange(r_top, device=dev)[None, :] < r_each[:, None]
        merging = (r_each > 0)[:, None]
    order = _merged_order(is_a, is_b, lead, src, valid, rows, a_idx, sorted_a, merging)
    return src, dst, valid, order


def _merged_order(is_a: torch.Tensor, is_b: torch.Tensor, lead: torch.Tensor,
                  src: torch.Tensor, valid: torch.Tensor, rows: torch.Tensor,
                  a_idx: torch.Tensor, sorted_a: torch.Tensor | bool,
                  merging: torch.Tensor | None) -> torch.Tensor:
    """`tome_matching`'s slot order: a sort key per slot, in four bands (leading protected,
    unmerged A, B, dead), each by position except unmerged A by link rank where
    ``sorted_a`` is False; samples where ``merging`` is False keep their order."""
    bsz, n = is_a.shape
    idx = torch.arange(n, device=is_a.device).expand(bsz, n)
    merged = torch.zeros_like(is_a).scatter(1, src, valid)
    within_a = idx
    if sorted_a is not True:
        na = rows.shape[1]
        link_rank = torch.empty_like(rows).scatter(
            1, rows, torch.arange(na, device=rows.device).expand(bsz, na))
        by_link = torch.zeros_like(idx).scatter(1, a_idx, link_rank)
        within_a = by_link if sorted_a is False else torch.where(sorted_a, idx, by_link)
    key = 3 * n + idx  # dead: merged sources, padding, earlier drops
    key = torch.where(is_b & ~lead, 2 * n + idx, key)
    key = torch.where(is_a & ~lead & ~merged, n + within_a, key)
    key = torch.where(lead, idx, key)
    if merging is not None:
        key = torch.where(merging, key, idx)
    return _stable_order(key)


def permute_tokens(state: TokenState, order: torch.Tensor, *, prefix_kept: bool = False
                   ) -> TokenState:
    """``state`` with its slots in ``order`` (B×N long, a permutation per sample, e.g.
    `tome_matching`'s): every field follows its token, ``source`` included. The dead count
    stays known; a known protected prefix only with ``prefix_kept`` (``order`` keeps the
    leading protected tokens first, as `tome_matching`'s does)."""
    d = state.x.shape[-1]
    x = state.x.gather(1, order[..., None].expand(-1, -1, d))
    keep, size, protected = (t.gather(1, order) for t in (state.keep, state.size,
                                                          state.protected))
    source = None
    if state.source is not None:
        slots = torch.arange(order.shape[1], device=order.device).expand_as(order)
        source = _remap_source(state.source, torch.empty_like(order).scatter(1, order, slots))
    entry = None if state.entry is None else state.entry.gather(1, order)
    new = replace(state, x=x, keep=keep, size=size, protected=protected, source=source,
                  entry=entry, packed=False)
    return new.knowing(state.dead_count, state.protected_prefix if prefix_kept else None)


def merge_tokens(
    state: TokenState, src: torch.Tensor, dst: torch.Tensor, valid: torch.Tensor,
    all_valid: bool = False,
) -> TokenState:
    """Merge token ``src[b, i]`` into ``dst[b, i]`` where ``valid``: size-weighted average.

    Sources become dead; destinations carry the summed size. Total size is conserved.
    ``all_valid``: every pair is known to be valid (distinct live sources, as
    `bipartite_soft_matching` gives with ``prefix``), so the state keeps knowing its dead
    count (`drop_tokens`).
    """
    if src.shape[1] == 0:
        return state
    x, size = state.x, state.size
    d = x.shape[-1]
    w = size.gather(1, src) * valid.to(size.dtype)
    idx = dst[..., None].expand(-1, -1, d)
    moved = x.gather(1, src[..., None].expand(-1, -1, d)) * w[..., None]
    new_size = size.scatter_add(1, dst, w)
    total = (x * size[..., None]).scatter_add(1, idx, moved)
    new_x = total / new_size[..., None]
    gone = torch.zeros(state.keep.shape, dtype=torch.bool, device=x.device)
    gone = gone.scatter(1, src, valid)
    source = None
    if state.source is not None:
        smap = _slot_map(state).scatter(1, src, torch.where(valid, dst, src))
        source = _remap_source(state.source, smap)
    new = replace(state, x=new_x, size=new_size, keep=_dead(state.keep, gone), source=source,
                  sized=True, has_dead=True, packed=False)
    return _add_dead(state, new, src.shape[1] if all_valid else None)


def topk_by_score(scores: torch.Tensor, keep_ratio: float, eligible: torch.Tensor) -> torch.Tensor:
    """B×N bool of the eligible tokens to keep: the top ``ceil(keep_ratio · E)`` by score.

    E counts each sample's eligible tokens; at least one is kept where E > 0. Ties go to the
    earlier position, so the choice is deterministic.
    """
    return keep_top(scores, keep_count(eligible, keep_ratio), eligible)


def drop_below_top(state: TokenState, scores: torch.Tensor, keep_ratio: float
                   ) -> tuple[torch.Tensor, int | None]:
    """B×N bool: the live unprotected tokens to drop so that each sample keeps the top
    ``ceil(keep_ratio · E)`` of its E by ``scores`` (`topk_by_score`); and how many that
    drops per sample where the state's layout tells it without a read
    (`TokenState.dense_prefix`: no device sync, static shapes), else ``None``."""
    eligible = state.live & ~state.protected
    prefix = state.dense_prefix()
    if prefix is None:
        return eligible & ~topk_by_score(scores, keep_ratio, eligible), None
    e = int(eligible.shape[1]) - prefix
    k = keep_count(e, keep_ratio)
    kept = keep_top(scores, eligible.new_full((eligible.shape[0],), k, dtype=torch.long),
                    eligible)
    return eligible & ~kept, e - k


def keep_count(eligible: torch.Tensor | int, keep_ratio: float) -> torch.Tensor | int:
    """B long: ``ceil(keep_ratio · E)`` of each sample's E eligible tokens, at least 1 (0
    when E is 0), as `topk_by_score` keeps. ``eligible`` is the B×N mask, or E itself (an
    int known on the host: an int comes back, with no device sync)."""
    # The tolerance keeps float error from rounding an exact count up (0.07 · 100 → 8).
    if isinstance(eligible, int):
        return min(max(math.ceil(eligible * keep_ratio - 1e-9), 1), eligible)
    counts = eligible.sum(1)
    k = torch.ceil(counts.to(torch.float64) * keep_ratio - 1e-9).long().clamp(min=1)
    return torch.minimum(k, counts)


def keep_top(scores: torch.Tensor, k: torch.Tensor, eligible: torch.Tensor) -> torch.Tensor:
    """B×N bool: the ``k[b]`` eligible tokens of each sample with the highest scores (ties go
    to the earlier position)."""
    n = scores.shape[1]
    masked = scores.float().masked_fill(~eligible, -math.inf)
    order = _stable_order(masked, descending=True)
    ranks = torch.empty_like(order).scatter_(
        1, order, torch.arange(n, device=scores.device).expand_as(order))
    return (ranks < k[:, None]) & eligible


def fuse_tokens(state: TokenState, drop: torch.Tensor, weights: torch.Tensor,
                count: int | None = None) -> TokenState:
    """Drop ``drop`` and fuse the dropped tokens of each sample into one (EViT).

    The fused token is their average weighted by ``weights`` (e.g. the attention CLS paid
    them), carries their summed size, and takes the slot of the first dropped token.
    ``count`` as in `drop_tokens`.
    """
    drop = drop & ~state.protected & state.live
    has = drop.any(1)
    first = torch.argmax(drop.to(torch.uint8), dim=1)[:, None]  # B×1
    w = weights.float().masked_fill(~drop, 0.0)
    w = torch.where(w.sum(1, keepdim=True) > 0, w, drop.float())  # all-zero weights: plain mean
    w = w / w.sum(1, keepdim=True).clamp_min(1e-12)
    fused = torch.einsum("bn,bnd->bd", w.to(state.x.dtype), state.x)[:, None]
    fused_size = (state.size * drop).sum(1, keepdim=True)
    d = state.x.shape[-1]
    slot_x = first[..., None].expand(-1, -1, d)
    hx = has[:, None]
    x = state.x.scatter(1, slot_x, torch.where(hx[..., None], fused, state.x.gather(1, slot_x)))
    size = state.size.scatter(1, first, torch.where(hx, fused_size, state.size.gather(1, first)))
    gone = drop.scatter(1, first, torch.zeros_like(hx))
    keep = _dead(state.keep, gone)
    if keep.dtype != torch.bool:
        keep = keep.scatter(1, first, torch.where(hx, 1.0, keep.gather(1, first)))
    source = None
    if state.source is not None:
        smap = _slot_map(state)
        smap = torch.where(drop, first.expand_as(smap), smap)
        source = _remap_source(state.source, smap)
    new = replace(state, x=x, size=size, keep=keep, source=source, sized=True, has_dead=True,
                  packed=False)
    return _add_dead(state, new, None if count is None else max(count - 1, 0))


def _partial(keep: torch.Tensor) -> bool:
    """Whether some key has less than full weight: dead, or a soft keep below 1."""
    return bool((~keep).any()) if keep.dtype == torch.bool else bool((keep < 1).any())


def compact(state: TokenState) -> tuple[TokenState, torch.Tensor | None]:
    """Gather the live tokens away, in order, padding to the batch's longest survivor.

    Returns the new state and the B×M gather index (``None`` if nothing was dead, or the
    state is already `TokenState.packed`). Padding slots are dead (``keep`` False / 0) and
    unprotected.
    """
    if not state.has_dead or state.packed:
        return state, None
    dead = state.dead_count
    if dead is not None:
        return _compact_known(state, dead)
    if static_shapes():  # per-sample counts: the survivors stay in place, masked
        return state, None
    live = state.live
    b, n = live.shape
    hard = state.keep.dtype == torch.bool
    counts = live.sum(1)
    if b == 0:
        return replace(state, has_dead=False, packed=True), None
    # the longest and the shortest survivor, read in one device sync
    m, least = torch.stack([counts.max(), counts.min()]).tolist()
    if least == n:
        return replace(state, has_dead=not hard and _partial(state.keep), packed=True), None
    idx = _stable_order((~live).to(torch.uint8), m)
    pad = torch.arange(m, device=live.device)[None, :] >= counts[:, None]
    new = _gather_slots(state, idx, pad)
    has_dead = least < m or (not hard and _partial(new.keep))
    return replace(new, has_dead=has_dead), idx


def _compact_known(state: TokenState, dead: int) -> tuple[TokenState, torch.Tensor | None]:
    """`compact` of a state known to have ``dead`` dead tokens in every sample: the
    survivors' count is known, so nothing is read on the host and nothing is padded."""
    prefix = state.protected_prefix
    if dead == 0:
        return replace(state, has_dead=False, packed=True).knowing(0, prefix), None
    n = state.keep.shape[1]
    idx = _stable_order((~state.live).to(torch.uint8), n - dead)
    new = replace(_gather_slots(state, idx, None), has_dead=False)
    return new.knowing(0, prefix), idx


def _gather_slots(state: TokenState, idx: torch.Tensor, pad: torch.Tensor | None
                  ) -> TokenState:
    """``state`` gathered at ``idx`` (B×M) and marked packed; ``pad`` (B×M bool, or
    ``None``) marks padding slots, which become dead, of size 1 and unprotected."""
    b, n = state.keep.shape
    m = idx.shape[1]
    x = state.x.gather(1, idx[..., None].expand(-1, -1, state.x.shape[-1]))
    keep, size, protected = (t.gather(1, idx) for t in (state.keep, state.size,
                                                         state.protected))
    slots = torch.arange(m, device=idx.device).expand(b, m)
    if pad is not None:
        keep, size, protected = _dead(keep, pad), size.masked_fill(pad, 1.0), protected & ~pad
        slots = slots.masked_fill(pad, -1)
    source = None
    if state.source is not None:
        smap = torch.full((b, n), -1, dtype=torch.long, device=idx.device).scatter(1, idx, slots)
        source = _remap_source(state.source, smap)
    entry = state.entry
    if entry is not None:
        entry = entry.gather(1, idx)
        if pad is not None:
            entry = entry.masked_fill(pad, state.source.shape[1] - 1)
    return replace(state, x=x, keep=keep, size=size, protected=protected, source=source,
                   entry=entry, packed=True)


# ------------------------------------------------------------------ entry positions (``source``)

def entry_positions(state: TokenState) -> torch.Tensor:
    """B×N long: the entry position each current token stands for, the *latest* entry token it
    covers (a merged token sits where its last member sat, so under a causal mask nothing
    attends to it before all of its members were visible). Tokens covering nothing (dropped,
    padding) get the last entry position. Needs ``state.source``."""
    src = state.source
    if src is None:
        raise ValueError("entry positions need a state that tracks its source")
    b, n0 = src.shape
    n = state.keep.shape[1]
    entry = torch.arange(n0, device=src.device).expand(b, n0)
    if torch.onnx.is_in_onnx_export():  # ONNX has no scatter with "amax" before opset 18
        slots = torch.arange(n, device=src.device)[None, :, None]
        pos = torch.where(src[:, None, :] == slots, entry[:, None, :], -1).amax(-1)
    else:
        pos = torch.full((b, n + 1), -1, dtype=torch.long, device=src.device)
        pos = pos.scatter_reduce(1, src.masked_fill(src < 0, n), entry, "amax")[:, :n]
    return pos.masked_fill(pos < 0, n0 - 1)


def token_entries(state: TokenState) -> torch.Tensor:
    """B×N long (1×ΣN packed): the entry position whose per-token inputs each current token
    takes (`TokenState.entry`: its own, a merged token its destination's). A state that
    carries no ``entry`` (published by an adapter) falls back on `entry_positions`."""
    if state.entry is not None:
        return state.entry
    segments = state.segments
    if segments is None:
        return entry_positions(state)
    pos = _entry_positions(state.source, max(segments.lengths, default=0))
    live = torch.arange(pos.shape[1], device=pos.device)[None] < torch.tensor(
        segments.lengths, device=pos.device)[:, None]
    return pos[live][None]


#: rows that leave a token as it is, by `trimkit.describe.TokenInput.neutral`, as the
#: halves (first, second) of the row
NEUTRAL_ROWS = {"sin-cos": (0.0, 1.0), "cos-sin": (1.0, 0.0), "ones": (1.0, 1.0),
                "zeros": (0.0, 0.0)}


def gather_token_input(value: torch.Tensor, state: TokenState, *, axis: int = -2,
                       rank: int | None = None, leading: int | None = None,
                       neutral: str | None = None) -> torch.Tensor:
    """A block input indexed by the stream's entry tokens (`trimkit.describe.TokenInput`:
    a rotary table, position ids) gathered so that its rows follow the current tokens:
    each token takes the row of its entry position (`token_entries`: a merged token its
    destination's), a dropped token's row is gone, padding slots take some valid row.

    ``value`` covers the last M of the N0 entry tokens along ``axis``; the first
    N0 − M tokens (``leading``, when stated) stay in the first slots (they must be
    protected) and get no row. Shared by the batch (rank below ``rank``), it gains a batch
    axis in front. In packed execution the rows of each sample's segment are concatenated;
    where M < N0 the model skips only the sequence's first N0 − M tokens, so the leading
    tokens of the later samples take the ``neutral`` row (`NEUTRAL_ROWS`, along the last
    axis), which leaves them as they are. Needs ``state.source``."""
    if axis >= 0:
        raise ValueError(f"the token axis of a token input is counted from the end, got {axis}")
    src = state.source
    if src is None:
        raise ValueError("gathering a token input needs a state that tracks its source")
    b, n0 = src.shape
    m = value.shape[axis]
    lead = n0 - m
    if lead < 0 or (leading is not None and lead != leading):
        raise RuntimeError(f"trimkit: a token input of shape {tuple(value.shape)} has {m} rows "
                           f"along axis {axis}, but the stream entered with {n0} tokens"
                           + ("" if leading is None else f" of which {leading} lead uncovered"))
    rank = value.dim() if rank is None else rank
    if value.dim() < rank:
        value = value.reshape((1,) * (rank - value.dim()) + tuple(value.shape))
    if value.shape[0] not in (1, b):
        raise RuntimeError(f"trimkit: a token input of shape {tuple(value.shape)} holds "
                           f"{value.shape[0]} samples, the batch has {b}")
    segments = state.segments
    table = value.movedim(axis, 1)
    rest = table.shape[2:]
    pos = token_entries(state)
    if segments is None:
        pos = pos[:, lead:] - lead
        table = table.expand(b, *table.shape[1:])
        idx = pos.reshape(*pos.shape, *(1,) * len(rest)).expand(*pos.shape, *rest)
        return table.gather(1, idx).movedim(1, axis)
    # packed: row ``pos - lead`` of each token's own sample, in one flat gather
    if lead and neutral not in NEUTRAL_ROWS:
        raise RuntimeError("trimkit: a token input that leaves leading tokens uncovered "
                           "cannot follow a packed stream unless it states its neutral row "
                           "(TokenInput.neutral)")
    pos = pos[0, lead:]
    flat = (pos - lead).clamp_min(0)
    if table.shape[0] == 1:
        out = table[0][flat]
    else:
        out = table.reshape(b * m, *rest)[segments.ids(pos.device)[lead:] * m + flat]
    if lead:
        first, second = NEUTRAL_ROWS[neutral]
        w = out.shape[-1]
        row = torch.cat([out.new_full((w - w // 2,), first), out.new_full((w // 2,), second)])
        out = torch.where((pos < lead).reshape(-1, *(1,) * len(rest)), row, out)
    return out[None].movedim(1, axis)


def _entry_positions(src: torch.Tensor, n: int) -> torch.Tensor:
    """`entry_positions` of a state whose per-sample rows hold ``n`` slots (``source``
    counts slots within each sample, also in packed execution)."""
    b, n0 = src.shape
    entry = torch.arange(n0, device=src.device).expand(b, n0)
    pos = torch.full((b, n + 1), -1, dtype=torch.long, device=src.device)
    pos = pos.scatter_reduce(1, src.masked_fill(src < 0, n), entry, "amax")[:, :n]
    return pos.masked_fill(pos < 0, n0 - 1)


def prefix_tokens(state: TokenState) -> torch.Tensor:
    """B×N bool: the live tokens of the stream's prefix (`TokenState.prefix`: a
    single-stream VLM's text ahead of its image), found by their entry positions (a merged
    token by its latest member's, so text merged only with text stays text). Needs
    ``state.source`` unless the state has no prefix (then none)."""
    if not state.prefix:
        return torch.zeros_like(state.live)
    return state.live & (entry_positions(state) < state.prefix)


def prefix_attention(q: torch.Tensor, k: torch.Tensor, bias: torch.Tensor | None,
                     scale: float, state: TokenState) -> torch.Tensor:
    """B×N: the attention the live prefix tokens (`prefix_tokens`) pay each token in a
    self-attention (q, k: B×H×N×d), averaged over heads and over those rows weighted by
    their size; zeros without a prefix. ``bias`` is the additive mask the product uses.

    Only the prefix's query rows are computed (at most ``state.prefix`` of them, found
    without a device sync), never the full attention map, so the main product stays fused:
    PuMer's text-to-image scores inside a shared self-attention."""
    b, h, n, d = q.shape
    rows = prefix_tokens(state)
    r = min(state.prefix, n)
    if r == 0:
        return q.new_zeros(b, n, dtype=torch.float32)
    idx = _stable_order((~rows).to(torch.int8), r)  # each sample's prefix rows first
    weights = (rows.float() * state.size.float()).gather(1, idx)
    q_rows = q.gather(2, idx[:, None, :, None].expand(b, h, r, d))
    if bias is not None and bias.dim() >= 2 and bias.shape[-2] > 1:  # a full N×N mask
        while bias.dim() < 4:
            bias = bias.unsqueeze(0)
        bias = bias.expand(b, *bias.shape[1:])
        bias = bias.gather(2, idx[:, None, :, None].expand(b, bias.shape[1], r, n))
    return query_attention(q_rows, k, bias, scale, weights)


def gather_entry_mask(mask: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """An attention mask given over a stream's N0 entry tokens (any shape that SDPA
    broadcasts to B×H×N0×N0) as a B×H×N×N mask over its current tokens at ``positions``
    (B×N, `entry_positions`); H is the mask's own head count (1 if it has none)."""
    n0 = mask.shape[-1]
    while mask.dim() < 4:
        mask = mask.unsqueeze(0)
    b, n = positions.shape
    mask = mask.expand(b, -1, -1, -1)
    h = mask.shape[1]
    rows = mask.gather(2, positions[:, None, :, None].expand(b, h, n, n0))
    return rows.gather(3, positions[:, None, None, :].expand(b, h, n, n))


def restore_positions(state: TokenState, x: torch.Tensor, fill: str = "zeros") -> torch.Tensor:
    """``x`` (B×N×D, laid out like ``state``) back at the stream's entry positions, B×N0×D:
    each entry position holds the token that now covers it (a merged token at all of its
    members' positions), zeros where the entry token was dropped or was padding. A protected
    token is alone in its slot, so it comes back exactly where it entered. Needs
    ``state.source``.

    ``fill="mean"`` puts the size-weighted mean of the live unprotected tokens where tokens
    were dropped instead, so that any mean over the unprotected positions (a model's own
    average pooling, whatever it is) is the size-weighted mean over the live tokens."""
    src = state.source
    if src is None:
        raise ValueError("restoring entry positions needs a state that tracks its source")
    if fill not in ("zeros", "mean"):
        raise ValueError(f"fill must be 'zeros' or 'mean', got {fill!r}")
    d = x.shape[-1]
    out = x.gather(1, src.clamp_min(0)[..., None].expand(-1, -1, d))
    dropped = (src < 0)[..., None]
    if fill == "zeros":
        return out.masked_fill(dropped, 0.0)
    w = (state.size * (state.live & ~state.protected)).to(x.dtype)[..., None]
    mean = (x * w).sum(1, keepdim=True) / w.sum(1, keepdim=True).clamp_min(1e-6)
    return torch.where(dropped, mean.to(out.dtype), out)


def size_weighted_mean(state: TokenState | None, x: torch.Tensor, skip: int = 0
                       ) -> torch.Tensor | None:
    """The mean of ``x`` (B×N×D, laid out like ``state``) over its live tokens from ``skip``
    on, each weighted by its size: what an average pool over the entry tokens computes, once
    tokens were merged or dropped. ``None`` when ``state`` is ``None``, does not describe
    ``x``, or changed nothing (the model's own mean is then exact)."""
    if (state is None or state.keep.shape != x.shape[:2]
            or not (state.sized or state.has_dead)):
        return None
    w = (state.size * state.live)[:, skip:].to(x.dtype)[..., None]
    return (x[:, skip:] * w).sum(1) / w.sum(1).clamp_min(1e-6)


# ---------------------------------------------------------------------------- head rows


def live_head_rows(heads: torch.Tensor, head_dim: int, num_heads: int,
                   sections: int = 1) -> torch.Tensor:
    """Indices, along a projection's head-side dimension, of the heads ``heads`` (a long
    tensor, kept on its device): head ``h`` owns ``h·d:(h+1)·d`` of each of ``sections``
    blocks of ``num_heads · d`` (3 for a fused q/k/v projection)."""
    one = (heads[:, None] * head_dim
           + torch.arange(head_dim, device=heads.device)).flatten()
    if sections == 1:
        return one
    starts = torch.arange(sections, device=heads.device) * (num_heads * head_dim)
    return (starts[:, None] + one[None]).flatten()


def linear_rows(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                rows: torch.Tensor, width: int) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` computed at the output ``rows`` only, the other outputs
    of the ``width`` zero."""
    y = F.linear(x, weight.index_select(0, rows),
                 None if bias is None else bias.index_select(0, rows))
    return place_rows(y, rows, width)


def place_rows(y: torch.Tensor, rows: torch.Tensor, width: int) -> torch.Tensor:
    """``y`` (outputs at ``rows`` only) placed in zeros of the full ``width``."""
    out = y.new_zeros(*y.shape[:-1], width)
    return out.index_copy_(out.dim() - 1, rows, y)


def linear_columns(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                   cols: torch.Tensor) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` reading the input ``cols`` only: exact where the other
    inputs are zero."""
    return F.linear(x.index_select(x.dim() - 1, cols), weight.index_select(1, cols), bias)
