"""Static head pruning: attention heads removed from the weights for real.

Four layers, each usable alone:

- tensor functions that slice a projection by head (`head_rows`, `prune_linear`), and
  `PrunedMultiheadAttention`, an `nn.MultiheadAttention` stand-in whose inner width may be
  smaller than its model width (``nn.MultiheadAttention`` cannot have fewer heads than
  ``embed_dim // head_dim``);
- `locate_heads`: where each described attention keeps its heads, from the adapters'
  `HeadLayout`s, checked against the modules' shapes;
- `head_importance` (|gradient × output| per head, Michel et al., NeurIPS 2019) and
  `select_heads` (per-layer or global ratio, at least one head per attention);
- `prune_heads`: the selection applied to the model, every projection and every head
  count updated, nothing changed unless everything checks out. `pruned_heads` reads back
  which original heads are gone, as JSON-able data, to rebuild the model's shapes.

Attentions are named by a `HeadKey` ``(stream, layer, kind)``, ``kind`` ``"self"`` or
``"cross"``; as text ``"image.3"`` / ``"text.1.cross"``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .describe import HeadLayout, LayerDesc, ModelDescription
from .mha import multihead_attention_forward, packed_qkv, route_multihead_attention
from .ops import live_head_rows

__all__ = [
    "heads_to_keep",
    "AttentionHeads",
    "HeadKey",
    "PrunedMultiheadAttention",
    "default_head_loss",
    "head_importance",
    "head_key",
    "head_key_name",
    "head_rows",
    "locate_heads",
    "prunable_heads",
    "prune_heads",
    "prune_linear",
    "pruned_heads",
    "record_pruned",
    "select_heads",
]

HeadKey = tuple[str, int, str]
KINDS = ("self", "cross")
#: where a model keeps the record of its pruned heads (instance ``__dict__``, not a buffer,
#: so the ``state_dict`` keeps the family's own keys)
RECORD_ATTR = "_trimkit_pruned_heads"


def head_key_name(key: HeadKey) -> str:
    """``("image", 3, "self")`` -> ``"image.3"``; the cross-attention gets ``".cross"``."""
    stream, layer, kind = key
    return f"{stream}.{layer}" + ("" if kind == "self" else f".{kind}")


def head_key(spec: Any, desc: ModelDescription) -> HeadKey:
    """A `HeadKey` from ``"image.3"``, ``"image.3.cross"``, ``("image", 3)``,
    ``("image", 3, "cross")``, or a bare layer index when the model has one stream; a
    `ValueError` names what does not exist in ``desc``."""
    parts: tuple
    if isinstance(spec, str):
        parts = tuple(spec.split("."))
        if len(parts) >= 2 and parts[1].lstrip("-").isdigit():
            parts = (parts[0], int(parts[1]), *parts[2:])
    elif isinstance(spec, int) and not isinstance(spec, bool):
        parts = (None, spec)
    elif isinstance(spec, tuple):
        parts = spec
    else:
        parts = ()
    if len(parts) == 2:
        parts = (*parts, "self")
    if (len(parts) != 3 or not isinstance(parts[1], int) or isinstance(parts[1], bool)
            or parts[2] not in KINDS):
        raise ValueError(f"cannot read {spec!r} as an attention: use 'stream.layer', "
                         f"'stream.layer.cross', (stream, layer) or (stream, layer, 'cross')")
    stream, layer, kind = parts
    try:
        sdesc = desc.stream(stream)
    except (KeyError, ValueError):
        raise ValueError(f"{spec!r}: stream must be one of {sorted(desc.streams)}") from None
    if not 0 <= layer < len(sdesc.layers):
        raise ValueError(f"{spec!r}: stream {sdesc.name!r} has layers 0..{len(sdesc.layers) - 1}")
    if kind == "cross" and sdesc.layers[layer].cross_attention is None:
        raise ValueError(f"{spec!r}: layer {layer} of stream {sdesc.name!r} has no "
                         f"cross-attention")
    return (sdesc.name, layer, kind)


# ---------------------------------------------------------------------------- tensors


def head_rows(kept: Sequence[int], head_dim: int, num_heads: int, sections: int = 1,
              device: torch.device | None = None) -> torch.Tensor:
    """Indices, along a projection's head-side dimension, of the kept heads' slices.

    Head ``h`` owns ``h·d:(h+1)·d``; with ``sections`` (3 for a fused q/k/v projection) the
    same heads are taken in each of the ``sections`` blocks of ``num_heads · head_dim``.
    """
    heads = torch.as_tensor(list(kept), dtype=torch.long, device=device)
    return live_head_rows(heads, head_dim, num_heads, sections)


def prune_linear(linear: nn.Linear, kept: Sequence[int], head_dim: int, *, side: str = "out",
                 sections: int = 1) -> nn.Linear:
    """A new ``nn.Linear`` with only the kept heads of ``linear``: its outputs (``side=
    "out"``: a q, k, v or fused qkv projection, ``sections`` blocks of heads) or its inputs
    (``side="in"``: an output projection, whose bias is the same). ``linear`` is unchanged;
    device, dtype and ``requires_grad`` carry over."""
    if side not in ("out", "in"):
        raise ValueError(f"side must be 'out' or 'in', got {side!r}")
    dim = 0 if side == "out" else 1
    width = linear.weight.shape[dim]
    if width % (sections * head_dim):
        raise ValueError(f"a width of {width} is not {sections} section(s) of heads of "
                         f"width {head_dim}")
    rows = head_rows(kept, head_dim, width // (sections * head_dim), sections,
                     linear.weight.device)
    weight = linear.weight.detach().index_select(dim, rows)
    bias = linear.bias
    if bias is not None:
        bias = bias.detach().index_select(0, rows) if side == "out" else bias.detach()
    new = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None,
                    device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        new.weight.copy_(weight)
        if bias is not None:
            new.bias.copy_(bias)
    new.weight.requires_grad_(linear.weight.requires_grad)
    if bias is not None:
        new.bias.requires_grad_(linear.bias.requires_grad)
    new.train(linear.training)
    return new


class PrunedMultiheadAttention(nn.Module):
    """`nn.MultiheadAttention` with ``num_heads`` heads of width ``head_dim`` whose inner
    width ``num_heads · head_dim`` may be smaller than ``embed_dim``.

    Same parameter names as ``nn.MultiheadAttention`` (``in_proj_weight`` or
    ``{q,k,v}_proj_weight``, ``in_proj_bias``, ``out_proj``), so a ``state_dict`` keeps its
    keys; same forward signature and outputs (``(out, weights or None)``); the attention
    product is one `F.scaled_dot_product_attention`. Build it with `from_module`.
    ``add_bias_kv`` and ``add_zero_attn`` are not supported.
    """

    def __init__(self, embed_dim: int, num_heads: int, head_dim: int, *, bias: bool = True,
                 batch_first: bool = False, dropout: float = 0.0, kdim: int | None = None,
                 vdim: int | None = None, device: torch.device | None = None,
                 dtype: torch.dtype | None = None):
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        self.embed_dim, self.num_heads, self.head_dim = embed_dim, num_heads, head_dim
        self.kdim, self.vdim = kdim or embed_dim, vdim or embed_dim
        #: one ``in_proj_weight`` for q, k and v (else three); ``_qkv_same_embed_dim`` stays
        #: False so that torch's fused encoder-layer kernel (nn.TransformerEncoderLayer's
        #: inference fast path), which reads heads as ``embed_dim // num_heads`` wide,
        #: never takes a pruned attention
        self.packed_qkv = self.kdim == embed_dim and self.vdim == embed_dim
        self._qkv_same_embed_dim = False
        self.batch_first, self.dropout = batch_first, dropout
        self.bias_k = self.bias_v = None
        self.add_zero_attn = False
        inner = num_heads * head_dim
        if self.packed_qkv:
            self.in_proj_weight = nn.Parameter(torch.empty(3 * inner, embed_dim, **dd))
            for name in ("q_proj_weight", "k_proj_weight", "v_proj_weight"):
                self.register_parameter(name, None)
        else:
            self.q_proj_weight = nn.Parameter(torch.empty(inner, embed_dim, **dd))
            self.k_proj_weight = nn.Parameter(torch.empty(inner, self.kdim, **dd))
            self.v_proj_weight = nn.Parameter(torch.empty(inner, self.vdim, **dd))
            self.register_parameter("in_proj_weight", None)
        if bias:
            self.in_proj_bias = nn.Parameter(torch.zeros(3 * inner, **dd))
        else:
            self.register_parameter("in_proj_bias", None)
        self.out_proj = nn.Linear(inner, embed_dim, bias=bias, **dd)

    @classmethod
    def from_module(cls, mha: nn.Module, kept: Sequence[int]) -> PrunedMultiheadAttention:
        """The heads ``kept`` of an ``nn.MultiheadAttention`` (or of a pruned one), weights
        copied; ``mha`` is unchanged."""
        if mha.bias_k is not None or mha.add_zero_attn:
            raise ValueError("nn.MultiheadAttention with add_bias_kv or add_zero_attn cannot "
                             "be head-pruned")
        h, d = mha.num_heads, mha.head_dim
        ref = mha.out_proj.weight
        new = cls(mha.embed_dim, len(kept), d, bias=mha.in_proj_bias is not None,
                  batch_first=mha.batch_first, dropout=mha.dropout, kdim=mha.kdim,
                  vdim=mha.vdim, device=ref.device, dtype=ref.dtype)
        with torch.no_grad():
            if packed_qkv(mha):
                rows = head_rows(kept, d, h, 3, ref.device)
                new.in_proj_weight.copy_(mha.in_proj_weight.index_select(0, rows))
                new.in_proj_weight.requires_grad_(mha.in_proj_weight.requires_grad)
            else:
                rows = head_rows(kept, d, h, 1, ref.device)
                for name in ("q_proj_weight", "k_proj_weight", "v_proj_weight"):
                    old = getattr(mha, name)
                    getattr(new, name).copy_(old.index_select(0, rows))
                    getattr(new, name).requires_grad_(old.requires_grad)
            if mha.in_proj_bias is not None:
                rows = head_rows(kept, d, h, 3, ref.device)
                new.in_proj_bias.copy_(mha.in_proj_bias.index_select(0, rows))
                new.in_proj_bias.requires_grad_(mha.in_proj_bias.requires_grad)
        new.out_proj = prune_linear(mha.out_proj, kept, d, side="in")
        new.train(mha.training)
        return new

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                key_padding_mask: torch.Tensor | None = None, need_weights: bool = True,
                attn_mask: torch.Tensor | None = None, average_attn_weights: bool = True,
                is_causal: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        return multihead_attention_forward(self, F.scaled_dot_product_attention, query, key,
                                           value, key_padding_mask, need_weights, attn_mask,
                                           average_attn_weights, is_causal)

    def extra_repr(self) -> str:
        return (f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, "
                f"head_dim={self.head_dim}, batch_first={self.batch_first}")


#: modules the engine treats as a multi-head attention with ``nn.MultiheadAttention``'s API
MULTIHEAD_TYPES = (nn.MultiheadAttention, PrunedMultiheadAttention)


# ---------------------------------------------------------------------------- locating


@dataclass
class AttentionHeads:
    """One attention's heads as found in a model: its `HeadLayout`, its block, its head
    count and width, and the module whose input is the heads' concatenated output."""

    key: HeadKey
    layout: HeadLayout
    block: nn.Module
    num_heads: int
    head_dim: int
    out: nn.Module
    multihead: nn.Module | None = None
    linears: dict[str, tuple[nn.Linear, str, int]] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return head_key_name(self.key)


