"""The generic adapter: trimming sites for transformers no hand-written adapter knows.

It reads the model's own `torch.fx` graphs, module by module (children as leaves):

- an **attention module** computes one attention product (``scaled_dot_product_attention``,
  the explicit ``softmax(q·kᵀ)·v``, or is an `nn.MultiheadAttention`);
- its **block** is the nearest ancestor that is an element of a container
  (``blocks.3``, ``encoder.layers.0``): one transformer layer, whose first argument is the
  tokens, with a residual addition around the attention (pre-norm or post-norm);
- the blocks of one container, in order, are a **stream**;
- the **head count** is the constant head dimension of the reshape that makes ``q``
  (B×H×N×d), the **token width** the input width of the projection that reads the
  attention's input, the **head width** the output projection's input over H;
- **protected tokens** are the model's ``num_prefix_tokens`` when it states it, else the
  widths of its token parameters (``cls_token``, ``reg_token``, ``dist_token``…, shaped
  1×k×D); `GenericAdapter(num_protected=...)` overrides it.

Attention masks computed inside a block (a relative-position bias) are over the stream's
entry tokens, so such streams are ``positional``. Anything it cannot place (attention in
several modules of one block, a block with a further required input, seq-first
`nn.MultiheadAttention`, a forward fx cannot trace) is reported in words by `why_not`,
which `trimkit.apply` shows when no adapter recognises the model.
"""

from __future__ import annotations

import inspect
import operator
import re
import weakref
from dataclasses import dataclass, field, replace
from functools import partial

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from trimkit import (
    Adapter,
    HeadLayout,
    LayerDesc,
    ModelDescription,
    StreamDesc,
    TokenInput,
    register_adapter,
)
from trimkit.heads import MULTIHEAD_TYPES
from trimkit.hooks import Patches, Restore, Undo, per_call
from trimkit.rewrite import RewriteError, find_attention, residual_after, trace_module
from trimkit.sites import Site, TrimContext

__all__ = ["GenericAdapter", "discover"]

NAME = "generic"
SITES = "trimkit"  # the container `trimkit.apply` adds: never part of the model's own graph
_TOKEN_PARAM = re.compile(r"(cls|class|reg|register|dist|distill)(_?tokens?|_?embedding)?$|"
                          r"_tokens?$")
#: words (lower case) whose presence in a forward's source says it computes attention
_ATTENTION_WORDS = ("softmax", "scaled_dot_product_attention", "multiheadattention")
_SHAPE_KEEP = {"contiguous", "type_as", "to", "float", "half", "bfloat16", "clone"}
_NORMS = (nn.LayerNorm, nn.Identity, nn.GroupNorm) + ((nn.RMSNorm,) if hasattr(nn, "RMSNorm")
                                                     else ())


@dataclass
class _Attention:
    """One attention module as its graph shows it (paths relative to the module)."""

    heads: int
    head_dim: int
    dim: int
    masked: bool
    layout: dict = field(default_factory=dict)
    unprunable: str | None = None
    #: talking heads: how many H -> H linears mix the heads (`LayerDesc.mixes_heads`)
    mixes: int = 0


@dataclass
class Discovery:
    """What the graphs gave: the streams found, and what could not be placed."""

    streams: dict[str, StreamDesc]
    problems: list[str]
    #: positional streams whose masks come only from their blocks' inputs (none computed
    #: inside an attention module): they pack in a call that passes none
    input_masked: frozenset[str] = frozenset()


# ------------------------------------------------------------------------ graph reading

def _is(node: object, methods: tuple[str, ...] = (), functions: tuple = ()) -> bool:
    if not isinstance(node, fx.Node):
        return False
    if node.op == "call_method":
        return node.target in methods
    return node.op == "call_function" and node.target in functions


def _shape_args(node: fx.Node) -> list:
    args = node.args[1:]
    if len(args) == 1 and isinstance(args[0], (tuple, list)):
        args = args[0]
    return list(args)


