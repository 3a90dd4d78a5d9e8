"""``trimkit bench-packed``: is per-instance trimming faster, padded or packed?

SmartTrim keeps a different number of tokens for every input. Padded to the batch's
longest survivor (``mode="compacted"``) the whole batch pays for its least trimmed sample;
packed (``mode="packed"``, or ``"auto"``, which packs within each layer where it pays) every
per-token computation runs on the live tokens only. This command measures both, on two
models, and prints two tables (medians of alternating runs, in one process):

1. **The demo model** (the small METER of ``trimkit demo``, easy-VQA), SmartTrim fine-tuned
   at the demo's settings (cached), and ``attn_prune`` at a similar FLOPs ratio (the same
   count for every input, never ragged) for comparison: FLOPs ratio, the FLOPs the padded
   form would spend, speedup at batch 1 and 32 in each execution mode, and the *realised*
   share of the FLOPs ratio (speedup / FLOPs ratio). Also the trimmers' own share of the
   trimmed model's FLOPs and of its time.
2. **METER-base** (published sizes, random weights) replaying the fine-tuned model's
   decisions: for each test example, the share of image tokens it kept entering each layer
   is mapped to the same relative depth of METER-base's image tower and fusion stack, and
   a batch's samples keep exactly those shares (one per example, so the spread within a
   batch is the real one). Same columns. ``--replay-on scenes`` replays them on the scenes
   model instead (`scenes.SCENES_MODEL`, random weights, 257 image tokens, width 192, the
   cached MiniLM features replaced by random ones): whether packing pays at width 192.
"""

from __future__ import annotations

import argparse
import copy
import math
import re
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import trimkit
from trimkit.ops import drop_tokens
from trimkit.registry import RECIPES, Command, register_command
from trimkit.tools.bench import padded_flops, time_calls

from .bench_vqa import FINE_TUNE, _fine_tune, _Questions, _say, _segments, smarttrim_options

MODES = ("compacted", "packed", "auto")
#: the demo's comparison point: the same count kept for every input
ATTN_PRUNE = dict(keep_ratio=0.5)
#: a token op's module name under the model's ``trimkit`` child (its own children excluded)
_OP_NAME = re.compile(r"\.trimkit\.[^.]+\.(pre|post)\.\d+$")


# ------------------------------------------------------------------------------ replay


class KeepShares(trimkit.TokenOp):
    """Keeps, in sample ``j`` of a batch, the share ``shares[(offset + j) % E]`` of the
    stream's entry tokens that are not protected (the largest norms first): a replay of
    per-instance decisions, one recorded example per sample. ``offset`` is set by the
    caller before each forward."""

    def __init__(self, shares: torch.Tensor, entry: int, holder: dict):
        super().__init__()
        self.shares, self.entry, self.holder = shares, entry, holder

    def forward(self, state: trimkit.TokenState, site: trimkit.Site) -> trimkit.TokenState:
        b, n = state.keep.shape
        eligible = state.live & ~state.protected
        idx = (self.holder["offset"] + torch.arange(b)) % len(self.shares)
        k = (self.shares[idx] * self.entry).round().clamp_min(1).long()
        score = state.x.detach().float().norm(dim=-1).masked_fill(~eligible, float("-inf"))
        rank = score.argsort(1, descending=True).argsort(1)
        return drop_tokens(state, eligible & (rank >= k[:, None]))


class Replay(trimkit.Recipe):
    """`KeepShares` before the attention of each layer in ``shares``: ``{(stream, layer):
    E shares}``."""

    name = "_replay_shares"
    options = {"shares": trimkit.Option(None, "{(stream, layer): per-example shares kept}"),
               "entry": trimkit.Option(None, "{stream: unprotected entry tokens}"),
               "holder": trimkit.Option(None, "{'offset': first example of the batch}")}

    def plan(self, desc: trimkit.ModelDescription, options: dict) -> dict:
        return {key: trimkit.SitePlan(pre=[KeepShares(s, options["entry"][key[0]],
                                                      options["holder"])])
                for key, s in options["shares"].items()}


