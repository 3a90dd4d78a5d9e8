"""Benchmarks: trimmed against untrimmed, in one process, next to the FLOPs ratio.

``benchmark(spec, recipe, options, batch_sizes)`` builds the model named by ``spec`` once,
deep-copies it, applies ``recipe`` to the copy, and times the two instances alternately on
the same inputs (median of the repeats, after warm-up), so that drift (thermal, other
processes, allocator state) hits both equally. Each `Row` carries the FLOPs per example of
both (`trimkit.count_flops` on that row's batch, divided by its size: per-instance trimming
packs a batch to its longest survivor, so the batch decides), their ratio, the throughputs,
the speedup, the speedup over the FLOPs ratio ("efficiency": 1.0 means no overhead of ours),
and the activation peak memory of one forward.

A builder may offer several timed calls of its model (`Tasks`: e.g. an encoder pass and a
``generate``), each measured as its own row, and rows derived from two of them (`Derived`:
the cost per generated token is generation minus encoding, over the tokens generated).

A model spec is ``<prefix>:<name>[?key=value&...]``; the prefix picks a builder in
`BUILDERS` and the query string becomes keyword arguments of that builder, each value parsed
by `parse_value` (``kind:name?depth=2&img_size=64``). Adapters register
their family's builder with `register_builder`; the engine itself knows no family.

Peak memory is ``torch.cuda.max_memory_allocated`` on CUDA. On CPU it is measured in a fresh
process (``python -m trimkit.bench --memory-probe JSON``): build, apply (or not), make the
inputs, run one batch-1 forward (so one-time allocations are not counted), read the
resident set size, run one forward, and report the rise of the peak resident set size over
it. The peak is the kernel's ``VmHWM`` after resetting it through ``/proc/self/clear_refs``:
``ru_maxrss`` is not used when that works, because an exec'd child inherits its parent's
peak there (a probe started from the benchmark process would report the parent's ~700 MB).
"""

from __future__ import annotations

import copy
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from functools import partial
from typing import Any
from urllib.parse import parse_qsl

import torch
from torch import nn

import trimkit
from trimkit.registry import _load_builtins

__all__ = [
    "ALIASES",
    "BUILDERS",
    "Derived",
    "EXAMPLES",
    "Tasks",
    "register_builder",
    "BenchSetupError",
    "Row",
    "benchmark",
    "build_model",
    "format_layer_stats",
    "format_table",
    "layer_stats",
    "memory_probe",
    "parse_spec",
    "parse_value",
    "time_pair",
]

MakeInputs = Callable[[int], tuple]


class BenchSetupError(ValueError):
    """The model spec or the recipe and its options do not work (before anything is timed)."""


Run = Callable[..., Any]


@dataclass(frozen=True)
class Derived:
    """A row computed from two tasks' medians: ``(of − minus) / per``, in time and FLOPs (e.g.
    ``Derived("generate", "encode", 20)``: the cost of one of 20 generated tokens)."""

    of: str
    minus: str
    per: float = 1.0


#: task name → ``run(model, *inputs)``, or a `Derived` row; a builder returning none is timed
#: as ``model(*inputs)``
Tasks = dict[str, "Run | Derived"]


def first_run(tasks: Tasks) -> tuple[str, Run]:
    """The first task that runs the model itself (not a `Derived` row): its name and call."""
    return next((k, t) for k, t in tasks.items() if not isinstance(t, Derived))

Builder = Callable[..., "tuple[nn.Module, MakeInputs] | tuple[nn.Module, MakeInputs, Tasks]"]


# ------------------------------------------------------------------------------ values, specs

def parse_value(text: str) -> Any:
    """A command-line value as Python: int, float, bool, None, a list (comma-separated or
    JSON ``[...]``), a JSON object ``{...}``, else the string itself. ``"13"`` → 13,
    ``"0.5"`` → 0.5, ``"true"`` → True, ``"none"`` → None, ``"3,6,9"`` → [3, 6, 9]."""
    s = text.strip()
    low = s.lower()
    if low in ("true", "yes", "on"):
        return True
    if low in ("false", "no", "off"):
        return False
    if low in ("none", "null"):
        return None
    if s.startswith(("[", "{")):
        try:
            return json.loads(s)
        except json.JSONDecodeError:
            pass
    if "," in s:
        return [parse_value(p) for p in s.split(",") if p.strip()]
    for kind in (int, float):
        try:
            return kind(s)
        except ValueError:
            pass
    return s