def _dims(node: object, gm: fx.GraphModule, depth: int = 0) -> list | None:
    """The sizes of ``node``'s tensor that the graph states as constants (``None`` where a
    size is only known at run time; ``-1`` as written), following reshapes, permutations,
    unbinds, slicing and shape-keeping ops back to the reshape that made it."""
    if depth > 40 or not isinstance(node, fx.Node):
        return None
    src = node.args[0] if node.args else None
    if _is(node, ("reshape", "view"), (torch.reshape,)):
        return [a if isinstance(a, int) else None for a in _shape_args(node)]
    if _is(node, ("permute",), (torch.permute,)):
        inner = _dims(src, gm, depth + 1)
        perm = _shape_args(node)
        if inner is None or len(perm) != len(inner):
            return None
        return [inner[p] for p in perm]
    if _is(node, ("transpose",), (torch.transpose,)):
        inner = _dims(src, gm, depth + 1)
        if inner is None:
            return None
        a, b = (d % len(inner) for d in node.args[1:3])
        inner = list(inner)
        inner[a], inner[b] = inner[b], inner[a]
        return inner
    if node.op == "call_function" and node.target is operator.getitem:
        index = node.args[1]
        if _is(src, ("unbind",), (torch.unbind,)):
            inner = _dims(src.args[0], gm, depth + 1)
            dim = src.kwargs.get("dim", src.args[1] if len(src.args) > 1 else 0)
            return None if inner is None else inner[:dim] + inner[dim + 1:]
        inner = _dims(src, gm, depth + 1)
        if inner is None:
            return None
        index = index if isinstance(index, tuple) else (index,)
        out, i = [], 0
        for ix in index:
            if ix is Ellipsis:
                rest = len(inner) - i - (len(index) - index.index(Ellipsis) - 1)
                out += inner[i:i + rest]
                i += rest
            elif isinstance(ix, int):
                i += 1
            elif isinstance(ix, slice):
                out.append(inner[i] if ix == slice(None) else None)
                i += 1
            else:
                return None
        return out + inner[i:]
    if _is(node, tuple(_SHAPE_KEEP)):
        return _dims(src, gm, depth + 1)
    if node.op == "call_module" and isinstance(gm.get_submodule(node.target), _NORMS):
        return _dims(src, gm, depth + 1)
    if _is(node, ("mul", "div", "add"), (operator.mul, operator.truediv, operator.add,
                                         torch.mul, torch.add)):
        for a in node.args:
            if isinstance(a, fx.Node):
                return _dims(a, gm, depth + 1)
    if _is(node, (), (torch.cat,)):
        parts = node.args[0]
        dim = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else 0)
        inner = _dims(parts[0], gm, depth + 1) if parts else None
        if inner is None:
            return None
        inner = list(inner)
        inner[dim] = None
        return inner
    return None


def _projection(node: object, gm: fx.GraphModule, depth: int = 0
                ) -> tuple[str, list[fx.Node]] | None:
    """The `nn.Linear` submodule ``node`` is a reshaping of, and the reshapes on the way."""
    if depth > 40 or not isinstance(node, fx.Node):
        return None
    if node.op == "call_module":
        mod = gm.get_submodule(node.target)
        if isinstance(mod, nn.Linear):
            return node.target, []
        if not isinstance(mod, _NORMS):
            return None
    if node.op == "call_function" and node.target is operator.getitem:
        src = node.args[0]
        if _is(src, ("unbind",), (torch.unbind,)):
            return _projection(src.args[0], gm, depth + 1)
        if not isinstance(node.args[1], int):  # q = qkv[0]: a section; slices are not
            return None
    elif not (_is(node, ("reshape", "view", "permute", "transpose", *_SHAPE_KEEP),
                  (torch.reshape, torch.permute, torch.transpose))
              or node.op == "call_module"):
        return None
    found = _projection(node.args[0], gm, depth + 1)
    if found is None:
        return None
    if _is(node, ("reshape", "view"), (torch.reshape,)):
        found[1].append(node)
    return found


def _out_projection(out: fx.Node, gm: fx.GraphModule
                    ) -> tuple[str, list[fx.Node], bool] | None:
    """The `nn.Linear` that reads the attention product (after its head-merging reshape),
    the reshapes on the way, and whether a norm over all heads' outputs comes between."""
    node, reshapes, mixed = out, [], False
    for _ in range(16):
        users = list(node.users)
        if len(users) != 1:
            return None
        node = users[0]
        if node.op == "call_module":
            mod = gm.get_submodule(node.target)
            if isinstance(mod, nn.Linear):
                return node.target, reshapes, mixed
            if not isinstance(mod, _NORMS):
                return None
            mixed = mixed or not isinstance(mod, nn.Identity)
            continue
        if _is(node, ("reshape", "view"), (torch.reshape,)):
            reshapes.append(node)
        elif not _is(node, ("permute", "transpose", "flatten", *_SHAPE_KEEP),
                     (torch.permute, torch.transpose, torch.flatten)):
            return None
    return None


