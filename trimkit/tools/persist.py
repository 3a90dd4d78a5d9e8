"""Saving a trimmed model and rebuilding it in another process: `save`, `load`, and the
Hugging Face style `save_pretrained` / `from_pretrained`.

A saved model is a directory (see ``docs/saving.md``):

- ``trimkit.json``: what to rebuild, readable: the file format and trimkit version, the
  adapter, the recipe with its resolved options (JSON; tuples, sets and dicts with
  non-string keys tagged, see `encode_option`), the mode, the heads removed from the weights
  (`trimkit.pruned_heads`), and a summary of the architecture (streams, layers, heads and
  widths per layer, before any head was pruned) that a model must match to load it;
- ``trimmers.safetensors``: the state dict of the sites container ``model.trimkit`` (the
  learned trimmers' parameters; empty for training-free recipes);
- ``model.safetensors``: the model's own state dict (``weights="model"``, the default), since
  fine-tuning with trimkit changes the base weights too; ``weights="trimmers"`` leaves it
  out for users who load their base weights themselves, and `save_pretrained` leaves it to
  the model's own ``save_pretrained``.

`load` takes a freshly built, untrimmed model (or a factory), checks it against the summary
before changing anything, removes the same heads, applies the same recipe with the same
options and loads the tensors: in eval, outputs equal the saved model's bit for bit, and
`trimkit.remove` gives the untrimmed model with the saved weights. Tensors that share
memory (tied weights) are written once; the others' names are kept as aliases.

The engine names no model family and no recipe here either: head pruning is redone with the
adapter's `Adapter.prune_heads`, Hugging Face models are recognised by their
``save_pretrained`` / ``from_pretrained`` methods.
"""

from __future__ import annotations

import ctypes
import errno
import hashlib
import json
import math
import os
import re
import shutil
import sys
import types
import uuid
import warnings
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ..adapter import Adapter
from ..api import SITES_ATTR, _applied, apply, find_adapter, is_applied, remove
from ..describe import ModelDescription
from ..heads import (
    head_key,
    head_key_name,
    heads_to_keep,
    locate_heads,
    pruned_heads,
    record_pruned,
)
from ..registry import ADAPTERS, RECIPES, _load_builtins
from ..version import __version__
from .training import unwrap

__all__ = [
    "FORMAT",
    "MIGRATIONS",
    "ArchitectureMismatchError",
    "SaveFormatError",
    "architecture",
    "decode_option",
    "encode_option",
    "from_pretrained",
    "load",
    "read_meta",
    "save",
    "save_pretrained",
]

#: the file format this trimkit writes; it reads this one and migrates older ones
FORMAT = 2
META_FILE = "trimkit.json"
TRIMMERS_FILE = "trimmers.safetensors"
MODEL_FILE = "model.safetensors"
#: the sharded checkpoint index a Hugging Face ``save_pretrained`` may write instead
INDEX_FILE = "model.safetensors.index.json"
WEIGHTS = ("model", "trimmers")
#: the field of ``trimkit.json`` with the sha256 of every tensor file (format 2 on)
CHECKSUMS = "sha256"
#: tensor files a save writes or replaces (trimkit's, and Hugging Face checkpoints' weights
#: and shard indices): an earlier save's are never carried into a new one
_TENSOR_FILE = re.compile(r"(trimmers\.safetensors|(model|pytorch_model)(-\d+-of-\d+)?"
                          r"\.(safetensors|bin)(\.index\.json)?)")
_TAGS = ("__tuple__", "__set__", "__dict__", "__float__")


class SaveFormatError(ValueError):
    """A saved directory cannot be read by this trimkit (missing or newer file format, a
    recipe or option that no longer exists, tensors that do not fit)."""


class ArchitectureMismatchError(ValueError):
    """The model given to `load` is not the architecture the file was saved from (raised
    before anything is changed)."""


# ---------------------------------------------------------------------------- options


class _NotJSON(TypeError):
    pass


def encode_option(value: Any) -> Any:
    """``value`` as JSON data that `decode_option` turns back into an equal value: JSON
    types as they are; tuples, sets, dicts with non-string keys and non-finite floats as
    one-key tagged objects (``{"__tuple__": [...]}``). Anything else (a function, a data
    loader, a tensor) is a `TypeError`."""
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else {"__float__": repr(value)}
    if isinstance(value, list):
        return [encode_option(v) for v in value]
    if isinstance(value, tuple):
        return {"__tuple__": [encode_option(v) for v in value]}
    if isinstance(value, (set, frozenset)):
        items = [encode_option(v) for v in value]
        try:
            items.sort()
        except TypeError:
            items.sort(key=repr)
        return {"__set__": items}
    if isinstance(value, Mapping):
        if all(isinstance(k, str) for k in value) and not (len(value) == 1
                                                           and next(iter(value)) in _TAGS):
            return {k: encode_option(v) for k, v in value.items()}
        return {"__dict__": [[encode_option(k), encode_option(v)] for k, v in value.items()]}
    raise _NotJSON(_kind(value))


