"""ONNX export of a trimmed model (docs/deploy.md).

`export_onnx` exports a trimmed model in eval with compacted execution, so the graph really
computes fewer tokens. It tries the ``torch.export``-based exporter (``dynamo=True``) first
and falls back to the TorchScript one (``dynamo=False``).

Only fixed-count trimming exports: every layer's token counts must follow from the input
shapes and the padding (a merge count per layer, pruning or merging ratios, static head
pruning, a learned trimmer's fixed budget). Counts a learned threshold decides per
instance, and heads gated per instance, are data-dependent shapes that an ONNX graph cannot
hold; `export_onnx` says so before trying. A padded stream (an attention mask was given)
has per-sample counts too, but they follow from the mask: while exporting
(`trimkit.ops.static_shapes`) such a stream is trimmed in masked form and never compacted,
which gives the same outputs for any padding pattern; the streams without padding are
compacted.

The ops the trimmed forward uses while exporting are ones ONNX has: stable sorts become
``TopK`` (which breaks ties by the lower index, as a stable sort does), and merging is a
``scatter_add`` and a division (`trimkit.ops`).
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils import _pytree as pytree

from ..api import _applied, is_applied
from ..sites import Site, TrimContext
from ..state import fixed_shapes

__all__ = ["OnnxExport", "OnnxExportError", "export_onnx"]


class OnnxExportError(RuntimeError):
    """The trimmed model cannot be exported to ONNX, or its export does not match PyTorch."""


@dataclass
class OnnxExport:
    """What `export_onnx` wrote: the file, the exporter that worked (``"dynamo"`` or
    ``"torchscript"``), and the largest difference from PyTorch when checked."""

    path: Path
    exporter: str
    max_diff: float | None = None
    #: streams whose token counts differ per sample (a padded batch): the graph trims them in
    #: masked form, which gives the same outputs but computes every slot
    masked_streams: tuple[str, ...] = ()


def _adaptive_reason(model: nn.Module) -> str | None:
    """Why ``model``'s trimming cannot be held by a fixed-shape graph, or ``None``: heads gated
    per instance, or token counts a learned threshold decides per instance."""
    sites = [m for m in model.modules() if isinstance(m, Site)]
    for what, flag in (("its heads are gated per instance", "gates_heads"),
                       ("a learned threshold decides how many tokens each instance keeps",
                        "data_dependent_count")):
        where = sorted({f"{m.stream} layer {m.layer}" for m in sites
                        if any(getattr(op, flag) for op in (*m.pre, *m.post))})
        if where:
            return f"{what} ({', '.join(where[:3])}), so the shapes depend on the data"
    return None


def _masked_streams(model: nn.Module, trimmed: nn.Module, args: tuple) -> list[str]:
    """The streams the graph trims in masked form: those whose counts are not known on the
    host (padding), read from a forward under `static_shapes`, as the exporter runs it
    (such a stream is never compacted there, so it ends with dead tokens of unknown count)."""
    ctx = _applied(trimmed).ctx
    with _inference(model, ctx), fixed_shapes():
        model(*args)
    return sorted(name for name, state in ctx.states.items()
                  if state.dead_count is None and state.has_dead)


def _leaves(out: Any) -> list[torch.Tensor]:
    if hasattr(out, "to_tuple"):  # transformers' ModelOutput
        out = out.to_tuple()
    return [t for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]


def _export(model: nn.Module, args: tuple, path: Path, dynamo: bool, **kw: Any) -> None:
    kw.setdefault("verbose", False)
    with warnings.catch_warnings():
        # the TorchScript tracer warns at every shape read as a number: the graph is meant
        # to hold the shapes of ``args``; and it is deprecated, which is why it comes second
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(model, args, str(path), dynamo=dynamo, **kw)


def _run_onnx(path: Path, args: tuple) -> list:
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    tensors = [a for a in pytree.tree_leaves(args) if isinstance(a, torch.Tensor)]
    names = [i.name for i in session.get_inputs()]
    if len(names) != len(tensors):
        raise OnnxExportError(f"the ONNX graph takes {len(names)} inputs, the call gave "
                              f"{len(tensors)} tensors: cannot check it")
    for i, (graph_input, t) in enumerate(zip(session.get_inputs(), tensors, strict=True)):
        want = graph_input.shape  # ints where the graph is static, names or None where not
        fixed = [a for a, w in enumerate(want) if isinstance(w, int)
                 and (a >= t.dim() or w != t.shape[a])]
        if len(want) != t.dim() or fixed:
            where = (f"axis {fixed[0]} is fixed at {want[fixed[0]]} in the graph" if fixed
                     else f"the graph takes {len(want)} dimensions")
            raise OnnxExportError(
                f"cannot check the ONNX graph on an input of shape {tuple(t.shape)} "
                f"(input {i}, {graph_input.name!r}): {where}, as traced. Export with that "
                f"axis dynamic (dynamic_shapes= for the dynamo exporter, dynamic_axes= for "
                f"TorchScript), or check on inputs of the traced shape")
    feed = {n: t.detach().cpu().numpy() for n, t in zip(names, tensors, strict=True)}
    try:
        return session.run(None, feed)
    except Exception as err:  # onnxruntime's own error types
        raise OnnxExportError(f"onnxruntime could not run the ONNX graph on inputs of shapes "
                              f"{[tuple(t.shape) for t in tensors]}: {err}") from err


def export_onnx(model: nn.Module, args: tuple | torch.Tensor, path: str | os.PathLike, *,
                check: bool = False, check_inputs: Sequence[tuple | torch.Tensor] = (),
                atol: float = 1e-4, dynamo: bool | None = None, **kw: Any) -> OnnxExport:
    """Export ``model`` (trimmed, untrimmed, or a module around a trimmed one) to ONNX at
    ``path``, traced on ``args`` in eval with compacted execution; return an `OnnxExport`.

    ``dynamo``: ``None`` tries the ``torch.export``-based exporter, then the TorchScript one;
    ``True`` / ``False`` uses only that one. Other keywords go to ``torch.onnx.export``
    (e.g. ``opset_version``, ``dynamic_shapes`` or ``dynamic_axes``, ``input_names``). The
    graph has the shapes of ``args`` except where those keywords make an axis dynamic.
    ``check=True`` runs the file in onnxruntime on ``args`` and on every input of
    ``check_inputs`` (e.g. other padding patterns, or other batch sizes along a dynamic
    axis), compares with the trimmed model in PyTorch, and raises `OnnxExportError` with the
    largest difference where it exceeds ``atol``.

    Trimmers whose token counts a learned threshold decides, and per-instance head gates,
    have data-dependent shapes: `OnnxExportError` says so before exporting. Padded streams
    are exported in masked form (`OnnxExport.masked_streams`).
    """
    args = args if isinstance(args, tuple) else (args,)
    path = Path(path)
    trimmed = next((m for m in model.modules() if is_applied(m)), None)  # or a wrapper's
    ctx = _applied(trimmed).ctx if trimmed is not None else None
    expected = _reference(model, args, ctx)
    masked: list[str] = []
    if trimmed is not None:
        why = _adaptive_reason(trimmed)
        if why is not None:
            raise OnnxExportError(
                f"cannot export this trimmed model to ONNX: {why}. An ONNX graph needs "
                f"every layer's token and head counts to follow from the input shapes and "
                f"the padding, as with fixed-count trimming (a merge count, pruning or "
                f"merging ratios, static head pruning, a learned trimmer's fixed budget); use "
                f"torch.compile(..., dynamic=True) to deploy per-instance trimming "
                f"(docs/deploy.md)")
        masked = _masked_streams(model, trimmed, args)
    errors = []
    used = None
    for use_dynamo in [True, False] if dynamo is None else [dynamo]:
        try:
            with _inference(model, ctx):
                _export(model, args, path, use_dynamo, **kw)
            used = "dynamo" if use_dynamo else "torchscript"
            break
        except Exception as err:  # noqa: BLE001 — reported below, with the other's
            errors.append(f"{'dynamo' if use_dynamo else 'torchscript'} exporter: "
                          f"{type(err).__name__}: {str(err).strip()[:2000]}")
    if used is None:
        raise OnnxExportError("ONNX export failed.\n" + "\n".join(errors))
    result = OnnxExport(path, used, masked_streams=tuple(masked))
    if check:
        cases = [(args, expected)]
        for extra in check_inputs:
            extra = extra if isinstance(extra, tuple) else (extra,)
            cases.append((extra, _reference(model, extra, ctx)))
        result.max_diff = max(_difference(path, a, e, used, atol, result.masked_streams)
                              for a, e in cases)
    return result


@contextmanager
def _inference(model: nn.Module, ctx: TrimContext | None) -> Iterator[None]:
    """``model`` in eval, without gradients, with compacted execution, restored after."""
    was_training, mode = model.training, ctx.mode if ctx else None
    model.eval()
    if ctx is not None:
        ctx.mode = "compacted"
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)
        if ctx is not None:
            ctx.mode = mode


def _reference(model: nn.Module, args: tuple, ctx: TrimContext | None) -> list[torch.Tensor]:
    """The model's outputs on ``args`` as the exported graph should compute them."""
    with _inference(model, ctx):
        return _leaves(model(*args))


