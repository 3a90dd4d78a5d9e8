"""The ``trimkit`` command: ``bench``, ``stats``, ``recipes``, ``adapters``, and the commands
shipped beside the engine (`trimkit.registry.register_command`)."""

from __future__ import annotations

import argparse
import json
import os
import sys
import textwrap
from typing import Any, NoReturn

__all__ = ["main", "parse_overrides"]

BENCH_EPILOG = """\
Any other --some-option VALUE is a recipe option (some_option=VALUE); values are parsed as
int, float, bool (true/false), none, or a comma-separated list.

Batch 1 gives the latency (ms base, ms trim), larger batches the throughput (img/s).
Resize baseline: where the model's builder can rebuild it at another input side and the
model has a patch grid, each batch also times the untrimmed model at the lower side (a
multiple of the patch size) whose GFLOPs come closest to the trimmed model's ("resize px",
"GFLOPs resize", "img/s resize", "speedup resize"; JSON keys resize_side, gflops_resize,
ips_resize, speedup_resize). Trimming is worth it where "speedup" beats "speedup resize".
Text-only models, builders without the hook and recipes that remove no FLOPs show "-".

examples:
{examples}

model specs: <kind>:<name>[?key=value&...] (kinds: {kinds}), the query becoming keyword
arguments of the kind's model builder (random weights); aliases: {aliases}."""


def _bench_examples() -> list[str]:
    """``trimkit bench`` lines offered by the registered adapters."""
    from ..registry import _load_builtins
    from .bench import EXAMPLES

    _load_builtins()
    return [f"trimkit bench {e}" for e in EXAMPLES]


STATS_EPILOG = """\
Any other --some-option VALUE is a recipe option, as for bench.

examples (SPEC: any model spec or alias of trimkit bench --help):
  trimkit stats --model SPEC --recipe pumer --batch-size 2
  trimkit stats --model SPEC --recipe tome --r 8 --json"""

RECIPES_EPILOG = """\
example:
  trimkit recipes          # then: trimkit bench --recipe NAME --OPTION VALUE ..."""

ADAPTERS_EPILOG = """\
Adapters from other packages (entry point group trimkit.adapters) show [from DISTRIBUTION].

example:
  trimkit adapters         # model families trimkit.apply recognises"""