def _token_width(gm: fx.GraphModule) -> int | None:
    """The input width of the first projection that reads the module's first input."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if not placeholders:
        return None
    for user in placeholders[0].users:
        if user.op == "call_module":
            mod = gm.get_submodule(user.target)
            if isinstance(mod, nn.Linear):
                return mod.in_features
        if user.op == "call_function" and user.target is F.linear:
            weight = user.kwargs.get("weight", user.args[1] if len(user.args) > 1 else None)
            if isinstance(weight, fx.Node) and weight.op == "get_attr":
                return int(gm.get_parameter(weight.target).shape[1])
    return None


def _int_attrs(module: nn.Module, value: int, words: tuple[str, ...],
               exclude: tuple[str, ...] = ()) -> tuple[str, ...]:
    return tuple(k for k, v in vars(module).items()
                 if type(v) is int and v == value and any(w in k for w in words)
                 and not any(w in k for w in exclude))


def _read_attention(module: nn.Module) -> _Attention | str | None:
    """The attention ``module`` computes (`_Attention`), why it cannot be used (a string),
    or ``None`` when it computes none."""
    if isinstance(module, MULTIHEAD_TYPES):
        if not getattr(module, "batch_first", False):
            return ("an nn.MultiheadAttention with batch_first=False (sequence-first tokens; "
                    "trimming sites expect batch-first)")
        return _Attention(module.num_heads, module.head_dim, module.embed_dim, False,
                          dict(multihead=""))
    gm = trace_module(module)
    found = find_attention(gm)
    if not found:
        return None
    if len(found) > 1:
        return f"computes {len(found)} attention products in one forward"
    spec = found[0]
    dim = _token_width(gm)
    if dim is None:
        return "its first input feeds no nn.Linear, so the token width is unknown"
    q_dims = _dims(spec["q"], gm)
    heads = q_dims[1] if q_dims and len(q_dims) == 4 else None
    if not isinstance(heads, int) or heads < 1:
        return ("q is not a reshape to B×H×N×d with a constant head count H, so the head "
                "count is unknown")
    out = _out_projection(spec["out"], gm)
    if out is not None:
        width = gm.get_submodule(out[0]).in_features
    elif isinstance(q_dims[3], int) and q_dims[3] > 0:
        width = heads * q_dims[3]
    else:
        return "no nn.Linear reads the attention product, so the head width is unknown"
    if width % heads:
        return f"its output projection reads {width} features, not a multiple of {heads} heads"
    masked = spec["attn_mask"] is not None or spec["is_causal"] is not False
    mixes = sum(t is not None for t in spec.get("mix") or ())
    attn = _Attention(heads, width // heads, dim, masked, mixes=mixes)
    _head_layout(module, gm, spec, attn, out)
    return attn


def _head_layout(module: nn.Module, gm: fx.GraphModule, spec: dict, attn: _Attention,
                 out: tuple[str, list[fx.Node], bool] | None) -> None:
    """Where the heads live (for static head pruning), or why the graph does not say."""
    h, d = attn.heads, attn.head_dim
    if attn.mixes:
        attn.unprunable = "its talking heads mix every head's attention"
        return
    if out is None:
        attn.unprunable = "no nn.Linear output projection reads the attention product"
        return
    if out[2]:
        attn.unprunable = "a norm over all heads' outputs mixes the heads"
        return
    sources = [_projection(spec[k], gm) for k in ("q", "k", "v")]
    if any(s is None for s in sources):
        attn.unprunable = "q, k or v is not a reshaping of an nn.Linear's output"
        return
    names = [s[0] for s in sources]
    widths = [gm.get_submodule(n).out_features for n in names]
    if len(set(names)) == 1:
        shape = [a for a in _shape_args(sources[0][1][0])] if sources[0][1] else []
        ints = [a for a in shape if isinstance(a, int)]
        if widths[0] != 3 * h * d or ints[:2] != [3, h]:
            attn.unprunable = ("the fused q/k/v projection is not laid out as [q; k; v], "
                               "each head-major")
            return
        attn.layout["qkv"] = names[0]
    elif len(set(names)) == 3 and widths == [h * d] * 3:
        attn.layout.update(q=names[0], k=names[1], v=names[2])
    else:
        attn.unprunable = "q, k and v do not come from one fused or three separate projections"
        return
    counts = _int_attrs(module, h, ("head",), ("dim", "size", "width"))
    if not counts:
        attn.unprunable = (f"no attribute of the attention module holds its head count "
                           f"{h}, so a pruned module could not run")
        return
    merged = _shape_args(out[1][-1])[-1] if out[1] else -1
    if isinstance(merged, fx.Node):
        attn.unprunable = ("the forward reshapes the heads' outputs to a width it reads at run "
                           "time (e.g. its input's), which a pruned module would not have")
        return
    stated = {a for r in out[1] for a in _shape_args(r) if isinstance(a, int)}
    widths_attrs: tuple[str, ...] = ()
    if h * d in stated and h * d > 1:
        widths_attrs = _int_attrs(module, h * d, ("dim", "width", "inner"), ("head",))
        if not widths_attrs:
            attn.unprunable = (f"the forward reshapes the heads to a constant width {h * d} "
                               f"that no attribute holds")
            return
    attn.layout.update(out=out[0], counts=counts, widths=widths_attrs)


# ------------------------------------------------------------------------ model reading

def _own_modules(model: nn.Module):
    for name, module in model.named_modules():
        if name == SITES or name.startswith(SITES + "."):
            continue
        yield name, module


def _candidate(module: nn.Module) -> bool:
    if isinstance(module, MULTIHEAD_TYPES):
        return True
    cls = type(module)
    return not cls.__module__.startswith("torch.") and "forward" in {
        k for c in cls.__mro__ if not c.__module__.startswith("torch.") for k in vars(c)}


def _mentions_attention(module: nn.Module) -> bool:
    try:
        source = inspect.getsource(type(module).forward)
    except (OSError, TypeError):
        return False
    source = source.lower()  # nn.Softmax(dim=-1)(scores) mentions it too
    return any(w in source for w in _ATTENTION_WORDS)


def _block_of(path: str) -> str | None:
    """The deepest proper ancestor of ``path`` that is an element of a container (its last
    component is an index)."""
    parts = path.split(".")
    for i in range(len(parts) - 1, 0, -1):
        if parts[i - 1].isdigit():
            return ".".join(parts[:i])
    return None


def _adds_input(gm: fx.GraphModule) -> bool:
    """Whether ``gm`` adds its first input back to something (a residual inside)."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    return bool(placeholders) and any(
        _is(n, ("add", "__add__"), (operator.add, torch.add)) and placeholders[0] in n.args
        for n in gm.graph.nodes)