def _kind(value: Any) -> str:
    """What ``value`` is, for an error message: "a function", "a torch.Tensor", …"""
    if isinstance(value, (types.FunctionType, types.BuiltinFunctionType, types.MethodType)):
        return "a function"
    cls = type(value)
    if cls.__module__ == "builtins":
        return f"a {cls.__qualname__}"
    return f"a {cls.__module__}.{cls.__qualname__}"


def decode_option(data: Any) -> Any:
    """The value `encode_option` wrote."""
    if isinstance(data, list):
        return [decode_option(v) for v in data]
    if not isinstance(data, dict):
        return data
    if len(data) == 1:
        (tag, inner), = data.items()
        if tag == "__tuple__":
            return tuple(decode_option(v) for v in inner)
        if tag == "__set__":
            return {decode_option(v) for v in inner}
        if tag == "__dict__":
            return {_hashable(decode_option(k)): decode_option(v) for k, v in inner}
        if tag == "__float__":
            return float(inner)
    return {k: decode_option(v) for k, v in data.items()}


def _hashable(key: Any) -> Any:
    return tuple(key) if isinstance(key, list) else key


def _encode_options(recipe: str, options: dict[str, Any], omit: Iterable[str]
                    ) -> tuple[dict[str, Any], list[str], list[str]]:
    """The options as JSON, the names left out (given in ``omit``: `load` needs them again)
    and notes for the file."""
    rec = RECIPES[recipe]
    omit = set(omit)
    unknown = sorted(omit - set(options))
    if unknown:
        raise ValueError(f"omit names {unknown[0]!r}, which is not an option of recipe "
                         f"{recipe!r} (options: {', '.join(sorted(options))})")
    out: dict[str, Any] = {}
    omitted, notes = [], []
    for name, value in options.items():
        if name in omit:
            omitted.append(name)
            notes.append(f"option {name!r} was not saved (omit=): pass it to trimkit.load "
                         f"as options={{{name!r}: ...}}")
            continue
        try:
            out[name] = encode_option(value)
        except _NotJSON as err:
            default = rec.options[name].default if name in rec.options else None
            if value is default:  # resolved again from the recipe's default on load
                notes.append(f"option {name!r} ({err}) was left at its default and is not "
                             f"written")
                continue
            raise TypeError(
                f"option {name!r} of recipe {recipe!r} is {err}, which cannot be written to "
                f"JSON, and the recipe needs it to rebuild the trimmed model. Save with "
                f"trimkit.save(..., omit=[{name!r}]) and pass it again when loading: "
                f"trimkit.load(..., options={{{name!r}: ...}})") from None
    return out, omitted, notes


# ---------------------------------------------------------------------------- architecture


def architecture(desc: ModelDescription, pruned: Mapping[str, list[int]] | None = None
                 ) -> dict[str, Any]:
    """The summary of a description that a model must match to load a file: per stream,
    each layer's width and head counts (self- and cross-attention; ``None`` without one),
    with the heads ``pruned`` (`trimkit.pruned_heads`) counted back in, i.e. as the model
    was built."""
    pruned = pruned or {}
    streams = {}
    for name, stream in desc.streams.items():
        dims, heads, cross = [], [], []
        for i, layer in enumerate(stream.layers):
            dims.append(layer.dim)
            heads.append(layer.num_heads + len(pruned.get(head_key_name((name, i, "self")), ())))
            if layer.cross_attention is None:
                cross.append(None)
            else:
                n = layer.cross_num_heads or layer.num_heads
                cross.append(n + len(pruned.get(head_key_name((name, i, "cross")), ())))
        streams[name] = {"layers": len(stream.layers), "dims": dims, "heads": heads,
                         "cross_heads": cross}
    return {"family": desc.family, "streams": streams}


def _mismatch(model: dict[str, Any], saved: dict[str, Any]) -> str | None:
    """The first difference between a model's `architecture` and the file's, in words."""
    if model["family"] != saved["family"]:
        return f"the model is a {model['family']!r} model, the file says {saved['family']!r}"
    mine, theirs = model["streams"], saved["streams"]
    if sorted(mine) != sorted(theirs):
        return f"the model has streams {sorted(mine)}, the file says {sorted(theirs)}"
    for name, s in theirs.items():
        m = mine[name]
        if m["layers"] != s["layers"]:
            return f"stream {name!r} has {m['layers']} layers, the file says {s['layers']}"
        for i in range(s["layers"]):
            at = f"stream {name!r} layer {i}"
            if m["dims"][i] != s["dims"][i]:
                return f"{at} has width {m['dims'][i]}, the file says {s['dims'][i]}"
            if m["heads"][i] != s["heads"][i]:
                return f"{at} has {m['heads'][i]} heads, the file says {s['heads'][i]}"
            a, b = m["cross_heads"][i], s["cross_heads"][i]
            if (a is None) != (b is None):
                return (f"{at} has a cross-attention, the file says none" if b is None
                        else f"{at} has no cross-attention, the file says it has one")
            if a != b:
                return f"{at} has {a} cross-attention heads, the file says {b}"
    return None


# ---------------------------------------------------------------------------- tensors


def _storage_key(t: torch.Tensor) -> tuple:
    return (t.device, t.untyped_storage().data_ptr())