def parse_spec(spec: str) -> tuple[str, str, dict[str, Any]]:
    """``"kind:name?img_size=64&depth=2"`` → ``("kind", "name", {"img_size": 64,
    "depth": 2})``; a registered alias stands for its full spec."""
    _load_builtins()
    head, q, query = spec.partition("?")
    spec = ALIASES.get(head, head) + q + query
    prefix, sep, rest = spec.partition(":")
    if not sep or not prefix or not rest:
        raise ValueError(f"model spec must look like '<kind>:<name>[?key=value&...]', got "
                         f"{spec!r}; kinds: {', '.join(sorted(BUILDERS))}")
    name, _, query = rest.partition("?")
    kwargs = {k: parse_value(v) for k, v in parse_qsl(query, keep_blank_values=True)}
    return prefix, name, kwargs


# ---------------------------------------------------------------------------- model factory

#: prefix → builder(name, **kwargs) → (model, make_inputs); adapters add theirs.
BUILDERS: dict[str, Builder] = {}

#: short names accepted by ``--model`` for specs of the form ``<kind>:<name>``
ALIASES: dict[str, str] = {}


#: ``trimkit bench`` argument lines that adapters offer as examples (shown by ``--help``)
EXAMPLES: list[str] = []


def register_builder(prefix: str, builder: Builder, aliases: dict[str, str] | None = None,
                     examples: list[str] | None = None) -> None:
    """Make ``<prefix>:<name>`` model specs buildable (an adapter registers its family's),
    with short ``aliases`` and ``examples`` of ``trimkit bench`` arguments for ``--help``."""
    BUILDERS[prefix] = builder
    ALIASES.update(aliases or {})
    EXAMPLES.extend(examples or [])


def build_model(spec: str, device: str | torch.device = "cpu") -> tuple[nn.Module, MakeInputs]:
    """The model named by ``spec`` (eval mode, on ``device``) and ``make_inputs(batch_size)``,
    which returns the positional arguments of one forward (the same ones on every call)."""
    model, make_inputs, _ = build_with_tasks(spec, device)
    return model, make_inputs


def _forward(model: nn.Module, *inputs: Any) -> Any:
    return model(*inputs)


def build_with_tasks(spec: str, device: str | torch.device = "cpu"
                     ) -> tuple[nn.Module, MakeInputs, Tasks]:
    """`build_model`, with the builder's `Tasks` (``{"": model(*inputs)}`` when it has
    none)."""
    _load_builtins()
    prefix, name, kwargs = parse_spec(spec)
    if prefix not in BUILDERS:
        raise ValueError(f"unknown model kind {prefix!r} in {spec!r}; kinds: "
                         f"{', '.join(sorted(BUILDERS))}")
    built = BUILDERS[prefix](name, **kwargs)
    model, make = built[0], built[1]
    tasks: Tasks = built[2] if len(built) > 2 else {"": _forward}
    device = torch.device(device)
    model = model.to(device)

    def make_inputs(batch_size: int) -> tuple:
        return tuple(a.to(device) if isinstance(a, torch.Tensor) else a
                     for a in make(batch_size))

    return model, make_inputs, tasks


def layer_stats(spec: str, recipe: str, options: dict[str, Any] | None = None,
                batch_size: int = 1, device: str = "cpu") -> dict[str, Any]:
    """One forward of ``recipe`` on the model of ``spec`` (the builder's first task, on its
    inputs at ``batch_size``): per-layer live tokens and heads (`trimkit.last_stats`), and
    the FLOPs per example of the untrimmed and the trimmed model. Setup errors are a
    `BenchSetupError`, as in `benchmark`."""
    try:
        model, make_inputs, tasks = build_with_tasks(spec, device)
    except (ValueError, RuntimeError, TypeError) as e:
        raise BenchSetupError(f"cannot build {spec!r}: {e}") from e
    task, run = first_run(tasks)
    inputs = make_inputs(batch_size)
    base = trimkit.count_flops(lambda *a: run(model, *a), *inputs)
    try:
        trimkit.apply(model, recipe, **dict(options or {}))
    except (ValueError, trimkit.UnsupportedModelError) as e:
        raise BenchSetupError(str(e)) from e
    trim = trimkit.count_flops(lambda *a: run(model, *a), *inputs)
    layers = trimkit.last_stats(model).table() if trimkit.is_applied(model) else []
    return dict(model=spec, recipe=recipe, options=dict(options or {}), task=task,
                batch_size=batch_size, gflops_base=base / batch_size / 1e9,
                gflops_trim=trim / batch_size / 1e9, layers=layers)


