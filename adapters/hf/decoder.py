"""A Hugging Face decoder language model (Llama, Qwen2 and their kin) as a trimmed stream.

The language model of a decoder VLM (LLaVA) reads image tokens among its text tokens. Token
ops placed on its layers (FastV: `PruneByQueryScore` after layer K) drop image tokens in
the *prefill*; the layers after that point, and their KV cache, hold only the kept tokens,
and every decoding step reads that shorter cache. The recipe describes *what* to drop; this
module does the rest, per instance and reversibly, with hooks (no forked model file):

- the candidates: the adapter tells which entry tokens are image tokens
  (`DecoderStream.set_candidates`, from the VLM's ``input_ids``); every other real token is
  protected. Padding is never live.
- the scores: at a layer whose ops need ``"query_scores"``, trimkit's entry in transformers'
  `AttentionInterface` (`trimkit.adapters.hf.attention.Intercept`) computes the attention the
  *last* token of the prompt pays every key, averaged over heads, from that layer's own q and
  k (one query row), then calls the model's own attention implementation (SDPA stays the
  kernel).
- the drop: after such a layer its ops run on a `TokenState` of the current tokens; the kept
  ones (per sample: a batch whose samples keep different counts is padded to the longest
  with dead slots, which no live token attends to) are gathered, with their rotary tables
  and position ids, so each kept token keeps its original position. The later layers get a
  causal mask built over the kept tokens' entry positions. The language model's output goes
  back to the entry positions (dropped ones zero), so logits keep the input's length and
  ``logits_to_keep`` reads the right rows.
- masked execution (``mode="masked"``, or training under ``"auto"``): the same decisions,
  but every token stays in place, the dropped ones dead (no live token attends to them, in
  the prefill and from the cache); the outputs equal compacted execution's.
- the cache: what was kept (`Kept`) is attached to the cache the prefill filled; each later
  call with that cache (a decoding step of ``generate``, greedy or beam) builds the mask of
  each shortened layer over its cached tokens. Layers up to the drop keep every token in
  their cache (FastV: they ran on all of them); ``cache.get_seq_length()`` (layer 0) keeps
  counting the prompt, so position ids stay right.

The stream's token state (`trimkit.last_states`: one slot per kept token, ``source``
mapping each prompt position to its slot) and per-layer counts (`trimkit.last_stats`) are
published for inspection and the conformance kit; the layers never read them.

Supported: a `transformers.DynamicCache` (full layers, no sliding window), attention
implementations ``"sdpa"`` and ``"eager"``, a prefill that starts from an empty cache (a
prefill that continues a cache is left untrimmed). Calls made while trimming is disabled
leave no record, so their decoding steps are untrimmed too.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from trimkit.hooks import ArgumentReader, Patches, per_call
from trimkit.sites import LayerStats, Site, TrimContext
from trimkit.state import TokenState
from trimkit.trimmers import PruneByQueryScore

from .attention import Intercept, original_implementation

__all__ = ["CACHE_ATTR", "DecoderStream", "Kept", "Level", "kept_tokens"]

#: where a trimmed prefill leaves its `Kept` record on the cache instance
CACHE_ATTR = "_trimkit_kept"
#: attention implementations whose 4D masks trimkit builds for the shortened layers
MASKED_IMPLEMENTATIONS = ("sdpa", "eager")


@dataclass
class Level:
    """The tokens the layers from ``first`` on run on: ``index`` (B×M long) their entry
    positions, ascending; ``live`` (B×M bool) False on the dead slots that pad a sample
    keeping fewer tokens than the batch's longest."""

    first: int
    index: torch.Tensor
    live: torch.Tensor


@dataclass
class Kept:
    """What a trimmed prefill of ``length`` tokens kept, level after level (a cache carries
    it: `kept_tokens`)."""

    length: int
    levels: list[Level] = field(default_factory=list)

    def level(self, layer: int) -> Level | None:
        """The level layer ``layer`` runs at (``None``: every token)."""
        found = None
        for level in self.levels:
            if level.first <= layer:
                found = level
        return found


def kept_tokens(cache: Any) -> Kept | None:
    """What a trimmed prefill kept in ``cache`` (``None``: the cache holds every token)."""
    return None if cache is None else cache.__dict__.get(CACHE_ATTR)