def _write_tensors(state: Mapping[str, Any], file: Path) -> dict[str, str]:
    """Write a state dict with safetensors; a tensor that is the same view of the same memory
    as an earlier one (tied weights) is written once, and ``{its name: the written name}``
    returned. Other tensors that share memory are written as copies."""
    out: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    seen: dict[tuple, list[tuple[str, torch.Tensor]]] = {}
    for name, t in state.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"state {name!r} is a {type(t).__name__}, not a tensor: safetensors "
                            f"stores tensors only")
        t = t.detach()
        if t.device.type == "meta":
            raise ValueError(f"{name!r} is on the meta device: it holds no values to save")
        same = seen.setdefault(_storage_key(t), [])
        twin = next((n for n, o in same if o.dtype == t.dtype and o.shape == t.shape
                     and o.stride() == t.stride()
                     and o.storage_offset() == t.storage_offset()), None)
        if twin is not None:
            aliases[name] = twin
            continue
        shared = bool(same) or t.untyped_storage().nbytes() != t.numel() * t.element_size()
        same.append((name, t))
        out[name] = t.contiguous().clone() if shared or not t.is_contiguous() else t
    save_file(out, str(file))
    return aliases


def _read_tensors(file: Path, aliases: Mapping[str, str]) -> dict[str, torch.Tensor]:
    if not file.is_file():
        raise SaveFormatError(f"{file} is missing")
    state = load_file(str(file))
    for name, target in aliases.items():
        if target not in state:
            raise SaveFormatError(f"{file}: {name!r} is saved as {target!r}, which is missing")
        state[name] = state[target]
    return state


def _read_pretrained(directory: Path) -> dict[str, torch.Tensor]:
    """The tensors of a Hugging Face style checkpoint: ``model.safetensors`` or the shards
    its ``model.safetensors.index.json`` lists."""
    if (directory / MODEL_FILE).is_file():
        return load_file(str(directory / MODEL_FILE))
    index = directory / INDEX_FILE
    if not index.is_file():
        raise SaveFormatError(f"{directory} has neither {MODEL_FILE} nor {INDEX_FILE}: the "
                              f"model's weights are missing")
    state: dict[str, torch.Tensor] = {}
    for shard in sorted(set(json.loads(index.read_text())["weight_map"].values())):
        state.update(load_file(str(directory / shard)))
    return state


def _check_state(module: nn.Module, state: Mapping[str, torch.Tensor], what: str,
                 strict: bool, tied_ok: bool = False) -> None:
    """Raise `SaveFormatError` unless ``state`` loads into ``module`` without error (keys
    when ``strict``, shapes always), so that loading never stops half way. With ``tied_ok``
    a missing key is fine where the module's tensor shares memory with a loaded one (a
    checkpoint that writes tied weights once)."""
    own = module.state_dict()
    problems = []
    if strict:
        loaded = {_storage_key(own[k]) for k in state if k in own}
        missing = [k for k in own if k not in state
                   and not (tied_ok and _storage_key(own[k]) in loaded)]
        unexpected = [k for k in state if k not in own]
        if missing:
            problems.append(f"missing {_few(missing)}")
        if unexpected:
            problems.append(f"unexpected {_few(unexpected)}")
    bad = [f"{k} ({tuple(v.shape)} in the file, {tuple(own[k].shape)} in the model)"
           for k, v in state.items() if k in own and v.shape != own[k].shape]
    if bad:
        problems.append(f"shape mismatch for {_few(bad)}")
    if problems:
        raise SaveFormatError(f"{what} do not fit this model: {'; '.join(problems)}")
    casts = sorted({(str(v.dtype), str(own[k].dtype)) for k, v in state.items()
                    if k in own and v.dtype != own[k].dtype})
    if casts:
        warnings.warn(f"{what}: tensors saved as {casts[0][0]} are loaded into "
                      f"{casts[0][1]} ones; build the model in the saved dtype for the same "
                      f"outputs", stacklevel=4)


def _few(names: list[str], n: int = 3) -> str:
    more = f" and {len(names) - n} more" if len(names) > n else ""
    return ", ".join(names[:n]) + more


# ---------------------------------------------------------------------------- save


def save(model: nn.Module, path: str | os.PathLike, *, weights: str = "model",
         omit: Iterable[str] = ()) -> Path:
    """Write what rebuilds the trimmed ``model`` into the directory ``path`` (created if
    needed) and return it.

    ``weights="model"`` (default) also writes the model's own weights (fine-tuning changes
    them); ``"trimmers"`` writes only the trimmers', for base weights loaded some other way.
    ``omit`` names recipe options not to write (values that cannot be JSON, e.g. a
    function): `load` then needs them again. A model trimmed only by head pruning, or not
    at all, is saved too (its recipe is ``null``). A model wrapped by DDP or
    ``torch.compile`` is saved as the model inside; in a multi-process run, save from the
    main process only.
    """
    if weights not in WEIGHTS:
        raise ValueError(f"weights must be one of {WEIGHTS}, got {weights!r}")
    model = unwrap(model)
    return _atomic(Path(path), lambda tmp: _save(model, tmp, weights, omit, __version__))