def _difference(path: Path, args: tuple, expected: list[torch.Tensor], used: str,
                atol: float, masked: tuple[str, ...]) -> float:
    """The largest difference between the ONNX graph and ``expected`` on ``args``; an
    `OnnxExportError` above ``atol``."""
    got = _run_onnx(path, args)
    if len(got) != len(expected):
        raise OnnxExportError(f"the ONNX graph returns {len(got)} outputs, PyTorch "
                              f"{len(expected)}")
    for i, (g, e) in enumerate(zip(got, expected, strict=True)):
        if tuple(g.shape) != tuple(e.shape):
            why = (f": it holds the tokens of stream(s) {', '.join(masked)}, which the graph "
                   f"trims in masked form (every slot kept, the dead ones included) where "
                   f"PyTorch packs the survivors. Export a wrapper that returns what you "
                   f"deploy (scores, pooled or position-restored outputs), or inputs without "
                   f"padding" if masked else "")
            raise OnnxExportError(f"output {i} of the ONNX graph ({used} exporter) has shape "
                                  f"{tuple(g.shape)}, PyTorch's {tuple(e.shape)}{why}")
    diff = max((float(abs(torch.as_tensor(g) - e.detach().cpu()).max())
                for g, e in zip(got, expected, strict=True) if e.numel()), default=0.0)
    if not diff <= atol:
        raise OnnxExportError(f"the ONNX graph ({used} exporter) differs from PyTorch by "
                              f"{diff:.3g} (atol {atol:g}) on the given inputs")
    return diff