def _layout_of(layer: LayerDesc, kind: str) -> tuple[HeadLayout | None, int]:
    if kind == "self":
        return layer.heads, layer.num_heads
    return layer.cross_heads, layer.cross_num_heads or layer.num_heads


def prunable_heads(desc: ModelDescription, streams: Iterable[str] | None = None,
                   layers: Mapping[str, Iterable[int]] | None = None,
                   cross: bool = True) -> list[HeadKey]:
    """The attentions of ``desc`` whose heads can be pruned (a `HeadLayout` without an
    ``unsupported`` reason), in the given ``streams`` (default all), at the given ``layers``
    per stream (default all), cross-attentions included when ``cross``."""
    keys = []
    for name, stream in desc.streams.items():
        if streams is not None and name not in streams:
            continue
        allowed = None if layers is None or name not in layers else set(layers[name])
        for i, layer in enumerate(stream.layers):
            if allowed is not None and i not in allowed:
                continue
            for kind in KINDS if cross else ("self",):
                layout, _ = _layout_of(layer, kind)
                if layout is not None and not (layout.unsupported or layout.unprunable):
                    keys.append((name, i, kind))
    return keys


def _attr_owner(block: nn.Module, path: str) -> tuple[Any, str]:
    owner_path, _, attr = path.rpartition(".")
    return (block.get_submodule(owner_path) if owner_path else block), attr


