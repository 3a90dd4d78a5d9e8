"""The hook toolkit: how sites get into a model whose forward is not rewritten.

An adapter declares where a stream runs (`Tower`: the module it enters through, its layers,
where each layer's leave point goes, how to read padding and protected tokens from the
call's arguments); `install_tower` installs it:

- `Entry` hooks on the tower (or a wrapper of one of its methods): they read the stream's
  ``(real, protected)`` entry masks from the call and are the only writer of
  `CallRecord.entry`; where the call also receives another stream's tokens as keys
  (`Keys`), that stream continues there or enters there, or is absent from the call;
- `Enter` before each layer, `Leave` after it (or after a named child), both ahead of any
  other hook on the module; `KeysThrough` runs a keys-only site on the keys a layer reads;
- `Restore` after the last layer: the stream's output back at its entry positions;
- `KeyBias` (and `Expanding`) on an untrimmed module that cross-attends to a trimmed
  tower's output, which an `Entry` recorded (`Outputs`): its dead slots are masked.

Every change goes through a `Patches` stack: an instance attribute set, a hook registered,
each with an undo object that holds its targets as attributes (`RestoreAttr`,
`RemoveHook`), and everything installed so far undone when a later step fails. Hooks and
undo entries are instances of this module's classes, never closures, so ``copy.deepcopy``
of a trimmed model gives one whose hooks and `trimkit.remove` act on the copy, and pickling
works. What one forward computes lives in the calling thread's `CallRecord.scratch`
(`per_call`), never on a hook, which every call and thread shares.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from .ops import additive_mask, restore_positions
from .sites import Site, TrimContext
from .state import TokenState, static_shapes

__all__ = ["ArgumentReader", "Enter", "Entry", "Exit", "EntryMethod", "EntryOutput", "Expanding",
           "KeyBias", "Keys", "KeysThrough", "Leave", "MethodPatch", "Outputs", "Patches",
           "RemoveHook", "Restore",
           "RestoreAttr", "StreamCall", "Tower", "Undo", "first_output", "install_tower",
           "live_slots", "outputs", "padding_mask", "per_call", "replace_first_output",
           "stream_call", "untouched"]

Undo = Callable[[], None]
#: ``masks(arguments, module)``: a stream's ``(real, protected)`` B×N bool entry masks (each
#: may be ``None``) from the arguments a tower's call passes, by name; ``None``: nothing
MaskReader = Callable[[dict[str, Any], nn.Module],
                      "tuple[torch.Tensor | None, torch.Tensor | None] | None"]


# ------------------------------------------------------------------------- the patch stack

class RestoreAttr:
    """Undoes `Patches.set`: deletes the instance attribute while it is still the value set
    (a later patch of the same name stays)."""

    def __init__(self, obj: object, name: str, value: object):
        self.obj, self.name, self.value = obj, name, value

    def __call__(self) -> None:
        if self.obj.__dict__.get(self.name) is self.value:
            del self.obj.__dict__[self.name]


_HOOK_DICTS = ("_forward_pre_hooks", "_forward_pre_hooks_with_kwargs", "_forward_hooks",
               "_forward_hooks_with_kwargs", "_forward_hooks_always_called")


class RemoveHook:
    """Undoes `Patches.hook`: removes the hook ``hook_id`` from ``module`` (torch's handle
    keeps a weak reference, which a deep copy cannot map to the copy's module)."""

    def __init__(self, module: nn.Module, hook_id: int):
        self.module, self.hook_id = module, hook_id

    def __call__(self) -> None:
        for name in _HOOK_DICTS:
            getattr(self.module, name, {}).pop(self.hook_id, None)

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        # unpickled in a fresh process: hooks registered later must not reuse this id
        RemovableHandle.next_id = max(RemovableHandle.next_id, self.hook_id + 1)


class Patches:
    """A stack of reversible changes to one model. Used as a context manager, an error
    inside undoes everything installed so far (last first) and propagates; `undo` is what
    `Adapter.install` returns."""

    def __init__(self) -> None:
        self.undo: list[Undo] = []

    def __enter__(self) -> Patches:
        return self

    def __exit__(self, kind: type | None, *rest: object) -> None:
        if kind is not None:
            self.rollback()

    def add(self, *undo: Undo) -> None:
        """Take over undo entries made elsewhere."""
        self.undo.extend(undo)

    def set(self, obj: object, name: str, value: object) -> None:
        """Set an instance attribute (e.g. shadowing a method of the class) of ``obj``."""
        if name in obj.__dict__:
            raise RuntimeError(f"{type(obj).__name__}.{name} is already patched on this "
                               f"instance; nothing was changed")
        obj.__dict__[name] = value
        self.undo.append(RestoreAttr(obj, name, value))

    def hook(self, module: nn.Module, fn: Callable, *, pre: bool = False, kwargs: bool = False,
             prepend: bool = False, always: bool = False) -> None:
        """Register a forward hook (``pre``: a pre-hook) on ``module``; ``kwargs``: it
        receives and may return the keyword arguments; ``always``: it also runs when the
        forward raises."""
        if pre:
            handle = module.register_forward_pre_hook(fn, with_kwargs=kwargs, prepend=prepend)
        else:
            handle = module.register_forward_hook(fn, with_kwargs=kwargs, prepend=prepend,
                                                  always_call=always)
        self.undo.append(RemoveHook(module, handle.id))

    def rollback(self) -> None:
        """Undo everything, last first."""
        while self.undo:
            self.undo.pop()()


class MethodPatch:
    """Base of instance attributes that stand in for one of ``owner``'s methods (install
    with `Patches.set`); `original` calls the class's method."""

    def __init__(self, owner: object, name: str):
        self.owner, self.name = owner, name

    def original(self, *args: Any, **kwargs: Any) -> Any:
        return getattr(type(self.owner), self.name)(self.owner, *args, **kwargs)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.original(*args, **kwargs)


class ArgumentReader:
    """Reads some named arguments of calls to ``fn`` (a bound method, or a function whose
    first parameter a hook does not see) from a call's ``args`` and ``kwargs``.

    The positions are found once, here: binding every call to the signature with `inspect`
    breaks a ``torch.compile`` graph (dynamo cannot trace ``Signature.bind``), while this
    lookup is plain indexing that it traces. Like ``bind_partial(...).arguments``, an
    argument the call does not pass is absent (no defaults are filled in). ``required``: each
    name must be a parameter of ``fn`` and every call must pass it (else `TypeError`)."""

    def __init__(self, fn: Callable, names: Iterable[str], required: bool = False):
        params = list(inspect.signature(fn).parameters.values())
        self.fn_name = getattr(fn, "__qualname__", repr(fn))
        self.required = required
        self.positions: dict[str, int | None] = {}
        for name in names:
            self.positions[name] = None
            for i, p in enumerate(params):
                if p.name != name or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
                    continue
                positional = p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
                after_star = any(q.kind is q.VAR_POSITIONAL for q in params[:i])
                self.positions[name] = i if positional and not after_star else None
                break
        #: the names ``fn`` has as parameters (the others can only come through ``**kwargs``)
        self.known = frozenset(p.name for p in params)
        for name in self.positions if required else ():
            if name not in self.known:
                raise TypeError(f"trimkit reads {name!r} from a `{name}` parameter, which "
                                f"{self.fn_name!r} does not have")

    def __call__(self, args: tuple, kwargs: dict) -> dict[str, Any]:
        """The named arguments this call passes, by name."""
        found = {}
        for name, pos in self.positions.items():
            if name in kwargs:
                found[name] = kwargs[name]
            elif pos is not None and pos < len(args):
                found[name] = args[pos]
            elif self.required:
                raise TypeError(f"{self.fn_name}() missing its `{name}` argument")
        return found


# --------------------------------------------------------------------------- per-call state

def per_call(ctx: TrimContext, key: object, factory: Callable[[], Any]) -> Any:
    """The calling thread's value under ``key`` in `CallRecord.scratch`, made by
    ``factory`` the first time."""
    scratch = ctx.call.scratch
    got = scratch.get(key)
    if got is None:
        got = scratch[key] = factory()
    return got


@dataclass
class StreamCall:
    """A stream's part of the call under way: how many of its towers are running, the real
    tokens it entered with (B×N bool, ``None``: all), whether its tokens still sit where
    they entered (``None``: not known yet); for a stream read as keys, whether a tower's
    call reads it (`Keys`) and its tokens as the last keys-only site left them."""

    depth: int = 0
    real: torch.Tensor | None = None
    in_place: bool | None = True
    reading: bool = False
    tokens: torch.Tensor | None = None


def stream_call(ctx: TrimContext, stream: str) -> StreamCall:
    """``stream``'s `StreamCall` in the calling thread."""
    return per_call(ctx, ("stream", stream), StreamCall)


def _in_place(src: torch.Tensor, real: torch.Tensor | None) -> torch.Tensor:
    """0-d bool: whether every real entry token still sits in its own slot, alone (``src``:
    B×N0 source of a state of N0 slots)."""
    expected = torch.arange(src.shape[1], device=src.device).expand_as(src)
    if real is not None:
        expected = expected.masked_fill(~real.to(src.device), -1)
    return (src == expected).all()


def untouched(ctx: TrimContext, stream: str) -> bool:
    """Whether ``stream`` is laid out as it entered this call, for layers no op has acted
    before (padding compacted away at the entry moves tokens only when a shorter sample is
    not padded at its end, or no sample is full-length); read on the host once per call."""
    call = stream_call(ctx, stream)
    if call.in_place is None:
        state = ctx.states.get(stream)
        call.in_place = (state is not None and state.source is not None
                         and state.keep.shape == state.source.shape
                         and bool(_in_place(state.source, call.real)))
    return call.in_place


def live_slots(state: TokenState) -> torch.Tensor | None:
    """B×N bool live slots of ``state``, or ``None`` when every slot is live (known from the
    state, or read once; under `static_shapes` the mask, decided in the graph)."""
    live = state.keep.detach() > 0
    if state.dead_count == 0 or (not static_shapes() and bool(live.all())):
        return None
    return live


class Outputs:
    """The calling thread's latest tower outputs (`Entry` with ``record``), one per stream,
    with their live slots, so that a module cross-attending to one masks its dead slots
    (`KeyBias`). Outputs are found by identity (``is``, which ``torch.compile`` traces,
    unlike ``id`` keys and weak references) and held until the next one; the key bias is
    built once per tensor read (``generate`` passes the same one at every step)."""

    def __init__(self) -> None:
        #: stream -> (its latest output, its live tokens B×N bool, or None when all are live)
        self._latest: dict[str, tuple[torch.Tensor, torch.Tensor | None]] = {}
        self.pending: torch.Tensor | None = None  # set while an `Expanding` method runs
        self.mask: torch.Tensor | None = None  # the key bias of the `KeyBias` call under way
        self._bias: tuple[torch.Tensor, torch.Tensor | None] | None = None

    def record(self, ctx: TrimContext, stream: str, output: Any) -> None:
        """``output`` of ``stream``'s tower, when its state lays it out."""
        x = getattr(output, "last_hidden_state", None)
        if x is None and isinstance(output, tuple):
            x = output[0]
        state = ctx.states.get(stream) if ctx.enabled else None
        if x is not None and state is not None and state.keep.shape == x.shape[:2]:
            self._latest[stream] = (x, live_slots(state))

    def find(self, x: torch.Tensor | None) -> tuple[bool, torch.Tensor | None]:
        """Whether ``x`` is a recorded output, and its live mask (``None``: all live)."""
        if x is not None:
            for out, live in self._latest.values():
                if out is x:
                    return True, live
        return False, None

    def key_bias(self, x: torch.Tensor | None) -> torch.Tensor | None:
        """B×1×1×N additive bias on the dead slots of ``x``: a recorded output, or one that
        an `Expanding` method expanded from it (repeated per beam or sample); ``None`` if
        there are none."""
        if x is None:
            return None
        if self._bias is not None and self._bias[0] is x:
            return self._bias[1]
        found, live = self.find(x)
        p = self.pending
        if (not found and p is not None and x.dim() == 3 and x.shape[1] == p.shape[1]
                and x.shape[0] % p.shape[0] == 0):
            live = p.repeat_interleave(x.shape[0] // p.shape[0], dim=0)
        bias = None
        if live is not None:
            bias = additive_mask(live.to(x.device), x.dtype)[:, None, None, :]
        self._bias = (x, bias)
        return bias


def outputs(ctx: TrimContext) -> Outputs:
    """The calling thread's `Outputs`."""
    return per_call(ctx, "outputs", Outputs)


# ------------------------------------------------------------------------------ the hooks

def first_output(output: object) -> torch.Tensor:
    """A module's hidden states: the output itself, or the first element of a tuple."""
    return output[0] if isinstance(output, tuple) else output


def replace_first_output(output: object, x: torch.Tensor) -> object:
    """A module's output with its hidden states (the first element of a tuple) replaced."""
    return (x, *output[1:]) if isinstance(output, tuple) else x


def padding_mask(mask: torch.Tensor | None, owner: str) -> torch.Tensor | None:
    """B×N bool, True on real tokens, from a 2D attention mask (1 on real tokens; ``None``
    stays ``None``); any other shape is a `ValueError` naming ``owner``."""
    if mask is None:
        return None
    if mask.dim() != 2:
        raise ValueError(f"trimkit reads padding from a 2D attention_mask (B×N, 1 on real "
                         f"tokens); the {owner} got one of shape {tuple(mask.shape)}")
    return mask.to(torch.bool)


@dataclass(frozen=True)
class Keys:
    """Another stream's tokens that a tower's call receives as keys: its argument ``tokens``,
    and ``mask`` the argument with their 2D padding mask."""

    stream: str
    tokens: str
    mask: str | None = None


class Entry:
    """Where ``stream`` enters: forward hooks of a tower module (`install`). ``read`` picks
    the call's arguments, ``masks`` turns them into the stream's entry masks. With ``keys``,
    the call's keys stream continues here (the tokens are its recorded output), else enters
    here, or is absent from the call (no tokens: no trimmer is guided by it). ``record``:
    the tower's output is recorded (`Outputs`)."""

    def __init__(self, ctx: TrimContext, stream: str, read: ArgumentReader | None = None,
                 masks: MaskReader | None = None, *, keys: Keys | None = None,
                 record: bool = False):
        self.ctx, self.stream, self.read, self.masks = ctx, stream, read, masks
        self.keys, self.record = keys, record

    def install(self, patches: Patches, module: nn.Module, method: str = "forward") -> None:
        """Hooks on ``module``, or, for a ``method`` other than its forward, a wrapper."""
        if method == "forward":
            patches.hook(module, self.before, pre=True, kwargs=True)
            patches.hook(module, self.after, kwargs=True, always=True)
        else:
            patches.set(module, method, EntryMethod(module, method, self))

    def before(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        call = stream_call(self.ctx, self.stream)
        call.depth += 1
        call.real, call.in_place = None, True
        if self.ctx.enabled:
            self.begin(module, self.read(args, kwargs) if self.read is not None else {})

    def begin(self, module: nn.Module, arguments: dict[str, Any]) -> None:
        """The stream's entry masks, and its keys stream, from the call's ``arguments``."""
        ctx = self.ctx
        real, protected = (self.masks(arguments, module) if self.masks is not None
                           else None) or (None, None)
        self.write(module, real, protected)
        if self.keys is None:
            return
        stream, x = self.keys.stream, arguments.get(self.keys.tokens)
        keys = stream_call(ctx, stream)
        keys.reading, keys.tokens = x is not None, None
        if x is None:
            ctx.absent.add(stream)
            return
        state = ctx.states.get(stream)
        if outputs(ctx).find(x)[0] and state is not None and state.keep.shape == x.shape[:2]:
            ctx.states[stream] = state.with_x(x)  # the stream's own tower output
        else:
            mask = arguments.get(self.keys.mask) if self.keys.mask else None
            ctx.start(stream, x, None if mask is None or mask.dim() != 2 else mask.bool())

    def write(self, module: nn.Module, real: torch.Tensor | None,
              protected: torch.Tensor | None, prefix: int = 0) -> None:
        """The stream's entry masks (B×N bool, ``None``: none) and the length of its prefix
        (`trimkit.describe.StreamDesc.prefix`) for the call under way, which the stream's
        first layer consumes."""
        ctx = self.ctx
        if real is not None:
            call = stream_call(ctx, self.stream)
            call.real = real
            if ctx.compacting(module.training) and not static_shapes():
                call.in_place = None  # known once the padding was compacted
        if real is not None or protected is not None:
            ctx.entry[self.stream] = (real, protected)
        if prefix:
            ctx.call.prefix[self.stream] = prefix

    def after(self, module: nn.Module, args: tuple, kwargs: dict, output: object) -> None:
        ctx = self.ctx
        stream_call(ctx, self.stream).depth -= 1
        ctx.entry.pop(self.stream, None)
        ctx.call.prefix.pop(self.stream, None)
        if self.keys is not None:
            ctx.absent.discard(self.keys.stream)
            keys = stream_call(ctx, self.keys.stream)
            keys.reading, keys.tokens = False, None
        if self.record:
            outputs(ctx).record(ctx, self.stream, output)


#: ``masks(output, arguments, module)``: ``(real, protected, prefix)`` from what a module
#: inside a tower returned (`EntryOutput`)
OutputMaskReader = Callable[[Any, dict[str, Any], nn.Module],
                            "tuple[torch.Tensor | None, torch.Tensor | None, int]"]


class EntryOutput:
    """Forward hook of a module inside a tower (its embeddings) whose output gives the
    stream's entry masks, for models that only know their padding once they embed (ViLT
    samples its image patches and their padding there): ``masks(output, arguments,
    module)`` returns ``(real, protected, prefix)``, written through the tower's `Entry`
    (`Entry.write`), which stays the only writer; ``read`` picks the call's arguments."""

    def __init__(self, entry: Entry, masks: OutputMaskReader, read: ArgumentReader | None = None):
        self.entry, self.masks, self.read = entry, masks, read

    def install(self, patches: Patches, module: nn.Module) -> None:
        patches.hook(module, self, kwargs=True)

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict, output: object) -> None:
        if not self.entry.ctx.enabled or not stream_call(self.entry.ctx, self.entry.stream).depth:
            return None
        arguments = self.read(args, kwargs) if self.read is not None else {}
        real, protected, prefix = self.masks(output, arguments, module)
        self.entry.write(module, real, protected, prefix)
        return None


class EntryMethod(MethodPatch):
    """``owner.<name>`` run inside an `Entry` (a tower whose inputs reach a method, not its
    forward)."""

    def __init__(self, owner: nn.Module, name: str, entry: Entry):
        super().__init__(owner, name)
        self.entry = entry

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        output = None
        try:
            self.entry.before(self.owner, args, kwargs)
            output = self.original(*args, **kwargs)
            return output
        finally:
            self.entry.after(self.owner, args, kwargs, output)


class Enter:
    """Forward pre-hook of a layer: its hidden states (first argument, or keyword ``name``)
    through the site's enter. ``guard(layer)`` may refuse the call; with ``tower`` (its
    name), the stream's first layer must run inside that tower, where its masks are read."""

    def __init__(self, site: Site, name: str = "hidden_states",
                 guard: Callable[[nn.Module], None] | None = None, tower: str | None = None):
        self.site, self.name, self.guard, self.tower = site, name, guard, tower

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        site = self.site
        if not site.ctx.enabled:
            return None
        if self.guard is not None:
            self.guard(module)
        if self.tower and site.first and not stream_call(site.ctx, site.stream).depth:
            raise RuntimeError(f"trimkit: call the {self.tower} (or the model around it), not "
                               f"its layers directly, so padding reaches the trimmers")
        if args:
            return (site.enter(args[0]), *args[1:]), kwargs
        return args, dict(kwargs, **{self.name: site.enter(kwargs[self.name])})


class KeysThrough:
    """Forward pre-hook of a layer that reads another stream's tokens as keys (argument
    ``name``, or position ``position``), for that stream's keys-only site
    (`LayerDesc.keys_only`): in calls that read the stream (`Keys`), the tokens go through
    the site (enter, then leave) first, and what it leaves is what this layer and the
    stream's next reader get."""

    def __init__(self, site: Site, name: str, position: int):
        self.site, self.name, self.position = site, name, position

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        site, i = self.site, self.position
        call = stream_call(site.ctx, site.stream)
        if not site.ctx.enabled or not call.reading:
            return None
        given = args[i] if len(args) > i else kwargs.get(self.name)
        call.tokens = site.leave(site.enter(given if call.tokens is None else call.tokens))
        if len(args) > i:
            return (*args[:i], call.tokens, *args[i + 1:]), kwargs
        return args, dict(kwargs, **{self.name: call.tokens})


class Leave:
    """Forward hook of a layer (or of the child after which its leave point goes): the
    hidden states it returns through the site's leave; with ``unless_reading``, only in
    calls that do not read that stream as keys (the leave point is then after the
    cross-attention, another `Leave`)."""

    def __init__(self, site: Site, unless_reading: str | None = None):
        self.site, self.unless_reading = site, unless_reading

    def __call__(self, module: nn.Module, args: tuple, output: object) -> object:
        if self.unless_reading and stream_call(self.site.ctx, self.unless_reading).reading:
            return None
        return replace_first_output(output, self.site.leave(first_output(output)))


class Exit:
    """Forward hook at a layer's output: a stream packed only within its layers (``mode=
    "auto"``) leaves the layer one row per sample (`Site.exit_`)."""

    def __init__(self, site: Site):
        self.site = site

    def __call__(self, module: nn.Module, args: tuple, output: object) -> object:
        x = first_output(output)
        if not isinstance(x, torch.Tensor):
            return None
        out = self.site.exit_(x)
        return None if out is x else replace_first_output(output, out)


class Restore:
    """Forward hook of a stream's last layer: the hidden states back at the stream's entry
    positions (`trimkit.ops.restore_positions` with ``fill``), so the model's code after it
    sees the input's length and reads its tokens where the input put them. ``exact``: the
    output itself while the tokens still sit where they entered (the model's own values at
    padding positions, so zero trimming is the untrimmed model exactly)."""

    def __init__(self, ctx: TrimContext, stream: str, fill: str = "zeros", exact: bool = False):
        self.ctx, self.stream, self.fill, self.exact = ctx, stream, fill, exact

    def __call__(self, module: nn.Module, args: tuple, output: object) -> object:
        x = first_output(output)
        state = self.ctx.states.get(self.stream) if self.ctx.enabled else None
        if (not isinstance(x, torch.Tensor) or state is None or state.source is None
                or state.keep.shape != x.shape[:2]):
            return None
        src = state.source
        if not self.exact or x.shape[1] != src.shape[1]:
            return replace_first_output(output, restore_positions(state, x, self.fill))
        real = stream_call(self.ctx, self.stream).real
        flag = _in_place(src, real if real is not None and real.shape == src.shape else None)
        if static_shapes():  # decided in the graph, not read on the host
            x = torch.where(flag, x, restore_positions(state, x, self.fill))
        elif not bool(flag):
            x = restore_positions(state, x, self.fill)
        return replace_first_output(output, x)


class KeyBias:
    """Hooks of a module that is not trimmed but cross-attends to a recorded tower output
    (`Outputs`), handed as its argument ``tokens``: its cross-attention modules get the key
    bias on that output's dead slots as their argument ``mask``."""

    def __init__(self, ctx: TrimContext, module: nn.Module, tokens: str, mask: str):
        self.ctx, self.tokens, self.mask = ctx, tokens, mask
        self.read = ArgumentReader(module.forward, (tokens,))

    def install(self, patches: Patches, module: nn.Module, cross: Iterable[nn.Module]) -> None:
        patches.hook(module, self.before, pre=True, kwargs=True)
        patches.hook(module, self.after, kwargs=True, always=True)
        for attention in cross:
            patches.hook(attention, self.cross, pre=True, kwargs=True)

    def before(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        out = outputs(self.ctx)
        out.mask = out.key_bias(self.read(args, kwargs).get(self.tokens))

    def after(self, module: nn.Module, args: tuple, kwargs: dict, output: object) -> None:
        outputs(self.ctx).mask = None

    def cross(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        mask = outputs(self.ctx).mask
        if mask is None or kwargs.get(self.tokens) is None:
            return None
        return args, dict(kwargs, **{self.mask: mask})


class Expanding(MethodPatch):
    """A method handed a recorded output as its keyword ``tokens`` that expands it per beam
    or sample before a `KeyBias` module reads it (a decoder's ``generate``)."""

    def __init__(self, owner: nn.Module, name: str, ctx: TrimContext, tokens: str):
        super().__init__(owner, name)
        self.ctx, self.tokens = ctx, tokens

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        out = outputs(self.ctx)
        out.pending = out.find(kwargs.get(self.tokens))[1]
        try:
            return self.original(*args, **kwargs)
        finally:
            out.pending = None


# -------------------------------------------------------------------------------- towers

@dataclass
class Tower:
    """What an adapter declares about one stream's tower for `install_tower`.

    ``module`` is what the stream enters through (its ``method``, default its forward);
    ``layers`` are the stream's layers in order, one site each; the leave point goes after
    each layer, or after its child ``leave_after``. ``read`` and ``masks`` give the entry
    masks from the call's arguments (`Entry`); ``restore`` is the ``fill`` with which the
    output goes back to the entry positions after the last layer (``None``: it stays as
    trimmed), ``exact`` as in `Restore`. ``guard`` and ``name``: see `Enter`; ``name`` and
    ``path`` (the module's, in the model) also name the tower in messages."""

    stream: str
    module: nn.Module
    layers: Sequence[nn.Module]
    leave_after: str | None = None
    read: ArgumentReader | None = None
    masks: MaskReader | None = None
    method: str = "forward"
    restore: str | None = None
    exact: bool = False
    guard: Callable[[nn.Module], None] | None = None
    name: str | None = None
    path: str = ""

    def refusal(self, adapter: str, why: str) -> str:
        """The message of an error that refuses this tower, and why, before any change."""
        where = f" at {self.path!r}" if self.path else ""
        return (f"trimkit's {adapter} adapter cannot trim the {self.name}{where}: {why}. "
                f"Nothing was changed.")


def install_tower(patches: Patches, ctx: TrimContext, tower: Tower, sites: Sequence[Site],
                  entry: Entry | None = None) -> None:
    """Install ``tower``'s entry (``entry``, default an `Entry` from its ``read`` and
    ``masks``), its layers' enter and leave points (ahead of any other hook on them, so what
    they record is what the next layer receives) and the restore."""
    entry = entry or Entry(ctx, tower.stream, tower.read, tower.masks)
    entry.install(patches, tower.module, tower.method)
    for i, (site, layer) in enumerate(zip(sites, tower.layers, strict=True)):
        if tower.restore is not None and i == len(sites) - 1:  # runs after the leave
            patches.hook(layer, Restore(ctx, tower.stream, tower.restore, tower.exact),
                         prepend=True)
        after = layer if tower.leave_after is None else layer.get_submodule(tower.leave_after)
        patches.hook(after, Leave(site), prepend=True)
        patches.hook(layer, Enter(site, guard=tower.guard, tower=tower.name), pre=True,
                     kwargs=True, prepend=True)