def format_layer_stats(stats: dict[str, Any]) -> str:
    """`layer_stats` as a text table, one line per layer that ran."""
    ratio = stats["gflops_base"] / stats["gflops_trim"] if stats["gflops_trim"] else 0.0
    task = f"  task {stats['task']}" if stats["task"] else ""
    lines = [f"model {stats['model']}  recipe {stats['recipe']}  options {stats['options']}  "
             f"batch {stats['batch_size']}{task}",
             f"GFLOPs per example: base {stats['gflops_base']:.3f}  trim "
             f"{stats['gflops_trim']:.3f}  FLOPs ratio {ratio:.3f}x"]
    if not stats["layers"]:
        lines.append("(the recipe changed the model once and installs no sites: no per-layer "
                     "statistics; trimkit.describe shows its heads)")
        return "\n".join(lines)
    lines.append(f"{'stream':<8} {'layer':>5} {'tokens in':>10} {'tokens out':>11} "
                 f"{'heads':>6}")
    for r in stats["layers"]:
        lines.append(f"{r['stream']:<8} {r['layer']:>5} {r['tokens_in']:>10.1f} "
                     f"{r['tokens_out']:>11.1f} {r['heads']:>6.1f}")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------- rows

@dataclass
class Row:
    """One batch size of a benchmark: untrimmed ("base") against trimmed ("trim")."""

    model: str
    recipe: str
    options: dict[str, Any]
    device: str
    threads: int
    batch_size: int
    gflops_base: float  # per example
    gflops_trim: float
    flops_ratio: float  # base / trim
    ips_base: float  # examples per second, median of the repeats
    ips_trim: float
    speedup: float  # median time base / median time trim
    efficiency: float  # speedup / flops_ratio
    mem_base_mb: float | None = None  # activation peak of one forward, MiB
    mem_trim_mb: float | None = None
    repeats: int = 0
    times_base: list[float] = field(default_factory=list)  # seconds per forward
    times_trim: list[float] = field(default_factory=list)
    #: which of the builder's timed calls (`Tasks`); empty for a plain forward
    task: str = ""

    @property
    def ms_base(self) -> float:
        """Median milliseconds per call, untrimmed."""
        return self.batch_size / self.ips_base * 1e3

    @property
    def ms_trim(self) -> float:
        return self.batch_size / self.ips_trim * 1e3

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


# ----------------------------------------------------------------------------------- memory

def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark (Linux ≥ 4.0); False where that is not allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _peak_rss_bytes(reset: bool) -> int:
    """The peak resident set size: ``VmHWM`` after a reset (``ru_maxrss`` of an exec'd
    child can carry its parent's peak), else ``ru_maxrss``."""
    if reset:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def memory_probe(spec: str, recipe: str | None, options: dict[str, Any], batch_size: int,
                 threads: int | None = None) -> int:
    """Activation peak (bytes) of one CPU forward, measured in THIS process; call it in a
    fresh one (see `probe_in_subprocess`) so nothing earlier inflates the peak."""
    if threads:
        torch.set_num_threads(threads)
    model, make_inputs, tasks = build_with_tasks(spec)
    run = first_run(tasks)[1]
    if recipe is not None:
        trimkit.apply(model, recipe, **options)
    inputs = make_inputs(batch_size)
    with torch.inference_mode():  # trace the trimmed forward once, at batch 1, first
        run(model, *make_inputs(1))
    reset = _reset_peak_rss()
    before = _rss_bytes()
    with torch.inference_mode():
        run(model, *inputs)
    return max(_peak_rss_bytes(reset) - before, 0)


def probe_in_subprocess(spec: str, recipe: str | None, options: dict[str, Any],
                        batch_size: int, threads: int | None = None) -> int:
    """`memory_probe` in a fresh ``python -m trimkit.bench --memory-probe`` process."""
    arg = json.dumps(dict(spec=spec, recipe=recipe, options=options, batch_size=batch_size,
                          threads=threads))
    # a fixed mmap threshold turns off glibc's adaptive one, so every large tensor is its own
    # mapping, returned on free: the resident set then follows live tensors (runs agree to
    # the page instead of scattering by ±30%)
    env = {"MALLOC_MMAP_THRESHOLD_": "131072", **os.environ}
    out = subprocess.run([sys.executable, "-m", "trimkit.bench", "--memory-probe", arg],
                         capture_output=True, text=True, check=False, env=env)
    if out.returncode != 0:
        raise RuntimeError(f"memory probe failed (exit {out.returncode}):\n{out.stderr[-2000:]}")
    return int(json.loads(out.stdout.strip().splitlines()[-1])["peak_bytes"])