def locate_heads(model: nn.Module, desc: ModelDescription,
                 keys: Iterable[HeadKey]) -> dict[HeadKey, AttentionHeads]:
    """Find each attention of ``keys`` in ``model`` from its `HeadLayout`, and check the
    layout against the modules (types, widths, head counts). A `ValueError` names the first
    attention that cannot be pruned and why; nothing is changed."""
    found: dict[HeadKey, AttentionHeads] = {}
    seen: dict[int, str] = {}
    for key in keys:
        stream, i, kind = key
        layer = desc.streams[stream].layers[i]
        layout, h = _layout_of(layer, kind)
        name = head_key_name(key)
        if layout is None:
            raise ValueError(f"{name}: the {desc.family!r} adapter does not say where this "
                             f"attention keeps its heads (LayerDesc."
                             f"{'heads' if kind == 'self' else 'cross_heads'} is None)")
        if layout.unsupported:
            raise ValueError(f"{name}: heads cannot be pruned here: {layout.unsupported}")
        try:
            heads = _resolve(name, key, layout, model.get_submodule(layer.block), h)
        except AttributeError as err:
            raise ValueError(f"{name}: the description names a module or attribute the model "
                             f"does not have ({err})") from None
        ident = id(heads.out)
        if ident in seen:
            raise ValueError(f"{name} and {seen[ident]} share their projections; shared "
                             f"attention weights cannot be head-pruned")
        seen[ident] = name
        found[key] = heads
    return found


