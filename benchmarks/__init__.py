"""End-to-end benchmarks shipped with trimkit (installed as ``trimkit.benchmarks``): real
data, real training, measured speed. Each registers a ``trimkit`` sub-command on import;
heavy dependencies are imported only when a command runs."""

from . import (  # noqa: F401
    bench_minilm,
    bench_vqa,
    demo,
    smarttrim_ablation,
    smarttrim_flops,
    smarttrim_speed,
)