def _cuda_peak(model: Callable[..., Any], inputs: tuple) -> int:
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    with torch.inference_mode():
        model(*inputs)
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - before


# ----------------------------------------------------------------------------------- timing

def _timed(model: Callable[..., Any], batches: list[tuple], cuda: bool) -> float:
    if cuda:
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for inputs in batches:
        model(*inputs)
    if cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def time_pair(
    base: Callable[..., Any],
    trim: Callable[..., Any],
    inputs: tuple | list[tuple],
    *,
    warmup: int = 2,
    repeats: int = 5,
    device: str | torch.device = "cpu",
    progress: Callable[[int, float, float], None] | None = None,
) -> tuple[list[float], list[float]]:
    """Seconds per round of ``base`` and ``trim`` on the same ``inputs``, in one process:
    ``warmup`` untimed rounds, then ``repeats`` timed rounds that alternate which model goes
    first, so neither always follows the other. Take the medians. A round is one forward,
    or, for a list of input tuples, one forward of each (e.g. many single examples, where
    per-instance trimming makes one example unrepresentative)."""
    cuda = torch.device(device).type == "cuda"
    batches = inputs if isinstance(inputs, list) else [inputs]
    tb: list[float] = []
    tt: list[float] = []
    with torch.inference_mode():
        for _ in range(warmup):
            _timed(base, batches, cuda)
            _timed(trim, batches, cuda)
        for i in range(repeats):
            pair = ((base, tb), (trim, tt)) if i % 2 == 0 else ((trim, tt), (base, tb))
            for model, times in pair:
                times.append(_timed(model, batches, cuda))
            if progress is not None:
                progress(i, tb[-1], tt[-1])
    return tb, tt


def benchmark(
    spec: str,
    recipe: str = "tome",
    options: dict[str, Any] | None = None,
    batch_sizes: list[int] | tuple[int, ...] = (16,),
    warmup: int = 2,
    repeats: int = 5,
    threads: int | None = None,
    *,
    memory: bool = True,
    device: str = "cpu",
    progress: Callable[[str], None] | None = None,
) -> list[Row]:
    """Measure ``recipe`` (with ``options``) on the model of ``spec``: one `Row` per batch
    size. A bad spec, recipe or option (`trimkit.apply`'s ``ValueError``, no adapter) is a
    `BenchSetupError` (a ``ValueError``), raised before anything is timed."""
    options = dict(options or {})
    say = progress or (lambda _msg: None)
    old_threads = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        try:  # unknown kind, unknown model name, bad constructor keywords
            base, make_inputs, tasks = build_with_tasks(spec, device)
        except (ValueError, RuntimeError, TypeError) as e:
            raise BenchSetupError(f"cannot build {spec!r}: {e}") from e
        trim = copy.deepcopy(base)
        try:
            trimkit.apply(trim, recipe, **options)
        except (ValueError, trimkit.UnsupportedModelError) as e:
            raise BenchSetupError(str(e)) from e
        try:
            return _measure(spec, recipe, options, base, trim, make_inputs, tasks,
                            list(batch_sizes), warmup, repeats, threads, memory,
                            torch.device(device), say)
        finally:
            if trimkit.is_applied(trim):  # one-shot recipes (prune_heads) install nothing
                trimkit.remove(trim)
    finally:
        torch.set_num_threads(old_threads)


