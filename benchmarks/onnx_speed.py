"""ONNX speed of a trimmed timm model against the untrimmed one, in onnxruntime on the CPU.

Builds a timm model with random weights (``timm.create_model(name, pretrained=False)``),
trims a copy (``trimkit.apply(copy, recipe, **options)``), and exports both the same way
with ``trimkit.export_onnx(..., check=True)`` into a temporary folder: one graph each with a
dynamic batch axis (``dynamic_shapes=({0: torch.export.Dim("batch")},)``, traced on batch 2
and checked on every batch size asked for), or, with ``--static`` or where that export
fails, one graph per batch size. Both graphs run in ``onnxruntime.InferenceSession``s on the
CPU with ``intra_op_num_threads`` set to ``--threads``, on the same random images, in one
process: ``--warmup`` untimed rounds, then ``--repeats`` timed rounds alternating which goes
first (`trimkit.tools.bench.time_calls`).

For each batch size it prints the median latency of each graph, the speedup (untrimmed /
trimmed time), the FLOPs ratio (untrimmed / trimmed FLOPs of the PyTorch models on the same
images, `trimkit.count_flops`, trimmers' own work included) and the largest absolute
difference between each graph's outputs and its PyTorch model's. ``--json`` prints the
rows as JSON instead of the markdown table.

Run (from the repository root; a few minutes on one thread)::

    python benchmarks/onnx_speed.py --model deit_small_patch16_224 --recipe tome --r 13 \\
        --batch-sizes 1 8 --repeats 5 --threads 1
    python benchmarks/onnx_speed.py --recipe attn_prune --option keep_ratio=0.7

Recipe options are ``--option KEY=VALUE`` (the value a Python literal, else as for
``trimkit bench``: ``true``, ``none``, ``3,6,9``) or ``--some-option VALUE`` as for
``trimkit bench``.
"""

from __future__ import annotations

import argparse
import ast
import copy
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

import trimkit
from trimkit.tools.bench import parse_value, time_calls
from trimkit.tools.cli import parse_overrides

#: the batch size a graph with a dynamic batch axis is traced on (torch.export specialises
#: sizes 0 and 1, so not 1)
TRACE_BATCH = 2


def _say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def literal(text: str) -> Any:
    """``text`` as a Python literal (``"13"``, ``"0.7"``, ``"[3, 6, 9]"``, ``"True"``), else
    as `trimkit.tools.bench.parse_value` reads it (``"true"``, ``"none"``, ``"3,6,9"``, a
    string)."""
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return parse_value(text)


def _option(text: str) -> tuple[str, Any]:
    key, sep, value = text.partition("=")
    key = key.strip().replace("-", "_")
    if not sep or not key.isidentifier():
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return key, literal(value)


def _images(model: nn.Module, batch_size: int, seed: int) -> torch.Tensor:
    c, h, w = model.pretrained_cfg["input_size"]
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch_size, c, h, w, generator=g)


def _session(path: Path, threads: int) -> Any:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def _runner(session: Any) -> Callable[[dict[str, np.ndarray]], list[np.ndarray]]:
    name = session.get_inputs()[0].name

    def run(feed: dict[str, np.ndarray]) -> list[np.ndarray]:
        return session.run(None, {name: feed["x"]})

    return run


def _export(model: nn.Module, tag: str, folder: Path, batch_sizes: list[int], seed: int,
            static: bool) -> tuple[dict[int, Path], str, bool]:
    """ONNX graphs of ``model``: batch size -> file (one file for all with a dynamic batch
    axis), the exporter used, and whether the batch axis is dynamic."""
    if not static:
        path = folder / f"{tag}.onnx"
        try:
            done = trimkit.export_onnx(
                model, (_images(model, TRACE_BATCH, seed),), path, check=True,
                check_inputs=[(_images(model, b, seed),) for b in batch_sizes], dynamo=True,
                dynamic_shapes=({0: torch.export.Dim("batch")},))
            return dict.fromkeys(batch_sizes, path), done.exporter, True
        except trimkit.OnnxExportError as err:
            _say(f"{tag}: no dynamic batch axis ({str(err).splitlines()[-1][:200]}); "
                 f"exporting one graph per batch size")
    paths, exporter = {}, ""
    for b in batch_sizes:
        paths[b] = folder / f"{tag}_b{b}.onnx"
        exporter = trimkit.export_onnx(model, (_images(model, b, seed),), paths[b],
                                       check=True).exporter
    return paths, exporter, False


def _max_diff(got: list[np.ndarray], model: nn.Module, images: torch.Tensor) -> float:
    with torch.no_grad():
        out = model(images)
    want = out if isinstance(out, (tuple, list)) else [out]
    return max(float(np.abs(g - w.numpy()).max()) for g, w in zip(got, want, strict=True))