def _resolve(name: str, key: HeadKey, layout: HeadLayout, block: nn.Module,
             h: int) -> AttentionHeads:
    if layout.multihead is not None:
        mha = block.get_submodule(layout.multihead)
        if not isinstance(mha, MULTIHEAD_TYPES):
            raise ValueError(f"{name}: {layout.multihead!r} is a {type(mha).__name__}, not an "
                             f"nn.MultiheadAttention")
        if mha.bias_k is not None or mha.add_zero_attn:
            raise ValueError(f"{name}: nn.MultiheadAttention with add_bias_kv or add_zero_attn "
                             f"cannot be head-pruned")
        if mha.num_heads != h:
            raise ValueError(f"{name}: the description says {h} heads, the module has "
                             f"{mha.num_heads}")
        return AttentionHeads(key, layout, block, h, mha.head_dim, mha.out_proj, mha)
    if layout.out is None:
        raise ValueError(f"{name}: its HeadLayout names no output projection (out)")
    fused = layout.qkv is not None
    separate = [p is not None for p in (layout.q, layout.k, layout.v)]
    if (any(separate) if fused else not all(separate)):
        raise ValueError(f"{name}: its HeadLayout must name either qkv or all of q, k, v")

    def linear(path: str) -> nn.Linear:
        mod = block.get_submodule(path)
        if not isinstance(mod, nn.Linear):
            raise ValueError(f"{name}: {path!r} is a {type(mod).__name__}, not an nn.Linear")
        return mod

    out = linear(layout.out)
    if out.in_features % h:
        raise ValueError(f"{name}: the output projection's {out.in_features} inputs are not "
                         f"{h} heads of one width")
    d = out.in_features // h
    linears = {layout.out: (out, "in", 1)}
    outs = [(layout.qkv, 3)] if fused else [(p, 1) for p in (layout.q, layout.k, layout.v)]
    for path, sections in [*outs, *((p, 1) for p in layout.per_head)]:
        lin = linear(path)
        if lin.out_features != sections * h * d:
            raise ValueError(f"{name}: {path!r} has {lin.out_features} outputs, expected "
                             f"{sections}·{h}·{d} for {h} heads of width {d}")
        linears[path] = (lin, "out", sections)
    for attrs, want in ((layout.counts, h), (layout.widths, h * d)):
        for path in attrs:
            owner, attr = _attr_owner(block, path)
            value = getattr(owner, attr)
            if value != want:
                raise ValueError(f"{name}: attribute {path!r} is {value!r}, expected {want}")
    return AttentionHeads(key, layout, block, h, d, out, None, linears)