def _save(model: nn.Module, path: Path, weights: str, omit: Iterable[str],
          version: str) -> Path:
    _load_builtins()
    pruned = pruned_heads(model)
    notes = []
    if pruned:
        notes.append("heads removed from the weights are saved as their original indices "
                     "(pruned_heads); how they were chosen is not needed to rebuild the model "
                     "and is not kept")
    if is_applied(model):
        applied = _applied(model)
        desc, adapter = applied.description, applied.adapter
        options, omitted, more = _encode_options(applied.recipe, applied.options, omit)
        notes += more
        recipe: dict[str, Any] | None = {
            "name": applied.recipe, "options": options, "omitted": omitted,
            "mode": applied.ctx.mode, "track_source": bool(applied.ctx.track_source)}
        trimmers = model.get_submodule(SITES_ATTR).state_dict()
    else:
        if list(omit):
            raise ValueError("omit names recipe options, but this model has no recipe applied")
        found = find_adapter(model)
        desc, adapter, recipe, trimmers = found.describe(model), found.name, None, {}
    if adapter not in ADAPTERS:
        notes.append(f"the adapter {adapter!r} is not registered: pass it to trimkit.load "
                     f"as adapter=")
    meta: dict[str, Any] = {
        "format": FORMAT,
        "trimkit_version": version,
        "torch_version": torch.__version__,
        "adapter": adapter,
        "recipe": recipe,
        "pruned_heads": pruned,
        "weights": weights,
        "trimmers": {"file": TRIMMERS_FILE,
                     "aliases": _write_tensors(trimmers, path / TRIMMERS_FILE)},
    }
    if weights == "model":  # "pretrained": the model's own save_pretrained wrote them
        meta["model"] = {"file": MODEL_FILE,
                         "aliases": _write_tensors(_base_state(model), path / MODEL_FILE)}
    meta["architecture"] = architecture(desc, pruned)
    meta[CHECKSUMS] = {f.name: _sha256(f) for f in sorted(path.iterdir())
                       if _TENSOR_FILE.fullmatch(f.name) and f.is_file()}
    meta["notes"] = notes
    _write_text(path / META_FILE, _dumps(meta) + "\n")  # last: without it, no save
    return path


def _write_text(file: Path, text: str) -> None:
    """Write ``text`` to ``file`` (one place, so tests can make it fail like a full disk)."""
    file.write_text(text)


def _sha256(file: Path) -> str:
    """The hex sha256 of a file's bytes, read in chunks."""
    digest = hashlib.sha256()
    with open(file, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _atomic(target: Path, write: Callable[[Path], Any]) -> Path:
    """Run ``write(folder)`` on a new folder beside ``target``, then swap it in for
    ``target`` in one step and return ``target``: an error or a crash at any point leaves
    either the old directory or the new one at ``target``, whole.

    Entries of an old ``target`` that the new save does not write (a tokenizer, notes, a
    folder of checkpoints) are kept, as hard links where the file system allows; an earlier
    save's tensor files are not. Where the system cannot swap two directories atomically
    (``renameat2`` on Linux), the old one is renamed aside for the instant the new one is
    renamed in."""
    real = Path(os.path.realpath(target))  # a link to a directory: save where it points
    if real.exists() and not real.is_dir():
        raise NotADirectoryError(f"{target} exists and is not a directory")
    real.parent.mkdir(parents=True, exist_ok=True)
    staging = real.parent / f".{real.name}.trimkit-{uuid.uuid4().hex[:12]}"
    staging.mkdir()
    try:
        if real.exists():
            shutil.copymode(real, staging)
        write(staging)
        if real.exists():
            _carry_over(real, staging)
        _fsync(staging)
        cwd = os.getcwd()
        if real.exists():
            if _exchange(staging, real):  # staging now holds the old directory
                shutil.rmtree(staging, ignore_errors=True)
            else:
                old = real.parent / f".{real.name}.trimkit-old-{uuid.uuid4().hex[:12]}"
                os.rename(real, old)
                try:
                    os.rename(staging, real)
                except BaseException:
                    os.rename(old, real)
                    raise
                shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(staging, real)
        _fsync(real.parent, files=False)
        if cwd == str(real) or cwd.startswith(str(real) + os.sep):
            try:  # the process was inside the old directory: enter the new one
                os.chdir(cwd)
            except OSError:
                pass
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return target


def _carry_over(old: Path, new: Path) -> None:
    """Link (or copy) into ``new`` the entries of ``old`` that ``new`` lacks, except tensor
    files of an earlier save."""
    def link(src: str, dst: str) -> None:
        try:
            os.link(src, dst)
        except OSError:
            shutil.copy2(src, dst)

    for entry in old.iterdir():
        dest = new / entry.name
        if dest.exists() or dest.is_symlink() or _TENSOR_FILE.fullmatch(entry.name) \
                or entry.name in (META_FILE, META_FILE + ".tmp"):
            continue
        if entry.is_symlink():
            os.symlink(os.readlink(entry), dest)
        elif entry.is_dir():
            shutil.copytree(entry, dest, symlinks=True, copy_function=link)
        else:
            link(str(entry), str(dest))


def _fsync(path: Path, files: bool = True) -> None:
    """Flush ``path``'s files (with ``files``) and the directory itself to disk, so a power
    loss after the swap cannot leave a directory of empty files."""
    if files:
        for f in path.iterdir():
            if f.is_file() and not f.is_symlink():
                with open(f, "rb") as handle:
                    os.fsync(handle.fileno())
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # a system that cannot open directories (Windows)
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically (Linux ``renameat2(RENAME_EXCHANGE)``); ``False`` where the
    system or the file system cannot."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p,
                          ctypes.c_uint]
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.EPERM):
        return False
    raise OSError(err, os.strerror(err), str(b))


