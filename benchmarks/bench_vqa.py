"""``trimkit bench-vqa``: SmartTrim and PuMer end to end on real data (easy-VQA), and speed.

1. A small METER (pretrained MiniLM text encoder, frozen, its features cached per question;
   a small CLIP-style ViT; co-attention fusion layers) is trained on the easy-VQA train
   split to a strong baseline and cached (`trimkit.benchmarks.easy_vqa`).
2. For each target cost ratio, SmartTrim is applied to a copy and fine-tuned with
   `trimkit.train` (self-distillation from the untrimmed pass, cost loss, curriculum);
   each fine-tuned model is cached too.
3. On the test split: accuracy, GFLOPs per example (FLOPs counter at batch 1, trimmers
   included, the frozen text encoder's cached features excluded on both sides), the
   FLOPs ratio against the target, live tokens and heads per layer, the spread of live
   image tokens per example, and the measured speedup at batch 1 (a run of single
   examples) and at batch 32, trimmed against untrimmed in one process.
4. PuMer (text-informed pruning and modality-aware merging, fixed counts per layer) on the
   same baseline: as is (no training) and fine-tuned with the reducers on and KL from the
   untrimmed model, same steps and learning rate; the same columns.
5. ``meter-base`` at the published sizes (random weights) with the trimmers in fixed-budget
   mode, keeping per layer the fractions of tokens and heads the trained small model kept:
   FLOPs ratio and measured speedup at batches 32 and 1.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import math
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

import trimkit
from trimkit.learned import param_groups
from trimkit.registry import Command, register_command
from trimkit.tools.bench import time_pair

#: image tokens only: a question is about 9 tokens, so trimming them saves little compute
#: (the image stream holds most of it) and costs accuracy; heads are gated in both streams
SMARTTRIM = dict(lambda_cost=1000.0, warmup=0.5, init_logit=3.0, tokens=["image"])
FINE_TUNE = dict(steps=400, batch_size=64, lr=2e-4, trimmer_lr=3e-3, threshold_lr=3e-2)
#: PuMer's published VQA ratios, at its default placement (both fusion layers here)
PUMER: dict = dict(prune_ratio=0.2, image_merge_ratio=0.2, text_merge_ratio=0.2)
#: the frozen MiniLM's weights, loaded from their package rather than saved with a model
_FROZEN = "text_transformer."
#: bump when the trimmers' architecture changes, so cached fine-tunes are not reused
_VERSION = 4


def smarttrim_options(desc: trimkit.ModelDescription) -> dict:
    """`SMARTTRIM` at the recipe's default placement: on this METER every image layer after
    the first CLIP block and every text layer (the frozen MiniLM's too, which never run
    here: the text features are cached, so the text stream starts at the fusion stack)."""
    return dict(SMARTTRIM)


def _say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------ data


class _Questions(torch.utils.data.Dataset):
    """Questions of a split as (image, text features, text mask, label) examples."""

    def __init__(self, split: Any, feats: torch.Tensor, mask: torch.Tensor):
        self.split, self.feats, self.mask = split, feats, mask

    def __len__(self) -> int:
        return len(self.split.labels)

    def __getitem__(self, i: int):
        s = self.split
        q = int(s.question_index[i])
        return (s.images[int(s.image_index[i])], self.feats[q], self.mask[q],
                int(s.labels[i]))


def _forward(model: nn.Module, batch) -> torch.Tensor:
    images, feats, mask = batch[:3]
    return model(images, attention_mask=mask, text_embeds=feats)


def _loss(out: torch.Tensor, batch) -> torch.Tensor:
    return F.cross_entropy(out, batch[-1])


# ------------------------------------------------------------------------------ stages


def weights_digest(model: nn.Module) -> str:
    """A short hash of ``model``'s weights (the frozen MiniLM left out), so a fine-tune is
    reused only on the baseline it started from."""
    h = hashlib.sha1()
    for k, v in sorted(model.state_dict().items()):
        if not k.startswith(_FROZEN):
            h.update(k.encode())
            h.update(v.detach().contiguous().cpu().numpy().tobytes())
    return h.hexdigest()[:12]


def _fine_tune(base: nn.Module, target: float | None, train_set, cache: Path, cfg: dict,
               options: dict, recipe: str = "smarttrim", *, tag: str | None = None,
               shipped: Path | None = None, out: Path | None = None
               ) -> tuple[nn.Module, dict]:
    """``recipe`` (SmartTrim at ``target``, or PuMer) fine-tuned from ``base`` with
    `trimkit.train` and the recipe's own objective, cached by its settings (and ``tag``,
    e.g. the baseline's `weights_digest`, when given). ``shipped``: a checkpoint to load
    first when it was made with the same settings; ``out``: where to save (default: the
    cache). ``cfg["mixed_precision"]`` (e.g. ``"bf16"``) trains under autocast."""
    if recipe == "smarttrim":
        key_of: list = [_VERSION, target, cfg, options, base.config.__repr__()]
        name, extra = f"smarttrim {target:g}", dict(ratio=target)
    else:
        key_of = [_VERSION, recipe, cfg, options, base.config.__repr__()]
        name, extra = recipe, {}
    if tag is not None:
        key_of.append(tag)
    key = hashlib.sha1(json.dumps(key_of, sort_keys=True, default=str).encode()).hexdigest()[:12]
    path = out if out is not None else cache / f"{name.replace(' ', '_')}_{key}.pt"
    model = trimkit.apply(copy.deepcopy(base), recipe, **extra, **options)
    for candidate in ([shipped] if shipped is not None else []) + [path]:
        if not candidate.exists():
            continue
        saved = torch.load(candidate, weights_only=False)
        if saved.get("key", key) != key:  # cache files are named by their key
            _say(f"{name}: {candidate} was fine-tuned with other settings; skipped")
            continue
        # the frozen MiniLM is not saved: it comes from its package, as in the baseline
        missing, unexpected = model.load_state_dict(saved["state_dict"], strict=False)
        if unexpected or any(not k.startswith(_FROZEN) for k in missing):
            raise RuntimeError(f"{candidate} does not fit the model: missing {missing}, "
                               f"unexpected {unexpected}")
        _say(f"{name}: loaded the fine-tuned model from {candidate}")
        return model.eval(), {**saved["info"], "path": str(candidate)}
    # smarttrim says how much faster its thresholds train (preset="paper": no faster)
    scale = trimkit.api._applied(model).options.get(
        "threshold_scale", cfg["threshold_lr"] / cfg["trimmer_lr"])
    opt = torch.optim.AdamW(param_groups(model, cfg["lr"], trimmer_lr=cfg["trimmer_lr"],
                                         threshold_lr=scale * cfg["trimmer_lr"]))
    loader = torch.utils.data.DataLoader(train_set, batch_size=cfg["batch_size"], shuffle=True,
                                         drop_last=True)
    t0 = time.perf_counter()
    res = trimkit.train(model, loader, _loss, forward=_forward, steps=cfg["steps"],
                        optimizer=opt, lr_schedule="cosine", seed=0, cpu=True, log_every=10,
                        mixed_precision=cfg.get("mixed_precision", "no"))
    info = {"train_seconds": time.perf_counter() - t0, "steps": cfg["steps"],
            "threads": torch.get_num_threads(),
            "last": res.history[-1] if res.history else {}}
    model.eval()
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v for k, v in model.state_dict().items() if not k.startswith(_FROZEN)}
    torch.save({"state_dict": state, "info": info, "key": key}, path)
    return model, {**info, "path": str(path)}


@torch.no_grad()
def _test_pass(model: nn.Module, test_set, batch_size: int = 256) -> dict:
    """Accuracy and per-example live counts over the test split (compacted execution)."""
    loader = torch.utils.data.DataLoader(test_set, batch_size=batch_size)
    correct, total = 0, 0
    tokens: dict[tuple[str, int], list[torch.Tensor]] = {}
    heads: dict[tuple[str, int], list[torch.Tensor]] = {}
    applied = trimkit.is_applied(model)
    for batch in loader:
        out = _forward(model, batch)
        correct += int((out.argmax(-1) == batch[-1]).sum())
        total += len(batch[-1])
        if applied:
            for s in trimkit.last_stats(model).layers:
                tokens.setdefault((s.stream, s.layer), []).append(s.tokens_in)
                h = s.heads if isinstance(s.heads, torch.Tensor) else torch.full_like(
                    s.tokens_in, s.heads)
                heads.setdefault((s.stream, s.layer), []).append(h)
    return {"accuracy": correct / total,
            "tokens": {k: torch.cat(v).float() for k, v in tokens.items()},
            "heads": {k: torch.cat(v).float() for k, v in heads.items()}}


def _flops_per_example(model: nn.Module, test_set, n: int) -> list[float]:
    out = []
    for i in range(n):
        images, feats, mask, _ = test_set[i * (len(test_set) // n)]
        out.append(trimkit.count_flops(model, images[None], attention_mask=mask[None],
                                       text_embeds=feats[None]))
    return out


def _speed(base: nn.Module, trim: nn.Module, test_set, repeats: int) -> dict[int, float]:
    """Speedup at batch 1 (a run of 32 single examples) and at batch 32."""
    examples = [test_set[i] for i in range(32)]

    def call(model):
        return lambda images, mask, feats: model(images, attention_mask=mask, text_embeds=feats)

    singles = [(e[0][None], e[2][None], e[1][None]) for e in examples]
    batch = (torch.stack([e[0] for e in examples]), torch.stack([e[2] for e in examples]),
             torch.stack([e[1] for e in examples]))
    out = {}
    for bs, inputs in ((1, singles), (32, batch)):
        tb, tt = time_pair(call(base), call(trim), inputs, warmup=1, repeats=repeats)
        out[bs] = statistics.median(tb) / statistics.median(tt)
    return out


def _segments(layers) -> list[list[int]]:
    """A stream's layer indices split into its leading run of single-modality layers (an
    encoder) and the rest (the cross-modal stack)."""
    own = [i for i, lay in enumerate(layers) if not lay.cross_attention]
    cross = [i for i, lay in enumerate(layers) if lay.cross_attention]
    return [own, cross]


def _budget_from(res: dict, entry: dict[str, float], desc_small, desc_base) -> dict:
    """Fixed-budget fractions for ``meter-base``: per layer, the share of the stream's entry
    tokens and of the heads that the trained small model kept at the same relative depth
    of the same segment (encoder or fusion stack), as (fraction of the tokens left, fraction
    of the heads)."""
    budget = {}
    for stream, small_desc in desc_small.streams.items():
        big_desc = desc_base.streams[stream]
        prev = 1.0
        for small, big in zip(_segments(small_desc.layers), _segments(big_desc.layers),
                              strict=True):
            if not small or not big or any((stream, i) not in res["tokens"] for i in small):
                continue  # a segment that did not run (the text encoder, features cached)
            toks = [res["tokens"][(stream, i)].mean().item() / entry[stream] for i in small]
            heads = [res["heads"][(stream, i)].mean().item()
                     / small_desc.layers[i].num_heads for i in small]
            for j, i in enumerate(big):
                pos = j * (len(small) - 1) / max(len(big) - 1, 1)
                lo, hi = math.floor(pos), math.ceil(pos)
                w = pos - lo
                frac = min(toks[lo] * (1 - w) + toks[hi] * w, prev)
                head = heads[lo] * (1 - w) + heads[hi] * w
                if frac < 0.999 * prev or head < 0.999:
                    budget[(stream, i)] = (max(frac / prev, 1e-3), max(min(head, 1.0), 1e-3))
                prev = frac
    return budget


def _meter_base(budget: dict, repeats: int) -> list[dict]:
    from trimkit.adapters.meter import METER, meter_base

    torch.manual_seed(0)
    base = METER(meter_base()).eval()
    trim = trimkit.apply(copy.deepcopy(base), "smarttrim", budget=budget)
    rows = []
    for bs in (32, 1):
        g = torch.Generator().manual_seed(bs)
        cfg = base.config
        inputs = (torch.randn(bs, 3, cfg.image_size, cfg.image_size, generator=g),
                  torch.randint(3, cfg.vocab_size, (bs, 40), generator=g),
                  torch.ones(bs, 40, dtype=torch.long))
        fb = trimkit.count_flops(base, *inputs) / bs
        ft = trimkit.count_flops(trim, *inputs) / bs
        _say(f"meter-base batch {bs}: timing ({repeats} repeats)")
        tb, tt = time_pair(base, trim, inputs, warmup=1, repeats=repeats)
        speed = statistics.median(tb) / statistics.median(tt)
        rows.append(dict(batch=bs, gflops_base=fb / 1e9, gflops_trim=ft / 1e9,
                         flops_ratio=fb / ft, speedup=speed, efficiency=speed / (fb / ft)))
    return rows


# ------------------------------------------------------------------------------ report


def _fmt_layers(values: dict, stream: str) -> str:
    keys = sorted(k for k in values if k[0] == stream)
    return " ".join(f"{values[k].mean().item():.1f}" for k in keys)


def run(args: argparse.Namespace) -> int:
    from . import easy_vqa

    if args.threads:
        torch.set_num_threads(args.threads)
    cache = Path(args.cache_dir) if args.cache_dir else easy_vqa.default_cache_dir()
    if args.baseline_epochs:  # part of the baseline's cache key
        easy_vqa.BASELINE = dict(easy_vqa.BASELINE, epochs=args.baseline_epochs)
    start = time.perf_counter()
    base, info = easy_vqa.train_baseline(cache, log=_say)
    train, test = easy_vqa.load_split("train", cache), easy_vqa.load_split("test", cache)
    train_set = _Questions(train, *easy_vqa.text_features(train.questions, cache))
    test_set = _Questions(test, *easy_vqa.text_features(test.questions, cache))
    desc = trimkit.describe(base)
    entry = {"image": float(desc.streams["image"].num_tokens),
             "text": test_set.mask.float().sum(1)[test.question_index].mean().item()}
    smart = smarttrim_options(desc)

    cfg = dict(FINE_TUNE, steps=args.steps)
    base_pass = _test_pass(base, test_set)
    base_flops = _flops_per_example(base, test_set, args.flops_examples)
    rows = [dict(model="untrimmed", target=1.0, accuracy=base_pass["accuracy"],
                 gflops=statistics.mean(base_flops) / 1e9, ratio=1.0)]
    trimmed = {}

    def measure(label: str, target: float | None, model: nn.Module, tinfo: dict) -> dict:
        res = _test_pass(model, test_set)
        flops = _flops_per_example(model, test_set, args.flops_examples)
        ratio = statistics.mean(flops) / statistics.mean(base_flops)
        _say(f"{label}: test accuracy {res['accuracy']:.2%}, FLOPs ratio {ratio:.3f}; timing")
        speed = _speed(base, model, test_set, args.repeats)
        last = res["tokens"][max(k for k in res["tokens"] if k[0] == "image")]
        rows.append(dict(
            model=label, target=target, accuracy=res["accuracy"],
            gflops=statistics.mean(flops) / 1e9, ratio=ratio, speedup_1=speed[1],
            speedup_32=speed[32], image_tokens=_fmt_layers(res["tokens"], "image"),
            text_tokens=_fmt_layers(res["tokens"], "text"),
            image_heads=_fmt_layers(res["heads"], "image"),
            text_heads=_fmt_layers(res["heads"], "text"),
            spread=f"{last.mean():.1f} ± {last.std():.1f} ({int(last.min())}–{int(last.max())})",
            train_seconds=tinfo.get("train_seconds")))
        return res

    for target in args.targets:
        model, tinfo = _fine_tune(base, target, train_set, cache, cfg, smart)
        trimmed[target] = measure("smarttrim", target, model, tinfo)
    if not args.no_pumer:
        measure("pumer, no training", None,
                trimkit.apply(copy.deepcopy(base), "pumer", **PUMER).eval(), {})
        model, tinfo = _fine_tune(base, None, train_set, cache, cfg, PUMER, recipe="pumer")
        measure("pumer, fine-tuned", None, model, tinfo)
    print(_table(rows, info))

    if not args.no_meter_base and trimmed:
        from trimkit.adapters.meter import METER, meter_base

        target = min(trimmed)
        budget = _budget_from(trimmed[target], entry, desc,
                              trimkit.describe(METER(meter_base())))
        mrows = _meter_base(budget, max(1, args.repeats // 2))
        print()
        print(f"meter-base (published sizes, random weights), fixed budget: per layer the "
              f"fractions of tokens and heads the target-{target:g} model kept")
        print("| batch | GFLOPs base | GFLOPs trim | FLOPs ratio | speedup | efficiency |")
        print("|---|---|---|---|---|---|")
        for r in mrows:
            print(f"| {r['batch']} | {r['gflops_base']:.2f} | {r['gflops_trim']:.2f} | "
                  f"{r['flops_ratio']:.3f}× | {r['speedup']:.3f}× | {r['efficiency']:.1%} |")
    _say(f"bench-vqa finished in {(time.perf_counter() - start) / 60:.1f} min")
    return 0


def _fmt_target(target: float | None) -> str:
    return "–" if target is None else f"{target:g}"


def _table(rows: list[dict], info: dict) -> str:
    lines = ["| model | target | test acc | GFLOPs/ex | FLOPs ratio | speedup b1 | speedup b32 "
             "| image tokens per layer | text tokens per layer | image heads | text heads "
             "| live image tokens per example (last layer) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(
            f"| {r['model']} | {_fmt_target(r['target'])} | {r['accuracy']:.2%} | "
            f"{r['gflops']:.4f} | "
            f"{r['ratio']:.3f} | {r.get('speedup_1', 1.0):.2f}× | {r.get('speedup_32', 1.0):.2f}× "
            f"| {r.get('image_tokens', '')} | {r.get('text_tokens', '')} | "
            f"{r.get('image_heads', '')} | {r.get('text_heads', '')} | {r.get('spread', '')} |")
    return "\n".join(lines)


def configure(p: argparse.ArgumentParser) -> None:
    p.add_argument("--targets", type=float, nargs="+", default=[0.5, 0.33],
                   help="target cost ratios to fine-tune (default: 0.5 0.33)")
    p.add_argument("--steps", type=int, default=FINE_TUNE["steps"],
                   help=f"fine-tuning steps per target (default: {FINE_TUNE['steps']})")
    p.add_argument("--baseline-epochs", type=int, default=None,
                   help="epochs of the baseline (default: the tuned setting; fewer for a "
                        "quick check of the pipeline)")
    p.add_argument("--flops-examples", type=int, default=200,
                   help="test examples whose FLOPs are counted one by one (default: 200)")
    p.add_argument("--repeats", type=int, default=5, help="timed runs of each (default: 5)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--cache-dir", default=None,
                   help="where the baseline, text features and fine-tuned models are cached "
                        "(default: $TRIMKIT_CACHE or ~/.cache/trimkit/easy_vqa)")
    p.add_argument("--no-pumer", action="store_true",
                   help="skip the PuMer rows (as is, and fine-tuned)")
    p.add_argument("--no-meter-base", action="store_true",
                   help="skip the fixed-budget measurement on meter-base")


register_command(Command(
    "bench-vqa", help="SmartTrim and PuMer on easy-VQA: accuracy, FLOPs and speed, end to end",
    description=__doc__.split("\n\n", 1)[1], configure=configure, run=run, epilog="""\
examples:
  trimkit bench-vqa                               # baseline, SmartTrim 0.5 and 0.33, PuMer
  trimkit bench-vqa --targets 0.5 --no-pumer --no-meter-base
  trimkit bench-vqa --steps 100 --baseline-epochs 1   # a quick check of the pipeline"""))