def _residual(block: nn.Module, child: str) -> bool | str:
    """``True`` when a residual addition follows the call of ``child`` in the block,
    ``False`` when that child adds its input back itself (post-norm inside it), else why
    neither."""
    required = _required_tensor_args(block)
    if required:
        return (f"takes further required inputs {required} besides its tokens (masks or "
                f"positions need a hand-written adapter)")
    try:
        gm = trace_module(block)
    except RewriteError as err:
        return str(err)
    calls = [n for n in gm.graph.nodes if n.op == "call_module" and n.target == child]
    if len(calls) != 1:
        return f"calls its attention child {child!r} {len(calls)} times, not once"
    if residual_after(gm, calls[0]) is not None:
        return True
    try:
        if _adds_input(trace_module(block.get_submodule(child))):
            return False
    except RewriteError:
        pass
    return "has no residual addition around its attention"


def _required_tensor_args(module: nn.Module) -> list[str]:
    params = list(inspect.signature(type(module).forward).parameters.values())[1:]
    return [p.name for p in params[1:]
            if p.default is inspect.Parameter.empty
            and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]


def _optional_inputs(module: nn.Module) -> list[str]:
    """The block's inputs besides its tokens that have defaults (biases, masks, rotary
    embeddings a model may pass)."""
    params = list(inspect.signature(type(module).forward).parameters.values())[2:]
    return [p.name for p in params if p.default is None]


def _depends(node: fx.Node, target: fx.Node) -> bool:
    seen, stack = set(), [node]
    while stack:
        n = stack.pop()
        if n is target:
            return True
        if n not in seen:
            seen.add(n)
            stack.extend(n.all_input_nodes)
    return False


def _placeholder(gm: fx.GraphModule, name: str) -> fx.Node | None:
    return next((n for n in gm.graph.nodes if n.op == "placeholder"
                 and str(n.target).lstrip("*") == name), None)