class _UsageError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    """An argument parser whose errors are one ``error:`` line (exit status 2), as the
    command's other errors are, instead of the usage text and the error."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split()) or type(err).__name__


def parse_overrides(tokens: list[str]) -> dict[str, Any]:
    """``["--r", "13", "--keep-ratio=0.5", "--fuse"]`` → ``{"r": 13, "keep_ratio": 0.5,
    "fuse": True}``: dashes become underscores, values go through `bench.parse_value`,
    an option with no value is True."""
    from .bench import parse_value

    out: dict[str, Any] = {}
    i = 0
    while i < len(tokens):
        tok = tokens[i]
        if not tok.startswith("--") or tok == "--":
            raise _UsageError(f"unexpected argument {tok!r} (recipe options are --name VALUE)")
        name, eq, value = tok[2:].partition("=")
        i += 1
        if not eq:
            if i < len(tokens) and not tokens[i].startswith("--"):
                value = tokens[i]
                i += 1
            else:
                value = "true"
        key = name.replace("-", "_")
        if not key.isidentifier():
            raise _UsageError(f"bad option name {tok!r}")
        if key in out:
            raise _UsageError(f"option --{name} given twice")
        out[key] = parse_value(value)
    return out


def _bench_epilog() -> str:
    from .bench import ALIASES, BUILDERS

    return BENCH_EPILOG.format(
        examples="\n".join(f"  {e}" for e in _bench_examples()),
        kinds=", ".join(sorted(BUILDERS)), aliases=", ".join(sorted(ALIASES)) or "none")


def _parser() -> argparse.ArgumentParser:
    fmt = argparse.RawDescriptionHelpFormatter
    p = _Parser(
        prog="trimkit", formatter_class=fmt, allow_abbrev=False,
        description="Token pruning, merging and head trimming for existing transformers.",
        epilog="examples:\n  trimkit recipes\n  trimkit adapters\n"
               + "".join(f"  {e}\n" for e in _bench_examples()[:1]))
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    b = sub.add_parser(
        "bench", formatter_class=fmt, allow_abbrev=False, epilog=_bench_epilog(),
        help="time a recipe against the untrimmed model, next to the FLOPs ratio",
        description="Build the model once, apply the recipe to a copy, time both alternately "
                    "on the same inputs (median after warm-up) and print GFLOPs, latency, "
                    "throughput, speedup, speedup / FLOPs ratio and activation peak memory, "
                    "next to the resize baseline: the untrimmed model at the lower input side "
                    "whose GFLOPs match the trimmed model's, timed in the same rounds.")
    _model_and_recipe(b)
    b.add_argument("--batch-size", type=int, nargs="+", default=[1, 16], metavar="N",
                   help="one or more batch sizes (default: 1 16: latency and throughput)")
    b.add_argument("--warmup", type=int, default=2, help="untimed runs of each (default: 2)")
    b.add_argument("--repeats", type=int, default=5, help="timed runs of each (default: 5)")
    b.add_argument("--threads", type=int, default=None,
                   help="torch intra-op threads (default: torch's)")
    b.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    b.add_argument("--json", action="store_true", help="print JSON rows instead of the table")
    b.add_argument("--no-memory", action="store_true", help="skip the peak-memory probes")
    b.add_argument("--no-resize", action="store_true",
                   help="skip the resize baseline (the untrimmed model at the input side "
                        "closest in GFLOPs to the trimmed one)")
    b.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    b.add_argument("--compile", nargs="?", const="default", default=None, metavar="MODE",
                   help="torch.compile the untrimmed, trimmed and resized models alike (in "
                        "place, afresh per batch size, in the warm-up) with this mode "
                        "(default: 'default'); rows are marked compiled (docs/deploy.md)")

    st = sub.add_parser(
        "stats", formatter_class=fmt, allow_abbrev=False, epilog=STATS_EPILOG,
        help="per-layer live tokens and heads of one trimmed forward",
        description="Build the model, run one forward of the recipe on the builder's inputs "
                    "and print each layer's live tokens in and out and live heads, with the "
                    "GFLOPs per example untrimmed and trimmed.")
    _model_and_recipe(st)
    st.add_argument("--batch-size", type=int, default=1, metavar="N",
                    help="batch size of the forward (default: 1)")
    st.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    st.add_argument("--json", action="store_true", help="print JSON instead of the table")

    sub.add_parser("recipes", formatter_class=fmt, allow_abbrev=False, epilog=RECIPES_EPILOG,
                   help="list recipes with their options and defaults",
                   description="List the registered recipes, their options and defaults.")
    sub.add_parser("adapters", formatter_class=fmt, allow_abbrev=False, epilog=ADAPTERS_EPILOG,
                   help="list the model families trimkit recognises",
                   description="List the registered adapters (model families).")
    from ..registry import COMMANDS

    for command in COMMANDS.values():
        c = sub.add_parser(command.name, formatter_class=fmt, allow_abbrev=False,
                           help=command.help, description=command.description,
                           epilog=command.epilog)
        command.configure(c)
    return p


def _model_and_recipe(p: argparse.ArgumentParser) -> None:
    """The ``--model`` and ``--recipe`` arguments that ``bench`` and ``stats`` share."""
    p.add_argument("--model", required=True, metavar="SPEC",
                   help="model spec <kind>:<name>[?key=value&...] or an alias")
    p.add_argument("--recipe", metavar="NAME",
                   help="recipe name, required: trimkit recipes lists them with their options")


def _recipe(args: argparse.Namespace) -> str:
    """``--recipe``, which has no default (the engine favours no recipe); its absence is a
    usage error that lists the recipes to choose from."""
    if args.recipe is None:
        from ..api import list_recipes

        raise _UsageError(f"--recipe NAME is required, one of: {', '.join(list_recipes())} "
                          f"(trimkit recipes shows their options)")
    return args.recipe


def _bench(args: argparse.Namespace, extra: list[str]) -> int:
    from .bench import benchmark, format_table

    recipe = _recipe(args)
    options = parse_overrides(extra)
    bad = [n for n in args.batch_size if n < 1]
    if bad or args.repeats < 1 or args.warmup < 0:
        raise _UsageError("--batch-size and --repeats must be >= 1, --warmup >= 0")
    progress = None if args.quiet or args.json else (
        lambda msg: print(msg, file=sys.stderr, flush=True))
    rows = benchmark(args.model, recipe, options, args.batch_size, warmup=args.warmup,
                     repeats=args.repeats, threads=args.threads, memory=not args.no_memory,
                     resize=not args.no_resize, device=args.device, progress=progress,
                     compile=args.compile)
    if args.json:
        print(json.dumps([r.as_dict() for r in rows], indent=2))
    else:
        print(format_table(rows))
    return 0


def _stats(args: argparse.Namespace, extra: list[str]) -> int:
    from .bench import format_layer_stats, layer_stats

    recipe = _recipe(args)
    if args.batch_size < 1:
        raise _UsageError("--batch-size must be >= 1")
    stats = layer_stats(args.model, recipe, parse_overrides(extra), args.batch_size,
                        args.device)
    print(json.dumps(stats, indent=2) if args.json else format_layer_stats(stats))
    return 0


def _from(kind: str, name: str) -> str:
    """`` [from DISTRIBUTION]`` for an adapter or recipe that does not ship with trimkit."""
    from trimkit.registry import origin

    where = origin(kind, name)
    return "" if where == "built-in" else f" [from {where}]"


def _recipes() -> int:
    import trimkit
    from trimkit.registry import RECIPES

    for name in trimkit.list_recipes():
        rec = RECIPES[name]
        print(f"{name}: {rec.summary}{_from('recipe', name)}")
        for opt, o in rec.options.items():
            head = f"  --{opt.replace('_', '-')} (default {o.default!r})"
            if o.kind is not None or o.choices:
                head += f": {o.describe()}"
            print(head)
            for line in textwrap.wrap(o.help, 88):
                print(f"      {line}")
    return 0


def _adapters() -> int:
    import trimkit
    from trimkit.registry import ADAPTERS

    for name in trimkit.list_adapters():
        doc = (type(ADAPTERS[name]).__doc__ or "").strip().split("\n\n")[0]
        doc = " ".join(doc.split())
        print(f"{name}: {doc}{_from('adapter', name)}" if doc
              else f"{name}{_from('adapter', name)}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Run the ``trimkit`` command; returns the exit status: 2 for usage and option errors,
    1 for other failures, each reported as one ``error:`` line on stderr."""
    try:
        return _run(argv)
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # not the input's fault: one line too, the traceback on request
        if os.environ.get("TRIMKIT_TRACEBACK"):
            raise
        print(f"error: {type(e).__name__}: {_one_line(e)} (TRIMKIT_TRACEBACK=1 shows where)",
              file=sys.stderr)
        return 1


def _run(argv: list[str] | None) -> int:
    parser = _parser()
    try:
        args, extra = parser.parse_known_args(argv)
    except SystemExit as e:  # --help (0) or an argparse error (2)
        return int(e.code or 0)
    from .bench import BenchSetupError

    try:
        if extra and args.command not in ("bench", "stats"):
            raise _UsageError(f"unrecognized arguments: {' '.join(extra)}")
        if args.command == "bench":
            return _bench(args, extra)
        if args.command == "stats":
            return _stats(args, extra)
        if args.command == "recipes":
            return _recipes()
        if args.command == "adapters":
            return _adapters()
        from ..registry import COMMANDS

        return COMMANDS[args.command].run(args)
    except (_UsageError, BenchSetupError) as e:
        # bad usage, or trimkit.apply's ValueError for the recipe and its options
        print(f"error: {_one_line(e)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