def measure(args: argparse.Namespace, options: dict[str, Any]) -> dict[str, Any]:
    import onnxruntime as ort
    import timm

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    base = timm.create_model(args.model, pretrained=False).eval()
    trim = trimkit.apply(copy.deepcopy(base), args.recipe, **options).eval()
    result: dict[str, Any] = {
        "model": args.model, "recipe": args.recipe, "options": options,
        "threads": args.threads, "warmup": args.warmup, "repeats": args.repeats,
        "onnxruntime": ort.__version__, "torch": torch.__version__, "rows": []}
    with tempfile.TemporaryDirectory(prefix="trimkit_onnx_") as tmp:
        graphs = {}
        for tag, model in (("base", base), ("trim", trim)):
            t0 = time.perf_counter()
            paths, exporter, dynamic = _export(model, tag, Path(tmp), args.batch_sizes,
                                               args.seed, args.static)
            seconds = time.perf_counter() - t0
            _say(f"exported and checked {tag} ({exporter} exporter, "
                 f"{'dynamic' if dynamic else 'static'} batch) in {seconds:.0f} s")
            result[f"export_{tag}"] = {"exporter": exporter, "dynamic_batch": dynamic,
                                       "seconds": round(seconds, 1)}
            graphs[tag] = {b: _runner(_session(p, args.threads)) for b, p in paths.items()}
        for b in args.batch_sizes:
            images = _images(base, b, args.seed)
            feed = {"x": images.numpy()}
            run_base, run_trim = graphs["base"][b], graphs["trim"][b]
            flops_base = trimkit.count_flops(base, images)
            flops_trim = trimkit.count_flops(trim, images)
            diff_base = _max_diff(run_base(feed), base, images)
            diff_trim = _max_diff(run_trim(feed), trim, images)
            tb, tt = time_calls([(run_base, (feed,)), (run_trim, (feed,))],
                                warmup=args.warmup, repeats=args.repeats)
            ms_base, ms_trim = 1e3 * statistics.median(tb), 1e3 * statistics.median(tt)
            row = {"batch": b, "ms_base": ms_base, "ms_trim": ms_trim,
                   "speedup": ms_base / ms_trim,
                   "gflops_base": flops_base / b / 1e9, "gflops_trim": flops_trim / b / 1e9,
                   "flops_ratio": flops_base / flops_trim,
                   "max_diff_base": diff_base, "max_diff_trim": diff_trim}
            _say(f"batch {b}: {ms_base:.1f} ms untrimmed, {ms_trim:.1f} ms trimmed")
            result["rows"].append(row)
    return result


def format_table(result: dict[str, Any]) -> str:
    opts = ", ".join(f"{k}={v}" for k, v in result["options"].items()) or "defaults"
    exp = result["export_trim"]
    batch = "dynamic batch axis" if exp["dynamic_batch"] else "one graph per batch size"
    out = [f"{result['model']}, {result['recipe']} ({opts}); onnxruntime "
           f"{result['onnxruntime']} CPU, {result['threads']} intra-op threads; "
           f"{exp['exporter']} exporter, {batch}; medians of {result['repeats']} alternating "
           f"runs after {result['warmup']} warm-up", "",
           "| batch | base ms | trimmed ms | speedup | FLOPs ratio | GFLOPs/img base "
           "| GFLOPs/img trimmed | max abs diff base | max abs diff trimmed |",
           "|---|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        out.append(f"| {r['batch']} | {r['ms_base']:.1f} | {r['ms_trim']:.1f} | "
                   f"{r['speedup']:.2f}× | {r['flops_ratio']:.2f}× | {r['gflops_base']:.2f} | "
                   f"{r['gflops_trim']:.2f} | {r['max_diff_base']:.1e} | "
                   f"{r['max_diff_trim']:.1e} |")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n", 1)[0], allow_abbrev=False,
        epilog="Any other --some-option VALUE is a recipe option, as for trimkit bench.")
    p.add_argument("--model", default="deit_small_patch16_224",
                   help="timm model name, random weights (default: deit_small_patch16_224)")
    p.add_argument("--recipe", default="tome", help="trimkit recipe (default: tome)")
    p.add_argument("--option", type=_option, action="append", default=[],
                   metavar="KEY=VALUE", help="recipe option, the value a Python literal "
                                             "(repeatable), e.g. keep_ratio=0.7")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8],
                   help="batch sizes (default: 1 8)")
    p.add_argument("--warmup", type=int, default=2, help="untimed runs of each (default: 2)")
    p.add_argument("--repeats", type=int, default=5, help="timed runs of each (default: 5)")
    p.add_argument("--threads", type=int, default=1,
                   help="onnxruntime intra-op threads, and torch's (default: 1)")
    p.add_argument("--static", action="store_true",
                   help="export one graph per batch size instead of a dynamic batch axis")
    p.add_argument("--seed", type=int, default=0, help="seed of weights and images")
    p.add_argument("--json", action="store_true", help="print JSON instead of the table")
    args, extra = p.parse_known_args(argv)
    try:
        options = parse_overrides(extra)
    except Exception as err:  # trimkit.tools.cli's usage error
        p.error(str(err))
    for key, value in args.option:
        if key in options:
            p.error(f"recipe option {key} given twice")
        options[key] = value
    if min(args.batch_sizes) < 1 or args.repeats < 1 or args.warmup < 0 or args.threads < 1:
        p.error("--batch-sizes, --repeats and --threads must be at least 1, --warmup 0")
    start = time.perf_counter()
    result = measure(args, options)
    result["seconds"] = round(time.perf_counter() - start, 1)
    print(json.dumps(result, indent=1) if args.json else format_table(result))
    _say(f"onnx_speed finished in {result['seconds'] / 60:.1f} min")
    return 0


if __name__ == "__main__":
    sys.exit(main())
