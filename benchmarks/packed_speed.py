"""Padded against packed execution of ragged batches, on a timm ViT at published sizes
(random weights): each sample keeps its own share of the image tokens from one layer on,
so a batch's survivors differ per sample, as under a learned per-instance trimmer.

    python -m trimkit.benchmarks.packed_speed --model vit_base_patch16_224 --threads 2

prints, for batch 1 and a large batch, the median latency of the untrimmed model, of the
trimmed model run padded (``mode="compacted"``: the batch padded to its longest survivor)
and packed (``mode="packed"``), the speedups, and the FLOPs ratio (trimmed FLOPs spent in
packed form next to the FLOPs the padded form spends).
"""

from __future__ import annotations

import argparse
import statistics
import time

import timm
import torch

import trimkit
from trimkit.ops import drop_tokens
from trimkit.registry import RECIPES


class KeepShare(trimkit.TokenOp):
    """Keeps a per-sample share of the unprotected tokens (the largest norms), the share
    drawn once per sample index from ``shares``: a replay of per-instance decisions."""

    def __init__(self, shares: torch.Tensor):
        super().__init__()
        self.shares = shares

    def forward(self, state: trimkit.TokenState, site: trimkit.Site) -> trimkit.TokenState:
        b, n = state.keep.shape
        eligible = state.live & ~state.protected
        score = state.x.norm(dim=-1).masked_fill(~eligible, float("-inf"))
        rank = score.argsort(1, descending=True).argsort(1)
        share = self.shares[torch.arange(b) % len(self.shares)]
        k = (share * eligible.sum(1)).ceil().clamp_min(1).long()
        return drop_tokens(state, eligible & (rank >= k[:, None]))


class Replay(trimkit.Recipe):
    """`KeepShare` before one layer's attention."""

    name = "_replay"
    options = {"shares": trimkit.Option(None, "per-sample shares kept"),
               "layer": trimkit.Option(3, "the layer that drops")}

    def plan(self, desc: trimkit.ModelDescription, options: dict) -> dict:
        s = desc.stream()
        return {(s.name, options["layer"]): trimkit.SitePlan(pre=[KeepShare(options["shares"])])}


def _median_ms(model: torch.nn.Module, x: torch.Tensor, repeats: int) -> float:
    with torch.no_grad():
        model(x)
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            model(x)
            times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e3


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="vit_base_patch16_224")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 32])
    p.add_argument("--layer", type=int, default=3, help="the layer whose entry drops")
    p.add_argument("--mean-share", type=float, default=0.25,
                   help="mean share of tokens a sample keeps (exponentially spread; one "
                        "sample of each batch of 2 or more keeps everything)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    RECIPES[Replay.name] = Replay()
    g = torch.Generator().manual_seed(0)
    shares = torch.empty(max(args.batch_sizes)).exponential_(1 / args.mean_share,
                                                             generator=g).clamp(0.01, 1.0)
    shares[1] = 1.0  # in every batch of 2 or more, one sample keeps everything
    base = timm.create_model(args.model, pretrained=False).eval()
    trimmed = trimkit.apply(timm.create_model(args.model, pretrained=False).eval(),
                            Replay.name, shares=shares, layer=args.layer)
    trimmed.load_state_dict(base.state_dict(), strict=False)
    print(f"model {args.model}  drop at layer {args.layer}  mean share kept "
          f"{shares.mean():.2f}  threads {torch.get_num_threads()}  median of {args.repeats}")
    print("| batch | untrimmed ms | padded ms | packed ms | padded speedup | packed speedup "
          "| FLOPs ratio packed | FLOPs ratio padded |")
    print("|---|---|---|---|---|---|---|---|")
    for b in args.batch_sizes:
        x = torch.randn(b, 3, 224, 224, generator=g)
        full = trimkit.count_flops(base, x)
        row = {"untrimmed": _median_ms(base, x, args.repeats)}
        flops = {}
        for mode in ("compacted", "packed"):
            trimkit.set_mode(trimmed, mode)
            flops[mode] = trimkit.count_flops(trimmed, x)
            row[mode] = _median_ms(trimmed, x, args.repeats)
        u = row["untrimmed"]
        print(f"| {b} | {u:.1f} | {row['compacted']:.1f} | {row['packed']:.1f} "
              f"| {u / row['compacted']:.2f}× | {u / row['packed']:.2f}× "
              f"| {full / flops['packed']:.2f}× | {full / flops['compacted']:.2f}× |")


if __name__ == "__main__":
    main()