def replay_shares(tokens: dict[tuple[str, int], torch.Tensor], entry: dict[str, float],
                  small: trimkit.ModelDescription, big: trimkit.ModelDescription,
                  streams: list[str]) -> dict[tuple[str, int], torch.Tensor]:
    """Per-example shares of each stream's entry tokens kept entering each layer of
    ``big``, from the per-example counts ``tokens[(stream, layer)]`` of ``small``: each
    segment (encoder, fusion stack) maps onto the same segment at the same relative depth,
    interpolated, never above the share of the layer before."""
    out = {}
    for stream in streams:
        prev: torch.Tensor | None = None
        for seg_s, seg_b in zip(_segments(small.streams[stream].layers),
                                _segments(big.streams[stream].layers), strict=True):
            if not seg_s or not seg_b:
                continue
            shares = [tokens[(stream, i)].float() / entry[stream] for i in seg_s]
            for j, i in enumerate(seg_b):
                pos = j * (len(seg_s) - 1) / max(len(seg_b) - 1, 1)
                lo, hi = math.floor(pos), math.ceil(pos)
                w = pos - lo
                share = (shares[lo] * (1 - w) + shares[hi] * w).clamp(max=1.0)
                if prev is not None:
                    share = torch.minimum(share, prev)
                if bool((share < 0.999).any()):
                    out[(stream, i)] = share
                prev = share
    return out


# ------------------------------------------------------------------------------ measures


def trimmer_flops_share(model: Callable[..., Any], inputs: tuple) -> float:
    """The share of ``model``'s FLOPs on ``inputs`` spent in trimkit's token ops (the
    trimmers, scorers and gates `trimkit.apply` installed under the model's ``trimkit``
    child)."""
    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        model(*inputs)
    counts = fc.get_flop_counts()
    total = sum(counts.get("Global", {}).values())
    own = sum(sum(v.values()) for k, v in counts.items() if _OP_NAME.search(k))
    return own / total if total else 0.0


class _Timer:
    """Wall time spent inside trimkit's token ops (forward pre/post hooks)."""

    def __init__(self, model: nn.Module):
        self.seconds, self._t0, self.handles = 0.0, [], []
        sites = getattr(model, "trimkit", None)
        for site in (sites.values() if sites is not None else []):
            for op in [*site.pre, *site.post]:
                self.handles.append(op.register_forward_pre_hook(self._start))
                self.handles.append(op.register_forward_hook(self._stop))

    def _start(self, *_: Any) -> None:
        self._t0.append(time.perf_counter())

    def _stop(self, *_: Any) -> None:
        self.seconds += time.perf_counter() - self._t0.pop()

    def close(self) -> None:
        for h in self.handles:
            h.remove()


def trimmer_time_share(model: nn.Module, call: Callable[..., Any], inputs: tuple,
                       repeats: int = 3) -> float:
    """The share of the wall time of ``call`` (a forward of ``model``) on ``inputs`` spent
    in ``model``'s token ops."""
    timer = _Timer(model)
    try:
        with torch.inference_mode():
            call(*inputs)
            timer.seconds = 0.0
            t = time.perf_counter()
            for _ in range(repeats):
                call(*inputs)
            total = time.perf_counter() - t
    finally:
        timer.close()
    return timer.seconds / total if total else 0.0


def _speeds(base, trimmed: dict[str, Any], singles: list[tuple], batch: tuple,
            repeats: int) -> dict[tuple[str, int], float]:
    """Speedup of each of ``trimmed`` (name → callable) over ``base`` at batch 1 (a run of
    the single examples) and at the batch."""
    out = {}
    for bs, inputs in ((1, singles), (len(batch[0]), batch)):
        names = list(trimmed)
        times = time_calls([(base, inputs)] + [(trimmed[n], inputs) for n in names],
                           warmup=1, repeats=repeats)
        tb = statistics.median(times[0])
        for n, t in zip(names, times[1:], strict=True):
            out[(n, bs)] = tb / statistics.median(t)
    return out


def _moded(model: nn.Module, mode: str, call):
    """``call`` on ``model`` in execution ``mode`` (switched at each call: the modes share
    one model)."""
    def run(*inputs):
        trimkit.set_mode(model, mode)
        return call(*inputs)
    return run


def _row(name: str, ratio: float, padded: float | None, speeds: dict, bs: int,
         shares: tuple[float, float] | None) -> str:
    cells = [name, f"{ratio:.2f}×", "–" if padded is None else f"{padded:.2f}×"]
    for mode in MODES:
        s1, sb = speeds.get((mode, 1)), speeds.get((mode, bs))
        cells.append("–" if s1 is None else f"{s1:.2f}× / {sb:.2f}× ({sb / ratio:.0%})")
    cells.append("–" if shares is None else f"{shares[0]:.1%} / {shares[1]:.1%}")
    return "| " + " | ".join(cells) + " |"


def _header(bs: int) -> list[str]:
    modes = " | ".join(f"{m}: speedup b1 / b{bs} (realised)" for m in MODES)
    return [f"| model | FLOPs ratio | FLOPs ratio if padded b{bs} | {modes} "
            f"| trimmers' share of FLOPs / time b{bs} |",
            "|---" * (4 + len(MODES)) + "|"]


# ------------------------------------------------------------------------------ run