@dataclass
class _Call:
    """One forward of the language model."""

    mode: str = "off"  # "prefill": drops tokens; "decode": reads a trimmed cache
    kept: Kept | None = None
    real: torch.Tensor | None = None  # B×N bool, the prefill's real tokens
    candidates: torch.Tensor | None = None  # B×N bool, the tokens ops may drop
    attention_mask: torch.Tensor | None = None  # the 2D mask the call got
    cache: Any = None
    scores: dict[int, torch.Tensor] = field(default_factory=dict)
    # per level: the prefill's mask and position tables, or the decoding step's mask
    masks: dict[int, torch.Tensor] = field(default_factory=dict)
    positions: dict[int, tuple[Any, Any]] = field(default_factory=dict)


class DecoderStream:
    """The hooks' shared view of one trimmed decoder language model: its layers' sites and
    the calling thread's `_Call` (in `trimkit.sites.CallRecord.scratch`)."""

    def __init__(self, ctx: TrimContext, stream: str, lm: nn.Module, layers: nn.ModuleList,
                 sites: list[Site], attention: str):
        self.ctx, self.stream, self.attention = ctx, stream, attention
        self.sites = sites
        self.config = layers[0].get_submodule(attention).config
        self.read = ArgumentReader(lm.forward, ("attention_mask", "inputs_embeds", "input_ids",
                                                "cache", "past_key_values", "use_cache"))
        #: layers whose ops drop tokens after them
        self.pruning = [i for i, s in enumerate(sites) if len(s.post)]

    def call(self) -> _Call:
        return per_call(self.ctx, ("decoder", id(self)), _Call)

    def set_candidates(self, mask: torch.Tensor | None) -> None:
        """B×N bool: the entry tokens of the language model's next call that ops may drop
        (a VLM's image tokens); read once, by that call."""
        self.call().candidates = mask

    # -- the language model's call ------------------------------------------------------
    def before(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        call = self.call()
        candidates, call.candidates = call.candidates, None
        found = self.read(args, kwargs)
        cache = found.get("cache", found.get("past_key_values"))
        call.mode, call.cache, call.scores, call.masks, call.positions = "off", cache, {}, {}, {}
        call.attention_mask = found.get("attention_mask")
        kept = kept_tokens(cache)
        if kept is not None:
            call.mode, call.kept = "decode", kept
            self._check_implementation()
            return
        x = found.get("inputs_embeds")
        if x is None:
            x = found.get("input_ids")
        empty = cache is None or cache.get_seq_length() == 0
        if not self.ctx.enabled or x is None or not empty:
            return
        b, n = x.shape[:2]
        if candidates is not None and candidates.shape != (b, n):
            raise RuntimeError(f"trimkit: the language model got {n} tokens per sample but "
                               f"{tuple(candidates.shape)} image-token flags")
        mask = call.attention_mask
        real = (torch.ones(b, n, dtype=torch.bool, device=x.device) if mask is None
                or mask.dim() != 2 else mask.to(device=x.device, dtype=torch.bool))
        cand = (torch.zeros_like(real) if candidates is None
                else candidates.to(x.device) & real)
        self.ctx.stats = [s for s in self.ctx.stats if s.stream != self.stream]
        # the stream's token state, for `trimkit.last_states` (the layers do not read it)
        self.ctx.entry[self.stream] = (None, real & ~cand)
        self.ctx.start(self.stream, x if x.dim() == 3 else x[..., None].float(), real)
        if not self.pruning:
            return
        self._check_implementation()
        call.mode, call.kept, call.real, call.candidates = "prefill", Kept(n), real, cand

    def after(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        call = self.call()
        mode, kept, call.mode, call.cache = call.mode, call.kept, "off", None
        call.masks, call.positions, call.scores = {}, {}, {}
        call.kept = call.real = call.candidates = call.attention_mask = None
        if mode != "prefill" or not kept.levels or output is None:
            return None
        level = kept.levels[-1]
        x = output[0]
        full = x.new_zeros(x.shape[0], kept.length, x.shape[-1])
        full.scatter_(1, level.index[..., None].expand(-1, -1, x.shape[-1]),
                      x * level.live[..., None].to(x.dtype))
        if isinstance(output, tuple):
            return (full, *output[1:])
        output.last_hidden_state = full
        return output

    def _check_implementation(self) -> None:
        name = original_implementation(self.config)
        if name not in MASKED_IMPLEMENTATIONS:
            raise RuntimeError(f"trimkit trims the language model with the attention "
                               f"implementations {MASKED_IMPLEMENTATIONS}, not {name!r}; "
                               f"call model.set_attn_implementation('sdpa') before "
                               f"trimkit.apply")

    # -- scores: one query row of the pruning layer's attention --------------------------
    def score(self, layer: int, fn: Any, module: nn.Module, query: torch.Tensor,
              key: torch.Tensor, value: torch.Tensor, attention_mask: Any, **kwargs: Any
              ) -> Any:
        call = self.call()
        if call.mode == "prefill":
            call.scores[layer] = last_query_attention(query, key, attention_mask,
                                                      kwargs.get("scaling"))
        return fn(module, query, key, value, attention_mask, **kwargs)

    # -- around each layer ----------------------------------------------------------------
    def layer_before(self, layer: int, module: nn.Module, args: tuple, kwargs: dict
                     ) -> tuple[tuple, dict] | None:
        call = self.call()
        if call.mode == "off":
            return None
        level = call.kept.level(layer)
        if level is None:
            return None
        key = call.kept.levels.index(level)
        x = args[0] if args else kwargs["hidden_states"]
        if call.mode == "prefill":
            mask = call.masks.get(key)
            if mask is None:
                mask = call.masks[key] = self._format(prefill_mask(level), x.dtype)
            tables, ids = call.positions[key]
            kwargs = dict(kwargs, attention_mask=mask, position_embeddings=tables)
            if ids is not None:
                kwargs["position_ids"] = ids
            return args, kwargs
        mask = call.masks.get(key)
        if mask is None:
            cache = kwargs.get("cache", kwargs.get("past_key_values"))
            if cache is None:
                raise RuntimeError("trimkit: a call continues a trimmed prefill's cache but "
                                   "its layers got no cache")
            before = cache.layers[layer].get_seq_length()
            mask = call.masks[key] = self._format(
                decode_mask(level, call.kept.length, before, x.shape[1], call.attention_mask),
                x.dtype)
        return args, dict(kwargs, attention_mask=mask)

    def layer_after(self, layer: int, module: nn.Module, args: tuple, kwargs: dict,
                    output: Any) -> Any:
        call = self.call()
        if call.mode != "prefill":
            return None
        x = output[0] if isinstance(output, tuple) else output
        kept = call.kept
        level = kept.level(layer)
        live = call.real if level is None else level.live
        cand = call.candidates if level is None else call.candidates.gather(1, level.index)
        state = TokenState.start(x, protected=~cand & live, padding_mask=~live)
        site = self.sites[layer]
        if "query_scores" in _needs(site):
            scores = call.scores.pop(layer, None)
            if scores is None:
                raise RuntimeError(f"trimkit: layer {layer} of the language model drops tokens "
                                   f"by the last query's attention, which its attention did "
                                   f"not compute (an unsupported attention module?)")
            site.captured["query_scores"] = scores
        for op in site.post:
            state = op(state, site)
        if (state.keep.dtype != torch.bool or state.keep.shape != live.shape or state.sized
                or state.x is not x):
            raise RuntimeError(f"trimkit: a token op on layer {layer} of the language model "
                               f"did more than drop tokens, which a decoder cannot follow")
        keep = state.keep & live
        self._stats(layer, live, keep)
        if bool((keep == live).all()):
            return None  # nothing dropped: the layers after run as before
        if self.ctx.compacting(module.training):
            sel, new_live = _selection(keep)
        else:  # masked execution: every slot stays, the dropped ones dead
            sel = torch.arange(keep.shape[1], device=keep.device).expand(keep.shape[0], -1)
            new_live = keep
        index = sel if level is None else level.index.gather(1, sel)
        new = Level(layer + 1, index, new_live)
        kept.levels.append(new)
        tables = kwargs.get("position_embeddings")
        if tables is not None:
            tables = tuple(_gather_rows(t, sel) for t in tables)
        ids = kwargs.get("position_ids")
        if ids is not None:
            ids = _gather_rows(ids[..., None], sel)[..., 0]
        call.positions[len(kept.levels) - 1] = (tables, ids)
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        if cache is not None:
            _check_cache(cache, layer + 1)
            cache.__dict__[CACHE_ATTR] = kept
        y = _gather_rows(x, sel)
        self._publish(y, new, call.candidates)
        return (y, *output[1:]) if isinstance(output, tuple) else y

    def _publish(self, x: torch.Tensor, level: Level, candidates: torch.Tensor) -> None:
        """The stream's token state after a drop: one slot per kept token (dead slots pad),
        ``source`` mapping each entry token to its slot (-1: dropped or padding)."""
        b, m = level.live.shape
        slots = torch.arange(m, device=x.device).expand(b, m)
        source = torch.full((b, int(candidates.shape[1])), -1, dtype=torch.long,
                            device=x.device)
        source.scatter_(1, level.index, torch.where(level.live, slots, -1))
        protected = ~candidates.gather(1, level.index) & level.live
        self.ctx.states[self.stream] = TokenState(
            x=x, keep=level.live, size=torch.ones(b, m, dtype=x.dtype, device=x.device),
            protected=protected, source=source, has_dead=bool((~level.live).any()))

    def _stats(self, layer: int, live: torch.Tensor, keep: torch.Tensor) -> None:
        site = self.sites[layer]
        self.ctx.stats.append(LayerStats(self.stream, layer, live.sum(1), keep.sum(1),
                                         site.num_heads))

    def _format(self, mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """A bool mask (True: attend) as additive logits (0, or the dtype's lowest value),
        made once per call and level: the eager implementation takes only additive masks,
        and SDPA would convert a bool mask again in every layer that reads it (on CPU two
        ``where``s and their scalars per layer and decoding step; an additive mask is also
        the faster input to its kernel)."""
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(
            ~mask, torch.finfo(dtype).min)


def _needs(site: Site) -> frozenset[str]:
    return frozenset().union(*(op.needs for op in site.post)) if len(site.post) else frozenset()


def _selection(keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The slots each sample keeps (B×M long, ascending; M the most any sample keeps), a
    sample keeping fewer padded with its earliest dropped slots, and which are live."""
    b, n = keep.shape
    m = int(keep.sum(1).max())
    pos = torch.arange(n, device=keep.device)
    rank = torch.where(keep, pos, pos + n)  # kept first, then dropped, each in order
    sel = rank.topk(m, dim=1, largest=False).values % n
    sel = sel.sort(dim=1).values
    return sel, keep.gather(1, sel)


def _gather_rows(t: torch.Tensor, sel: torch.Tensor) -> torch.Tensor:
    """``t`` (B×N×…, or 1×N×… shared by the batch) at the token rows ``sel`` (B×M)."""
    t = t.expand(sel.shape[0], *t.shape[1:])
    return t.gather(1, sel.view(*sel.shape, *([1] * (t.dim() - 2))).expand(
        -1, -1, *t.shape[2:]))


def _check_cache(cache: Any, layer: int) -> None:
    layers = getattr(cache, "layers", None)
    if layers is None or type(layers[layer]).__name__ != "DynamicLayer":
        what = type(layers[layer]).__name__ if layers is not None else type(cache).__name__
        raise RuntimeError(f"trimkit drops tokens from the language model's KV cache, which "
                           f"needs a DynamicCache of full layers; this one holds {what}")


def last_query_attention(query: torch.Tensor, key: torch.Tensor, mask: Any,
                         scaling: float | None) -> torch.Tensor:
    """B×L float: the attention the last query row pays each of the L keys, averaged over
    heads (``query`` B×H×Q×d, ``key`` B×Hkv×L×d, grouped queries sharing a key head);
    ``mask``: the 4D mask the attention got (bool, True to attend, or additive), or None."""
    q = query[:, :, -1:, :].float()
    k = key.float()
    if k.shape[1] != q.shape[1]:
        k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    scale = scaling if scaling is not None else q.shape[-1] ** -0.5
    logits = (q @ k.transpose(-1, -2)) * scale  # B×H×1×L
    if isinstance(mask, torch.Tensor):
        row = mask[..., -1:, :]
        if row.dtype == torch.bool:
            logits = logits.masked_fill(~row, float("-inf"))
        else:
            logits = logits + row.float()
    return logits.softmax(-1).mean(1)[:, 0]


def prefill_mask(level: Level) -> torch.Tensor:
    """B×1×M×M bool: causal by entry position over a level's tokens; dead slots are seen by
    no other token (each sees itself, so no row is empty)."""
    idx, live = level.index, level.live
    causal = idx[:, None, :] <= idx[:, :, None]  # B×q×k
    eye = torch.eye(idx.shape[1], dtype=torch.bool, device=idx.device)
    return (causal & (live[:, None, :] | eye))[:, None]


def decode_mask(level: Level, length: int, cached: int, new: int,
                attention_mask: torch.Tensor | None) -> torch.Tensor:
    """B×1×T×(M+E) bool for ``new`` = T tokens after a trimmed prefill of ``length`` tokens:
    the level's kept tokens (live ones), then the E = ``cached`` − M + T tokens that came
    after the prefill (causal among the new ones; padding from the call's 2D
    ``attention_mask`` over all tokens, when it has that length)."""
    b, m = level.live.shape
    after = cached - m + new
    if after < new:
        raise RuntimeError(f"trimkit: a shortened layer's cache holds {cached} tokens, fewer "
                           f"than the {m} its trimmed prefill kept; was the cache cropped?")
    dev = level.live.device
    live = torch.ones(b, after, dtype=torch.bool, device=dev)
    if isinstance(attention_mask, torch.Tensor) and attention_mask.dim() == 2 and (
            attention_mask.shape[1] == length + after):
        live = attention_mask[:, length:].to(device=dev, dtype=torch.bool)
    rows = torch.arange(new, device=dev)[:, None] + (after - new)
    causal = torch.arange(after, device=dev)[None, :] <= rows  # T×E
    mask = torch.cat([level.live[:, None, :].expand(b, new, m),
                      live[:, None, :] & causal[None]], dim=2)
    return mask[:, None]


class LanguageModelCall:
    """Pre-hook and hook (with kwargs) on the language model: starts and ends its call."""

    def __init__(self, stream: DecoderStream):
        self.stream = stream

    def before(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        self.stream.before(module, args, kwargs)

    def after(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        return self.stream.after(module, args, kwargs, output)


class LayerBefore:
    """Pre-hook (with kwargs) on a decoder layer that may run on kept tokens only."""

    def __init__(self, stream: DecoderStream, layer: int):
        self.stream, self.layer = stream, layer

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict) -> Any:
        return self.stream.layer_before(self.layer, module, args, kwargs)


class LayerAfter:
    """Hook (with kwargs) on a decoder layer whose ops drop tokens after it."""

    def __init__(self, stream: DecoderStream, layer: int):
        self.stream, self.layer = stream, layer

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        return self.stream.layer_after(self.layer, module, args, kwargs, output)


class Score(Intercept):
    """The pruning layer's attention: records the last query row's attention, then runs the
    model's own implementation."""

    def __init__(self, stream: DecoderStream, layer: int):
        self.stream, self.layer = stream, layer

    def __call__(self, fn: Any, module: nn.Module, query: torch.Tensor, key: torch.Tensor,
                 value: torch.Tensor, attention_mask: Any, **kwargs: Any) -> Any:
        return self.stream.score(self.layer, fn, module, query, key, value, attention_mask,
                                 **kwargs)


#: what the language model's token ops may ask for and do
SUPPORTED_NEEDS = frozenset({"query_scores"})


def check_sites(sites: list[Site], what: str) -> None:
    """Refuse ops a decoder stream cannot run: anything before a layer's attention, any
    need but the last query's scores, head gates."""
    for i, site in enumerate(sites):
        if len(site.pre):
            raise ValueError(f"{what}: layer {i} has token ops that decide before its "
                             f"attention ({', '.join(type(o).__name__ for o in site.pre)}); "
                             f"the language model only drops tokens after a layer, by the "
                             f"attention its last prompt token pays them (fastv, "
                             f"attn_prune with stream='text')")
        for op in site.post:
            if isinstance(op, PruneByQueryScore) and op.fuse:
                raise ValueError(f"{what}: layer {i} fuses the tokens it drops into one "
                                 f"(EViT), a token with no position of its own in a decoder; "
                                 f"the language model only drops tokens (fuse=False)")
            bad = set(op.needs) - SUPPORTED_NEEDS
            if bad or op.gates_heads:
                raise ValueError(f"{what}: layer {i} has a {type(op).__name__}, which needs "
                                 f"{sorted(bad) or 'head gates'}; the language model only "
                                 f"drops tokens by the attention its last prompt token pays "
                                 f"them (fastv, attn_prune with stream='text')")


def install_decoder(patches: Patches, ctx: TrimContext, stream: str, lm: nn.Module,
                    layers: nn.ModuleList, sites: list[Site], attention: str = "self_attn"
                    ) -> tuple[DecoderStream, dict[nn.Module, Intercept]]:
    """Hook ``lm`` (a transformers decoder model whose ``layers`` take ``attention_mask``,
    ``position_embeddings``, ``position_ids`` and ``cache`` by keyword) so that its sites'
    ops drop tokens in the prefill; return the stream and the attention intercepts to route
    (`trimkit.adapters.hf.attention.route_attention`)."""
    check_sites(sites, "trimkit's decoder stream")
    dec = DecoderStream(ctx, stream, lm, layers, sites, attention)
    intercepts: dict[nn.Module, Intercept] = {}
    hooks = LanguageModelCall(dec)
    patches.hook(lm, hooks.before, pre=True, kwargs=True)
    patches.hook(lm, hooks.after, kwargs=True, always=True)
    first = dec.pruning[0] if dec.pruning else len(layers)
    for i, layer in enumerate(layers):
        if i > first:
            patches.hook(layer, LayerBefore(dec, i), pre=True, kwargs=True)
        if i in dec.pruning:
            patches.hook(layer, LayerAfter(dec, i), kwargs=True)
            if "query_scores" in _needs(sites[i]):
                intercepts[layer.get_submodule(attention)] = Score(dec, i)
    return dec, intercepts
