"""Trimming sites: the three points of a layer where trimmers act, and the per-forward context.

A `Site` belongs to one layer of one stream. Its three small modules are what the rewrite
pass (or an attention hook) calls from inside the model's own forward:

- ``site.enter(x)`` at the layer's input: starts or fetches the stream's `TokenState`, runs
  the *pre* token ops (trimmers that decide before attention), compacts;
- ``site.core(q, k, v, …)`` in place of the attention product: adds the key bias (dead keys,
  log-size), records what the ops asked for (mean keys, the attention a query row pays),
  applies head gates, and stays on ``scaled_dot_product_attention`` (talking-heads
  attention, whose heads mix, is written out: ``mix``);
- ``site.leave(x)`` after the attention's residual sum: runs the *post* ops (merging,
  score-based pruning), compacts, records statistics.
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass, field, replace

import torch
import torch.nn.functional as F
from torch import nn

from .ops import (
    additive_mask,
    attention_bias,
    compact,
    entry_positions,
    gather_entry_mask,
    gather_token_input,
    key_attention,
    live_head_rows,
    prefix_attention,
    query_attention,
)
from .packed import Segments, segment_attention, unpack
from .state import LiveCounts, TokenState, resolve_counts, static_shapes

__all__ = ["CallRecord", "CrossScores", "LayerCost", "LayerStats", "Site", "SiteCall", "TokenOp",
           "TrimContext"]

MODES = ("auto", "masked", "compacted", "packed")
#: what a site's own attention core records for its ops (``TokenOp.needs``)
SELF_RECORDS = frozenset({"keys", "query_scores", "prefix_scores"})


class TokenOp(nn.Module):
    """A trimmer that turns one `TokenState` into the next, in masked form.

    ``needs`` names what the attention core must record for it: ``"keys"`` (B×N×d, keys
    averaged over heads) and/or ``"query_scores"`` (B×N, attention the query rows pay),
    ``"prefix_scores"`` (B×N, the attention the live tokens of the stream's prefix pay each
    token, `trimkit.ops.prefix_attention`: a single-stream VLM's text looking at its image), or
    ``"cross_scores"``: what a cross-attention of another stream that reads this stream's
    tokens as keys saw of them (`CrossScores`, in ``site.ctx.cross_scores``).
    """

    needs: frozenset[str] = frozenset()
    #: whether the op sets the site's head gates (``site.head_gates`` / ``cross_head_gates``);
    #: the engine then lets the layer's projections skip the heads a whole batch gated off
    gates_heads: bool = False
    #: whether how many tokens the op keeps is decided per instance from the content (a
    #: learned threshold), not by the counts it is given: no fixed-shape graph can hold it
    data_dependent_count: bool = False

    def forward(self, state: TokenState, site: Site) -> TokenState:  # pragma: no cover
        raise NotImplementedError

    def flops(self, tokens: torch.Tensor) -> torch.Tensor | float:
        """The op's own FLOPs on ``tokens`` live tokens (B float), for cost models; 0 for
        ops whose work is negligible next to the layer's."""
        return 0.0


class LayerStats:
    """Live tokens (per sample, B long) entering a layer's attention and leaving the layer,
    and its live self-attention heads (an int, or per sample when heads are gated). The
    counts may be given as `trimkit.state.LiveCounts`, counted when first read: a forward
    records them at every layer, and most are never read."""

    __slots__ = ("stream", "layer", "heads", "_tokens_in", "_tokens_out")

    def __init__(self, stream: str, layer: int, tokens_in: torch.Tensor | LiveCounts,
                 tokens_out: torch.Tensor | LiveCounts, heads: int | torch.Tensor):
        self.stream, self.layer, self.heads = stream, layer, heads
        self._tokens_in, self._tokens_out = tokens_in, tokens_out

    @property
    def tokens_in(self) -> torch.Tensor:
        self._tokens_in = resolve_counts(self._tokens_in)
        return self._tokens_in

    @property
    def tokens_out(self) -> torch.Tensor:
        self._tokens_out = resolve_counts(self._tokens_out)
        return self._tokens_out

    def __repr__(self) -> str:
        return (f"LayerStats(stream={self.stream!r}, layer={self.layer}, "
                f"tokens_in={self.tokens_in!r}, tokens_out={self.tokens_out!r}, "
                f"heads={self.heads!r})")

    def as_dict(self) -> dict:
        heads = self.heads if isinstance(self.heads, int) else self.heads.float().mean().item()
        return dict(stream=self.stream, layer=self.layer, heads=heads,
                    tokens_in=self.tokens_in.float().mean().item(),
                    tokens_out=self.tokens_out.float().mean().item())


@dataclass
class LayerCost:
    """What one layer of one forward computed, as float B tensors that carry the trimmers'
    gradient in training (soft counts): tokens entering its attention and leaving it, live
    self-/cross-attention heads (``None``: all), and the keys its cross-attention read."""

    stream: str
    layer: int
    tokens_in: torch.Tensor
    tokens_out: torch.Tensor
    heads: torch.Tensor | None = None
    cross_heads: torch.Tensor | None = None
    cross_keys: torch.Tensor | None = None
    #: the layer's trimmers' own FLOPs (B float, or 0)
    trimmers: torch.Tensor | float = 0.0


@dataclass
class CrossScores:
    """What one cross-attention saw of the tokens it read as keys, for ops that trim those
    tokens guided by the reading stream (PuMer): ``scores`` (B×N float) is the attention
    the reader's live tokens paid each key, averaged over heads and over those tokens
    (weighted by their size); ``keys`` (B×N×d) are the keys averaged over heads."""

    scores: torch.Tensor
    keys: torch.Tensor


@dataclass
class SiteCall:
    """What one forward computed at one site: never stored on the shared `Site`, so
    concurrent calls do not see each other's values."""

    #: what the site's attention core recorded for its ops (``TokenOp.needs``)
    captured: dict[str, torch.Tensor] = field(default_factory=dict)
    #: B long: live tokens entering the layer's attention (or counted when read)
    tokens_in: torch.Tensor | LiveCounts | None = None
    #: the soft counts of `LayerCost` gathered so far (while costs are recorded)
    cost: dict[str, torch.Tensor] = field(default_factory=dict)
    #: B×H per-instance gates on the heads of the self- and the cross-attention, set by this
    #: forward's ops (``None``: every head on); a zero gate removes the head's output
    head_gates: torch.Tensor | None = None
    cross_head_gates: torch.Tensor | None = None
    #: per attention (False: self, True: cross), the gates the live heads were read from, the
    #: live heads, and their projection rows by (head width, heads, sections)
    live: dict[bool, tuple[torch.Tensor, torch.Tensor | None, dict,
                           tuple[int, ...] | None]] = field(default_factory=dict)


@dataclass
class CallRecord:
    """What the forwards of one thread compute on one trimmed model: token states,
    statistics, costs, captures, gates. Each thread has its own (`TrimContext.call`); it
    outlives the forward, so `trimkit.last_stats` reads the calling thread's last one."""

    states: dict[str, TokenState] = field(default_factory=dict)
    entered: dict[tuple[str, int], TokenState] = field(default_factory=dict)
    stats: list[LayerStats] = field(default_factory=list)
    costs: list[LayerCost] = field(default_factory=list)
    #: B float: each stream's real (non-padding) tokens at its entry, the full-cost reference
    entry_counts: dict[str, torch.Tensor] = field(default_factory=dict)
    #: each stream's hidden states as its last layer leaves (while `TrimContext.observe`)
    observed: dict[str, torch.Tensor] = field(default_factory=dict)
    #: per stream, ``(real, protected)`` B×N bool masks (or ``None``) for its next entry, which
    #: an adapter derives from the model's own inputs (e.g. the token a pooler reads)
    entry: dict[str, tuple[torch.Tensor | None, torch.Tensor | None]] = field(
        default_factory=dict)
    #: per stream, the length of the prefix its next entry starts with (`TokenState.prefix`)
    prefix: dict[str, int] = field(default_factory=dict)
    #: streams that the forward under way does not read (e.g. a text encoder run without
    #: the image): `TrimContext.keys_state` gives ``None`` for them, so no trimmer is guided
    #: by a stream the outputs must not depend on
    absent: set[str] = field(default_factory=set)
    #: positional streams (`StreamDesc.positional`) whose layers get no attention mask in
    #: the forward under way, as an adapter read from the model's inputs at their entry:
    #: they may pack (`TrimContext.packing`); the others stay one row per sample
    unmasked: set[str] = field(default_factory=set)
    #: each cross-attention read of a scored stream leaves its `CrossScores` under
    #: ``(stream, pair of the reading layer)`` until the stream restarts
    cross_scores: dict[tuple[str, int], CrossScores] = field(default_factory=dict)
    #: per site, keyed ``(stream, layer)``
    sites: dict[tuple[str, int], SiteCall] = field(default_factory=dict)
    #: per-call values of hooks and adapters, under keys they choose
    scratch: dict[object, object] = field(default_factory=dict)


class _PerThread(threading.local):
    """A thread's record and switches: each thread that touches the local starts afresh."""

    def __init__(self) -> None:
        self.call = CallRecord()
        self.enabled = True
        self.record_costs = False
        self.observe = False


def _per_call(name: str, doc: str) -> property:
    """A `TrimContext` attribute that reads and writes the calling thread's `CallRecord`."""

    def get(self: TrimContext) -> object:
        return getattr(self._local.call, name)

    def set_(self: TrimContext, value: object) -> None:
        setattr(self._local.call, name, value)

    return property(get, set_, doc=doc)


def _switch(name: str, doc: str) -> property:
    """A `TrimContext` switch that holds for the calling thread only."""

    def get(self: TrimContext) -> bool:
        return getattr(self._local, name)

    def set_(self: TrimContext, value: bool) -> None:
        setattr(self._local, name, value)

    return property(get, set_, doc=doc)


@dataclass
class TrimContext:
    """What `trimkit.apply` decided for one model (its fields, shared by every call), and
    the way to what the calling thread's forwards compute (`call`).

    The rule: what a setter changes (`trimkit.set_mode`, the fields) holds for the model,
    in every thread; what a context manager or a switch changes (``enabled``,
    ``record_costs``, ``observe``: `trimkit.trimming_disabled`, `trimkit.recording_costs`)
    holds for the calling thread only. A deep copy or an unpickled copy starts with a
    fresh record and the switches at their defaults."""

    mode: str = "auto"
    track_source: bool = False
    protected: dict[str, int] = field(default_factory=dict)
    parallel: bool = False
    #: streams whose merged tokens weigh attention by log(size) wherever they are keys
    proportional: frozenset[str] = frozenset()
    #: streams whose attention masks are given over their entry tokens (`StreamDesc.positional`)
    positional: frozenset[str] = frozenset()
    #: streams whose tokens are scored wherever a cross-attention reads them as keys (some
    #: op needs ``"cross_scores"``)
    scored: frozenset[str] = frozenset()
    #: streams whose layers take inputs indexed by their entry tokens
    #: (`trimkit.describe.TokenInput`), gathered at every layer: they track their source
    follows: frozenset[str] = frozenset()
    #: streams that may run packed (`trimkit.packed`), positional ones only in a call that
    #: gives them no mask (`CallRecord.unmasked`); others stay padded whatever the mode
    packable: frozenset[str] = frozenset()
    #: positional streams whose adapter records, call by call, whether their layers get a
    #: mask (`CallRecord.unmasked`), so that they may pack in the calls that give none; set
    #: by `trimkit.Adapter.install` (the others never pack)
    unmaskable: frozenset[str] = frozenset()
    _local: _PerThread = field(default_factory=_PerThread, init=False, repr=False,
                               compare=False)

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        del state["_local"]
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._local = _PerThread()

    @property
    def call(self) -> CallRecord:
        """The calling thread's `CallRecord`."""
        return self._local.call

    enabled = _switch("enabled", "Whether the calling thread's forwards are trimmed.")
    record_costs = _switch("record_costs", "Whether the calling thread's forwards record each "
                           "layer's soft token and head counts (`LayerCost`) for a cost loss.")
    observe = _switch("observe", "Whether the calling thread's forwards record each stream's "
                      "hidden states as its last layer leaves, even while disabled "
                      "(self-distillation on hidden states).")
    states = _per_call("states", "`CallRecord.states` of the calling thread.")
    entered = _per_call("entered", "`CallRecord.entered` of the calling thread.")
    stats = _per_call("stats", "`CallRecord.stats` of the calling thread.")
    costs = _per_call("costs", "`CallRecord.costs` of the calling thread.")
    entry_counts = _per_call("entry_counts", "`CallRecord.entry_counts` of the calling thread.")
    observed = _per_call("observed", "`CallRecord.observed` of the calling thread.")
    entry = _per_call("entry", "`CallRecord.entry` of the calling thread.")
    absent = _per_call("absent", "`CallRecord.absent` of the calling thread.")
    cross_scores = _per_call("cross_scores", "`CallRecord.cross_scores` of the calling thread.")

    def compacting(self, training: bool) -> bool:
        return self.mode in ("compacted", "packed") or (self.mode == "auto" and not training)

    def packing(self, stream: str, training: bool) -> bool:
        """Whether ``stream``'s batches may be packed: in ``"packed"`` mode, and in
        ``"auto"`` mode in eval (layer by layer, where it pays: `pays_to_pack`); never while
        shapes must stay static (export, `trimkit.fixed_shapes`) or under ``torch.compile``
        (packing reads the counts on the host, which would break the graph at every
        layer); a positional stream only in a call whose adapter found it gets no mask
        (`CallRecord.unmasked`)."""
        return (stream in self.packable
                and (stream not in self.positional or stream in self.call.unmasked)
                and (self.mode == "packed" or (self.mode == "auto" and not training))
                and not static_shapes() and not torch.compiler.is_compiling())

    @property
    def per_layer_packing(self) -> bool:
        """``"auto"`` packs within a layer only: each packed stream leaves every layer one
        row per sample, so whatever the model's own code keeps from between its layers
        (``output_hidden_states``, intermediate features) has its usual shape."""
        return self.mode == "auto"

    def start(self, stream: str, x: torch.Tensor, real: torch.Tensor | None = None) -> TokenState:
        """A fresh state for ``stream`` at its entry (``real``: B×N bool, False on padding),
        with the stream's pending `entry` masks; that stream's statistics and remembered
        layer entries restart."""
        call = self.call
        call.stats = [s for s in call.stats if s.stream != stream]
        call.costs = [c for c in call.costs if c.stream != stream]
        call.entered = {k: v for k, v in call.entered.items() if k[0] != stream}
        call.cross_scores = {k: v for k, v in call.cross_scores.items() if k[0] != stream}
        extra_real, protected = call.entry.pop(stream, (None, None))
        prefix = call.prefix.pop(stream, 0)
        for mask in (extra_real, protected):
            if mask is not None and mask.shape != x.shape[:2]:
                raise RuntimeError(f"trimkit: the entry masks of stream {stream!r} have shape "
                                   f"{tuple(mask.shape)}, its tokens {tuple(x.shape[:2])}")
        if extra_real is not None:
            real = extra_real if real is None else real.to(torch.bool) & extra_real
        pad = None if real is None else ~real.to(torch.bool)
        state = TokenState.start(x, num_protected=self.protected.get(stream, 0),
                                 protected=protected, padding_mask=pad, prefix=prefix,
                                 track_source=(self.track_source or stream in self.positional
                                               or stream in self.follows or prefix > 0))
        call.states[stream] = state
        if self.record_costs:
            call.entry_counts[stream] = state.keep.float().sum(1)
        return state

    def keys_state(self, stream: str, pair: int) -> TokenState | None:
        """The state of ``stream`` that describes the keys a cross-attention reads: as it
        entered its layer paired with ``pair`` (side-by-side streams), else its latest;
        ``None`` while the stream is `absent`."""
        call = self.call
        if stream in call.absent:
            return None
        if self.parallel and (stream, pair) in call.entered:
            return call.entered[(stream, pair)]
        return call.states.get(stream)


class _Point(nn.Module):
    """Base of the three call points; holds its site without registering it as a child.

    A call goes straight to ``forward``: the points run several times in every layer of
    every forward, and `nn.Module.__call__`'s hook dispatch cost more there than what they
    do when a layer trims nothing. Nothing hooks them (they hold no parameters)."""

    def __init__(self, site: Site):
        super().__init__()
        object.__setattr__(self, "site", site)

    def __call__(self, *args: object, **kwargs: object) -> object:
        return self.forward(*args, **kwargs)


class _Enter(_Point):
    def forward(self, x: torch.Tensor, real: torch.Tensor | None = None) -> torch.Tensor:
        return self.site.enter_(x, real)


class _Leave(_Point):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.site.leave_(x)


class _Core(_Point):
    cross = False

    def forward(self, q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                mix=None):
        return self.site.attend_(q, k, v, attn_mask, dropout_p, is_causal, scale,
                                 cross=self.cross, mix=mix)

    def mixes_heads(self) -> None:
        """Declare (at install) that this attention mixes its heads (``mix``): its q, k and
        v projections then compute every head, which every head's weights read."""
        self.site.mixed.add(self.cross)

    def live_rows(self, head_dim: int, num_heads: int, sections: int = 1, *,
                  qkv: bool = False) -> torch.Tensor | None:
        """The rows of this attention's projections that the next call computes
        (`Site.live_rows`), for a forward that projects q, k, v itself."""
        return self.site.live_rows(head_dim, num_heads, sections, cross=self.cross, qkv=qkv)


class _CrossCore(_Core):
    cross = True


class _Follow(_Point):
    """Gathers one of the layer's token inputs (`trimkit.describe.TokenInput`) at the
    tokens its enter left (``x``, which orders the call after it)."""

    def __init__(self, site: Site, spec: object):
        super().__init__(site)
        self.spec = spec

    def forward(self, x: torch.Tensor, value: object) -> object:
        return self.site.follow_(value, self.spec)


def _soft_count(keep: torch.Tensor) -> torch.Tensor:
    """B float: live tokens, counting a soft keep by its value (its gradient flows)."""
    return keep.float().sum(1)


def _row_mask(mask: torch.Tensor | None) -> torch.Tensor | None:
    """The key bias seen by one query row (a full N×N mask keeps its first row)."""
    if mask is None or mask.dim() < 2 or mask.shape[-2] == 1:
        return mask
    return mask[..., :1, :]


class Site(nn.Module):
    """The trimming site of one layer: its ops, its flags, and its three call points.

    A site holds what `trimkit.apply` decided; what a forward computes at it (captures,
    head gates, counts) lives in the calling thread's `CallRecord` (`call`)."""

    def __init__(
        self,
        stream: str,
        layer: int,
        num_heads: int,
        *,
        first: bool = False,
        last: bool = False,
        pre: list[TokenOp] | None = None,
        post: list[TokenOp] | None = None,
        cross_stream: str | None = None,
        masks_are_padding: bool = False,
        pair: int | None = None,
    ):
        super().__init__()
        self.stream, self.layer, self.num_heads, self.first = stream, layer, num_heads, first
        #: the last layer of a run of the stream's layers in one module (a tower): a packed
        #: stream leaves it one row per sample again, as the model's own code after the
        #: tower expects
        self.last = last
        #: some op of the stream acts at or before this layer's attention (set by `apply`)
        self.acted = bool(pre)
        self.key = (stream, layer)
        self.cross_stream, self.masks_are_padding = cross_stream, masks_are_padding
        self.pair = layer if pair is None else pair
        self.pre = nn.ModuleList(pre or [])
        self.post = nn.ModuleList(post or [])
        self.needs = frozenset().union(*(op.needs for op in [*self.pre, *self.post]))
        #: the attentions (False: self, True: cross) whose heads mix (talking heads)
        self.mixed: set[bool] = set()
        self.ctx: TrimContext = TrimContext()
        object.__setattr__(self, "enter", _Enter(self))
        object.__setattr__(self, "core", _Core(self))
        object.__setattr__(self, "leave", _Leave(self))
        object.__setattr__(self, "cross_core", _CrossCore(self))

    def extra_repr(self) -> str:
        return f"stream={self.stream!r}, layer={self.layer}"

    # -- this forward's values, in the calling thread's record --------------------------
    @property
    def call(self) -> SiteCall:
        """What the calling thread's forward computed at this site so far."""
        sites = self.ctx.call.sites
        got = sites.get(self.key)
        if got is None:
            got = sites[self.key] = SiteCall()
        return got

    @property
    def captured(self) -> dict[str, torch.Tensor]:
        """What this forward's attention core recorded for the ops (``TokenOp.needs``)."""
        return self.call.captured

    @property
    def head_gates(self) -> torch.Tensor | None:
        """B×H gates of this forward on the self-attention's heads (``None``: all on)."""
        return self.call.head_gates

    @head_gates.setter
    def head_gates(self, gates: torch.Tensor | None) -> None:
        self.call.head_gates = gates

    @property
    def cross_head_gates(self) -> torch.Tensor | None:
        """B×H gates of this forward on the cross-attention's heads (``None``: all on)."""
        return self.call.cross_head_gates

    @cross_head_gates.setter
    def cross_head_gates(self, gates: torch.Tensor | None) -> None:
        self.call.cross_head_gates = gates

    # -- the three call points -----------------------------------------------------------
    def _state(self, x: torch.Tensor, real: torch.Tensor | None = None,
               entering: bool = False) -> TokenState:
        state = self.ctx.call.states.get(self.stream)
        if (self.first and entering) or state is None or state.keep.shape != x.shape[:2]:
            return self.ctx.start(self.stream, x, real)
        return state.with_x(x)

    def _run(self, ops: nn.ModuleList, state: TokenState, last: bool = False,
             acted: bool = False) -> TokenState:
        """``ops`` on ``state``, then compaction in eval; packing where the stream may pack
        and some op has ``acted`` on it (before that, adapters may run the model's own
        attention, which knows no segments)."""
        if state.segments is not None and (len(ops) or last):
            state = unpack_state(state)  # ops decide over one row per sample
        for op in ops:
            state = op(state, self)
        if self.ctx.compacting(self.training):
            state, _ = compact(state)
            ctx = self.ctx
            if (acted and not last and state.segments is None
                    and ctx.packing(self.stream, self.training)
                    and (not ctx.per_layer_packing or pays_to_pack(state))):
                state = pack_state(state)
        self.ctx.call.states[self.stream] = state
        return state

    def enter_(self, x: torch.Tensor, real: torch.Tensor | None = None) -> torch.Tensor:
        ctx = self.ctx
        if not ctx.enabled:
            return x
        state = self._state(x, real, entering=True)
        call = ctx.call.sites[self.key] = SiteCall()
        if self.cross_stream is not None:  # only cross-attending layers pair up
            ctx.call.entered[(self.stream, self.pair)] = state
        entering = _soft_count(state.keep) if ctx.record_costs else None
        state = self._run(self.pre, state, acted=self.acted)
        call.tokens_in = state.deferred_counts()
        if entering is not None:
            ops = [*self.pre, *self.post]
            call.cost = {"tokens_in": _soft_count(state.keep),
                         "trimmers": sum((op.flops(entering) for op in ops), 0.0)}
            for key, gates in (("heads", call.head_gates),
                               ("cross_heads", call.cross_head_gates)):
                if gates is not None:
                    call.cost[key] = gates.float().sum(1)
        return state.x

    def follow(self, spec: object) -> nn.Module:
        """A call point that gathers the token input ``spec`` (a
        `trimkit.describe.TokenInput`) at this layer's tokens: `follow_`."""
        return _Follow(self, spec)

    def follow_(self, value: object, spec: object) -> object:
        """``value``, an input of the layer indexed by the stream's entry tokens, with its
        rows at the stream's current tokens (`trimkit.ops.gather_token_input`); anything
        but a tensor, or a call with trimming off, passes unchanged."""
        ctx = self.ctx
        if not (ctx.enabled and isinstance(value, torch.Tensor)):
            return value
        state = ctx.call.states.get(self.stream)
        if state is None or state.source is None:
            return value
        return gather_token_input(value, state, axis=spec.axis, rank=spec.rank,
                                  leading=spec.leading, neutral=spec.neutral)

    def exit_(self, x: torch.Tensor) -> torch.Tensor:
        """At the layer's output (after its MLP): under per-layer packing
        (`TrimContext.per_layer_packing`), a packed stream one row per sample again, so the
        model's own code between layers sees its usual B×N shape."""
        ctx = self.ctx
        if not (ctx.enabled and ctx.per_layer_packing):
            return x
        state = ctx.call.states.get(self.stream)
        if state is None or state.segments is None or state.x.shape[:2] != x.shape[:2]:
            return x
        state = unpack_state(state.with_x(x))
        ctx.call.states[self.stream] = state
        return state.x

    def leave_(self, x: torch.Tensor) -> torch.Tensor:
        ctx = self.ctx
        if ctx.observe:
            ctx.call.observed[self.stream] = x
        if not ctx.enabled:
            return x
        state = self._run(self.post, self._state(x), last=self.last,
                          acted=self.acted or bool(len(self.post)))
        call = self.call
        call.captured.clear()
        out = state.deferred_counts()
        tokens_in = call.tokens_in if call.tokens_in is not None else out
        heads = (self.num_heads if call.head_gates is None
                 else (call.head_gates > 0).sum(1))
        ctx.call.stats.append(LayerStats(self.stream, self.layer, tokens_in, out, heads))
        if ctx.record_costs and call.cost:
            ctx.call.costs.append(LayerCost(self.stream, self.layer,
                                            tokens_out=_soft_count(state.keep), **call.cost))
        call.tokens_in, call.cost = None, {}
        return state.x

    def live_heads(self, cross: bool = False, *, qkv: bool = False) -> torch.Tensor | None:
        """The heads (sorted long indices) that some instance of this forward's batch keeps,
        where execution skips the others: at inference (compacted, gates without gradient),
        trimming enabled, some head gated off in every instance. ``None``: every head runs.

        ``qkv`` asks for the q, k, v projections, which compute every head while the site
        records keys or query scores from its self-attention (they average over all heads),
        and where the attention mixes its heads (talking heads: each reads every head).
        The answer is read once per forward (one device sync) and kept with the gates."""
        if qkv and (cross in self.mixed or (not cross and self.needs & SELF_RECORDS)):
            return None
        call = self.call
        gates = call.cross_head_gates if cross else call.head_gates
        if (gates is None or gates.requires_grad or not self.ctx.enabled
                or not self.ctx.compacting(self.training)):
            return None
        live = call.live.get(cross)
        if live is None or live[0] is not gates:
            flags = (gates > 0).any(0).tolist()  # the one sync
            heads = None if all(flags) else tuple(i for i, f in enumerate(flags) if f)
            idx = None if heads is None else torch.tensor(heads, device=gates.device)
            live = call.live[cross] = (gates, idx, {}, heads)
        return live[1]

    def live_head_set(self, cross: bool = False, *, qkv: bool = False
                      ) -> tuple[int, ...] | None:
        """The `live_heads` as a tuple (a cache key: batches that keep the same heads slice
        the projections' weights the same way), or ``None`` while every head runs."""
        if self.live_heads(cross, qkv=qkv) is None:
            return None
        return self.call.live[cross][3]

    def live_rows(self, head_dim: int, num_heads: int, sections: int = 1, *,
                  cross: bool = False, qkv: bool = False) -> torch.Tensor | None:
        """Indices along a projection's head-side dimension (``sections`` blocks of
        ``num_heads · head_dim``) of the `live_heads`, or ``None`` while every head runs."""
        idx = self.live_heads(cross, qkv=qkv)
        if idx is None:
            return None
        rows = self.call.live[cross][2]
        key = (head_dim, num_heads, sections)
        if key not in rows:
            rows[key] = live_head_rows(idx, head_dim, num_heads, sections)
        return rows[key]

    def _query_row(self, q: torch.Tensor, state: TokenState) -> torch.Tensor:
        """The query whose attention scores tokens (non-positional streams): the first token
        when the stream protects its leading tokens (``num_protected > 0``: its CLS; with a
        prefix, the prefix's first token), else the mean query of the live tokens."""
        if self.ctx.protected.get(self.stream, 0) > 0:
            return q[:, :, :1]
        w = state.live.to(q.dtype)[:, None, :, None]
        return (q * w).sum(2, keepdim=True) / w.sum(2, keepdim=True).clamp_min(1.0)

    # -- the attention core, in named steps ----------------------------------------------
    def attend_(self, q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                cross=False, mix=None):
        """SDPA with the key stream's bias; records what the ops need (self-attention only).

        ``mix``: ``(before, after)``, the ``nn.Linear`` H → H (or ``None``) that mix the
        heads of the logits before the softmax and of the weights after it (talking-heads
        attention); the product is then written out (`_mixed_attention`)."""
        state, keys = self._attention_states(k, cross)
        if keys is None:
            if mix is not None:
                return _mixed_attention(q, k, v, attn_mask, dropout_p, is_causal, scale, mix,
                                        None)[0]
            return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask,
                                                  dropout_p=dropout_p, is_causal=is_causal,
                                                  scale=scale)
        packed = keys.segments is not None or (state is not None and state.segments is not None)
        if packed and not cross and mix is None:
            return self._attend_packed(q, k, v, attn_mask, is_causal, scale, keys)
        if packed:
            return self._attend_unpacked(q, k, v, attn_mask, dropout_p, is_causal, scale,
                                         state, keys, cross, mix)
        return self._attend_rows(q, k, v, attn_mask, dropout_p, is_causal, scale, state,
                                 keys, cross, mix)

    def _attend_rows(self, q, k, v, attn_mask, dropout_p, is_causal, scale,
                     state: TokenState | None, keys: TokenState, cross: bool,
                     mix=None) -> torch.Tensor:
        """The attention of streams laid out one row per sample (masked or compacted)."""
        attn_mask, is_causal, positional = self._masks(q, k, attn_mask, is_causal, state,
                                                       keys, cross)
        self._record(q, k, attn_mask, scale, state, keys, cross, positional, mix)
        return self._product(q, k, v, attn_mask, dropout_p, is_causal, scale, state, cross,
                             keys, mix)

    def _attend_unpacked(self, q, k, v, attn_mask, dropout_p, is_causal, scale,
                         state: TokenState | None, keys: TokenState, cross: bool,
                         mix=None) -> torch.Tensor:
        """Attention where the reading or the read stream runs packed but the product needs
        one row per sample: a cross-attention (what it records, e.g. the attention each key
        receives, is then per sample as the ops expect), or one that mixes its heads. Both
        streams are laid out one row per sample for the product, and the output is packed
        again where the queries were."""
        rows = state
        if state is not None and state.segments is not None:
            rows = unpack_state(state)
            q = _unpack_heads(q, state.segments)
        if keys.segments is not None:
            k, v = (_unpack_heads(t, keys.segments) for t in (k, v))
            keys = unpack_state(keys) if cross else rows
        out = self._attend_rows(q, k, v, attn_mask, dropout_p, is_causal, scale, rows, keys,
                                cross, mix)
        if state is not None and state.segments is not None:
            out = out.transpose(1, 2)[rows.keep][None].transpose(1, 2)
        return out

    def _attention_states(self, k: torch.Tensor, cross: bool
                          ) -> tuple[TokenState | None, TokenState | None]:
        """The query stream's state and the state of the keys this attention reads (both
        ``None`` while trimming is off); a key count the state does not match is an error."""
        if not self.ctx.enabled:
            return None, None
        state = self.ctx.call.states.get(self.stream)
        keys = self.ctx.keys_state(self.cross_stream, self.pair) if cross else state
        if keys is not None and keys.keep.shape[1] != k.shape[-2]:
            raise RuntimeError(
                f"trimkit: the keys of {'cross-' if cross else ''}attention in {self.stream} "
                f"layer {self.layer} have {k.shape[-2]} tokens but the trimming state has "
                f"{keys.keep.shape[1]}; the adapter's description does not match this forward")
        return state, keys

    def _masks(self, q, k, attn_mask, is_causal, state: TokenState | None, keys: TokenState,
               cross: bool) -> tuple[torch.Tensor | None, bool, bool]:
        """The model's mask made to fit the trimmed keys, plus their bias (dead keys,
        log-size): the padding mask dropped where the state carries it, positional masks
        read at the tokens' entry positions. Also says whether the stream is positional."""
        if self.masks_are_padding:
            attn_mask = None  # the state carries (and compacts) the padding
        positional = not cross and state is not None and self.stream in self.ctx.positional
        if positional and (attn_mask is not None or is_causal):
            positions = entry_positions(state)
            if attn_mask is not None:
                if attn_mask.shape[-1] != state.source.shape[1]:
                    raise RuntimeError(
                        f"trimkit: {self.stream} layer {self.layer} got an attention mask over "
                        f"{attn_mask.shape[-1]} tokens; the stream entered with "
                        f"{state.source.shape[1]}")
                attn_mask = additive_mask(gather_entry_mask(attn_mask, positions), q.dtype)
            elif is_causal:
                causal = positions[:, None, :, None] >= positions[:, None, None, :]
                attn_mask, is_causal = additive_mask(causal, q.dtype), False
        key_stream = self.cross_stream if cross else self.stream
        bias = attention_bias(keys, q.dtype, key_stream in self.ctx.proportional)
        if bias is not None:
            mask = attn_mask
            if is_causal:
                mask, is_causal = _causal_mask(q, k), False
            attn_mask = bias if mask is None else additive_mask(mask, q.dtype) + bias
        return attn_mask, is_causal, positional

    def _record(self, q, k, attn_mask, scale, state: TokenState | None, keys: TokenState,
                cross: bool, positional: bool, mix=None) -> None:
        """What the ops asked to see of this attention: the keys read across (costs), the
        mean keys and the attention the scoring query row pays (self-attention)."""
        call = self.call
        if cross:
            if self.ctx.record_costs and call.cost:
                call.cost["cross_keys"] = _soft_count(keys.keep)
            return
        if "keys" in self.needs:
            call.captured["keys"] = k.mean(1)
        if "query_scores" in self.needs:
            s = scale if scale is not None else 1.0 / math.sqrt(q.shape[-1])
            if not positional:
                rows, row_mask = self._query_row(q, state), _row_mask(attn_mask)
            else:
                rows, row_mask = _scoring_rows(q, attn_mask, state)
            before = None if mix is None else mix[0]
            call.captured["query_scores"] = query_attention(
                rows, k, row_mask, s, transform=None if before is None else _HeadMix(before))
        if "prefix_scores" in self.needs:
            s = scale if scale is not None else 1.0 / math.sqrt(q.shape[-1])
            call.captured["prefix_scores"] = prefix_attention(q, k, attn_mask, s, state)

    def _attend_packed(self, q, k, v, attn_mask, is_causal, scale, state: TokenState
                       ) -> torch.Tensor:
        """Self-attention of a packed stream (q, k, v: 1×H×ΣN×d): each sample's tokens
        attend to their own segment only, under the stream's log-size bias and this
        forward's head gates; what the ops need is recorded one row per sample."""
        if (attn_mask is not None and not self.masks_are_padding) or is_causal:
            raise RuntimeError(
                f"trimkit: {self.stream} layer {self.layer} got an attention mask while its "
                f"stream runs packed; set_mode(model, 'compacted') runs it padded")
        segs = state.segments
        if self.needs & SELF_RECORDS:
            padded = unpack_state(state)
            qp, kp = (_unpack_heads(t, segs) for t in (q, k))
            bias = attention_bias(padded, q.dtype, self.stream in self.ctx.proportional)
            self._record(qp, kp, bias, scale, padded, padded, False, False)
        key_bias = None
        if self.stream in self.ctx.proportional and state.sized:
            key_bias = torch.log(state.size[0].float())
        live, gates = self.live_heads(False), self.call.head_gates
        heads = q.shape[1]
        if live is not None:
            q, k, v = q[:, live], k[:, live], v[:, live]
        out = segment_attention(q, k, v, segs, key_bias=key_bias, scale=scale)
        if gates is not None:
            per_token = gates.to(out.dtype)[segs.ids(out.device)]  # ΣN×H
            if live is not None:
                per_token = per_token[:, live]
            out = out * per_token.t()[None, :, :, None]
        if live is not None:
            out = out.new_zeros(1, heads, *out.shape[2:]).index_copy(1, live, out)
        return out

    def _product(self, q, k, v, attn_mask, dropout_p, is_causal, scale,
                 state: TokenState | None, cross: bool, keys: TokenState | None = None,
                 mix=None) -> torch.Tensor:
        """The attention product under this forward's head gates: written out where the
        keys are scored for another stream's ops or the heads mix (``mix``), over the live
        heads only where a whole batch gated some off, else fused."""
        gates = self.call.cross_head_gates if cross else self.call.head_gates
        key_stream = self.cross_stream if cross else self.stream
        if mix is not None:
            weights = None if keys is None else _key_weights(
                keys, key_stream in self.ctx.proportional)
            out, probs = _mixed_attention(q, k, v, attn_mask, dropout_p, is_causal, scale, mix,
                                          weights)
            if cross and key_stream in self.ctx.scored:
                scores = key_attention(probs.detach(), _row_weights(state, q.shape[-2]))
                self.ctx.call.cross_scores[(key_stream, self.pair)] = CrossScores(
                    scores, k.detach().mean(1))
            return out if gates is None else out * gates.to(out.dtype)[:, :, None, None]
        if cross and key_stream in self.ctx.scored:
            out, scores = _scored_attention(q, k, v, attn_mask, dropout_p, is_causal, scale,
                                             _row_weights(state, q.shape[-2]))
            self.ctx.call.cross_scores[(key_stream, self.pair)] = CrossScores(
                scores.detach(), k.detach().mean(1))
            return out if gates is None else out * gates.to(out.dtype)[:, :, None, None]
        live = self.live_heads(cross)
        if live is not None:
            return _attend_live_heads(q, k, v, attn_mask, dropout_p, is_causal, scale, gates,
                                      live)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p,
                                             is_causal=is_causal, scale=scale)
        if gates is not None:
            out = out * gates.to(out.dtype)[:, :, None, None]
        return out