def _measure(spec, recipe, options, base, trim, make_inputs, tasks, batch_sizes, warmup,
             repeats, threads, memory, device, say) -> list[Row]:
    cuda = device.type == "cuda"
    rows = []
    for bs in batch_sizes:
        inputs = make_inputs(bs)
        done: dict[str, tuple[float, float, list[float], list[float]]] = {}
        for n, (task, run) in enumerate(tasks.items()):
            label = f"batch {bs}" + (f", {task}" if task else "")
            if isinstance(run, Derived):
                fb, ft, tb, tt = _derive(done, run, task)
            else:
                # FLOPs of this very batch, per example: per-instance trimming packs a batch
                # to its longest survivor (and computes a head some instance keeps)
                fb = trimkit.count_flops(partial(run, base), *inputs) / bs
                ft = trimkit.count_flops(partial(run, trim), *inputs) / bs
                tb, tt = time_pair(partial(run, base), partial(run, trim), inputs,
                                   warmup=warmup, repeats=repeats, device=device,
                                   progress=lambda i, b, t, label=label: say(
                                       f"{label}: repeat {i + 1}/{repeats}: base "
                                       f"{b * 1e3:.1f} ms, trimmed {t * 1e3:.1f} ms"))
                done[task] = (fb, ft, tb, tt)
            mb = mt = None
            if memory and n == 0:  # the first task's forward
                if cuda:
                    mb, mt = _cuda_peak(partial(run, base), inputs), _cuda_peak(
                        partial(run, trim), inputs)
                else:
                    say(f"{label}: memory probes (fresh processes)")
                    mb = probe_in_subprocess(spec, None, {}, bs, threads)
                    mt = probe_in_subprocess(spec, recipe, options, bs, threads)
                mb, mt = mb / 2**20, mt / 2**20
            ratio = fb / ft if ft else float("nan")
            med_b, med_t = statistics.median(tb), statistics.median(tt)
            speedup = med_b / med_t
            rows.append(Row(
                model=spec, recipe=recipe, options=options, device=str(device),
                threads=torch.get_num_threads(), batch_size=bs,
                gflops_base=fb / 1e9, gflops_trim=ft / 1e9, flops_ratio=ratio,
                ips_base=bs / med_b, ips_trim=bs / med_t, speedup=speedup,
                efficiency=speedup / ratio, mem_base_mb=mb, mem_trim_mb=mt, repeats=repeats,
                times_base=tb, times_trim=tt, task=task))
    return rows


def _derive(done: dict, d: Derived, task: str
            ) -> tuple[float, float, list[float], list[float]]:
    if d.of not in done or d.minus not in done:
        raise BenchSetupError(f"task {task!r} derives from {d.of!r} and {d.minus!r}, which must "
                              f"be measured before it")
    (fb1, ft1, tb1, tt1), (fb0, ft0, tb0, tt0) = done[d.of], done[d.minus]

    def per(a: list[float], b: list[float]) -> list[float]:
        return [(x - y) / d.per for x, y in zip(a, b, strict=True)]

    return (fb1 - fb0) / d.per, (ft1 - ft0) / d.per, per(tb1, tb0), per(tt1, tt0)


# ------------------------------------------------------------------------------------ table

_COLUMNS = [
    ("batch", "batch_size", "{}"),
    ("ms base", "ms_base", "{:.1f}"),
    ("ms trim", "ms_trim", "{:.1f}"),
    ("GFLOPs base", "gflops_base", "{:.2f}"),
    ("GFLOPs trim", "gflops_trim", "{:.2f}"),
    ("FLOPs ratio", "flops_ratio", "{:.3f}x"),
    ("img/s base", "ips_base", "{:.2f}"),
    ("img/s trim", "ips_trim", "{:.2f}"),
    ("speedup", "speedup", "{:.3f}x"),
    ("efficiency", "efficiency", "{:.1%}"),
    ("act MiB base", "mem_base_mb", "{:.1f}"),
    ("act MiB trim", "mem_trim_mb", "{:.1f}"),
]


def format_table(rows: list[Row]) -> str:
    """A plain aligned text table, one line per row, under a line naming the setup."""
    if not rows:
        return "(no rows)"
    lines = []
    for key in dict.fromkeys((r.model, r.recipe, json.dumps(r.options, sort_keys=True),
                              r.device, r.threads, r.repeats) for r in rows):
        model, recipe, opts, dev, threads, repeats = key
        lines.append(f"model {model}  recipe {recipe}  options {opts}  device {dev}  "
                     f"threads {threads}  repeats {repeats} (median)")
    columns = ([("task", "task", "{}")] if any(r.task for r in rows) else []) + _COLUMNS
    header = [c[0] for c in columns]
    body = [["-" if getattr(r, attr) is None else fmt.format(getattr(r, attr))
             for _, attr, fmt in columns] for r in rows]
    widths = [max(len(x) for x in col) for col in zip(header, *body, strict=True)]
    for cells in [header, *body]:
        lines.append("  ".join(c.rjust(w) for c, w in zip(cells, widths, strict=True)))
    return "\n".join(lines)


def _probe_main(argv: list[str]) -> int:
    if len(argv) != 2 or argv[0] != "--memory-probe":
        print("usage: python -m trimkit.bench --memory-probe JSON", file=sys.stderr)
        return 2
    a = json.loads(argv[1])
    peak = memory_probe(a["spec"], a.get("recipe"), a.get("options") or {}, int(a["batch_size"]),
                        a.get("threads"))
    print(json.dumps({"peak_bytes": peak}))
    return 0


if __name__ == "__main__":
    # run the imported module's copy: adapters register their builders there, not in __main__
    from trimkit import bench

    sys.exit(bench._probe_main(sys.argv[1:]))