def run(args: argparse.Namespace) -> int:
    from . import easy_vqa

    if args.threads:
        torch.set_num_threads(args.threads)
    start = time.perf_counter()
    cache = Path(args.cache_dir) if args.cache_dir else easy_vqa.default_cache_dir()
    base, _ = easy_vqa.load_baseline(easy_vqa.SHIPPED_BASELINE) or easy_vqa.train_baseline(
        cache, log=_say)
    test = easy_vqa.load_split("test")
    test_set = _Questions(test, *easy_vqa.text_features(test.questions, cache))
    train = easy_vqa.load_split("train")
    train_set = _Questions(train, *easy_vqa.text_features(train.questions, cache))
    desc = trimkit.describe(base)
    cfg = dict(FINE_TUNE, steps=args.steps)
    smart, info = _fine_tune(base, args.target, train_set, cache, cfg, smarttrim_options(desc))
    shared = {id(base.text_transformer): base.text_transformer}
    prune = trimkit.apply(copy.deepcopy(base, shared), "attn_prune", **ATTN_PRUNE).eval()

    bs = args.batch_size
    examples = [test_set[i] for i in range(bs)]
    singles = [(e[0][None], e[2][None], e[1][None]) for e in examples]
    batch = tuple(torch.stack([e[i] for e in examples]) for i in (0, 2, 1))

    def call(model):
        return lambda images, mask, feats: model(images, attention_mask=mask, text_embeds=feats)

    def flops(model) -> float:
        return statistics.mean(trimkit.count_flops(call(model), *s) for s in singles)

    print(f"demo model (small METER, easy-VQA), SmartTrim ratio {args.target:g} fine-tuned "
          f"{info.get('steps')} steps; threads {torch.get_num_threads()}; medians of "
          f"{args.repeats}; speedups over the untrimmed model")
    print()
    lines = _header(bs)
    base_flops = flops(base)
    for name, model in ((f"smarttrim ratio={args.target:g}", smart),
                        (f"attn_prune keep={ATTN_PRUNE['keep_ratio']}", prune)):
        _say(f"{name}: FLOPs and timing")
        ratio = base_flops / flops(model)
        trimkit.set_mode(model, "auto")
        padded = padded_flops(model, call(model), batch)
        padded_ratio = None if padded is None else base_flops * bs / padded
        speeds = _speeds(call(base), {m: _moded(model, m, call(model)) for m in MODES},
                         singles, batch, args.repeats)
        trimkit.set_mode(model, "auto")
        shares = (trimmer_flops_share(call(model), batch),
                  trimmer_time_share(model, call(model), batch))
        lines.append(_row(name, ratio, padded_ratio, speeds, bs, shares))
    print("\n".join(lines))

    if not args.no_meter_base:
        _meter_base(smart, test_set, desc, args)
    _say(f"bench-packed finished in {(time.perf_counter() - start) / 60:.1f} min")
    return 0


@torch.no_grad()
def _recorded_counts(model: nn.Module, test_set, n: int) -> dict[tuple[str, int], torch.Tensor]:
    """Per-example live tokens entering each layer, over the first ``n`` test examples."""
    trimkit.set_mode(model, "compacted")
    loader = torch.utils.data.DataLoader(torch.utils.data.Subset(test_set, range(n)),
                                         batch_size=256)
    tokens: dict[tuple[str, int], list[torch.Tensor]] = {}
    for images, feats, mask, _ in loader:
        model(images, attention_mask=mask, text_embeds=feats)
        for s in trimkit.last_stats(model).layers:
            tokens.setdefault((s.stream, s.layer), []).append(s.tokens_in)
    trimkit.set_mode(model, "auto")
    return {k: torch.cat(v) for k, v in tokens.items()}


def _meter_call(model: nn.Module, images: torch.Tensor, text: torch.Tensor,
                mask: torch.Tensor) -> torch.Tensor:
    """A METER forward on token ids, or on text features (float ``text``)."""
    if text.is_floating_point():
        return model(images, attention_mask=mask, text_embeds=text)
    return model(images, text, mask)