#: ``mode="auto"`` packs a layer's batch when at least this share of its padded slots
#: would be padding (`pays_to_pack`)
AUTO_PACK_WASTE = 0.2
#: ... and its hidden states are at least this wide: in narrower layers the per-layer
#: gathers and the grouped attention calls cost more than the padding they save
#: (``trimkit bench-packed``: slower packed at widths 64 and 128, faster at 768)
AUTO_PACK_MIN_WIDTH = 256


def pays_to_pack(state: TokenState) -> bool:
    """Whether packing a compacted batch pays under ``mode="auto"``: two or more samples,
    hard decisions, hidden states at least `AUTO_PACK_MIN_WIDTH` wide, and at least
    `AUTO_PACK_WASTE` of the padded slots dead (fixed counts per sample, as `tome` or
    `attn_prune` give, never pack)."""
    keep = state.keep
    b, n = keep.shape
    if (b <= 1 or n == 0 or keep.dtype != torch.bool or not state.has_dead
            or state.x.shape[-1] < AUTO_PACK_MIN_WIDTH):
        return False
    return int(keep.sum()) <= (1.0 - AUTO_PACK_WASTE) * b * n


def pack_state(state: TokenState) -> TokenState:
    """A compacted state in packed form (`TokenState.segments`): the live tokens of a batch
    of more than one sample, with hard decisions, as one 1×ΣN sequence."""
    b = state.keep.shape[0]
    if b <= 1 or state.keep.dtype != torch.bool:
        return state
    live = state.keep
    counts = live.sum(1).tolist()
    entry = None if state.entry is None else state.entry[live][None]
    return replace(state, x=state.x[live][None], keep=live[live][None],
                   size=state.size[live][None], protected=state.protected[live][None],
                   entry=entry, has_dead=False, known=None,
                   segments=Segments.from_lengths(counts))