def _side_inputs(block: nn.Module, child: str, names: list[str]
                 ) -> tuple[bool, tuple[TokenInput, ...], tuple[str, ...]] | str:
    """What the block's optional inputs ``names`` are, read from the graphs with each given
    as a tensor: ``(masks, token_inputs, inner)``, where ``masks`` says some input reaches
    the attention's mask (a bias over the entry tokens, read at their entry positions) and
    ``token_inputs`` are those that reach its queries and keys only (rotary tables,
    rows per token: gathered to follow the tokens), ``inner`` the name under which ``child``
    receives each; else why one is neither. A block that does not trace with them given
    has them read as masks, checked at each call."""
    if not names:
        return False, (), ()
    try:
        gm = trace_module(block, tuple(names))
    except RewriteError:
        # a module that branches on them in Python (torch's own layers): read as masks,
        # as before; the check at each call stays the net (`_check_side_inputs`)
        return True, (), ()
    calls = [n for n in gm.graph.nodes if n.op == "call_module" and n.target == child]
    module = block.get_submodule(child)
    params = [p.name for p in list(inspect.signature(type(module).forward).parameters.values())
              [1:]]
    masks, tokens, receives = False, [], []
    for name in names:
        node = _placeholder(gm, name)
        if node is None or not node.users:
            continue
        if len(calls) != 1 or set(node.users) != {calls[0]}:
            return (f"uses its input {name!r} outside its attention {child!r}, where trimmed "
                    f"tokens could not follow it")
        call = calls[0]
        inner = [k for k, v in call.kwargs.items() if v is node]
        inner += [params[i] for i, v in enumerate(call.args) if v is node and i < len(params)]
        if isinstance(module, MULTIHEAD_TYPES) or len(inner) != 1:
            return f"passes its input {name!r} to {child!r} in a way the graphs do not show"
        try:
            agm = trace_module(module, (inner[0],))
        except RewriteError as err:
            return f"cannot trace {child!r} with its input {inner[0]!r} given: {err}"
        ph, found = _placeholder(agm, inner[0]), find_attention(agm)
        if ph is None or len(found) != 1:
            return f"passes its input {name!r} to {child!r} in a way the graphs do not show"
        spec = found[0]

        def reaches(key: str, spec: dict = spec, ph: fx.Node = ph) -> bool:
            return isinstance(spec[key], fx.Node) and _depends(spec[key], ph)

        if reaches("attn_mask") and not any(reaches(k) for k in ("q", "k", "v")):
            masks = True
        elif (reaches("q") or reaches("k")) and not reaches("v") and not reaches("attn_mask"):
            tokens.append(TokenInput(name, axis=-2, rank=4))  # combined with B×H×N×d q, k
            receives.append(inner[0])
        else:
            return (f"passes its input {name!r} to its attention, where it neither masks the "
                    f"scores nor acts on the queries and keys only, so trimmed tokens could "
                    f"not follow it")
    return masks, tuple(tokens), tuple(receives)