def _meter_base(smart: nn.Module, test_set, desc, args: argparse.Namespace) -> None:
    from trimkit.adapters.meter import METER, meter_base

    on = getattr(args, "replay_on", "meter-base")
    _say(f"{on}: recording the fine-tuned model's per-example decisions")
    counts = _recorded_counts(smart, test_set, min(args.examples, len(test_set)))
    torch.manual_seed(0)
    if on == "scenes":
        from .scenes import build_model

        base = build_model(seed=0).eval()
    else:
        base = METER(meter_base()).eval()
    big = trimkit.describe(base)
    entry_small = {"image": float(desc.streams["image"].num_tokens
                                  - desc.streams["image"].num_protected)}
    counts = {k: v - desc.streams[k[0]].num_protected for k, v in counts.items()}
    shares = replay_shares(counts, entry_small, desc, big, ["image"])
    kept = torch.stack([s for k, s in sorted(shares.items())])[-1]
    # the timed examples spread evenly over the recorded ones: sample j of the batch (and
    # the j-th single) replays example j * step
    bs = args.batch_size
    step = max(1, len(kept) // bs)
    shares = {key: s[::step][:bs] for key, s in shares.items()}
    holder = {"offset": 0}
    entry_big = {"image": big.streams["image"].num_tokens - big.streams["image"].num_protected}
    RECIPES[Replay.name] = Replay()
    try:
        trim = trimkit.apply(copy.deepcopy(base), Replay.name, shares=shares,
                             entry=entry_big, holder=holder)
    finally:
        del RECIPES[Replay.name]
    cfg = base.config
    g = torch.Generator().manual_seed(0)
    # scenes: questions as MiniLM features (as the demo feeds them), 12 tokens
    singles = [(torch.randn(1, 3, cfg.image_size, cfg.image_size, generator=g),
                torch.randn(1, 12, cfg.text_hidden, generator=g) if on == "scenes"
                else torch.randint(3, cfg.vocab_size, (1, 40), generator=g),
                torch.ones(1, 12 if on == "scenes" else 40, dtype=torch.long))
               for _ in range(bs)]
    batch = tuple(torch.cat([s[i] for s in singles]) for i in range(3))
    stamped = [(i, *s) for i, s in enumerate(singles)]
    stamped_batch = (0, *batch)

    def at(model, mode=None):
        def call(offset, *inputs):
            holder["offset"] = offset
            if mode is not None:
                trimkit.set_mode(model, mode)
            return _meter_call(model, *inputs)
        return call

    def fwd(model):
        return lambda *inputs: _meter_call(model, *inputs)

    def flops(model) -> float:
        out = []
        for i, s in enumerate(singles):
            holder["offset"] = i
            out.append(trimkit.count_flops(fwd(model), *s))
        return statistics.mean(out)

    _say(f"{on}: FLOPs and timing")
    ratio = flops(base) / flops(trim)
    holder["offset"] = 0
    padded = padded_flops(trim, fwd(trim), batch)
    padded_ratio = None if padded is None else trimkit.count_flops(fwd(base), *batch) / padded
    speeds = {}
    for b, inputs in ((1, stamped), (bs, stamped_batch)):
        times = time_calls([(at(base), inputs)] + [(at(trim, m), inputs) for m in MODES],
                           warmup=1, repeats=args.repeats)
        tb = statistics.median(times[0])
        for m, t in zip(MODES, times[1:], strict=True):
            speeds[(m, b)] = tb / statistics.median(t)
    trimkit.set_mode(trim, "auto")
    timed = torch.stack([s for k, s in sorted(shares.items())])[-1]
    print()
    what = ("the scenes model (scenes.SCENES_MODEL: 257 image tokens, width 192, random "
            "weights)" if on == "scenes" else "meter-base (published sizes, random weights)")
    print(f"{what} replaying the per-example image token shares of the first {len(kept)} "
          f"easy-VQA test examples; share kept at the "
          f"last layer {kept.mean():.2f} ± {kept.std():.2f} ({kept.min():.2f}–{kept.max():.2f}); "
          f"the {len(timed)} timed, evenly spread over them: {timed.mean():.2f} ± "
          f"{timed.std():.2f}")
    print()
    print("\n".join([*_header(bs), _row("smarttrim replay", ratio, padded_ratio, speeds, bs,
                                        None)]))


def configure(p: argparse.ArgumentParser) -> None:
    p.add_argument("--target", type=float, default=0.5, help="SmartTrim's ratio (default 0.5)")
    p.add_argument("--steps", type=int, default=150,
                   help="SmartTrim fine-tuning steps (default: the demo's 150; cached)")
    p.add_argument("--batch-size", type=int, default=32, help="the large batch (default 32)")
    p.add_argument("--repeats", type=int, default=5, help="timed runs of each (default 5)")
    p.add_argument("--examples", type=int, default=1000,
                   help="test examples whose decisions METER-base replays (default 1000)")
    p.add_argument("--no-meter-base", action="store_true", help="the demo model only")
    p.add_argument("--replay-on", choices=["meter-base", "scenes"], default="meter-base",
                   help="the model that replays the decisions (default: meter-base; scenes: "
                        "the scenes model, 192 wide)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--cache-dir", default=None,
                   help="cache of text features and fine-tuned models (default: the demo's)")


register_command(Command(
    "bench-packed", help="per-instance SmartTrim padded vs packed: demo model and METER-base",
    description=__doc__.split("\n\n", 1)[1], configure=configure, run=run))
