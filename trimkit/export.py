"""ONNX export of a trimmed model (docs/deploy.md).

`export_onnx` exports a trimmed model in eval with compacted execution, so the graph really
computes fewer tokens. It tries the ``torch.export``-based exporter (``dynamo=True``) first
and falls back to the TorchScript one (``dynamo=False``). Only fixed-count trimming exports:
the token counts of every layer must follow from the input shapes (ToMe's ``r``, a pruning
ratio, merging ratios on a batch without padding, static head pruning). Per-sample counts
(learned thresholds, per-instance head gates, padded batches) are data-dependent shapes that
an ONNX graph cannot hold; `export_onnx` says so before trying.

The ops the trimmed forward uses while exporting are ones ONNX has: stable sorts become
``TopK`` (which breaks ties by the lower index, as a stable sort does), and merging is a
``scatter_add`` and a division (`trimkit.ops`).
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils import _pytree as pytree

from .api import _applied, is_applied
from .sites import Site

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


def _adaptive_reason(model: nn.Module, args: tuple) -> str | None:
    """Why ``model``'s trimming on ``args`` has data-dependent shapes, or ``None`` where every
    count follows from the input shapes. Reads one eager forward's states."""
    gating = sorted({f"{m.stream} layer {m.layer}" for m in model.modules()
                     if isinstance(m, Site)
                     and any(op.gates_heads for op in (*m.pre, *m.post))})
    if gating:
        return (f"its heads are gated per instance ({', '.join(gating[:3])}), so the heads a "
                f"batch computes depend on the data")
    states = _applied(model).ctx.states
    per_sample = sorted(name for name, state in states.items() if state.dead_count is None)
    if per_sample:
        return (f"the tokens kept in stream(s) {', '.join(per_sample)} differ per sample "
                f"(learned thresholds or a padded batch), so the tensors' shapes depend on "
                f"the data")
    return None


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
    feed = {n: t.detach().cpu().numpy() for n, t in zip(names, tensors, strict=True)}
    return session.run(None, feed)


def export_onnx(model: nn.Module, args: tuple | torch.Tensor, path: str | os.PathLike, *,
                check: bool = False, atol: float = 1e-4, dynamo: bool | None = None,
                **kw: Any) -> OnnxExport:
    """Export ``model`` (trimmed or not) to ONNX at ``path``, traced on ``args`` in eval with
    compacted execution; return an `OnnxExport`.

    ``dynamo``: ``None`` tries the ``torch.export``-based exporter, then the TorchScript one;
    ``True`` / ``False`` uses only that one. Other keywords go to ``torch.onnx.export``
    (e.g. ``opset_version``, ``dynamic_shapes``). The graph has the shapes of ``args``.
    ``check=True`` runs the file in onnxruntime on ``args`` and raises `OnnxExportError`
    with the largest difference where it exceeds ``atol``.

    Recipes with per-sample token counts or per-instance head gates (learned thresholds,
    e.g. smarttrim) and padded batches have data-dependent shapes: `OnnxExportError` says
    so before exporting.
    """
    args = args if isinstance(args, tuple) else (args,)
    path = Path(path)
    applied = is_applied(model)
    ctx = _applied(model).ctx if applied else None
    was_training, mode = model.training, ctx.mode if ctx else None
    model.eval()
    if ctx is not None:
        ctx.mode = "compacted"
    try:
        with torch.no_grad():
            expected = _leaves(model(*args))
        if applied:
            why = _adaptive_reason(model, args)
            if why is not None:
                raise OnnxExportError(
                    f"cannot export this trimmed model to ONNX: {why}. An ONNX graph needs "
                    f"every layer's token and head counts to follow from the input shapes, as "
                    f"with fixed-count recipes (tome, attn_prune, pumer merging, prune_heads) "
                    f"on batches without padding; use torch.compile(..., dynamic=True) to "
                    f"deploy per-sample trimming (docs/deploy.md)")
        errors = []
        exporters = [True, False] if dynamo is None else [dynamo]
        used = None
        for use_dynamo in exporters:
            try:
                with torch.no_grad():
                    _export(model, args, path, use_dynamo, **kw)
                used = "dynamo" if use_dynamo else "torchscript"
                break
            except Exception as err:  # noqa: BLE001 — reported below, with the other's
                errors.append(f"{'dynamo' if use_dynamo else 'torchscript'} exporter: "
                              f"{type(err).__name__}: {str(err).strip()[:2000]}")
        if used is None:
            raise OnnxExportError("ONNX export failed.\n" + "\n".join(errors))
    finally:
        model.train(was_training)
        if ctx is not None:
            ctx.mode = mode
    result = OnnxExport(path, used)
    if check:
        got = _run_onnx(path, args)
        if len(got) != len(expected):
            raise OnnxExportError(f"the ONNX graph returns {len(got)} outputs, PyTorch "
                                  f"{len(expected)}")
        diff = max((float(abs(torch.as_tensor(g) - e.detach().cpu()).max())
                    for g, e in zip(got, expected, strict=True) if e.numel()), default=0.0)
        result.max_diff = diff
        if not diff <= atol:
            raise OnnxExportError(f"the ONNX graph ({used} exporter) differs from PyTorch by "
                                  f"{diff:.3g} (atol {atol:g}) on the given inputs")
    return result