def _neutral_row(module: nn.Module, arg: str, dim: int, head_dim: int, lead: int
                 ) -> str | None:
    """The row (`trimkit.ops.NEUTRAL_ROWS`) that, given to the attention ``module`` as its
    per-token input ``arg`` for every token after the ``lead`` ones, computes what it
    computes without the input, found by calling the module's own forward (eval, no
    gradients) on random tokens with each candidate at the widths a rotary table takes
    (2 × and 1 × the head width); ``None`` if none does. A packed stream gives this row to
    the leading tokens of every sample but the first (`trimkit.TokenInput.neutral`)."""
    from trimkit.ops import NEUTRAL_ROWS

    params = [p for p in module.parameters() if p.is_floating_point()]
    if not params:
        return None
    dtype, device = params[0].dtype, params[0].device
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1, lead + 3, dim, generator=gen).to(device=device, dtype=dtype)
    forward = type(module).forward  # the module's own, whatever is patched on the instance
    was = module.training
    try:
        module.eval()
        with torch.no_grad():
            ref = forward(module, x)
            for width in dict.fromkeys((2 * head_dim, head_dim)):
                noise = torch.randn(3, width, generator=gen).to(device=device, dtype=dtype)
                try:  # the input must change the output at this width
                    if torch.allclose(forward(module, x, **{arg: noise}), ref, atol=1e-5):
                        continue
                except Exception:  # noqa: BLE001 - another width, or no rotary table at all
                    continue
                for name, (first, second) in NEUTRAL_ROWS.items():
                    row = torch.cat([x.new_full((width - width // 2,), first),
                                     x.new_full((width // 2,), second)])
                    try:
                        out = forward(module, x, **{arg: row.expand(3, width)})
                    except Exception:  # noqa: BLE001 - not this candidate
                        continue
                    if torch.allclose(out, ref, atol=1e-5, rtol=1e-4):
                        return name
    except Exception:  # noqa: BLE001 - a module that cannot run alone: no neutral row
        return None
    finally:
        module.train(was)
    return None


def _follow(spec: TokenInput, layer: LayerDesc, receives: dict, protected: int
            ) -> TokenInput:
    """``spec`` as the stream declares it: covering every token where nothing is protected,
    else the tokens after the protected ones at most, with the row that leaves a token as
    it is where the attention module shows one (`_neutral_row`), so the stream can pack."""
    if protected == 0:
        return replace(spec, leading=0)
    module, inner = receives[spec.arg]
    head_dim = layer.head_dim or layer.dim // layer.num_heads
    return replace(spec, leading=None,
                   neutral=_neutral_row(module, inner, layer.dim, head_dim, protected))


def _mlp_width(block: nn.Module, attention: str, dim: int) -> int | None:
    widths = [m.out_features for n, m in block.named_modules()
              if isinstance(m, nn.Linear) and m.in_features == dim
              and not (n == attention or n.startswith(attention + "."))]
    return max(widths) if widths else None


def _protected(model: nn.Module, dim: int, blocks: list[str]) -> int:
    stated = getattr(model, "num_prefix_tokens", None)
    if type(stated) is int:
        return stated
    count = 0
    for name, p in model.named_parameters():
        if any(name.startswith(b + ".") for b in blocks) or name.startswith(SITES + "."):
            continue
        leaf = name.rsplit(".", 1)[-1]
        if not _TOKEN_PARAM.search(leaf) or p.shape[-1] != dim:
            continue
        if p.dim() == 3 and p.shape[0] == 1:
            count += p.shape[1]
        elif p.dim() == 1 and ("cls" in leaf or "class" in leaf):
            count += 1
    return count


def _kinds(scope: nn.Module) -> set[str]:
    """``"image"`` if ``scope`` has a patch convolution, ``"text"`` if a token embedding."""
    kinds = set()
    for m in scope.modules():
        if isinstance(m, nn.Conv2d) and m.kernel_size == m.stride and m.kernel_size != (1, 1):
            kinds.add("image")
        elif isinstance(m, nn.Embedding):
            kinds.add("text")
    return kinds


def _stream_names(model: nn.Module, containers: list[str]) -> dict[str, str]:
    """``"image"`` / ``"text"`` where the model (with several streams: the top-level part
    holding the container) tells one kind of input apart, else the container's path."""
    if len(containers) == 1:
        kinds = _kinds(model)
        return {containers[0]: kinds.pop() if len(kinds) == 1 else "tokens"}
    per = {c: _kinds(model.get_submodule(c.split(".")[0])) if "." in c else set()
           for c in containers}
    names = {}
    for c in containers:
        kind = next(iter(per[c])) if len(per[c]) == 1 else None
        unique = kind is not None and sum(per[o] == {kind} for o in containers) == 1
        names[c] = kind if unique else (c.replace(".", "_") or "tokens")
    return names


def discover(model: nn.Module, num_protected: int | None = None) -> Discovery:
    """Read ``model``'s graphs: its streams of transformer blocks, and what could not be
    placed (in words)."""
    problems: list[str] = []
    unread: dict[str, str] = {}  # modules that may hold attention the graphs do not show
    attentions: dict[str, _Attention] = {}
    for name, module in _own_modules(model):
        if not name or not _candidate(module):
            continue
        try:
            got = _read_attention(module)
        except RewriteError as err:
            if _mentions_attention(module):
                unread[name] = f"{name} ({type(module).__name__}) mentions attention but {err}"
                problems.append(unread[name])
            continue
        if isinstance(got, str):
            unread[name] = f"{name} ({type(module).__name__}): {got}"
            problems.append(unread[name])
        elif got is not None:
            attentions[name] = got
    if not attentions and not problems:
        problems.append("no module computes an attention product (scaled_dot_product_"
                        "attention, softmax(q·kᵀ)·v, or nn.MultiheadAttention)")
    by_block: dict[str, list[str]] = {}
    for path in attentions:
        block = _block_of(path)
        if block is None:
            problems.append(f"{path}: its attention is not inside an element of a block "
                            f"list (ModuleList / Sequential)")
            continue
        by_block.setdefault(block, []).append(path)
    blocks = sorted(by_block, key=lambda b: b.count("."))
    outer = [b for b in blocks if not any(b.startswith(o + ".") for o in blocks if o != b)]
    layers: dict[str, list[tuple[int, LayerDesc, bool]]] = {}
    broken: set[str] = set()  # containers with a block that cannot be placed
    inner_masked: set[str] = set()  # containers with an attention that computes a mask
    for block in outer:
        container = block.rsplit(".", 1)[0] if "." in block else ""
        paths = [p for b, ps in by_block.items() if b == block or b.startswith(block + ".")
                 for p in ps]
        hidden = [n for n in unread if n.startswith(block + ".")]
        if hidden:
            broken.add(container)
            problems.append(f"{block} has a module the graphs cannot read ({hidden[0]}), so "
                            f"its attention is not known in full")
            continue
        if len(paths) > 1:
            broken.add(container)
            problems.append(f"{block} computes attention in several modules ({', '.join(paths)}"
                            f"): cross-attention needs a hand-written adapter")
            continue
        path = paths[0]
        attn = attentions[path]
        relative = path[len(block) + 1:]
        child = relative.split(".")[0]
        module = model.get_submodule(block)
        residual = _residual(module, child)
        if isinstance(residual, str):
            broken.add(container)
            problems.append(f"{block} ({type(module).__name__}) {residual}")
            continue
        if attn.unprunable is None:
            lay = {k: (f"{relative}.{v}".rstrip(".") if isinstance(v, str) else
                       tuple(f"{relative}.{a}" for a in v)) for k, v in attn.layout.items()}
            if "multihead" in lay:
                lay = dict(multihead=relative)
            heads = HeadLayout(**lay)
        else:
            heads = HeadLayout(unprunable=attn.unprunable)
        index = block.rsplit(".", 1)[-1]
        desc = LayerDesc(block=block, attention=relative, num_heads=attn.heads, dim=attn.dim,
                         residual=residual,
                         head_dim=None if attn.heads * attn.head_dim == attn.dim
                         else attn.head_dim,
                         mlp_dim=_mlp_width(module, relative, attn.dim), heads=heads,
                         mixes_heads=attn.mixes)
        side = _side_inputs(module, child, _optional_inputs(module))
        if isinstance(side, str):
            broken.add(container)
            problems.append(f"{block} ({type(module).__name__}) {side}")
            continue
        desc = replace(desc, token_inputs=side[1])
        receives = {t.arg: (module.get_submodule(child), inner)
                    for t, inner in zip(side[1], side[2], strict=True)}
        layers.setdefault(container, []).append((int(index), desc, attn.masked or side[0],
                                                 receives))
        if attn.masked:
            inner_masked.add(container)
    for container in broken & set(layers):  # a stream with a gap would run blocks unadapted
        problems.append(f"the blocks of {container or 'the model'} are left untrimmed: one "
                        f"of them cannot be placed")
        del layers[container]
    streams: dict[str, StreamDesc] = {}
    containers = list(layers)
    names = _stream_names(model, containers)
    all_blocks = [d.block for items in layers.values() for _, d, _, _ in items]
    for container, items in layers.items():
        items.sort(key=lambda t: t[0])
        dim = items[0][1].dim
        name = names[container]
        protected = (num_protected if num_protected is not None
                     else _protected(model, dim, all_blocks) if len(containers) == 1 else 0)
        descs = tuple(replace(d, token_inputs=tuple(_follow(t, d, r, protected)
                                                    for t in d.token_inputs))
                      for _, d, _, r in items)
        streams[name] = StreamDesc(name, descs,
                                   num_protected=protected,
                                   positional=any(m for _, _, m, _ in items))
    input_masked = frozenset(names[c] for c in layers if c not in inner_masked
                             and streams[names[c]].positional)
    return Discovery(streams, problems, input_masked)


# ------------------------------------------------------------------------------ adapter

def _check_side_inputs(ctx: TrimContext, stream: str, path: str, first: bool, trimmed: bool,
                       follows: frozenset[str], input_masked: bool, module: nn.Module,
                       args: tuple, kwargs: dict) -> None:
    if not args or not isinstance(args[0], torch.Tensor):
        return
    entry = per_call(ctx, ("entry tokens", stream), dict)  # this call's, not another's
    if first:
        entry["n"] = args[0].shape[1]
        if input_masked:  # masks only from the blocks' inputs: packs in a call without any
            given = [v for v in args[1:] if isinstance(v, torch.Tensor)]
            given += [v for k, v in kwargs.items() if isinstance(v, torch.Tensor)
                      and k not in follows]
            if given:
                ctx.call.unmasked.discard(stream)
            else:
                ctx.call.unmasked.add(stream)
    if not (trimmed and ctx.enabled):
        return
    n0 = entry.get("n")
    named = [(f"argument {i}", a) for i, a in enumerate(args[1:], 1)]
    named += list(kwargs.items())
    for name, value in named:
        if not isinstance(value, torch.Tensor) or name in follows:
            continue  # token inputs the engine gathers
        if value.dim() >= 2 and value.shape[-1] == value.shape[-2] == n0:
            continue  # an attention bias over the entry tokens: read at entry positions
        raise RuntimeError(
            f"trimkit (generic adapter): {path} receives {name} of shape "
            f"{tuple(value.shape)} besides its tokens, and earlier layers of stream "
            f"{stream!r} trimmed tokens; it is not an attention bias over the {n0} entry "
            f"tokens, and the graphs did not show it as a per-token input of the queries and "
            f"keys (LayerDesc.token_inputs), so it cannot follow them: a hand-written "
            f"adapter can declare it (docs/adapters.md)")


def _fingerprint(model: nn.Module) -> tuple:
    return tuple((n, tuple(p.shape)) for n, p in model.named_parameters()) + tuple(
        (n, type(m)) for n, m in model.named_modules())


@register_adapter
class GenericAdapter(Adapter):
    """Sites from the model's own fx graphs, for transformers no other adapter knows (see
    the module docstring). ``num_protected`` fixes the leading tokens never trimmed
    (default: read from the model). Force it with ``trimkit.apply(model, recipe,
    adapter=GenericAdapter(...))`` or ``adapter="generic"``."""

    name = NAME
    fallback = True

    def __init__(self, num_protected: int | None = None):
        self.num_protected = num_protected
        self._seen: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

    def _discover(self, model: nn.Module) -> Discovery:
        key = _fingerprint(model)
        cached = self._seen.get(model)
        if cached is None or cached[0] != key:
            cached = (key, discover(model, self.num_protected))
            self._seen[model] = cached
        return cached[1]

    def detect(self, model: nn.Module) -> bool:
        return bool(self._discover(model).streams)

    def why_not(self, model: nn.Module) -> str | None:
        found = self._discover(model)
        if found.streams:
            return None
        return "; ".join(found.problems) + "."

    def install(self, model: nn.Module, desc: ModelDescription,
                sites: dict[tuple[str, int], Site], ctx: TrimContext) -> list[Undo]:
        """The engine's fx sites; each stream leaves its last block at its entry positions
        (`trimkit.hooks.Restore`: a merged token at each of its members' positions, the mean
        of the live tokens where tokens were dropped), so the model's own pooling and heads
        work unchanged, the same in masked and compacted execution; and a check
        on each block after the first trimming one:
        a further tensor it receives must be an attention bias over the entry tokens
        (which positional streams read at the tokens' entry positions), else trimmed tokens
        would no longer line up with it (rotary embeddings, position ids)."""
        ctx.track_source = True
        input_masked = self._discover(model).input_masked
        ctx.unmaskable = ctx.unmaskable | (input_masked & set(desc.streams))
        with Patches() as patches:
            patches.add(*super().install(model, desc, sites, ctx))
            for stream in desc.streams.values():
                last = model.get_submodule(stream.layers[-1].block)
                patches.hook(last, Restore(ctx, stream.name, fill="mean"))
                trimmed = False
                for i, layer in enumerate(stream.layers):
                    check = partial(_check_side_inputs, ctx, stream.name, layer.block, i == 0,
                                    trimmed, frozenset(t.arg for t in layer.token_inputs),
                                    stream.name in input_masked)
                    patches.hook(model.get_submodule(layer.block), check, pre=True, kwargs=True)
                    site = sites[(stream.name, i)]
                    trimmed = trimmed or bool(len(site.pre) or len(site.post))
        return patches.undo

    def describe(self, model: nn.Module) -> ModelDescription:
        found = self._discover(model)
        if not found.streams:
            raise TypeError(f"the generic adapter found no transformer blocks in "
                            f"{type(model).__name__}: {'; '.join(found.problems)}")
        return ModelDescription(NAME, dict(found.streams))
