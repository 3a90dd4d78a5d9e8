"""The rewrite pass: `torch.fx` puts trimming sites into a module's own forward.

A module is traced (its children as leaves), the graph is edited, and the result is set as
that *instance's* ``forward``; the class and every other instance are untouched, and
`Patch.undo` deletes the instance attribute again. Traces are specialised on the training
flag and on every non-tensor argument (``None`` masks, ``is_causal`` flags…), one cached
graph per combination, so a branch taken at trace time is always the right one.
"""

from __future__ import annotations

import inspect
import operator
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

__all__ = [
    "ADDITIVE_MASK_FUNCTIONS",
    "Patch",
    "RewriteError",
    "find_attention",
    "insert_after_output",
    "insert_after_residual",
    "insert_at_input",
    "patch_forward",
    "residual_after",
    "trace_module",
]

GraphEdit = Callable[[fx.GraphModule], None]


class RewriteError(RuntimeError):
    """A module's graph does not have the shape a trimming site needs."""


#: held while fx traces: tracing flips process-wide switches (torch's fused MHA path)
_TRACING = threading.RLock()


class _ChildrenAsLeaves(fx.Tracer):
    """Traces one module with its children as leaves. fx patches ``nn.Module.__call__`` and
    ``__getattr__`` for the whole process while it traces; calls from other threads (a
    trimmed model serving requests while one of them traces a new specialisation) pass
    through untouched instead of landing in this graph."""

    def __init__(self, root: nn.Module):
        super().__init__()
        self._children = {id(m) for m in root.children()}
        self._thread = threading.get_ident()

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return id(m) in self._children or super().is_leaf_module(m, qualname)

    def call_module(self, m: nn.Module, forward: Any, args: tuple, kwargs: dict) -> Any:
        if threading.get_ident() != self._thread:
            return forward(*args, **kwargs)
        return super().call_module(m, forward, args, kwargs)

    def getattr(self, attr: str, attr_val: Any, parameter_proxy_cache: dict) -> Any:
        if threading.get_ident() != self._thread:
            return attr_val
        return super().getattr(attr, attr_val, parameter_proxy_cache)


def _key_of(value: object) -> object:
    if isinstance(value, torch.Tensor):
        return torch.Tensor
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, tuple) and all(isinstance(v, (bool, int, float, str)) for v in value):
        return value
    raise RewriteError(f"cannot specialise a trimmed forward on an argument of type "
                       f"{type(value).__name__}")