def _dumps(data: Any, indent: str = "") -> str:
    """JSON, indented, with lists of plain values on one line (per-layer head counts)."""
    inner = indent + "  "
    if isinstance(data, dict) and data:
        items = [f"{inner}{json.dumps(k)}: {_dumps(v, inner)}" for k, v in data.items()]
        return "{\n" + ",\n".join(items) + f"\n{indent}}}"
    if isinstance(data, list) and any(isinstance(v, (dict, list)) for v in data):
        return "[\n" + ",\n".join(inner + _dumps(v, inner) for v in data) + f"\n{indent}]"
    return json.dumps(data)


def _base_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's state dict without trimkit's sites (those go to the trimmers' file)."""
    prefix = SITES_ATTR + "."
    return {k: v for k, v in model.state_dict().items() if not k.startswith(prefix)}


# ---------------------------------------------------------------------------- read


def _migrate_0(meta: dict[str, Any], path: Path) -> dict[str, Any]:
    """Format 0 to 1. Format 0 is the layout before the architecture summary, the
    ``weights`` field and the tensor index were added (the recipe's name, options and mode at
    the top level). No release wrote it; it keeps the migration path exercised (the tests
    write such a file by hand)."""
    out = dict(meta)
    name = out.pop("recipe", None)
    recipe = None
    if name is not None:
        recipe = {"name": name, "options": out.pop("options", {}), "omitted": [],
                  "mode": out.pop("mode", "auto"), "track_source": False}
    out["recipe"] = recipe
    out.setdefault("pruned_heads", {})
    out["weights"] = "model" if (path / MODEL_FILE).is_file() else "trimmers"
    out.setdefault("trimmers", {"file": TRIMMERS_FILE, "aliases": {}})
    if out["weights"] == "model":
        out.setdefault("model", {"file": MODEL_FILE, "aliases": {}})
    out["architecture"] = None  # not recorded: checked by the tensors' shapes only
    out.setdefault("notes", []).append("migrated from format 0: the file has no architecture "
                                       "summary, so only the tensors' shapes are checked")
    out["format"] = 1
    return out


def _migrate_1(meta: dict[str, Any], path: Path) -> dict[str, Any]:
    """Format 1 to 2: format 2 adds the sha256 of every tensor file (``"sha256"``); a
    format-1 file has none, so its tensors load unchecked."""
    out = dict(meta)
    out[CHECKSUMS] = {}
    out["notes"] = [*out.get("notes", []), "migrated from format 1: the file has no "
                    "checksums, so its tensor files are not verified"]
    out["format"] = 2
    return out


#: format n -> the function that turns a format-n file into format n + 1
MIGRATIONS: dict[int, Callable[[dict[str, Any], Path], dict[str, Any]]] = {
    0: _migrate_0, 1: _migrate_1}


def read_meta(path: str | os.PathLike) -> dict[str, Any]:
    """``trimkit.json`` of a saved directory, migrated to the current format; a
    `SaveFormatError` says why a file cannot be read (not a trimkit directory, a newer
    format, an older one that cannot be migrated)."""
    path = Path(path)
    file = path / META_FILE
    if not file.is_file():
        raise SaveFormatError(f"{path} holds no {META_FILE}: it was not written by "
                              f"trimkit.save / trimkit.save_pretrained (or the save did not "
                              f"finish)")
    try:
        meta = json.loads(file.read_text())
    except json.JSONDecodeError as err:
        raise SaveFormatError(f"{file} is not valid JSON: {err}") from None
    fmt = meta.get("format") if isinstance(meta, dict) else None
    written = meta.get("trimkit_version", "an unknown version") if isinstance(meta, dict) \
        else "an unknown version"
    if isinstance(fmt, bool) or not isinstance(fmt, int):
        raise SaveFormatError(f"{file} has no integer 'format' field: not a trimkit file")
    if fmt > FORMAT:
        raise SaveFormatError(f"{file} has file format {fmt}, written by trimkit {written}; "
                              f"this trimkit ({__version__}) reads formats up to {FORMAT}: "
                              f"upgrade trimkit to load it")
    while fmt < FORMAT:
        step = MIGRATIONS.get(fmt)
        if step is None:
            raise SaveFormatError(f"{file} has file format {fmt} (trimkit {written}), which "
                                  f"this trimkit ({__version__}) cannot read: no migration "
                                  f"from format {fmt} exists; load it with the trimkit that "
                                  f"wrote it and save it again with a newer one")
        try:
            meta = step(meta, path)
        except (KeyError, TypeError, ValueError) as err:
            raise SaveFormatError(f"{file}: cannot migrate file format {fmt} (trimkit "
                                  f"{written}) to {fmt + 1}: {err}") from None
        fmt = meta["format"]
    _check_meta(meta, file)
    return meta


def _check_meta(meta: dict[str, Any], file: Path) -> None:
    """A `SaveFormatError` naming the first field a current-format file lacks or mangles."""
    def need(ok: bool, what: str) -> None:
        if not ok:
            raise SaveFormatError(f"{file}: {what}; the file is damaged or was edited by hand")

    need(isinstance(meta.get("adapter"), str), "'adapter' must name an adapter")
    need(meta.get("weights") in (*WEIGHTS, "pretrained"),
         f"'weights' must be one of {(*WEIGHTS, 'pretrained')}")
    recipe = meta.get("recipe")
    need(recipe is None or isinstance(recipe, dict) and isinstance(recipe.get("name"), str)
         and isinstance(recipe.get("options"), dict) and isinstance(recipe.get("mode"), str),
         "'recipe' must be null or hold 'name', 'options' and 'mode'")
    omitted = (recipe or {}).get("omitted", [])
    need(isinstance(omitted, list) and all(isinstance(k, str) for k in omitted),
         f"'recipe.omitted' must be a list of option names, got {omitted!r}")
    pruned = meta.get("pruned_heads", {})
    need(isinstance(pruned, dict), "'pruned_heads' must be an object")
    for name, idx in pruned.items():
        need(isinstance(idx, list) and all(_is_int(i) for i in idx),
             f"'pruned_heads.{name}' must be a list of head indices, got {idx!r}")
    for part in ("trimmers", "model") if meta["weights"] == "model" else ("trimmers",):
        entry = meta.get(part)
        need(isinstance(entry, dict) and isinstance(entry.get("file"), str)
             and isinstance(entry.get("aliases", {}), dict)
             and all(isinstance(v, str) for v in entry.get("aliases", {}).values()),
             f"{part!r} must hold 'file' and 'aliases' (names to names)")
    arch = meta.get("architecture")
    need(arch is None or isinstance(arch, dict) and isinstance(arch.get("streams"), dict)
         and isinstance(arch.get("family"), str),
         "'architecture' must be null or hold 'family' and 'streams'")
    for name, stream in (arch or {}).get("streams", {}).items():
        at = f"'architecture.streams.{name}"
        need(isinstance(stream, dict) and _is_int(stream.get("layers"))
             and stream["layers"] >= 0, f"{at}.layers' must be a number of layers")
        n = stream["layers"]
        for field_, none_ok in (("dims", False), ("heads", False), ("cross_heads", True)):
            got = stream.get(field_)
            need(isinstance(got, list) and len(got) == n
                 and all(_is_int(v) or none_ok and v is None for v in got),
                 f"{at}.{field_}' must be a list of {n} "
                 f"{'ints or nulls' if none_ok else 'ints'}, one per layer, got {got!r}")
    sums = meta.get(CHECKSUMS)
    need(isinstance(sums, dict) and all(
        isinstance(k, str) and isinstance(v, str) and re.fullmatch(r"[0-9a-f]{64}", v)
        for k, v in sums.items()),
         f"'{CHECKSUMS}' must map file names to hex sha256 digests")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _verify(path: Path, meta: dict[str, Any]) -> None:
    """A `SaveFormatError` naming the first tensor file in ``path`` that is missing or
    whose sha256 differs from the one ``trimkit.json`` records."""
    for name, digest in meta[CHECKSUMS].items():
        file = path / name
        if not file.is_file():
            raise SaveFormatError(f"{file} is missing (trimkit.json records its checksum)")
        got = _sha256(file)
        if got != digest:
            raise SaveFormatError(
                f"{file} is corrupted: its sha256 is {got[:16]}…, trimkit.json records "
                f"{digest[:16]}… for it (it changed after it was saved: a bad copy, a disk "
                f"error, an edit). Save the model again; trimkit.load(..., verify=False) "
                f"skips the check")


# ---------------------------------------------------------------------------- load


def load(model_or_factory: nn.Module | Callable[[], nn.Module], path: str | os.PathLike, *,
         strict: bool = True, adapter: str | Adapter | None = None,
         options: Mapping[str, Any] | None = None, verify: bool = True) -> nn.Module:
    """Rebuild a saved trimmed model from a freshly built, untrimmed one (or a zero-argument
    factory that builds it) and return it.

    The model's architecture is checked against the file first (`ArchitectureMismatchError`
    names the first difference; nothing is changed), then the saved heads are removed, the
    recipe applied with its saved options (``options`` supplies the ones saved with
    ``omit=``, or overrides), and the trimmers' and the model's weights loaded (the model's
    when the file has them: ``weights="trimmers"`` files keep the model's own). ``strict``
    requires the tensors' names to match the model's exactly, as in ``load_state_dict``;
    shapes must match always. Any error leaves the model as it was given. ``adapter``
    overrides the saved adapter (needed when it was an unregistered instance). ``verify``
    checks every tensor file against the sha256 in ``trimkit.json`` first (a
    `SaveFormatError` names a corrupted file); ``False`` skips that for speed.
    """
    path = Path(path)
    meta = read_meta(path)
    if verify:
        _verify(path, meta)
    model = model_or_factory if isinstance(model_or_factory, nn.Module) else model_or_factory()
    if not isinstance(model, nn.Module):
        raise TypeError(f"the factory must return an nn.Module, got {type(model).__name__}")
    return _load_into(model, path, meta, strict, adapter, options, base=meta["weights"])


def _resolve_adapter(model: nn.Module, meta: dict[str, Any],
                     adapter: str | Adapter | None) -> Adapter:
    _load_builtins()
    if adapter is not None:
        return find_adapter(model, adapter)
    name = meta["adapter"]
    if name not in ADAPTERS:
        raise SaveFormatError(f"the file was saved with the adapter {name!r}, which is not "
                              f"registered: import the package that provides it, or pass "
                              f"trimkit.load(..., adapter=...)")
    found = ADAPTERS[name]
    if not found.detect(model):
        raise ArchitectureMismatchError(
            f"the file was saved from a model of the {name!r} adapter, which does not "
            f"recognise this {type(model).__qualname__} (it is a "
            f"{_adapter_name(model)!r} model); nothing was changed")
    return found


def _adapter_name(model: nn.Module) -> str:
    try:
        return find_adapter(model).name
    except TypeError:
        return "unknown"


def _recipe_options(meta: dict[str, Any], given: Mapping[str, Any] | None,
                    written: str) -> dict[str, Any]:
    """The keyword options to re-apply the saved recipe with, checked against the recipe
    as this trimkit has it."""
    recipe = meta["recipe"]
    name = recipe["name"]
    if name not in RECIPES:
        raise SaveFormatError(f"the file's recipe {name!r} is not registered in this trimkit "
                              f"({__version__}; the file is from {written}): import the "
                              f"package that provides it")
    known = RECIPES[name].options
    options = {k: decode_option(v) for k, v in recipe["options"].items()}
    gone = sorted(set(options) - set(known))
    if gone:
        raise SaveFormatError(f"the file sets option {gone[0]!r} of recipe {name!r}, which "
                              f"this trimkit ({__version__}) does not have (the file is from "
                              f"trimkit {written}); the recipe's options are: "
                              f"{', '.join(sorted(known))}")
    given = dict(given or {})
    unknown = sorted(set(given) - set(known))
    if unknown:
        raise ValueError(f"options names {unknown[0]!r}, which is not an option of recipe "
                         f"{name!r}")
    missing = [k for k in recipe.get("omitted", []) if k not in given]
    if missing:
        raise ValueError(f"the file was saved without option {missing[0]!r} of recipe "
                         f"{name!r} (omit=): pass it again, "
                         f"trimkit.load(..., options={{{missing[0]!r}: ...}})")
    options.update(given)
    return options


def _load_into(model: nn.Module, path: Path, meta: dict[str, Any], strict: bool,
               adapter: str | Adapter | None, options: Mapping[str, Any] | None,
               base: str) -> nn.Module:
    """`load` on a built model; ``base`` says where its own weights come from: ``"model"``
    (trimkit's file), ``"pretrained"`` (a Hugging Face checkpoint in ``path``) or
    ``"trimmers"`` / ``"loaded"`` (nowhere: the model has them)."""
    written = meta.get("trimkit_version", "an unknown version")
    if is_applied(model):
        raise ValueError(f"this model already has recipe {_applied(model).recipe!r} applied: "
                         f"load into a freshly built model (or trimkit.remove it first)")
    found = _resolve_adapter(model, meta, adapter)
    desc = found.describe(model)
    saved_pruned = {k: list(v) for k, v in meta.get("pruned_heads", {}).items()}
    have = pruned_heads(model)
    if have and have != saved_pruned:
        raise ArchitectureMismatchError(f"this model already has heads pruned ({have}), the "
                                        f"file says {saved_pruned or 'none'}: load into a "
                                        f"freshly built model; nothing was changed")
    if meta.get("architecture") is not None:
        why = _mismatch(architecture(desc, have), meta["architecture"])
        if why:
            raise ArchitectureMismatchError(f"cannot load {path} into this model: {why}; "
                                            f"nothing was changed")
    recipe = meta["recipe"]
    if recipe is None and options:
        raise ValueError("options are a recipe's, but the file applies no recipe")
    kw = _recipe_options(meta, options, written) if recipe is not None else {}
    # read every tensor before changing anything
    trimmers = _read_tensors(path / meta["trimmers"]["file"],
                             meta["trimmers"].get("aliases", {}))
    weights = None
    if base == "model":
        weights = _read_tensors(path / meta["model"]["file"], meta["model"].get("aliases", {}))
    elif base == "pretrained":
        weights = _read_pretrained(path)

    snapshot = _snapshot(model)
    try:
        if saved_pruned and not have:
            _prune(model, found, desc, saved_pruned, path / META_FILE)
        if recipe is not None:
            apply(model, recipe["name"], mode=recipe["mode"],
                  track_source=bool(recipe.get("track_source", False)), adapter=found, **kw)
        sites = model.get_submodule(SITES_ATTR) if recipe is not None else nn.Module()
        _check_state(sites, trimmers, f"the trimmers in {meta['trimmers']['file']} (written "
                     f"by trimkit {written})", strict=True)
        if weights is not None:  # the model's state dict holds the sites' as "trimkit.*"
            weights.update({f"{SITES_ATTR}.{k}": v for k, v in trimmers.items()})
            _check_state(model, weights, f"the model weights in {path}", strict,
                         tied_ok=base == "pretrained")
            model.load_state_dict(weights, strict=False)
        else:
            sites.load_state_dict(trimmers, strict=True)
    except Exception as err:
        if is_applied(model):
            remove(model)
        _restore(snapshot)
        if isinstance(err, (SaveFormatError, ArchitectureMismatchError)):
            raise type(err)(f"{err}; nothing was changed") from None
        raise
    return model


def _prune(model: nn.Module, adapter: Adapter, desc: ModelDescription,
           saved: Mapping[str, list[int]], file: Path) -> None:
    """Remove the saved original heads from a freshly built model, as head pruning did
    (``file``: the ``trimkit.json`` they come from, for errors)."""
    try:
        keys = {head_key(name, desc): list(idx) for name, idx in saved.items()}
        heads = locate_heads(model, desc, keys)
        keep = {k: v for k, v in heads_to_keep(heads, keys).items() if keys[k]}
    except ValueError as err:
        raise ArchitectureMismatchError(f"{file}: 'pruned_heads' do not fit this model: "
                                        f"{err}") from None
    adapter.prune_heads(model, desc, keep)
    record_pruned(model, heads, keep)


def _snapshot(model: nn.Module) -> list[tuple[nn.Module, dict, dict]]:
    """What every module holds (attributes, children, parameters), to undo a half-done
    load: head pruning swaps modules and sets attributes."""
    return [(m, dict(m.__dict__), {k: dict(getattr(m, k)) for k in _OWNED})
            for m in model.modules()]


_OWNED = ("_modules", "_parameters", "_buffers")


def _restore(snapshot: list[tuple[nn.Module, dict, dict]]) -> None:
    for m, attrs, owned in snapshot:
        m.__dict__.clear()
        m.__dict__.update(attrs)
        for k, items in owned.items():
            getattr(m, k).clear()
            getattr(m, k).update(items)


# ---------------------------------------------------------------------------- HF style


def save_pretrained(model: nn.Module, directory: str | os.PathLike, *,
                    omit: Iterable[str] = (), **kwargs: Any) -> Path:
    """Hugging Face style: the model's own ``save_pretrained(directory, **kwargs)`` (config
    and weights, without trimkit's sites), then trimkit's files beside them. Load it back
    with `from_pretrained` (or `load`)."""
    model = unwrap(model)
    if not callable(getattr(model, "save_pretrained", None)):
        raise TypeError(f"{type(model).__qualname__} has no save_pretrained method: use "
                        f"trimkit.save(model, path)")
    def write(folder: Path) -> None:
        model.save_pretrained(folder, state_dict=_base_state(model), **kwargs)
        _save(model, folder, "pretrained", omit, __version__)

    return _atomic(Path(directory), write)


def from_pretrained(model_class_or_factory: Any, directory: str | os.PathLike, *,
                    strict: bool = True, adapter: str | Adapter | None = None,
                    options: Mapping[str, Any] | None = None, verify: bool = True,
                    **kwargs: Any) -> nn.Module:
    """Load what `save_pretrained` wrote. A class with ``from_pretrained`` (a Hugging Face
    model class) loads itself: ``cls.from_pretrained(directory, **kwargs)``, or, for a model
    with heads removed (whose config still counts every head), ``cls(config)`` built at full
    size from ``cls.config_class.from_pretrained(directory, **kwargs)``, pruned, and given
    the checkpoint's weights. A zero-argument factory builds the full-size model itself
    and gets the checkpoint's weights. Then trimkit's files are applied as by `load`
    (``verify``: the tensor files' checksums first, as there)."""
    directory = Path(directory)
    meta = read_meta(directory)
    if verify:
        _verify(directory, meta)
    if meta["weights"] != "pretrained":
        raise SaveFormatError(f"{directory} was written by trimkit.save, not "
                              f"trimkit.save_pretrained: use trimkit.load")
    load_itself = isinstance(model_class_or_factory, type) and callable(
        getattr(model_class_or_factory, "from_pretrained", None))
    if load_itself and not meta.get("pruned_heads"):
        model = model_class_or_factory.from_pretrained(directory, **kwargs)
        base = "loaded"
    else:
        if load_itself:
            cls = model_class_or_factory
            model = cls(cls.config_class.from_pretrained(directory, **kwargs)).eval()
        elif kwargs:
            raise TypeError(f"keyword arguments {sorted(kwargs)} go to a model class's "
                            f"from_pretrained; a factory takes none")
        else:
            model = model_class_or_factory()
        base = "pretrained"
    return _load_into(model, directory, meta, strict, adapter, options, base=base)