# ---------------------------------------------------------------------------- importance


def _main_tensor(out: Any) -> torch.Tensor:
    for name in ("logits", "last_hidden_state"):
        value = out.get(name) if isinstance(out, Mapping) else getattr(out, name, None)
        if isinstance(value, torch.Tensor):
            return value
    if isinstance(out, Mapping):
        out = list(out.values())
    if isinstance(out, (tuple, list)):
        out = next((v for v in out if isinstance(v, torch.Tensor)), None)
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"cannot find a tensor in a model output of type "
                        f"{type(out).__name__}; pass loss_fn")
    return out


def default_head_loss(output: Any, batch: Any) -> torch.Tensor:
    """The loss importance differentiates when none is given: the output's own ``loss``
    when it carries one (a Hugging Face output given labels), else the cross-entropy of the
    main output (``logits``, or the first tensor) against its own top prediction over the
    last dimension, i.e. how much each head supports what the model predicts now."""
    loss = output.get("loss") if isinstance(output, Mapping) else getattr(output, "loss", None)
    if isinstance(loss, torch.Tensor):
        return loss
    logits = _main_tensor(output).float()
    logp = logits.log_softmax(-1)
    return -logp.gather(-1, logp.argmax(-1, keepdim=True)).sum()


def _default_forward(model: nn.Module, batch: Any) -> Any:
    if isinstance(batch, Mapping):
        return model(**batch)
    if isinstance(batch, (tuple, list)):
        return model(*batch)
    return model(batch)