class _Specialised:
    """The forward installed on one instance: picks (or traces) the graph for this call.

    Binding and the cache lookup are plain Python that ``torch.compile`` traces through, so
    a compiled model sees each rewritten forward as a call of its graph, with no break; a
    new specialisation is traced (by fx) outside the compiled region."""

    def __init__(self, module: nn.Module, edit: GraphEdit):
        self.module = module
        self.edit = edit
        self.signature = inspect.signature(type(module).forward)
        self.cache: dict[tuple, fx.GraphModule] = {}
        params = list(self.signature.parameters.values())[1:]
        #: parameters bound without `inspect` (all positional-or-keyword, the common case)
        self._simple = all(p.kind == p.POSITIONAL_OR_KEYWORD for p in params)
        self._names = tuple(p.name for p in params)
        self._defaults = tuple(p.default for p in params)
        #: graphs by `_call_key`, for calls that `_fast_bind` binds
        self._positional: dict[tuple, fx.GraphModule] = {}

    def __getstate__(self) -> dict:
        # traced graphs are derived: a copy (deep or unpickled) traces its own when called
        return dict(self.__dict__, cache={}, _positional={})

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self.__dict__.setdefault("_positional", {})

    def _fast_bind(self, args: tuple, kwargs: dict) -> list | None:
        """Every parameter's value in order, or ``None`` where `inspect` must bind (other
        parameter kinds, or a call it would reject: it then says why)."""
        names = self._names
        if not self._simple or len(args) > len(names):
            return None
        values = list(args) + list(self._defaults[len(args):])
        for name, value in kwargs.items():
            if name not in names:
                return None
            i = names.index(name)
            if i < len(args):
                return None
            values[i] = value
        for value in values:
            if value is inspect.Parameter.empty:
                return None
        return values

    def _bind(self, args: tuple, kwargs: dict) -> tuple[dict, tuple, dict]:
        """``(arguments by name, positional, keyword)`` for calling the traced graph."""
        values = self._fast_bind(args, kwargs)
        if values is not None:
            return dict(zip(self._names, values, strict=True)), tuple(values), {}
        bound = self.signature.bind(self.module, *args, **kwargs)
        bound.apply_defaults()
        return dict(list(bound.arguments.items())[1:]), bound.args[1:], bound.kwargs

    def trace(self, args: tuple, kwargs: dict) -> tuple[fx.GraphModule, tuple, dict]:
        key = self._call_key(args, kwargs)
        if key is not None:
            # the common call: its graph is found without binding the arguments by name
            got = self._positional.get(key)
            if got is not None:
                return got, tuple(self._fast_bind(args, kwargs)), {}
        gm, pos, kw = self._trace_by_name(args, kwargs)
        if key is not None and not kw and self._fast_bind(args, kwargs) is not None:
            self._positional[key] = gm
        return gm, pos, kw

    def _call_key(self, args: tuple, kwargs: dict) -> tuple | None:
        """What picks this call's graph, from the call as given: the mode, each argument's
        kind (a tensor) or value (None, a plain scalar, by type), keywords by name;
        ``None`` where an argument is of another type or the signature is not simple."""
        if not self._simple:
            return None
        kinds = []
        for v in (*args, *kwargs.values()):
            if isinstance(v, torch.Tensor):
                kinds.append(torch.Tensor)
            elif v is None or type(v) in (bool, int, float, str):
                kinds.append((type(v), v))
            else:
                return None
        return self.module.training, len(args), tuple(kwargs), tuple(kinds)

    def _trace_by_name(self, args: tuple, kwargs: dict) -> tuple[fx.GraphModule, tuple, dict]:
        arguments, pos, kw = self._bind(args, kwargs)
        concrete = {name: value for name, value in arguments.items()
                    if not isinstance(value, torch.Tensor)}
        key = (self.module.training, tuple((k, _key_of(v)) for k, v in concrete.items()))
        gm = self.cache.get(key)
        if gm is None:
            gm = self._trace_new(key, concrete)
        return gm, pos, kw

    @torch.compiler.disable
    def _trace_new(self, key: tuple, concrete: dict) -> fx.GraphModule:
        # torch's own layers branch on their inputs to pick a fused inference path; with
        # it off they take the plain path, which traces (and is what the graph runs)
        with _TRACING:
            fastpath = torch.backends.mha.get_fastpath_enabled()
            torch.backends.mha.set_fastpath_enabled(False)
            try:
                graph = _ChildrenAsLeaves(self.module).trace(self.module,
                                                             concrete_args=concrete)
            finally:
                torch.backends.mha.set_fastpath_enabled(fastpath)
        gm = fx.GraphModule(self.module, graph, class_name=type(self.module).__name__)
        self.edit(gm)
        gm.graph.lint()
        gm.recompile()
        self.cache[key] = gm
        return gm

    def __call__(self, *args, **kwargs):
        gm, pos, kw = self.trace(args, kwargs)
        # positional: fx renames specialised parameters, so keywords would not match. The
        # graph's forward directly: this already runs inside the module's own call (its
        # hooks ran), and the graph module, private to this forward, has none of its own
        return gm.forward(*pos, **kw)


@dataclass
class Patch:
    """One instance's rewritten forward; `undo` restores the original."""

    module: nn.Module
    forward: Callable

    def undo(self) -> None:
        if self.module.__dict__.get("forward") is self.forward:
            del self.module.__dict__["forward"]


def patch_forward(module: nn.Module, edit: GraphEdit) -> Patch:
    """Install on ``module`` (this instance only) a forward traced and edited by ``edit``.

    The forward is traced once right away, with every argument that has a default at its
    default and tensors elsewhere, so a module that cannot be rewritten fails here and not
    on its first call. Other specialisations are traced when first called.
    """
    if "forward" in module.__dict__:
        raise RewriteError(f"{type(module).__name__} already has a per-instance forward")
    spec = _Specialised(module, edit)
    _trace_defaults(spec)
    module.__dict__["forward"] = spec
    return Patch(module, spec)


