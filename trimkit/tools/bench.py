"""Benchmarks: trimmed against untrimmed, in one process, next to the FLOPs ratio.

``benchmark(spec, recipe, options, batch_sizes)`` builds the model named by ``spec`` once,
deep-copies it, applies ``recipe`` to the copy, and times the two instances alternately on
the same inputs (median of the repeats, after warm-up), so that drift (thermal, other
processes, allocator state) hits both equally. Each `Row` carries the FLOPs per example of
both (`trimkit.count_flops` on that row's batch, divided by its size: per-instance trimming
packs a batch to its longest survivor, so the batch decides), their ratio, the throughputs,
the speedup, the speedup over the FLOPs ratio ("efficiency": 1.0 means no overhead of ours),
and the activation peak memory of one forward.

Where the builder can rebuild its model at another square input side (``register_builder``'s
``resize``) and the model has a square patch grid, each batch size also times a **resize
baseline**: the untrimmed model at the lower input side (a multiple of the patch size) whose
FLOPs per example come closest to the trimmed model's, in the same round-robin as the other
two (`time_calls`). A token-reduction recipe is worth it where its speedup beats that one.

With ``compile`` (``trimkit bench --compile [MODE]``) the untrimmed, the trimmed and the
resize-baseline models are each compiled in place (``nn.Module.compile``, the same
``torch.compile`` mode) and compiled afresh for every batch size (`torch._dynamo.reset`, so
each batch size gets its own static-shape graphs); compilation happens in the untimed
warm-up rounds. FLOPs are counted eagerly; on CPU the memory probes (fresh processes) are
skipped, since they would measure eager execution. Rows carry the mode (`Row.compiled`).

A builder may offer several timed calls of its model (`Tasks`: e.g. an encoder pass and a
``generate``), each measured as its own row, and rows derived from two of them (`Derived`:
the cost per generated token is generation minus encoding, over the tokens generated).

A model spec is ``<prefix>:<name>[?key=value&...]``; the prefix picks a builder in
`BUILDERS` and the query string becomes keyword arguments of that builder, each value parsed
by `parse_value` (``kind:name?depth=2&img_size=64``). Adapters register
their family's builder with `register_builder`; the engine itself knows no family.

Peak memory is ``torch.cuda.max_memory_allocated`` on CUDA. On CPU it is measured in a fresh
process (``python -m trimkit.tools.bench --memory-probe JSON``): build, apply (or not), make the
inputs, run one batch-1 forward (so one-time allocations are not counted), read the
resident set size, run one forward, and report the rise of the peak resident set size over
it. The peak is the kernel's ``VmHWM`` after resetting it through ``/proc/self/clear_refs``:
``ru_maxrss`` is not used when that works, because an exec'd child inherits its parent's
peak there (a probe started from the benchmark process would report the parent's ~700 MB).
"""

from __future__ import annotations

import copy
import gc
import json
import os
import resource
import statistics
import subprocess
import sys
import time
import weakref
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from functools import partial
from typing import Any
from urllib.parse import parse_qsl

import torch
from torch import nn
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

import trimkit
from trimkit.registry import _load_builtins