def head_importance(
    model: nn.Module, heads: Mapping[HeadKey, AttentionHeads], data: Iterable[Any], *,
    loss_fn: Callable[[Any, Any], torch.Tensor] | None = None,
    forward: Callable[[nn.Module, Any], Any] | None = None,
) -> dict[HeadKey, torch.Tensor]:
    """Each head's importance, ``Σ_samples |Σ_tokens,dims (∂L/∂o_h) · o_h|``, where ``o_h`` is
    head ``h``'s slice of the input of its attention's output projection: the first-order
    change of the loss when the head is removed (Michel et al., 2019).

    ``heads`` comes from `locate_heads`; ``data`` yields batches, run as
    ``forward(model, batch)`` (default ``model(*batch)``, ``model(**batch)`` or
    ``model(batch)``) and scored by ``loss_fn(output, batch)`` (default
    `default_head_loss`). The model runs in eval mode (no dropout) with gradients on; no
    parameter's ``.grad`` is touched and the model is left as it was. Returns a float64
    CPU tensor of ``num_heads`` scores per attention.
    """
    loss_fn = loss_fn or default_head_loss
    forward = forward or _default_forward
    captured: dict[HeadKey, list[torch.Tensor]] = {k: [] for k in heads}
    scores = {k: torch.zeros(h.num_heads, dtype=torch.float64) for k, h in heads.items()}
    called = dict.fromkeys(heads, False)
    undo: list[Callable[[], None]] = []

    def capture(key: HeadKey) -> Callable:
        def hook(module: nn.Module, args: tuple) -> tuple:
            x = args[0]
            if not x.requires_grad:  # a frozen model: start a graph here
                x = x.detach().requires_grad_(True)
            captured[key].append(x)
            return (x, *args[1:])
        return hook

    was_training = model.training
    try:
        for key, h in heads.items():
            if isinstance(h.multihead, nn.MultiheadAttention):
                # torch's own forward reads out_proj's weights without calling it
                undo.append(route_multihead_attention(h.multihead,
                                                      F.scaled_dot_product_attention).undo)
            undo.append(h.out.register_forward_pre_hook(capture(key)).remove)
        model.eval()
        batches = 0
        for batch in data:
            batches += 1
            with torch.enable_grad():
                loss = loss_fn(forward(model, batch), batch)
                if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
                    raise ValueError(f"loss_fn must return a scalar tensor, got {loss!r}")
                flat = [(k, x) for k, xs in captured.items() for x in xs]
                grads = torch.autograd.grad(loss, [x for _, x in flat], allow_unused=True) \
                    if flat and loss.requires_grad else [None] * len(flat)
            for (key, x), g in zip(flat, grads, strict=True):
                called[key] = True
                if g is None:
                    continue
                h = heads[key]
                if x.shape[-1] != h.num_heads * h.head_dim:
                    raise ValueError(f"{h.name}: the output projection's input is "
                                     f"{x.shape[-1]} wide, expected {h.num_heads * h.head_dim}")
                per = (x.detach() * g).reshape(x.shape[0], -1, h.num_heads, h.head_dim)
                scores[key] += per.sum((1, 3)).abs().sum(0).double().cpu()
            for xs in captured.values():
                xs.clear()
        if not batches:
            raise ValueError("data yielded no batch to score heads on")
    finally:
        for u in reversed(undo):
            u()
        model.train(was_training)
    missing = [heads[k].name for k, c in called.items() if not c]
    if missing:
        raise ValueError(f"the forward never ran the output projection of {', '.join(missing)}; "
                         f"pass forward=... to run the part of the model that uses them")
    return scores


def select_heads(scores: Mapping[HeadKey, Sequence[float] | torch.Tensor], ratio: float,
                 scope: str = "layer") -> dict[HeadKey, list[int]]:
    """The heads to keep, per attention (sorted), highest scores first.

    ``scope="layer"`` keeps ``round(ratio · H)`` heads of every attention; ``"global"``
    keeps ``round(ratio · ΣH)`` heads over all of them, ranked by scores normalised to unit
    L2 norm within each attention (Michel et al.). Either way at least one head per
    attention survives; ties go to the lower index.
    """
    if scope not in ("layer", "global"):
        raise ValueError(f"scope must be 'layer' or 'global', got {scope!r}")
    tensors = {k: torch.as_tensor(v, dtype=torch.float64).flatten() for k, v in scores.items()}
    order = {k: torch.sort(-s, stable=True).indices.tolist() for k, s in tensors.items()}
    if scope == "layer":
        return {k: sorted(order[k][:max(1, math.floor(ratio * len(s) + 0.5))])
                for k, s in tensors.items()}
    total = sum(len(s) for s in tensors.values())
    budget = max(len(tensors), math.floor(ratio * total + 0.5))
    keep = {k: [order[k][0]] for k in tensors}
    rest = []
    for pos, (k, s) in enumerate(tensors.items()):
        norm = s.norm()
        normed = s / norm if norm > 0 else s
        rest += [(-float(normed[i]), pos, i, k) for i in order[k][1:]]
    for _, _, i, k in sorted(rest, key=lambda t: t[:3])[:budget - len(tensors)]:
        keep[k].append(i)
    return {k: sorted(v) for k, v in keep.items()}


# ---------------------------------------------------------------------------- pruning


def _check_keep(heads: AttentionHeads, kept: Sequence[int]) -> list[int]:
    kept = list(kept)
    if not all(isinstance(i, int) and not isinstance(i, bool) for i in kept):
        raise ValueError(f"{heads.name}: head indices must be ints, got {kept!r}")
    if len(set(kept)) != len(kept) or any(not 0 <= i < heads.num_heads for i in kept):
        raise ValueError(f"{heads.name}: head indices must be distinct and in "
                         f"0..{heads.num_heads - 1}, got {kept!r}")
    if not kept:
        raise ValueError(f"{heads.name}: every head would be pruned; keep at least one")
    return sorted(kept)