def unpack_state(state: TokenState) -> TokenState:
    """A packed state one row per sample again, as `trimkit.ops.compact` leaves a ragged
    batch: live tokens first, padded to the longest, the padding dead and of size 1."""
    segs = state.segments
    x, real = unpack(state.x, segs)
    size = unpack(state.size, segs, fill=1.0)[0]
    protected = unpack(state.protected, segs)[0]
    entry = state.entry
    if entry is not None:
        entry = unpack(entry, segs, fill=state.source.shape[1] - 1)[0]
    return replace(state, x=x, keep=real, size=size, protected=protected, entry=entry,
                   has_dead=min(segs.lengths, default=0) < real.shape[1], known=None,
                   segments=None)


def _unpack_heads(t: torch.Tensor, segments: Segments) -> torch.Tensor:
    """Packed per-head rows (1×H×ΣN×d) one row per sample (B×H×N×d, zeros past each)."""
    return unpack(t.transpose(1, 2), segments)[0].transpose(1, 2)


def _scoring_rows(q: torch.Tensor, mask: torch.Tensor | None, state: TokenState
                  ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The query row (B×H×1×d) that scores tokens in a stream whose masks are positional, and
    its mask row: each sample's first protected token (the token its pooler reads), else its
    last live token (which, under a causal mask, sees every other)."""
    b, h, n, d = q.shape
    idx = torch.arange(n, device=q.device)
    first = torch.where(state.protected, idx, n).amin(1)
    last = torch.where(state.live, idx, -1).amax(1).clamp_min(0)
    row = torch.where(first < n, first, last)
    rows = q.gather(2, row[:, None, None, None].expand(b, h, 1, d))
    if mask is None or mask.dim() < 2 or mask.shape[-2] == 1:
        return rows, mask
    while mask.dim() < 4:
        mask = mask.unsqueeze(0)
    mask = mask.expand(b, *mask.shape[1:])
    return rows, mask.gather(2, row[:, None, None, None].expand(b, mask.shape[1], 1,
                                                                  mask.shape[-1]))


def _causal_mask(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """SDPA's ``is_causal`` as a bool mask (True = attend), aligned to the last key."""
    n, m = q.shape[-2], k.shape[-2]
    return torch.ones(n, m, dtype=torch.bool, device=q.device).tril(m - n)


def _row_weights(state: TokenState | None, rows: int) -> torch.Tensor | None:
    """B×R weights of a stream's query rows when scoring keys: each live token by its size
    (padding and dead tokens 0); ``None`` (rows equal) when the state does not match."""
    if state is None or state.keep.shape[1] != rows:
        return None
    return state.keep.float() * state.size.float()


def _scored_attention(q, k, v, attn_mask, dropout_p, is_causal, scale,
                      row_weights: torch.Tensor | None
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """The attention product written out (not fused), to also return the attention each key
    receives (`trimkit.ops.key_attention` of the probabilities, before dropout)."""
    s = scale if scale is not None else 1.0 / math.sqrt(q.shape[-1])
    logits = torch.matmul(q, k.transpose(-2, -1)) * s
    if is_causal:
        logits = logits + additive_mask(_causal_mask(q, k), logits.dtype)
    if attn_mask is not None:
        logits = logits + additive_mask(attn_mask, logits.dtype)
    probs = torch.softmax(logits.float(), dim=-1)
    scores = key_attention(probs, row_weights)
    weights = probs.to(v.dtype)
    if dropout_p > 0:
        weights = F.dropout(weights, dropout_p)
    return torch.matmul(weights, v), scores


class _HeadMix:
    """An ``nn.Linear`` H → H applied over the head axis of a B×H×N×M map."""

    def __init__(self, linear: nn.Module):
        self.linear = linear

    def __call__(self, t: torch.Tensor) -> torch.Tensor:
        return self.linear(t.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


def _key_weights(keys: TokenState, proportional: bool) -> torch.Tensor | None:
    """B×N: how much of each key a term that reaches every key alike should see (the bias
    of a mix after the softmax): its keep (0 when dead, a soft keep's value in training)
    times, under proportional attention, its size; ``None`` when every key counts 1."""
    keep, w = keys.keep, None
    if keys.has_dead or (keep.dtype != torch.bool and keep.requires_grad):
        w = keep.float()
    if proportional and keys.sized:
        w = keys.size.float() if w is None else w * keys.size.float()
    return w


def _mixed_attention(q, k, v, attn_mask, dropout_p, is_causal, scale, mix,
                     weights: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Talking-heads attention written out (Shazeer et al. 2020): the logits' heads mixed by
    ``mix[0]`` before the softmax (the key bias, ``attn_mask``, added after it, so a dead
    key stays out of every head), the weights' heads mixed by ``mix[1]`` after it. That
    linear's bias reaches every key alike; it reaches each key by its ``weights`` (B×N,
    `_key_weights`; ``None``: 1), so that a dead key is read by no head and a merged one
    counts as the tokens it stands for where attention is proportional. Returns the product
    and the weights after the softmax, before the second mix."""
    before, after = mix
    logits = torch.matmul(q, k.transpose(-2, -1))
    if scale is None:
        logits = logits * (1.0 / math.sqrt(q.shape[-1]))
    elif scale != 1.0:
        logits = logits * scale
    if before is not None:
        logits = _HeadMix(before)(logits)
    if is_causal:
        logits = logits + additive_mask(_causal_mask(q, k), logits.dtype)
    if attn_mask is not None:
        logits = logits + additive_mask(attn_mask, logits.dtype)
    probs = logits.softmax(dim=-1)
    mixed = probs if after is None else _HeadMix(after)(probs)
    unread = None
    if after is not None and after.bias is not None and weights is not None:
        unread = (1.0 - weights.to(mixed.dtype))[:, None, None, :]  # B×1×1×N
        bias = after.bias.to(mixed.dtype)[None, :, None, None]
        if dropout_p > 0:  # dropout acts on the map as the model's does
            mixed, unread = mixed - bias * unread, None
    if dropout_p > 0:
        mixed = F.dropout(mixed, dropout_p)
    out = torch.matmul(mixed, v)
    if unread is not None:  # the same, on the output: (mixed − b·unread) @ v, a row per head
        out = out - bias * torch.matmul(unread, v)
    return out, probs


def _attend_live_heads(q, k, v, attn_mask, dropout_p, is_causal, scale, gates: torch.Tensor,
                       live: torch.Tensor):
    """SDPA over the heads ``live`` (those some instance of the batch keeps), gated; the other
    heads are not computed (their q, k, v are never read) and give zeros."""
    heads = q.shape[1]
    q, k, v = q[:, live], k[:, live], v[:, live]
    if attn_mask is not None and attn_mask.dim() == 4 and attn_mask.shape[1] == heads > 1:
        attn_mask = attn_mask[:, live]
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p,
                                         is_causal=is_causal, scale=scale)
    out = out * gates.to(out.dtype)[:, live, None, None]
    full = out.new_zeros(out.shape[0], heads, *out.shape[2:])
    return full.index_copy(1, live, out)