__all__ = [
    "ALIASES",
    "BUILDERS",
    "RESIZE",
    "STATE_BYTES",
    "Derived",
    "EXAMPLES",
    "Tasks",
    "register_builder",
    "BenchSetupError",
    "Row",
    "benchmark",
    "build_model",
    "check_run_args",
    "format_layer_stats",
    "format_table",
    "layer_stats",
    "activation_peak",
    "memory_probe",
    "parse_spec",
    "parse_value",
    "time_calls",
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

#: prefix → the builder keyword that sets the square input side in pixels (the resize hook)
RESIZE: dict[str, str] = {}
#: prefix → ``bytes(output)``: what the first task's call leaves for later calls (a decoder's
#: KV cache), reported per batch as "cache MiB"
STATE_BYTES: dict[str, Callable[[Any], int]] = {}


def register_builder(prefix: str, builder: Builder, aliases: dict[str, str] | None = None,
                     examples: list[str] | None = None, *, resize: str | None = None,
                     state_bytes: Callable[[Any], int] | None = None) -> None:
    """Make ``<prefix>:<name>`` model specs buildable (an adapter registers its family's),
    with short ``aliases`` and ``examples`` of ``trimkit bench`` arguments for ``--help``.

    ``resize`` names the builder keyword that sets the square input side in pixels (e.g.
    ``"img_size"``); it opts the family into the benchmark's resize baseline. The contract:
    ``builder(name, **spec_kwargs, <resize>=side)``, for ``side`` a multiple of the patch size
    below the native side, builds the same model (the spec's other keywords unchanged) at
    that side, and its ``make_inputs`` returns a ``B×C×side×side`` image batch. It is only
    called for models with a square patch grid (`trimkit.StreamDesc.grid`) whose inputs hold
    one square image batch of side ``grid × patch``, or for models whose streams state no
    grid (their patch count follows the input, as ViLT's) whose inputs hold one image batch
    with sides that are multiples of the model's patch (its first ``nn.Conv2d`` whose kernel
    is its stride): ``side`` is then the images' height, and the builder keeps their aspect
    ratio. Other models (text-only ones) get no baseline.

    ``state_bytes(output)``: the bytes of what the first task's call keeps for later calls
    (a decoder's KV cache after its prefill), measured once per batch size on the untrimmed
    and the trimmed model (`Row.cache_mb_base`)."""
    BUILDERS[prefix] = builder
    if state_bytes is None:
        STATE_BYTES.pop(prefix, None)
    else:
        STATE_BYTES[prefix] = state_bytes
    ALIASES.update(aliases or {})
    EXAMPLES.extend(examples or [])
    if resize is None:
        RESIZE.pop(prefix, None)
    else:
        RESIZE[prefix] = resize


def build_model(spec: str, device: str | torch.device = "cpu") -> tuple[nn.Module, MakeInputs]:
    """The model named by ``spec`` (eval mode, on ``device``) and ``make_inputs(batch_size)``,
    which returns the positional arguments of one forward (the same ones on every call)."""
    model, make_inputs, _ = build_with_tasks(spec, device)
    return model, make_inputs


def _forward(model: nn.Module, *inputs: Any) -> Any:
    return model(*inputs)


def build_with_tasks(spec: str, device: str | torch.device = "cpu", **overrides: Any
                     ) -> tuple[nn.Module, MakeInputs, Tasks]:
    """`build_model`, with the builder's `Tasks` (``{"": model(*inputs)}`` when it has
    none); ``overrides`` replace or add builder keywords of the spec."""
    _load_builtins()
    prefix, name, kwargs = parse_spec(spec)
    if prefix not in BUILDERS:
        raise ValueError(f"unknown model kind {prefix!r} in {spec!r}; kinds: "
                         f"{', '.join(sorted(BUILDERS))}")
    built = BUILDERS[prefix](name, **{**kwargs, **overrides})
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
    check_run_args(batch_sizes=[batch_size], device=device)
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
    """One batch size of a benchmark: untrimmed ("base") against trimmed ("trim"), and the
    resize baseline ("resize": untrimmed at the input side closest in FLOPs to trim; its
    fields are None where there is none)."""

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
    resize_side: int | None = None  # input side of the resize baseline, px
    gflops_resize: float | None = None  # per example
    ips_resize: float | None = None
    speedup_resize: float | None = None  # median time base / median time resize
    mem_resize_mb: float | None = None  # CUDA only
    times_resize: list[float] = field(default_factory=list)
    #: the ``torch.compile`` mode all the timed models ran under, ``None``: eager
    compiled: str | None = None
    #: per example, what the trimmed model would spend run padded (``mode="compacted"``:
    #: each batch padded to its longest survivor); ``None`` where it runs no other way
    gflops_padded: float | None = None
    #: MiB the first task's call keeps for later calls (a decoder's KV cache), where the
    #: builder says (`register_builder`'s ``state_bytes``)
    cache_mb_base: float | None = None
    cache_mb_trim: float | None = None

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


class _LiveBytes(TorchDispatchMode):
    """Bytes of the tensor storages created under it and still referenced, and their peak.

    Every op's outputs are seen; a storage is counted once, from its first tensor until its
    last tensor is gone (views and in-place results share it); views of storages that were
    there before (parameters, inputs) are not counted."""

    def __init__(self) -> None:
        super().__init__()
        self.alive: dict[int, list[int]] = {}  # storage address -> [tensors, bytes]
        self.now = self.peak = 0

    def _release(self, key: int) -> None:
        entry = self.alive.get(key)
        if entry is not None:
            entry[0] -= 1
            if entry[0] == 0:
                self.now -= entry[1]
                del self.alive[key]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        given = {a.untyped_storage().data_ptr()
                 for a in pytree.tree_leaves((args, kwargs)) if isinstance(a, torch.Tensor)}
        for t in pytree.tree_leaves(out):
            if not isinstance(t, torch.Tensor):
                continue
            storage = t.untyped_storage()
            key = storage.data_ptr()
            entry = self.alive.get(key)
            if entry is None:
                if key == 0 or key in given:  # empty, or a view of older memory
                    continue
                entry = self.alive[key] = [0, storage.nbytes()]
                self.now += entry[1]
                self.peak = max(self.peak, self.now)
            entry[0] += 1
            weakref.finalize(t, self._release, key)
        return out


@torch.no_grad()
def activation_peak(fn: Callable[..., Any], *inputs: Any) -> float:
    """Activation peak of one call of ``fn(*inputs)``, MiB: the most bytes of tensors
    created by its ops that were alive at once (the outputs included; parameters, inputs and
    a kernel's private scratch space not). It counts tensors, not what an allocator keeps,
    so it is the same in any process state and on any platform."""
    fn(*inputs)  # lazy one-time buffers are not activations
    gc.collect()
    with _LiveBytes() as live:
        out = fn(*inputs)
    del out
    return live.peak / 2**20


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
    """`memory_probe` in a fresh ``python -m trimkit.tools.bench --memory-probe`` process."""
    arg = json.dumps(dict(spec=spec, recipe=recipe, options=options, batch_size=batch_size,
                          threads=threads))
    # a fixed mmap threshold turns off glibc's adaptive one, so every large tensor is its own
    # mapping, returned on free: the resident set then follows live tensors (runs agree to
    # the page instead of scattering by ±30%)
    env = {"MALLOC_MMAP_THRESHOLD_": "131072", **os.environ}
    out = subprocess.run([sys.executable, "-m", "trimkit.tools.bench", "--memory-probe", arg],
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


def time_calls(
    calls: list[tuple[Callable[..., Any], tuple | list[tuple]]],
    *,
    warmup: int = 2,
    repeats: int = 5,
    device: str | torch.device = "cpu",
    progress: Callable[[int, list[float]], None] | None = None,
) -> list[list[float]]:
    """Seconds per round of each ``(call, inputs)``, in one process: ``warmup`` untimed
    rounds, then ``repeats`` timed rounds, round-robin, round ``i`` starting with call
    ``i mod len(calls)`` so that each goes first equally often. Take the medians. A round is
    one forward, or, for a list of input tuples, one forward of each (e.g. many single
    examples, where per-instance trimming makes one example unrepresentative).
    ``progress(i, last)`` gets each call's latest time after round ``i``."""
    cuda = torch.device(device).type == "cuda"
    jobs = [(call, inputs if isinstance(inputs, list) else [inputs]) for call, inputs in calls]
    times: list[list[float]] = [[] for _ in jobs]
    with torch.inference_mode():
        for _ in range(warmup):
            for call, batches in jobs:
                _timed(call, batches, cuda)
        for i in range(repeats):
            for j in range(len(jobs)):
                k = (i + j) % len(jobs)
                times[k].append(_timed(*jobs[k], cuda))
            if progress is not None:
                progress(i, [t[-1] for t in times])
    return times


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
    """`time_calls` of ``base`` and ``trim`` on the same ``inputs`` (they alternate which goes
    first): seconds per round of each."""
    tb, tt = time_calls([(base, inputs), (trim, inputs)], warmup=warmup, repeats=repeats,
                        device=device, progress=None if progress is None else
                        lambda i, last: progress(i, last[0], last[1]))
    return tb, tt


def _image_shape(inputs: tuple) -> tuple[int, int] | None:
    """``(H, W)`` of the one image batch (``B×C×H×W``) among ``inputs``."""
    images = [a for a in inputs if isinstance(a, torch.Tensor) and a.dim() == 4]
    if len(images) != 1:
        return None
    return int(images[0].shape[-2]), int(images[0].shape[-1])


def _image_side(inputs: tuple) -> int | None:
    """The side of the one square image batch (``B×C×H×W``, ``H = W``) among ``inputs``."""
    shape = _image_shape(inputs)
    return shape[0] if shape is not None and shape[0] == shape[1] else None


def _patch_size(model: nn.Module) -> int | None:
    """The side of the square patches of ``model``'s patch embedding (its first
    ``nn.Conv2d`` whose kernel is its stride), or None."""
    for m in model.modules():
        if (isinstance(m, nn.Conv2d) and m.kernel_size == m.stride
                and m.kernel_size[0] == m.kernel_size[1] > 1):
            return int(m.kernel_size[0])
    return None


class _Resizer:
    """The untrimmed model of ``spec`` rebuilt at ``k × patch`` px (``0 < k < steps``, the
    native grid side) through the builder keyword ``key``; FLOPs per example are counted on
    the first task (cached per ``k``), and only the last chosen model is kept."""

    def __init__(self, spec: str, key: str, patch: int, steps: int, device: torch.device):
        self.spec, self.key, self.patch, self.steps, self.device = spec, key, patch, steps, device
        self.flops: dict[int, float] = {}
        self.built: dict[int, tuple[nn.Module, MakeInputs]] = {}

    def build(self, k: int) -> tuple[nn.Module, MakeInputs]:
        if k in self.built:
            return self.built[k]
        side = k * self.patch
        model, make, _ = build_with_tasks(self.spec, self.device, **{self.key: side})
        shape = _image_shape(make(1))
        if shape is None or shape[0] != side:
            raise BenchSetupError(f"{self.key}={side} did not make {side} px inputs "
                                  f"(the builder's resize hook is broken)")
        return model, make

    def count(self, run: Run, k: int) -> float:
        if k not in self.flops:
            model, make = self.build(k)
            self.flops[k] = float(trimkit.count_flops(partial(run, model), *make(1)))
        return self.flops[k]

    def match(self, run: Run, target: float) -> tuple[int, nn.Module, MakeInputs] | None:
        """The side (px), model and inputs whose FLOPs per example are closest to ``target``
        (a binary search: FLOPs grow with the side); None where no side is below native."""
        lo, hi = 1, self.steps - 1
        if hi < 1:
            return None
        while lo < hi:
            mid = (lo + hi) // 2
            lo, hi = (lo, mid) if self.count(run, mid) >= target else (mid + 1, hi)
        best = min((k for k in (lo - 1, lo) if k >= 1),
                   key=lambda k: (abs(self.count(run, k) - target), k))
        self.built = {best: self.build(best)}
        return (best * self.patch, *self.built[best])


def _resizer(spec: str, base: nn.Module, make_inputs: MakeInputs, device: torch.device
             ) -> _Resizer | None:
    """The resize baseline of ``spec``'s model, or None: no resize hook in its builder, no
    square patch grid, or inputs without one square image batch of side grid × patch (for
    a model that states no grid: without one image batch whose sides are multiples of its
    patch embedding's)."""
    key = RESIZE.get(parse_spec(spec)[0])
    if key is None:
        return None
    try:
        streams = trimkit.describe(base).streams.values()
    except (ValueError, TypeError):  # no adapter (UnsupportedModelError is a TypeError)
        return None
    grids = [s.grid for s in streams if s.grid]
    shape = _image_shape(make_inputs(1))
    if shape is None:
        return None
    h, w = shape
    if not grids:  # the patch count follows the input (ViLT): resize by the patch size
        patch = _patch_size(base)
        if patch is None or h % patch or w % patch or h // patch < 2:
            return None
        return _Resizer(spec, key, patch, h // patch, device)
    if len(grids) != 1 or grids[0][0] != grids[0][1] or h != w or h % grids[0][0]:
        return None
    return _Resizer(spec, key, h // grids[0][0], grids[0][0], device)


def benchmark(
    spec: str,
    recipe: str,
    options: dict[str, Any] | None = None,
    batch_sizes: list[int] | tuple[int, ...] = (1, 16),
    warmup: int = 2,
    repeats: int = 5,
    threads: int | None = None,
    *,
    memory: bool = True,
    resize: bool = True,
    device: str = "cpu",
    progress: Callable[[str], None] | None = None,
    compile: str | None = None,
) -> list[Row]:
    """Measure ``recipe`` (with ``options``) on the model of ``spec``: one `Row` per batch
    size (and task), with the resize baseline where ``resize`` and the builder offers one
    (see `register_builder`) and the recipe lowers the FLOPs: its side is matched per batch
    size on the first task's FLOPs per example, and that model is timed for every task. A
    bad spec, recipe or option (`trimkit.apply`'s ``ValueError``, no adapter) is a
    `BenchSetupError` (a ``ValueError``), raised before anything is timed.

    ``compile``: a ``torch.compile`` mode (``"default"``, ``"reduce-overhead"``,
    ``"max-autotune"``…) under which every timed model runs (see the module docstring)."""
    check_run_args(batch_sizes, warmup, repeats, threads, device, compile)
    options = dict(options or {})
    say = progress or (lambda _msg: None)
    old_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        try:  # unknown kind, unknown model name, bad constructor keywords
            base, make_inputs, tasks = build_with_tasks(spec, device)
        except (ValueError, RuntimeError, TypeError) as e:
            raise BenchSetupError(f"cannot build {spec!r}: {e}") from e
        resizer = _resizer(spec, base, make_inputs, torch.device(device)) if resize else None
        trim = copy.deepcopy(base)
        try:
            trimkit.apply(trim, recipe, **options)
        except (ValueError, trimkit.UnsupportedModelError) as e:
            raise BenchSetupError(str(e)) from e
        try:
            if compile is not None:
                for model in (base, trim):
                    model.compile(mode=compile)
            return _measure(spec, recipe, options, base, trim, make_inputs, tasks,
                            list(batch_sizes), warmup, repeats, threads, memory,
                            torch.device(device), say, resizer, compile)
        finally:
            if trimkit.is_applied(trim):  # one-shot recipes (prune_heads) install nothing
                trimkit.remove(trim)
    finally:
        torch.set_num_threads(old_threads)


def check_run_args(batch_sizes: Any = (1,), warmup: Any = 0, repeats: Any = 1,
                   threads: Any = None, device: Any = "cpu", compile: Any = None) -> None:
    """A `BenchSetupError` naming the first argument of `benchmark` / `layer_stats` that
    cannot work, before any model is built: batch sizes and repeats ``>= 1``, warm-up
    ``>= 0``, threads ``>= 1`` (or ``None``), a device that exists here, a known
    ``torch.compile`` mode (or ``None``)."""
    def count(value: Any, least: int) -> bool:
        return isinstance(value, int) and not isinstance(value, bool) and value >= least

    if not isinstance(batch_sizes, (list, tuple)) or not batch_sizes or not all(
            count(n, 1) for n in batch_sizes):
        raise BenchSetupError(f"batch sizes must be ints >= 1, got {batch_sizes!r}")
    for name, value, least in (("warmup", warmup, 0), ("repeats", repeats, 1)):
        if not count(value, least):
            raise BenchSetupError(f"{name} must be an int >= {least}, got {value!r}")
    if threads is not None and not count(threads, 1):
        raise BenchSetupError(f"threads must be an int >= 1 (or None: torch's default), got "
                              f"{threads!r}")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise BenchSetupError(f"device must be 'cpu', 'cuda' or 'cuda:N', got {device!r}") \
            from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise BenchSetupError(f"device {device!r}: no CUDA device is available here")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise BenchSetupError(f"device {device!r}: there are {torch.cuda.device_count()} CUDA "
                              f"devices here")
    if compile is not None:
        from torch._inductor import list_mode_options

        modes = sorted(list_mode_options())
        if compile not in modes:
            raise BenchSetupError(f"compile mode must be one of {', '.join(modes)}, got "
                                  f"{compile!r}")


#: per task: FLOPs per example and seconds per call of base, trim (and resize)
_Done = dict[str, tuple[list[float], list[list[float]]]]


def _eager_flops(fn: Callable[..., Any], *inputs: Any) -> float:
    """`trimkit.count_flops` with compiled modules running eagerly (FLOPs do not change)."""
    with torch.compiler.set_stance("force_eager"):
        return trimkit.count_flops(fn, *inputs)


def _measure(spec, recipe, options, base, trim, make_inputs, tasks, batch_sizes, warmup,
             repeats, threads, memory, device, say, resizer, compile=None) -> list[Row]:
    cuda = device.type == "cuda"
    names = ("base", "trimmed", "resized")
    rows = []
    for bs in batch_sizes:
        inputs = make_inputs(bs)
        if compile is not None:
            torch._dynamo.reset()  # fresh graphs, static shapes for this batch size
        done: _Done = {}
        extra_flops: dict[str, float] = {}
        resized = None  # (side, model, make_inputs), chosen on the first task
        for n, (task, run) in enumerate(tasks.items()):
            label = f"batch {bs}" + (f", {task}" if task else "")
            if isinstance(run, Derived):
                flops, times = _derive(done, run, task)
            else:
                calls = [(partial(run, base), inputs), (partial(run, trim), inputs)]
                # FLOPs of this very batch, per example: per-instance trimming packs a batch
                # to its longest survivor (and computes a head some instance keeps)
                flops = [_eager_flops(c, *x) / bs for c, x in calls]
                padded = padded_flops(trim, calls[1][0], inputs)
                if padded is not None:
                    extra_flops[task] = padded / bs
                if n == 0 and resizer is not None and flops[1] < flops[0]:
                    try:
                        resized = resizer.match(run, flops[1])
                    except (ValueError, RuntimeError, TypeError) as e:
                        say(f"{label}: no resize baseline ({e})")
                    if resized is not None:
                        say(f"{label}: resize baseline at {resized[0]} px")
                if resized is not None:
                    if compile is not None and getattr(resized[1], "_compiled_call_impl",
                                                       None) is None:
                        resized[1].compile(mode=compile)
                    calls.append((partial(run, resized[1]), resized[2](bs)))
                    flops.append(_eager_flops(calls[2][0], *calls[2][1]) / bs)
                times = time_calls(calls, warmup=warmup, repeats=repeats, device=device,
                                   progress=lambda i, last, label=label: say(
                                       f"{label}: repeat {i + 1}/{repeats}: " + ", ".join(
                                           f"{k} {t * 1e3:.1f} ms"
                                           for k, t in zip(names, last, strict=False))))
                done[task] = (flops, times)
            mems: list[float | None] = [None] * 3
            if memory and n == 0 and (cuda or compile is None):  # the first task's forward
                if cuda:
                    mems = [_cuda_peak(c, x) / 2**20 for c, x in calls] + [None]
                else:
                    say(f"{label}: memory probes (fresh processes)")
                    mems[:2] = [probe_in_subprocess(spec, None, {}, bs, threads) / 2**20,
                                probe_in_subprocess(spec, recipe, options, bs, threads) / 2**20]
            cache = [None, None]
            sizer = STATE_BYTES.get(parse_spec(spec)[0])
            if sizer is not None and n == 0:
                with torch.no_grad():
                    cache = [sizer(c(*x)) / 2**20 for c, x in calls[:2]]
            fb, ft = flops[0], flops[1]
            ratio = fb / ft if ft else float("nan")
            med = [statistics.median(t) for t in times]
            speedup = med[0] / med[1]
            extra: dict[str, Any] = {}
            if len(times) > 2:
                extra = dict(resize_side=resized[0], gflops_resize=flops[2] / 1e9,
                             ips_resize=bs / med[2], speedup_resize=med[0] / med[2],
                             mem_resize_mb=mems[2], times_resize=times[2])
            rows.append(Row(
                model=spec, recipe=recipe, options=options, device=str(device),
                threads=torch.get_num_threads(), batch_size=bs,
                gflops_base=fb / 1e9, gflops_trim=ft / 1e9, flops_ratio=ratio,
                ips_base=bs / med[0], ips_trim=bs / med[1], speedup=speedup,
                efficiency=speedup / ratio, mem_base_mb=mems[0], mem_trim_mb=mems[1],
                repeats=repeats, times_base=times[0], times_trim=times[1], task=task,
                compiled=compile, gflops_padded=(extra_flops[task] / 1e9
                                                 if task in extra_flops else None),
                cache_mb_base=cache[0], cache_mb_trim=cache[1], **extra))
    return rows


def padded_flops(model: nn.Module, call: Callable[..., Any], inputs: tuple) -> float | None:
    """FLOPs of ``call(*inputs)`` with the trimmed ``model`` run padded (``mode=
    "compacted"``: each batch padded to its longest survivor) while it runs in ``"auto"``
    or ``"packed"``, where the difference to what it spends is the waste packing saves
    (``"auto"`` packs within a layer only where at least a fifth of the slots would be
    padding); else ``None``."""
    if not trimkit.is_applied(model):
        return None
    ctx = trimkit.api._applied(model).ctx
    if ctx.mode not in ("auto", "packed") or not ctx.packable:
        return None
    was = ctx.mode
    ctx.mode = "compacted"
    try:
        return _eager_flops(call, *inputs)
    finally:
        ctx.mode = was


def _derive(done: _Done, d: Derived, task: str) -> tuple[list[float], list[list[float]]]:
    if d.of not in done or d.minus not in done:
        raise BenchSetupError(f"task {task!r} derives from {d.of!r} and {d.minus!r}, which must "
                              f"be measured before it")
    (f1, t1), (f0, t0) = done[d.of], done[d.minus]
    flops = [(a - b) / d.per for a, b in zip(f1, f0, strict=True)]
    times = [[(x - y) / d.per for x, y in zip(a, b, strict=True)]
             for a, b in zip(t1, t0, strict=True)]
    return flops, times


# ------------------------------------------------------------------------------------ table

_COLUMNS = [
    ("compiled", "compiled", "{}"),
    ("batch", "batch_size", "{}"),
    ("ms base", "ms_base", "{:.1f}"),
    ("ms trim", "ms_trim", "{:.1f}"),
    ("GFLOPs base", "gflops_base", "{:.2f}"),
    ("GFLOPs trim", "gflops_trim", "{:.2f}"),
    ("GFLOPs padded", "gflops_padded", "{:.2f}"),
    ("FLOPs ratio", "flops_ratio", "{:.3f}x"),
    ("img/s base", "ips_base", "{:.2f}"),
    ("img/s trim", "ips_trim", "{:.2f}"),
    ("resize px", "resize_side", "{}"),
    ("GFLOPs resize", "gflops_resize", "{:.2f}"),
    ("img/s resize", "ips_resize", "{:.2f}"),
    ("speedup", "speedup", "{:.3f}x"),
    ("speedup resize", "speedup_resize", "{:.3f}x"),
    ("efficiency", "efficiency", "{:.1%}"),
    ("cache MiB base", "cache_mb_base", "{:.2f}"),
    ("cache MiB trim", "cache_mb_trim", "{:.2f}"),
    ("act MiB base", "mem_base_mb", "{:.1f}"),
    ("act MiB trim", "mem_trim_mb", "{:.1f}"),
    ("act MiB resize", "mem_resize_mb", "{:.1f}"),
]

#: columns shown only when some row has a value
_OPTIONAL = {"resize_side", "gflops_resize", "ips_resize", "speedup_resize", "mem_resize_mb",
             "compiled", "gflops_padded", "cache_mb_base", "cache_mb_trim"}


def format_table(rows: list[Row]) -> str:
    """A plain aligned text table, one line per row, under a line naming the setup. The
    resize columns appear when some row has a resize baseline ("-" in rows without one):
    "speedup" beside "speedup resize" tells whether trimming beats shrinking the input."""
    if not rows:
        return "(no rows)"
    lines = []
    resize = any(r.resize_side is not None for r in rows)
    for key in dict.fromkeys((r.model, r.recipe, json.dumps(r.options, sort_keys=True),
                              r.device, r.threads, r.repeats, r.compiled) for r in rows):
        model, recipe, opts, dev, threads, repeats, compiled = key
        lines.append(f"model {model}  recipe {recipe}  options {opts}  device {dev}  "
                     f"threads {threads}  repeats {repeats} (median)"
                     + (f"  compiled: torch.compile mode {compiled!r}" if compiled else "")
                     + ("  resize: untrimmed at the side closest in GFLOPs to trim"
                        if resize else ""))
    columns = ([("task", "task", "{}")] if any(r.task for r in rows) else []) + [
        c for c in _COLUMNS
        if c[1] not in _OPTIONAL or any(getattr(r, c[1]) is not None for r in rows)]
    header = [c[0] for c in columns]
    body = [["-" if getattr(r, attr) is None else fmt.format(getattr(r, attr))
             for _, attr, fmt in columns] for r in rows]
    widths = [max(len(x) for x in col) for col in zip(header, *body, strict=True)]
    for cells in [header, *body]:
        lines.append("  ".join(c.rjust(w) for c, w in zip(cells, widths, strict=True)))
    return "\n".join(lines)


def _probe_main(argv: list[str]) -> int:
    if len(argv) != 2 or argv[0] != "--memory-probe":
        print("usage: python -m trimkit.tools.bench --memory-probe JSON", file=sys.stderr)
        return 2
    a = json.loads(argv[1])
    peak = memory_probe(a["spec"], a.get("recipe"), a.get("options") or {}, int(a["batch_size"]),
                        a.get("threads"))
    print(json.dumps({"peak_bytes": peak}))
    return 0


if __name__ == "__main__":
    # run the imported module's copy: adapters register their builders there, not in __main__
    from trimkit.tools import bench

    sys.exit(bench._probe_main(sys.argv[1:]))
