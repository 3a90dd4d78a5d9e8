"""Per-token decoding time of a LLaVA-style VLM, untrimmed against trimmed, one step at a time.

``trimkit bench --model llava:...`` times 16-token decodes whole, base then trimmed, a few
times; on a CPU shared with other work its repeats scatter by tens of percent, more than
the few percent a decoding step differs. This script builds the preset
(`trimkit.adapters.hf.llava_bench.llava_model`, random weights), trims deep copies of it
(``--recipe`` with its options, and the same recipe with ``--zero KEY=VALUE``: every hook
installed, nothing dropped), runs one prefill each, then times ``--steps`` greedy decoding
steps *interleaved*: step ``i`` of every model back to back, the order rotating, each
continuing its own cache. ``--control`` adds an untrimmed deep copy: the trimmed models are
copies, whose weights lie elsewhere in memory, which alone can move a memory-bound step.
Load that comes and goes then hits every model alike. It prints the median, lower quartile
and minimum per step of each model and the median ratios.

Run (from the repository root; minutes on one thread)::

    OMP_NUM_THREADS=1 python benchmarks/decode_steps.py --model llava-interleave-qwen-0.5b \\
        --batch-size 1 --steps 40 --recipe fastv --option layer=2 --option keep=0.5
    OMP_NUM_THREADS=1 python benchmarks/decode_steps.py --image-size 112 --batch-size 8
"""

from __future__ import annotations

import argparse
import ast
import copy
import statistics
import time
from typing import Any

import torch
from trimkit.adapters.hf.llava_bench import PRESETS, llava_model

import trimkit


def _options(pairs: list[str]) -> dict[str, Any]:
    out = {}
    for pair in pairs:
        key, _, value = pair.partition("=")
        try:
            out[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            out[key] = value
    return out


def measure(preset: str, batch_size: int, steps: int, recipe: str, options: dict[str, Any],
            zero: dict[str, Any], image_size: int | None = None, threads: int = 1,
            control: bool = False) -> dict[str, list[float]]:
    """Seconds per decoding step of each model (``"untrimmed"``, with ``control`` an
    untrimmed deep copy, ``recipe``, and ``recipe`` with ``zero`` options unless empty),
    the steps interleaved."""
    torch.set_num_threads(threads)
    base, make_inputs, _ = llava_model(preset, image_size=image_size)
    models = {"untrimmed": base}
    if control:  # the weights of a deep copy lie elsewhere in memory, as the trimmed ones do
        models["untrimmed copy"] = copy.deepcopy(base)
    models[recipe] = trimkit.apply(copy.deepcopy(base), recipe, **options)
    if zero:
        models[f"{recipe}, nothing dropped"] = trimkit.apply(copy.deepcopy(base), recipe,
                                                             **{**options, **zero})
    ids, mask, pixels = make_inputs(batch_size)
    state = {}
    with torch.no_grad():
        for name, m in models.items():
            out = m(input_ids=ids, attention_mask=mask, pixel_values=pixels, use_cache=True,
                    logits_to_keep=1)
            state[name] = [out.cache, out.logits[:, -1].argmax(-1, keepdim=True), mask]
    times: dict[str, list[float]] = {name: [] for name in models}
    names = list(models)
    with torch.no_grad():
        for i in range(steps + 1):  # the first round warms up
            for name in names[i % len(names):] + names[:i % len(names)]:
                cache, token, seen = state[name]
                seen = torch.cat([seen, torch.ones_like(token)], dim=1)
                start = time.perf_counter()
                out = models[name](input_ids=token, attention_mask=seen, cache=cache,
                                   use_cache=True, logits_to_keep=1)
                took = time.perf_counter() - start
                state[name][1:] = [out.logits[:, -1].argmax(-1, keepdim=True), seen]
                if i:
                    times[name].append(took)
    return times


def table(times: dict[str, list[float]]) -> str:
    """A markdown table: median, lower quartile and minimum ms per step, and the untrimmed
    median over each model's."""
    base = statistics.median(times["untrimmed"])
    lines = ["| model | ms/step median | lower quartile | min | speedup (medians) |",
             "|---|---|---|---|---|"]
    for name, ts in times.items():
        ts = sorted(ts)
        med = statistics.median(ts)
        lines.append(f"| {name} | {med * 1e3:.1f} | {ts[len(ts) // 4] * 1e3:.1f} | "
                     f"{ts[0] * 1e3:.1f} | {base / med:.3f}x |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="llava-interleave-qwen-0.5b", choices=sorted(PRESETS))
    p.add_argument("--image-size", type=int, default=None, help="the vision tower's side")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--steps", type=int, default=40, help="timed steps per model")
    p.add_argument("--recipe", default="fastv")
    p.add_argument("--option", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--zero", action="append", default=None, metavar="KEY=VALUE",
                   help="options that drop nothing (default for fastv: keep=1.0)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--control", action="store_true",
                   help="also time an untrimmed deep copy (the trimmed models are copies: "
                        "their weights lie elsewhere in memory)")
    p.add_argument("--no-zero", action="store_true", help="skip the nothing-dropped model")
    args = p.parse_args(argv)
    if args.batch_size < 1 or args.steps < 1:
        p.error("--batch-size and --steps must be >= 1")
    options = _options(args.option) or ({"layer": 2, "keep": 0.5} if args.recipe == "fastv"
                                        else {})
    zero = _options(args.zero) if args.zero is not None else (
        {"keep": 1.0} if args.recipe == "fastv" and not args.no_zero else {})
    times = measure(args.model, args.batch_size, args.steps, args.recipe, options, zero,
                    args.image_size, args.threads, args.control)
    print(f"model {args.model}  image {args.image_size or 'preset'}  batch {args.batch_size}  "
          f"recipe {args.recipe} {options}  {args.steps} interleaved steps  "
          f"threads {args.threads}")
    print(table(times))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