def _trace_defaults(spec: _Specialised, given: tuple[str, ...] = ()) -> fx.GraphModule:
    args = [torch.empty(0) if p.default is inspect.Parameter.empty or p.name in given
            else p.default
            for p in list(spec.signature.parameters.values())[1:]
            if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    try:
        return spec.trace(tuple(args), {})[0]
    except RewriteError:
        raise
    except Exception as err:
        raise RewriteError(f"cannot trace {type(spec.module).__name__}.forward with torch.fx: "
                           f"{type(err).__name__}: {err}") from err


def trace_module(module: nn.Module, given: tuple[str, ...] = ()) -> fx.GraphModule:
    """``module``'s own forward as `torch.fx` traces it for `patch_forward` (children as
    leaves, arguments with defaults at their defaults, tensors elsewhere and for the
    arguments named in ``given``), unedited: what a graph edit would see. A `RewriteError`
    says why when it does not trace."""
    return _trace_defaults(_Specialised(module, lambda gm: None), given)


# ---------------------------------------------------------------------------- graph edits

_SDPA = {F.scaled_dot_product_attention, torch._C._nn.scaled_dot_product_attention}
_MATMUL = {operator.matmul, torch.matmul, torch.bmm}
_ADD = {operator.add, torch.add, operator.iadd}

#: Functions ``f(scores, mask) -> scores + mask`` that a family wraps out of fx's sight
#: (adapters register theirs, e.g. a ``maybe_add_mask``), recognised like an addition.
ADDITIVE_MASK_FUNCTIONS: set = set()


def _is_call(node: fx.Node, fns: set, methods: tuple[str, ...] = ()) -> bool:
    if node.op == "call_function" and node.target in fns:
        return True
    return node.op == "call_method" and node.target in methods


def _transposed_key(node: fx.Node) -> fx.Node | None:
    """``k`` if ``node`` is ``k.transpose(-2, -1)`` (or ``-1, -2``), else None."""
    if _is_call(node, {torch.transpose}, ("transpose",)):
        dims = tuple(node.args[1:3])
        if sorted(dims) in ([-2, -1], [2, 3]):
            return node.args[0]
    if _is_call(node, set(), ("mT",)):
        return node.args[0]
    return None


def find_attention(gm: fx.GraphModule) -> list[dict]:
    """Every attention product in ``gm``, as the arguments of an SDPA-like call.

    Two shapes are recognised: a call of ``scaled_dot_product_attention``, and the explicit
    ``softmax(q @ kᵀ [* s] [+ mask]) [→ dropout] @ v``. Each result names the node whose
    output is the attention product (``out``) and its ``q, k, v, attn_mask, scale,
    dropout`` (nodes or constants; ``dropout`` is a dropout module's target or a float).

    The explicit form may mix its heads (talking-heads attention, Shazeer et al. 2020): an
    ``nn.Linear`` from H to H over the head axis of the logits before the softmax and/or of
    the weights after it, written ``permute(0, 2, 3, 1) → linear → permute(0, 3, 1, 2)``.
    ``mix`` then names those modules' targets, ``(before, after)`` (either may be
    ``None``); it is ``None`` for attention that keeps its heads apart.
    """
    found = []
    for node in gm.graph.nodes:
        if _is_call(node, _SDPA):
            names = ["query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale"]
            spec = dict(zip(names, node.args, strict=False))
            spec.update(node.kwargs)
            found.append(dict(out=node, q=spec["query"], k=spec["key"], v=spec["value"],
                              attn_mask=spec.get("attn_mask"), dropout=spec.get("dropout_p", 0.0),
                              is_causal=spec.get("is_causal", False), scale=spec.get("scale"),
                              erase=[], mix=None))
        elif _is_call(node, {torch.softmax, F.softmax}, ("softmax",)):
            spec = _explicit_attention(node)
            if spec is not None:
                found.append(spec)
    return found


def _explicit_attention(softmax: fx.Node) -> dict | None:
    dim = softmax.kwargs.get("dim", softmax.args[1] if len(softmax.args) > 1 else None)
    if dim not in (-1, 3):
        return None
    node, mask, scale, chain = softmax.args[0], None, 1.0, [softmax]
    before = None
    while isinstance(node, fx.Node) and not _is_call(node, _MATMUL, ("matmul",)):
        chain.append(node)
        adds = _ADD | ADDITIVE_MASK_FUNCTIONS
        mixed = _head_mix(node, up=True)
        if mixed is not None and before is None and mask is None:
            before, node = mixed[0], mixed[1]
            chain.extend(mixed[2][1:])
        elif _is_call(node, adds, ("add", "__add__")) and len(node.args) == 2 and before is None:
            node, mask = node.args
        elif (_is_call(node, {operator.mul, torch.mul}, ("mul",)) and len(node.args) == 2
              and isinstance(node.args[1], (int, float))):
            scale, node = scale * node.args[1], node.args[0]
        elif (_is_call(node, {operator.truediv, torch.div}, ("div",)) and len(node.args) == 2
              and isinstance(node.args[1], (int, float))):
            scale, node = scale / node.args[1], node.args[0]
        else:
            return None
    if not isinstance(node, fx.Node):
        return None
    chain.append(node)
    q, kt = node.args[:2]
    k = _transposed_key(kt) if isinstance(kt, fx.Node) else None
    if k is None:
        return None
    probs, dropout, after = softmax, 0.0, None
    users = list(probs.users)
    mixed = _head_mix(users[0], up=False) if len(users) == 1 else None
    if mixed is not None:
        after, probs = mixed[0], mixed[1]
        chain.extend(mixed[2])
        users = list(probs.users)
    if len(users) == 1 and users[0].op == "call_module":
        probs, dropout = users[0], users[0].target
        chain.append(probs)
        users = list(probs.users)
    if (len(users) != 1 or not _is_call(users[0], _MATMUL, ("matmul",))
            or users[0].args[0] is not probs):
        return None
    out = users[0]
    mix = None if before is None and after is None else (before, after)
    return dict(out=out, q=q, k=k, v=out.args[1], attn_mask=mask, dropout=dropout,
                is_causal=False, scale=scale, erase=chain, mix=mix)


def _permutes(node: fx.Node, dims: tuple[int, ...]) -> bool:
    if not _is_call(node, {torch.permute}, ("permute",)):
        return False
    given = node.args[1:] if len(node.args) > 2 else node.args[1] if len(node.args) == 2 \
        else node.kwargs.get("dims")
    return tuple(given or ()) == dims


def _head_mix(node: fx.Node, up: bool) -> tuple[str, fx.Node, list[fx.Node]] | None:
    """A mix of the heads of a B×H×N×M map through an ``nn.Linear`` H → H, written
    ``permute(0, 2, 3, 1) → linear → permute(0, 3, 1, 2)``: found from its last node walking
    to the inputs (``up``; returns the map it mixes), or from its first walking to the users
    (returns its output). Returns the linear's target, that node and the mix's nodes."""
    def linear(n: fx.Node | None) -> bool:
        if n is None or n.op != "call_module":
            return False
        m = n.graph.owning_module.get_submodule(n.target)
        return (isinstance(m, nn.Linear) and m.in_features == m.out_features
                and type(m).forward is nn.Linear.forward)

    def next_(n: fx.Node | None) -> fx.Node | None:
        if n is None:
            return None
        if up:
            return n.args[0] if n.args and isinstance(n.args[0], fx.Node) else None
        users = list(n.users)
        return users[0] if len(users) == 1 else None

    first = node
    if not _permutes(first, (0, 3, 1, 2) if up else (0, 2, 3, 1)):
        return None
    lin = next_(first)
    if not linear(lin) or len(lin.users) != 1:
        return None
    last = next_(lin) if up else list(lin.users)[0]
    if last is None or not _permutes(last, (0, 2, 3, 1) if up else (0, 3, 1, 2)):
        return None
    if up and not isinstance(last.args[0], fx.Node):
        return None
    return lin.target, (last.args[0] if up else last), [first, lin, last]


def _depends_on(node: fx.Node, target: fx.Node) -> bool:
    seen, stack = set(), [node]
    while stack:
        n = stack.pop()
        if n is target:
            return True
        if n in seen:
            continue
        seen.add(n)
        stack.extend(a for a in n.all_input_nodes)
    return False


def insert_at_input(gm: fx.GraphModule, submodule: str, index: int = 0,
                    extra: tuple[int, ...] = ()) -> None:
    """Route the ``index``-th placeholder of ``gm`` through ``gm.<submodule>`` first; the
    placeholders at ``extra`` positions are passed along as further arguments."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    x = placeholders[index]
    anchor = placeholders[-1]
    with gm.graph.inserting_after(anchor):
        new = gm.graph.call_module(submodule, (x, *(placeholders[i] for i in extra)))
    x.replace_all_uses_with(new, delete_user_cb=lambda u: u is not new)


def insert_after_output(gm: fx.GraphModule, after_module: str, submodule: str) -> None:
    """Route the output of the single call of ``after_module`` through ``gm.<submodule>``."""
    call = _single_call(gm, after_module)
    with gm.graph.inserting_after(call):
        new = gm.graph.call_module(submodule, (call,))
    call.replace_all_uses_with(new, delete_user_cb=lambda u: u is not new)


def _single_call(gm: fx.GraphModule, target: str) -> fx.Node:
    calls = [n for n in gm.graph.nodes if n.op == "call_module" and n.target == target]
    if len(calls) != 1:
        raise RewriteError(f"expected one call of {target!r} in the traced forward, "
                           f"found {len(calls)}")
    return calls[0]


def residual_after(gm: fx.GraphModule, call: fx.Node) -> fx.Node | None:
    """The residual sum that follows ``call``: the first addition after it whose other
    operand does not depend on it (``x + f(attn(x))``, pre-norm or post-norm alike)."""
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    for node in gm.graph.nodes:
        if (order[node] > order[call] and _is_call(node, _ADD, ("add", "__add__"))
                and len(node.all_input_nodes) == 2):
            a, b = node.all_input_nodes
            if _depends_on(a, call) != _depends_on(b, call):
                return node
    return None


def insert_after_residual(gm: fx.GraphModule, after_module: str, submodule: str) -> None:
    """Route the residual sum that follows ``after_module``'s call through ``gm.<submodule>``.

    The residual sum is the first addition downstream of that call whose other operand does
    not depend on it (``x + f(attn(x))``, pre-norm or post-norm alike).
    """
    res = residual_after(gm, _single_call(gm, after_module))
    if res is None:
        raise RewriteError(f"no residual addition follows {after_module!r}")
    with gm.graph.inserting_after(res):
        new = gm.graph.call_module(submodule, (res,))
    res.replace_all_uses_with(new, delete_user_cb=lambda u: u is not new)


class RouteAttention:
    """Graph edit: the module's one attention product becomes a call of ``core`` (a
    submodule named ``name``). Talking heads (`find_attention`'s ``mix``) are handed to the
    core when ``mixes`` allows it, and refused with a `RewriteError` otherwise."""

    def __init__(self, core: nn.Module, name: str = "trimkit_core", mixes: bool = True):
        self.core, self.name, self.mixes = core, name, mixes

    def __call__(self, gm: fx.GraphModule) -> None:
        found = find_attention(gm)
        if len(found) != 1:
            raise RewriteError(f"expected one attention product in {type(gm).__name__}, "
                               f"found {len(found)}")
        spec = found[0]
        if spec.get("mix") is not None and not self.mixes:
            raise RewriteError(f"{type(gm).__name__} mixes its heads; {type(self.core).__name__}"
                               f" reads the attention of separate heads only")
        gm.add_submodule(self.name, self.core)
        dropout = spec["dropout"]
        if isinstance(dropout, str):
            mod = gm.get_submodule(dropout)
            dropout = float(getattr(mod, "p", 0.0)) if mod.training else 0.0
        out = spec["out"]
        kwargs = dict(attn_mask=spec["attn_mask"], dropout_p=dropout,
                      is_causal=spec["is_causal"], scale=spec["scale"])
        with gm.graph.inserting_before(out):
            if spec.get("mix") is not None:  # talking heads: the core mixes them
                kwargs["mix"] = tuple(None if t is None else gm.graph.get_attr(t)
                                      for t in spec["mix"])
                self.core.mixes_heads()
            new = gm.graph.call_module(self.name, (spec["q"], spec["k"], spec["v"]), kwargs)
        out.replace_all_uses_with(new)
        gm.graph.erase_node(out)
        for node in spec["erase"]:
            if not node.users:
                gm.graph.erase_node(node)
        gm.graph.eliminate_dead_code()