def prune_heads(model: nn.Module, desc: ModelDescription,
                keep: Mapping[HeadKey, Sequence[int]]) -> None:
    """Keep only the heads ``keep[key]`` of each attention, from the description's
    `HeadLayout`s: its q/k/v (or fused qkv) and per-head projections lose the other heads'
    outputs, its output projection their inputs, its head counts and widths are updated,
    and an ``nn.MultiheadAttention`` becomes a `PrunedMultiheadAttention`. Everything is
    checked and every new module built before the first is installed, so an error changes
    nothing. New modules hold new parameters: build an optimizer afterwards."""
    for key in keep:
        layout, _ = _layout_of(desc.streams[key[0]].layers[key[1]], key[2])
        if layout is not None and layout.unprunable:
            raise ValueError(f"{head_key_name(key)}: heads cannot be pruned here: "
                             f"{layout.unprunable}")
    heads = locate_heads(model, desc, keep)
    swaps: list[tuple[nn.Module, str, nn.Module]] = []
    sets: list[tuple[Any, str, int]] = []
    for key, kept in keep.items():
        h = heads[key]
        kept = _check_keep(h, kept)
        if h.multihead is not None:
            owner, attr = _attr_owner(h.block, h.layout.multihead)
            swaps.append((owner, attr, PrunedMultiheadAttention.from_module(h.multihead, kept)))
            continue
        for path, (lin, side, sections) in h.linears.items():
            owner, attr = _attr_owner(h.block, path)
            swaps.append((owner, attr, prune_linear(lin, kept, h.head_dim, side=side,
                                                    sections=sections)))
        for attrs, value in ((h.layout.counts, len(kept)),
                             (h.layout.widths, len(kept) * h.head_dim)):
            for path in attrs:
                sets.append((*_attr_owner(h.block, path), value))
    for owner, attr, module in swaps:
        setattr(owner, attr, module)
    for owner, attr, value in sets:
        setattr(owner, attr, value)


def heads_to_keep(heads: Mapping[HeadKey, AttentionHeads],
                  prune: Mapping[HeadKey, Sequence[int]]) -> dict[HeadKey, list[int]]:
    """For each ``prune[key]`` (indices of the heads to remove), the heads to keep; an index
    outside the attention's heads is a `ValueError` naming it."""
    keep = {}
    for key, idx in prune.items():
        h = heads[key].num_heads
        bad = [i for i in idx if not 0 <= i < h]
        if bad:
            raise ValueError(f"heads[{head_key_name(key)!r}]: {bad} out of range, the "
                             f"attention has heads 0..{h - 1}")
        keep[key] = [i for i in range(h) if i not in set(idx)]
    return keep


def record_pruned(model: nn.Module, heads: Mapping[HeadKey, AttentionHeads],
                  keep: Mapping[HeadKey, Sequence[int]]) -> None:
    """Add to the model's record (`pruned_heads`) the heads that ``keep`` removes, as
    indices of the attention's original heads (composing with earlier prunings)."""
    record = model.__dict__.setdefault(RECORD_ATTR, {})
    for key, kept in keep.items():
        name = head_key_name(key)
        gone = set(record.get(name, ()))
        current = [i for i in range(heads[key].num_heads + len(gone)) if i not in gone]
        kept_now = set(kept)
        gone |= {orig for j, orig in enumerate(current) if j not in kept_now}
        record[name] = sorted(gone)


def pruned_heads(model: nn.Module) -> dict[str, list[int]]:
    """Which original heads `trimkit.apply(model, "prune_heads", ...)` removed, as JSON-able
    data: ``{"image.3": [0, 5], "text.1.cross": [2]}`` (attention name: original head
    indices). ``trimkit.apply(fresh, "prune_heads", heads=pruned_heads(model))`` gives a
    freshly built, unpruned model the same shapes, so ``model``'s ``state_dict`` loads into
    it. Empty for a model that was never pruned."""
    return {k: list(v) for k, v in model.__dict__.get(RECORD_ATTR, {}).items()}
